//! The control plane: users, training files, presets, jobs and their state machine,
//! metrics, events and live updates, over SQLite or PostgreSQL.

pub mod auth;
pub mod configuration;
pub mod db;
pub mod domain;
pub mod enrichment;
pub mod http;
pub mod live;
pub mod startup;
pub mod telemetry;
