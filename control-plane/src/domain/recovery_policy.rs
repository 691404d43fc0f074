//! A job's recovery policy: how many failed attempts are retried on their own, how many
//! spot interruptions resume on their own, and whether they resume at all.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::FieldError;

/// The most retries or interruptions a policy may allow.
pub const MAX_BUDGET: i64 = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RecoveryPolicy {
    /// Failed attempts retried automatically (from the latest checkpoint), 0 to 20.
    pub max_retries: u32,
    /// Interruptions (spot notices, lost agents) resumed automatically, 0 to 20.
    pub max_interruptions: u32,
    /// Off: every interruption leaves the job `interrupted` until someone resumes it.
    pub auto_resume: bool,
}

impl Default for RecoveryPolicy {
    fn default() -> Self {
        RecoveryPolicy {
            max_retries: 3,
            max_interruptions: 5,
            auto_resume: true,
        }
    }
}

const FIELDS: [&str; 3] = ["max_retries", "max_interruptions", "auto_resume"];

impl RecoveryPolicy {
    /// `base` with the fields of `overrides` applied; every bad field is reported, named
    /// `recovery.<field>`.
    pub fn resolve(
        base: RecoveryPolicy,
        overrides: &Map<String, Value>,
    ) -> Result<RecoveryPolicy, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut policy = base;
        for (key, value) in overrides {
            let field = format!("recovery.{key}");
            match key.as_str() {
                "max_retries" | "max_interruptions" => match value.as_i64() {
                    Some(n) if (0..=MAX_BUDGET).contains(&n) => {
                        if key == "max_retries" {
                            policy.max_retries = n as u32;
                        } else {
                            policy.max_interruptions = n as u32;
                        }
                    }
                    Some(_) => errors.push(FieldError::new(
                        field,
                        format!("must be between 0 and {MAX_BUDGET}"),
                    )),
                    None => errors.push(FieldError::new(field, "must be a whole number")),
                },
                "auto_resume" => match value.as_bool() {
                    Some(on) => policy.auto_resume = on,
                    None => errors.push(FieldError::new(field, "must be true or false")),
                },
                _ => errors.push(FieldError::new(
                    field,
                    format!("unknown recovery setting; known: {}", FIELDS.join(", ")),
                )),
            }
        }
        if errors.is_empty() {
            Ok(policy)
        } else {
            Err(errors)
        }
    }

    /// Whether the interruption that brings the count to `interruptions` resumes on its own.
    pub fn resumes_interruption(&self, interruptions: i64) -> bool {
        self.auto_resume && interruptions <= i64::from(self.max_interruptions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn overrides(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn fields_override_the_base() {
        let policy = RecoveryPolicy::resolve(
            RecoveryPolicy::default(),
            &overrides(json!({"max_retries": 0, "auto_resume": false})),
        )
        .expect("valid");
        assert_eq!(
            policy,
            RecoveryPolicy {
                max_retries: 0,
                max_interruptions: 5,
                auto_resume: false
            }
        );
    }

    #[test]
    fn every_bad_field_is_named() {
        let errors = RecoveryPolicy::resolve(
            RecoveryPolicy::default(),
            &overrides(json!({"max_retries": 21, "max_interruptions": -1, "auto_resume": "yes", "retries": 1})),
        )
        .expect_err("invalid");
        let mut fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        fields.sort_unstable();
        assert_eq!(
            fields,
            [
                "recovery.auto_resume",
                "recovery.max_interruptions",
                "recovery.max_retries",
                "recovery.retries"
            ]
        );
    }

    #[test]
    fn a_spent_budget_or_auto_resume_off_waits_for_a_person() {
        let policy = RecoveryPolicy {
            max_interruptions: 1,
            ..RecoveryPolicy::default()
        };
        assert!(policy.resumes_interruption(1));
        assert!(!policy.resumes_interruption(2));
        let off = RecoveryPolicy {
            auto_resume: false,
            ..policy
        };
        assert!(!off.resumes_interruption(1));
    }
}
