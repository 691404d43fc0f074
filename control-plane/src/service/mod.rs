//! The operations of the control plane, called alike by the JSON API (`http/`), the
//! dashboard (`web/`), the agent protocol and the CLI. They take the acting user and
//! domain values, enforce every rule, and return domain values or a [`ServiceError`].
//!
//! A job's status changes in one place: [`transition::change_status`].

use std::sync::Arc;

use crate::configuration::Settings;
use crate::db::report_writer::ReportWriter;
use crate::db::Db;
use crate::domain::GpuCatalog;
use crate::enrichment::Enricher;
use crate::live::LiveUpdates;
use crate::storage::ArtifactStore;
use crate::telemetry::Metrics;

pub mod account;
pub mod artifact;
pub mod budget;
pub mod budget_request;
pub mod cost;
mod error;
pub mod estimate;
pub mod feed;
pub mod file;
pub mod fleet;
pub mod job;
pub mod judge;
pub mod metric_history;
pub mod preset;
pub mod recovery;
pub mod scheduler;
pub mod template;
pub mod transition;
pub mod validation;
pub mod validation_report;

pub use account::CurrentUser;
pub use error::{ServiceError, ServiceResult};

use crate::domain::FieldError;

#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    /// Commits agents' report batches (grouped on SQLite).
    pub reports: ReportWriter,
    pub settings: Arc<Settings>,
    pub catalog: Arc<GpuCatalog>,
    pub live: LiveUpdates,
    pub enricher: Enricher,
    pub login_limiter: Arc<account::LoginLimiter>,
    pub metrics: Arc<Metrics>,
    pub artifacts: ArtifactStore,
    /// Signs download links; shared by every replica through the database.
    pub signing_key: Arc<str>,
    /// Wakes claims waiting for work when a job is queued on this replica.
    pub work_available: Arc<tokio::sync::Notify>,
    pub known_agents: Arc<fleet::KnownAgents>,
    pub running_attempts: Arc<fleet::RunningAttempts>,
}

pub const MAX_PAGE_SIZE: i64 = 500;

/// `(limit, offset)` of a page, `limit` defaulting to `default`; field errors otherwise.
pub fn page_bounds(
    limit: Option<i64>,
    offset: Option<i64>,
    default: i64,
) -> ServiceResult<(i64, i64)> {
    let limit = limit.unwrap_or(default);
    let offset = offset.unwrap_or(0);
    let mut errors = Vec::new();
    if !(1..=MAX_PAGE_SIZE).contains(&limit) {
        errors.push(FieldError::new(
            "limit",
            format!("must be between 1 and {MAX_PAGE_SIZE}"),
        ));
    }
    if offset < 0 {
        errors.push(FieldError::new("offset", "must not be negative"));
    }
    if errors.is_empty() {
        Ok((limit, offset))
    } else {
        Err(ServiceError::Validation(errors))
    }
}

pub fn one_of(field: &str, value: &str, allowed: &[&str]) -> ServiceResult<()> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(ServiceError::Validation(vec![FieldError::new(
            field,
            format!("must be one of {}", allowed.join(", ")),
        )]))
    }
}
