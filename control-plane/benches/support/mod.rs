//! What the benchmarks share: a fresh database of either backend.

use control_plane::db::Db;
use uuid::Uuid;

/// A fresh SQLite file in `dir`, or a fresh PostgreSQL database (TEST_DATABASE_URL's
/// server) whose name is returned so the caller can drop it.
pub async fn database(backend: &str, dir: &std::path::Path) -> (Db, Option<String>) {
    match backend {
        "sqlite" => {
            let db = Db::connect(&format!("sqlite://{}", dir.join("bench.db").display()))
                .await
                .expect("sqlite");
            (db, None)
        }
        "postgres" => {
            let admin_url = admin_url();
            let name = format!("cp_bench_{}", Uuid::new_v4().simple());
            let admin = sqlx::PgPool::connect(&admin_url)
                .await
                .expect("PostgreSQL reachable");
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&admin)
                .await
                .expect("create database");
            let server = &admin_url[..admin_url.rfind('/').expect("path")];
            let db = Db::connect(&format!("{server}/{name}"))
                .await
                .expect("postgres");
            (db, Some(name))
        }
        other => panic!("unknown backend {other}: use sqlite or postgres"),
    }
}

fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Drops the PostgreSQL database [`database`] made, if it made one.
pub async fn drop_database(name: Option<String>) {
    let Some(name) = name else { return };
    if let Ok(admin) = sqlx::PgPool::connect(&admin_url()).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&admin)
            .await;
    }
}

/// The benchmark's own arguments: cargo bench adds flags such as `--bench`.
pub fn positional_args() -> Vec<String> {
    std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect()
}
