//! Budgets (spec §4.2.11): the period a budget renews over and its window at a moment,
//! what happens at its cap, whose jobs it counts, and the attribution jobs carry.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use serde_json::{Map, Value};

use super::vocabulary::vocabulary;
use super::FieldError;

vocabulary!(
    /// How often a budget starts over. Periods are calendar periods in UTC: a day, a week
    /// from Monday, a month, a quarter, a year.
    BudgetPeriod, "budget period" {
        Daily = "daily",
        Weekly = "weekly",
        Monthly = "monthly",
        Quarterly = "quarterly",
        Annual = "annual",
    }
);

vocabulary!(
    /// What a budget does at its cap.
    Enforcement, "enforcement" {
        /// Alerts only.
        None = "none",
        /// A job whose estimate exceeds what is left may not start.
        BlockStart = "block_start",
        /// A running job that takes the budget past its amount is stopped.
        StopAtCap = "stop_at_cap",
    }
);

vocabulary!(
    /// Where a budget increase request stands.
    RequestStatus, "request status" {
        Pending = "pending",
        /// The budget's amount became the one asked for.
        Approved = "approved",
        Denied = "denied",
    }
);

vocabulary!(
    /// Whose jobs a budget counts.
    BudgetScope, "budget scope" {
        /// Its owner's jobs (matching its filters).
        Personal = "personal",
        /// Every user's jobs of its team, project or cost center; kept by admins.
        Shared = "shared",
    }
);

impl BudgetPeriod {
    /// The period holding `at`: its first instant and the first instant after it.
    pub fn window(self, at: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        let day = at.date_naive();
        let (start, end) = match self {
            BudgetPeriod::Daily => (day, day + Duration::days(1)),
            BudgetPeriod::Weekly => {
                let monday = day - Duration::days(i64::from(day.weekday().num_days_from_monday()));
                (monday, monday + Duration::days(7))
            }
            BudgetPeriod::Monthly => {
                let first = first_of(day.year(), day.month());
                (first, add_months(first, 1))
            }
            BudgetPeriod::Quarterly => {
                let first = first_of(day.year(), (day.month() - 1) / 3 * 3 + 1);
                (first, add_months(first, 3))
            }
            BudgetPeriod::Annual => {
                let first = first_of(day.year(), 1);
                (first, add_months(first, 12))
            }
        };
        (midnight(start), midnight(end))
    }
}

fn first_of(year: i32, month: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(year, month, 1).unwrap_or(NaiveDate::MIN)
}

fn add_months(first: NaiveDate, months: u32) -> NaiveDate {
    first
        .checked_add_months(chrono::Months::new(months))
        .unwrap_or(NaiveDate::MAX)
}

fn midnight(day: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&day.and_time(chrono::NaiveTime::MIN))
}

/// Most characters of a team, project or cost center name.
const MAX_NAME: usize = 100;
/// Most tags on a job, and most characters of a tag's key or value.
const MAX_TAGS: usize = 20;
const MAX_TAG_TEXT: usize = 100;

/// Who a job's spend is charged to (spec §4.2.10): each field optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attribution {
    pub team: Option<String>,
    pub project: Option<String>,
    pub cost_center: Option<String>,
    /// Free-form key → value labels, such as {"experiment": "lr-sweep"}.
    pub tags: Option<Map<String, Value>>,
}

impl Attribution {
    /// Parses the optional attribution fields of a request; blank names are absent.
    /// Every bad field is reported under `prefix` + its name.
    pub fn parse(
        team: Option<&str>,
        project: Option<&str>,
        cost_center: Option<&str>,
        tags: Option<&Map<String, Value>>,
        errors: &mut Vec<FieldError>,
    ) -> Attribution {
        let mut name = |field: &str, value: Option<&str>| {
            let value = value.map(str::trim).filter(|v| !v.is_empty())?;
            if value.chars().count() > MAX_NAME || value.chars().any(char::is_control) {
                errors.push(FieldError::new(
                    field,
                    format!("must be at most {MAX_NAME} printable characters"),
                ));
                return None;
            }
            Some(value.to_owned())
        };
        let team = name("team", team);
        let project = name("project", project);
        let cost_center = name("cost_center", cost_center);
        let tags = tags.filter(|tags| !tags.is_empty()).and_then(|tags| {
            let before = errors.len();
            if tags.len() > MAX_TAGS {
                errors.push(FieldError::new("tags", format!("at most {MAX_TAGS} tags")));
            }
            for (key, value) in tags {
                let fits = |text: &str| {
                    !text.is_empty()
                        && text.chars().count() <= MAX_TAG_TEXT
                        && !text.chars().any(char::is_control)
                };
                if !fits(key) || !value.as_str().is_some_and(fits) {
                    errors.push(FieldError::new(
                        format!("tags.{key}"),
                        format!("tags are strings of 1 to {MAX_TAG_TEXT} printable characters"),
                    ));
                }
            }
            (errors.len() == before).then(|| tags.clone())
        });
        Attribution {
            team,
            project,
            cost_center,
            tags,
        }
    }

