//! The control plane: users, training files, presets, jobs and their state machine,
//! metrics, events and live updates, the agent protocol, scheduling and recovery,
//! artifacts, over SQLite or PostgreSQL.
//!
//! Layers, each calling only those below it: `startup` (and `main`) → `http` (the JSON
//! API) and `web` (the dashboard), both thin over `request` (credentials, cookies,
//! uploads) → `service` (every operation and rule; job status changes in
//! `service::transition`) → `live`, `storage`, `enrichment` → `db` (SQL only) → `domain`
//! (types that parse) → `configuration`.

pub mod auth;
pub mod configuration;
pub mod db;
pub mod domain;
pub mod enrichment;
pub mod http;
pub mod live;
pub mod request;
pub mod service;
pub mod startup;
pub mod storage;
pub mod telemetry;
pub mod web;
