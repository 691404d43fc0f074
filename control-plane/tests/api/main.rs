//! End-to-end tests of the control plane's API over real HTTP, on SQLite and PostgreSQL.

mod agents;
mod auth;
mod cli;
mod concurrency;
mod conformance;
mod costs;
mod dashboard;
mod error_shape;
mod files;
mod helpers;
mod isolation;
mod jobs;
mod live;
mod openapi;
mod ops;
mod recovery;
mod recovery_policy;
mod schema;
mod templates;
mod validation;