    /// This attribution with `defaults` filling the fields it leaves empty.
    pub fn or(self, defaults: &Attribution) -> Attribution {
        Attribution {
            team: self.team.or_else(|| defaults.team.clone()),
            project: self.project.or_else(|| defaults.project.clone()),
            cost_center: self.cost_center.or_else(|| defaults.cost_center.clone()),
            tags: self.tags.or_else(|| defaults.tags.clone()),
        }
    }
}

/// "team research, project tone": the attribution fields that are set, for people.
pub fn describe_attribution(
    team: Option<&str>,
    project: Option<&str>,
    cost_center: Option<&str>,
) -> String {
    [
        ("team", team),
        ("project", project),
        ("cost center", cost_center),
    ]
    .into_iter()
    .filter_map(|(label, value)| value.map(|v| format!("{label} {v}")))
    .collect::<Vec<_>>()
    .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().expect("timestamp")
    }

    #[test]
    fn windows_are_calendar_periods_in_utc() {
        let thursday = at("2026-12-03T15:04:05Z");
        let cases = [
            (
                BudgetPeriod::Daily,
                "2026-12-03T00:00:00Z",
                "2026-12-04T00:00:00Z",
            ),
            (
                BudgetPeriod::Weekly,
                "2026-11-30T00:00:00Z",
                "2026-12-07T00:00:00Z",
            ),
            (
                BudgetPeriod::Monthly,
                "2026-12-01T00:00:00Z",
                "2027-01-01T00:00:00Z",
            ),
            (
                BudgetPeriod::Quarterly,
                "2026-10-01T00:00:00Z",
                "2027-01-01T00:00:00Z",
            ),
            (
                BudgetPeriod::Annual,
                "2026-01-01T00:00:00Z",
                "2027-01-01T00:00:00Z",
            ),
        ];
        for (period, start, end) in cases {
            assert_eq!(period.window(thursday), (at(start), at(end)), "{period}");
        }
        // A period's first instant belongs to it.
        let monday = at("2026-11-30T00:00:00Z");
        assert_eq!(BudgetPeriod::Weekly.window(monday).0, monday);
        assert_eq!(
            BudgetPeriod::Quarterly.window(at("2026-03-31T23:59:59Z")).1,
            at("2026-04-01T00:00:00Z")
        );
    }

    #[test]
    fn attribution_names_each_bad_field_and_drops_blanks() {
        let mut errors = Vec::new();
        let tags: Map<String, Value> =
            serde_json::from_str(r#"{"ok": "yes", "n": 5}"#).expect("tags");
        let long = "x".repeat(101);
        let parsed = Attribution::parse(
            Some("  "),
            Some(&long),
            Some("cc-1"),
            Some(&tags),
            &mut errors,
        );
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["project", "tags.n"]);
        assert_eq!(parsed.team, None);
        assert_eq!(parsed.cost_center.as_deref(), Some("cc-1"));
        assert_eq!(parsed.tags, None);

        let defaults = Attribution {
            team: Some("research".into()),
            project: Some("p".into()),
            ..Attribution::default()
        };
        let mut errors = Vec::new();
        let own = Attribution::parse(None, Some("mine"), None, None, &mut errors).or(&defaults);
        assert!(errors.is_empty());
        assert_eq!(own.team.as_deref(), Some("research"));
        assert_eq!(own.project.as_deref(), Some("mine"));
    }
}
