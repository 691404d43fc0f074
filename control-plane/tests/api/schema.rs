use std::collections::BTreeSet;

use control_plane::db::Db;

use crate::helpers::{Backend, TestDatabase};

async fn migrated(database: &TestDatabase) -> Db {
    let db = Db::connect(&database.url).await.expect("connect");
    db.migrate().await.expect("migrations apply");
    db.migrate().await.expect("migrations are idempotent");
    db
}

/// The SQLite and PostgreSQL migrations describe the same tables, columns and indexes.
#[tokio::test]
async fn postgres_and_sqlite_schemas_match() {
    let sqlite_database = TestDatabase::create(Backend::Sqlite).await;
    let postgres_database = TestDatabase::create(Backend::Postgres).await;
    let Db::Sqlite(sqlite) = migrated(&sqlite_database).await else {
        unreachable!()
    };
    let Db::Postgres(postgres) = migrated(&postgres_database).await else {
        unreachable!()
    };

    let sqlite_columns: BTreeSet<(String, String, bool)> = sqlx::query_as(
        "SELECT m.name, p.name, p.\"notnull\" FROM sqlite_master m JOIN pragma_table_info(m.name) p
         WHERE m.type = 'table' AND m.name NOT LIKE '\\_%' ESCAPE '\\' AND m.name NOT LIKE 'sqlite%'",
    )
    .fetch_all(&sqlite)
    .await
    .expect("sqlite columns")
    .into_iter()
    .map(|(table, column, not_null): (String, String, bool)| (table, column, not_null))
    .collect();
    let postgres_columns: BTreeSet<(String, String, bool)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text, is_nullable = 'NO' FROM information_schema.columns
         WHERE table_schema = 'public' AND table_name NOT LIKE '\\_%'",
    )
    .fetch_all(&postgres)
    .await
    .expect("postgres columns")
    .into_iter()
    .collect();
    // SQLite does not mark a PRIMARY KEY column NOT NULL in table_info; PostgreSQL does.
    let normalise = |set: BTreeSet<(String, String, bool)>| -> BTreeSet<(String, String, bool)> {
        set.into_iter()
            .map(|(t, c, n)| {
                let n = n || c == "id";
                (t, c, n)
            })
            .collect()
    };
    assert_eq!(
        normalise(sqlite_columns.clone()),
        normalise(postgres_columns)
    );
    assert!(
        sqlite_columns.len() > 200,
        "all of the data model is there: {}",
        sqlite_columns.len()
    );

    let sqlite_indexes: BTreeSet<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE 'idx\\_%' ESCAPE '\\'",
    )
    .fetch_all(&sqlite)
    .await
    .expect("sqlite indexes")
    .into_iter()
    .collect();
    let postgres_indexes: BTreeSet<String> =
        sqlx::query_scalar("SELECT indexname::text FROM pg_indexes WHERE schemaname = 'public' AND indexname LIKE 'idx\\_%'")
            .fetch_all(&postgres)
            .await
            .expect("postgres indexes")
            .into_iter()
            .collect();
    assert_eq!(sqlite_indexes, postgres_indexes);
}
