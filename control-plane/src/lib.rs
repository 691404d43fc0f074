//! The control plane: users, training files, presets, jobs and their state machine,
//! metrics, events and live updates, the agent protocol, scheduling and recovery,
//! artifacts, over SQLite or PostgreSQL.

pub mod auth;
pub mod configuration;
pub mod costs;
pub mod db;
pub mod domain;
pub mod enrichment;
pub mod http;
pub mod live;
pub mod recovery;
pub mod scheduler;
pub mod startup;
pub mod storage;
pub mod telemetry;
pub mod web;
