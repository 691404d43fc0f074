//! Types that parse their input, so an invalid value cannot be built.

pub mod budget;
pub mod estimate;
pub mod gpu_catalog;
pub mod hyperparameters;
pub mod job_status;
pub mod placement;
pub mod recovery_policy;
pub mod user;
pub mod validation;
pub mod vocabulary;

pub use budget::{Attribution, BudgetPeriod, BudgetScope, Enforcement, RequestStatus};
pub use gpu_catalog::{GpuCatalog, GpuType};
pub use hyperparameters::{FieldError, Hyperparameters};
pub use job_status::JobStatus;
pub use recovery_policy::RecoveryPolicy;
pub use user::{Email, Password, Role};
pub use vocabulary::{AgentStatus, AttemptStatus, EnrichmentStatus, EventType, Severity};
