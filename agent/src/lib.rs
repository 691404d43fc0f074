//! The agent daemon of a GPU host: enrolls with the control plane, reports telemetry,
//! claims jobs and validations, runs the trainer in-process, streams progress through a durable outbox,
//! uploads artifacts, and hands a job back with a checkpoint on a spot notice.

pub mod client;
pub mod config;
pub mod daemon;
pub mod error;
pub mod gpu_choice;
pub mod outbox;
pub mod runner;
pub mod spot;
pub mod telemetry;
pub mod validator;
