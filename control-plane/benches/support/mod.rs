//! What the benchmarks share: their arguments, and a fresh database of either backend
//! (from `testkit`, as the tests get theirs).

use control_plane::db::Db;
use testkit::{Backend, TestDatabase};

/// A fresh database of `backend` (`sqlite` or `postgres`), connected; it is dropped with
/// the returned [`TestDatabase`].
pub async fn database(backend: &str) -> (Db, TestDatabase) {
    let backend = Backend::parse(backend)
        .unwrap_or_else(|| panic!("unknown backend {backend}: use sqlite or postgres"));
    let database = TestDatabase::create(backend).await;
    let db = Db::connect(&database.url).await.expect("database");
    (db, database)
}

/// The benchmark's own arguments: cargo bench adds flags such as `--bench`.
pub fn positional_args() -> Vec<String> {
    std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect()
}
