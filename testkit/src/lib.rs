//! What the control plane's tests, the end-to-end tests and the benchmarks share: a
//! throwaway database on SQLite or PostgreSQL, one test per backend, and polling with a
//! deadline (never sleeping as synchronisation).

use std::time::{Duration, Instant};

use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// `sqlite` or `postgres`, as benchmarks name them on their command line.
    pub fn parse(name: &str) -> Option<Backend> {
        match name {
            "sqlite" => Some(Backend::Sqlite),
            "postgres" => Some(Backend::Postgres),
            _ => None,
        }
    }
}

/// Generates one test per backend for each async fn taking a `Backend`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name($crate::Backend::Sqlite).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$name($crate::Backend::Postgres).await
                }
            }
        )*
    };
}

/// The PostgreSQL server tests make their databases on: `TEST_DATABASE_URL`, else the
/// local trust-auth server.
pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A database of its own for one test or benchmark, with a data directory beside it:
/// a SQLite file in that directory, or a fresh PostgreSQL database dropped afterwards.
pub struct TestDatabase {
    pub url: String,
    pub data_dir: tempfile::TempDir,
    postgres_name: Option<String>,
}

impl TestDatabase {
    pub async fn create(backend: Backend) -> TestDatabase {
        let data_dir = tempfile::tempdir().expect("temp dir");
        match backend {
            Backend::Sqlite => TestDatabase {
                url: format!(
                    "sqlite://{}",
                    data_dir.path().join("control-plane.db").display()
                ),
                data_dir,
                postgres_name: None,
            },
            Backend::Postgres => {
                let name = format!("testkit_{}", Uuid::new_v4().simple());
                let admin = sqlx::PgPool::connect(&admin_url())
                    .await
                    .expect("PostgreSQL reachable");
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&admin)
                    .await
                    .expect("create test database");
                admin.close().await;
                let base = admin_url();
                let server = &base[..base.rfind('/').expect("database URL has a path")];
                TestDatabase {
                    url: format!("{server}/{name}"),
                    data_dir,
                    postgres_name: Some(name),
                }
            }
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let Some(name) = self.postgres_name.take() else {
            return;
        };
        // Drop may run inside a runtime: clean up from a thread with its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let admin = sqlx::PgPool::connect(&admin_url()).await.ok()?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&admin)
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// Polls `check` until it yields a value; panics naming `what` once `timeout` passes.
pub async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
