//! The job state machine. Every status change is checked against [`JobStatus::next`] by
//! `service::transition::change_status`, the one function that writes a job's status.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Draft,
    Configured,
    Queued,
    Provisioning,
    Training,
    /// An attempt ended by a spot interruption; waiting to resume from a checkpoint.
    Interrupted,
    Completed,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("job is {from}; it cannot become {to}")]
pub struct IllegalTransition {
    pub from: JobStatus,
    pub to: JobStatus,
}

impl JobStatus {
    pub const ALL: [JobStatus; 9] = [
        JobStatus::Draft,
        JobStatus::Configured,
        JobStatus::Queued,
        JobStatus::Provisioning,
        JobStatus::Training,
        JobStatus::Interrupted,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Draft => "draft",
            JobStatus::Configured => "configured",
            JobStatus::Queued => "queued",
            JobStatus::Provisioning => "provisioning",
            JobStatus::Training => "training",
            JobStatus::Interrupted => "interrupted",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    /// The statuses a job may move to from this one.
    pub fn next(self) -> &'static [JobStatus] {
        use JobStatus::*;
        match self {
            Draft => &[Configured, Cancelled],
            Configured => &[Configured, Queued, Cancelled],
            Queued => &[Provisioning, Cancelled],
            Provisioning => &[Training, Queued, Interrupted, Failed, Cancelled],
            Training => &[Completed, Queued, Interrupted, Failed, Cancelled],
            Interrupted => &[Queued, Failed, Cancelled],
            Failed => &[Queued],
            Completed | Cancelled => &[],
        }
    }

    pub fn check(self, to: JobStatus) -> Result<(), IllegalTransition> {
        if self.next().contains(&to) {
            Ok(())
        } else {
            Err(IllegalTransition { from: self, to })
        }
    }

    /// A job in one of these holds its training file: the file cannot be deleted.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            JobStatus::Queued
                | JobStatus::Provisioning
                | JobStatus::Training
                | JobStatus::Interrupted
        )
    }

    pub fn is_terminal(self) -> bool {
        self.next().is_empty()
    }

    /// Nothing will change this job on its own any more: it is terminal, or failed (only a
    /// person's resume moves it on).
    pub fn is_settled(self) -> bool {
        self.is_terminal() || self == JobStatus::Failed
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| format!("unknown job status {s:?}"))
    }
}

super::vocabulary::sql_text!(JobStatus);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_lead_nowhere() {
        for status in JobStatus::ALL {
            assert_eq!(
                status.is_terminal(),
                matches!(status, JobStatus::Completed | JobStatus::Cancelled)
            );
        }
    }

    #[test]
    fn a_draft_cannot_be_started() {
        let error = JobStatus::Draft
            .check(JobStatus::Queued)
            .expect_err("illegal");
        assert_eq!(error.to_string(), "job is draft; it cannot become queued");
    }

    #[test]
    fn round_trips_through_text() {
        for status in JobStatus::ALL {
            assert_eq!(status.as_str().parse::<JobStatus>(), Ok(status));
        }
    }
}
