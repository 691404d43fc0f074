//! What every page shares: the frame (who is signed in, where they are) and the way
//! figures read: times ago, money, durations.

use chrono::{DateTime, Utc};

use super::PageUser;
use crate::db::jobs::Viewer;
use crate::db::now;

pub type PageResult = Result<axum::response::Response, super::PageError>;

/// What every page's frame shows: who is signed in and where they are.
pub struct Frame {
    pub email: String,
    pub sees_fleet: bool,
    pub section: &'static str,
    /// (label, link) from Home to the page.
    pub breadcrumbs: Vec<(String, String)>,
    /// Budgets past an alert threshold this period, one line each: every page shows them
    /// (pages with live figures put those in their place).
    pub budget_alerts: Vec<String>,
}

impl Frame {
    pub fn new(user: &PageUser, section: &'static str, breadcrumbs: &[(&str, &str)]) -> Frame {
        Frame {
            email: user.0 .0.email.clone(),
            sees_fleet: user.0 .0.role().sees_everything(),
            section,
            breadcrumbs: breadcrumbs
                .iter()
                .map(|(label, link)| (label.to_string(), link.to_string()))
                .collect(),
            budget_alerts: user.1.clone(),
        }
    }
}

pub fn viewer(user: &PageUser) -> Viewer {
    user.0.viewer()
}

/// "3 min ago", "2 h ago", or the date.
pub fn ago(at: &DateTime<Utc>) -> String {
    let seconds = (now() - *at).num_seconds().max(0);
    match seconds {
        0..60 => format!("{seconds} s ago"),
        60..3600 => format!("{} min ago", seconds / 60),
        3600..86_400 => format!("{} h ago", seconds / 3600),
        _ => at.format("%Y-%m-%d").to_string(),
    }
}

/// Dollars with cents; an empty sum (-0.0 in Rust) shows as $0.00.
pub fn money(amount: f64) -> String {
    format!("${:.2}", amount + 0.0)
}

pub fn duration(seconds: i64) -> String {
    match seconds {
        ..60 => format!("{} s", seconds.max(0)),
        60..3600 => format!("{} min {} s", seconds / 60, seconds % 60),
        _ => format!("{} h {} min", seconds / 3600, seconds % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_sum_of_money_is_zero_not_negative() {
        let nothing: f64 = std::iter::empty::<f64>().sum();
        assert_eq!(money(nothing), "$0.00");
        assert_eq!(money(12.345), "$12.35");
    }
}
