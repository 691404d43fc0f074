use control_plane::domain::Role;
use reqwest::StatusCode;
use serde_json::{json, Value};

use control_plane::db::Db;
use uuid::Uuid;

use crate::helpers::{
    chat_jsonl, field_names, json_of, poll, settings, Backend, TestApp, TestDatabase,
};
use testkit::on_both_backends;

on_both_backends!(
    enrichment_computes_statistics,
    csv_and_json_arrays_are_accepted,
    bad_records_are_named_by_line,
    oversized_uploads_answer_413,
    deleting_a_file_is_soft_and_blocked_by_live_jobs,
    an_abandoned_enrichment_is_taken_over_by_the_next_server,
    search_matches_wildcards_literally,
    names_are_capped,
    a_running_server_takes_over_an_abandoned_enrichment,
    a_run_that_lost_its_claim_neither_finishes_nor_counts,
    nul_characters_fail_a_file_alike_on_both_backends,
);

async fn enrichment_computes_statistics(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;
    let file = app.upload_enriched(&user, chat_jsonl(60)).await;

    assert_eq!(file["enrichment_status"], "completed", "{file}");
    assert_eq!(file["conversation_count"], 60);
    assert_eq!(file["training_pairs_count"], 60);
    assert_eq!(file["file_format"], "jsonl");
    assert_eq!(file["quality_scores"]["empathy"], 4.0);
    assert_eq!(file["quality_scores"]["appropriateness"], 4.0);
    assert_eq!(file["average_quality_score"], 4.33);
    let personas = file["scaffolding_distribution"]["personas"]
        .as_array()
        .expect("personas");
    assert_eq!(personas.len(), 3);
    assert_eq!(personas[0]["count"], 20);
    assert_eq!(personas[0]["percentage"], 33.3);
    let topics = file["scaffolding_distribution"]["topics"]
        .as_array()
        .expect("topics");
    assert_eq!(
        topics[0],
        json!({"category": "money", "count": 30, "percentage": 50.0})
    );
    assert_eq!(file["human_review"]["human_reviewed_count"], 15);
    assert_eq!(file["human_review"]["ai_generated_count"], 45);
    assert_eq!(file["human_review"]["human_reviewed_percentage"], 25.0);

    let id = file["id"].as_str().expect("id");
    let (status, preview) = json_of(
        app.get(
            &user,
            &format!("/api/v1/training-files/{id}/conversations?limit=3&quality_min=4.5"),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(preview["count"], 3);
    for conversation in preview["data"].as_array().expect("data") {
        assert!(conversation["quality_score"].as_f64().expect("score") >= 4.5);
        assert_eq!(conversation["messages"][2]["role"], "assistant");
    }

    let (_, list) = json_of(
        app.get(
            &user,
            "/api/v1/training-files?enrichment_status=completed&search=DATA",
        )
        .await,
    )
    .await;
    assert_eq!(list["count"], 1);
    assert_eq!(
        (list["page"].as_i64(), list["total_pages"].as_i64()),
        (Some(1), Some(1))
    );
    let (_, none) = json_of(
        app.get(&user, "/api/v1/training-files?search=nothing-like-this")
            .await,
    )
    .await;
    assert_eq!(none["count"], 0);
    let (status, _) = json_of(app.get(&user, "/api/v1/training-files?limit=0").await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

async fn csv_and_json_arrays_are_accepted(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;

    let csv = "prompt,completion,system\n\"Hi, there\",Hello,Be brief\nHow?,\"Like\nthis\",\n"
        .as_bytes()
        .to_vec();
    let file = app.upload_enriched(&user, csv).await;
    assert_eq!(
        (
            file["file_format"].as_str(),
            file["conversation_count"].as_i64()
        ),
        (Some("csv"), Some(2))
    );

    let array: Vec<Value> = (0..3)
        .map(|i| json!({"messages": [{"role": "user", "content": format!("q{i}")}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "more"}, {"role": "assistant", "content": "b"}]}))
        .collect();
    let file = app
        .upload_enriched(&user, serde_json::to_vec_pretty(&array).expect("json"))
        .await;
    assert_eq!(file["file_format"], "json");
    assert_eq!(file["conversation_count"], 3);
    assert_eq!(file["training_pairs_count"], 6);
    assert_eq!(
        file["average_quality_score"],
        Value::Null,
        "no metadata, no score"
    );
}

async fn bad_records_are_named_by_line(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let mut config = settings(&database);
    config.limits.max_record_bytes = 1000;
    let app = TestApp::spawn_with(config).await;
    let user = app.user("ada@example.com", Role::User).await;

    let good =
        r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]}"#;
    let mut lines: Vec<String> = vec![good.to_owned(); 45];
    lines[16] =
        r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}"#
            .to_owned();
    lines[29] =
        r#"{"messages":[{"role":"user","content":"hi"},{"role":"bot","content":"x"}]}"#.to_owned();
    lines[40] = r#"{"messages":[{"role":"user","content":"hi"}]}"#.to_owned();
    lines[5] = r#"{"metadata":{"topic":"x"}}"#.to_owned();
    lines[6] = r#"{"messages":[{"role":"user","content":""},{"role":"assistant","content":"x"}]}"#
        .to_owned();
    lines[7] = format!(
        r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(2000)
    );
    let mut bytes = lines.join("\n").into_bytes();
    bytes.extend_from_slice(b"\n{\"messages\": \"\x00\x01\x02\"}\n");

    let file = app.upload_enriched(&user, bytes).await;
    assert_eq!(file["enrichment_status"], "failed");
    assert_eq!(file["conversation_count"], 0);
    let error = file["enrichment_error"].as_str().expect("error text");
    assert_eq!(
        error.lines().collect::<Vec<_>>(),
        vec![
            "line 6: missing \"messages\" (or \"prompt\" and \"completion\", or \"text\")",
            "line 7: message 1 has empty content",
            "line 8: line is 2043 bytes, over the limit of 1000 bytes",
            "line 17: invalid JSON at column 82: EOF while parsing a list",
            "line 30: message 2 has unknown role \"bot\"",
            "line 41: no assistant message",
            "line 46: binary data (NUL bytes)",
            "7 bad records in total",
        ]
    );
    let id = file["id"].as_str().expect("id");
    let (_, preview) = json_of(
        app.get(&user, &format!("/api/v1/training-files/{id}/conversations"))
            .await,
    )
    .await;
    assert_eq!(preview["count"], 0, "a failed file keeps no conversations");

    let (status, error) = json_of(
        app.post(
            &user,
            "/api/v1/jobs",
            json!({"training_file_id": id, "name": "x", "base_model": "m"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(error["error"]["rules"][0]
        .as_str()
        .expect("rule")
        .contains("enrichment must be completed; it is failed"));

    let binary = app
        .upload_enriched(&user, vec![0x89, b'P', b'N', b'G', 0, 0, 0, 13])
        .await;
    assert_eq!(
        binary["enrichment_error"],
        "line 1: binary data (NUL bytes): expected a text dataset\n1 bad record in total"
    );
}

async fn oversized_uploads_answer_413(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let mut config = settings(&database);
    config.limits.max_upload_bytes = 4096;
    let app = TestApp::spawn_with(config).await;
    let user = app.user("ada@example.com", Role::User).await;

    let (status, error) =
        json_of(app.upload(&user, "big", "big.jsonl", chat_jsonl(100)).await).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        error["error"]["message"],
        "training files are limited to 4096 bytes"
    );
    let (_, list) = json_of(app.get(&user, "/api/v1/training-files").await).await;
    assert_eq!(list["count"], 0, "nothing is stored");
    let uploads = app
        .data_dir
        .join("training-files")
        .join(user.id.to_string());
    assert_eq!(
        std::fs::read_dir(uploads).map(|d| d.count()).unwrap_or(0),
        0,
        "the partial file is removed"
    );

    let small = app
        .upload(&user, "small", "small.jsonl", chat_jsonl(2))
        .await;
    assert_eq!(small.status(), StatusCode::CREATED);
}

async fn deleting_a_file_is_soft_and_blocked_by_live_jobs(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;
    let (file, job) = app.draft_job(&user).await;
    let file_path = format!(
        "/api/v1/training-files/{}",
        file["id"].as_str().expect("id")
    );
    let job_path = format!("/api/v1/jobs/{}", job["id"].as_str().expect("id"));

    let configure = json!({"gpu_type": "spot", "gpu_model": "A10G-24GB"});
    assert_eq!(
        app.put(&user, &format!("{job_path}/configure"), configure)
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        app.post(&user, &format!("{job_path}/start"), json!({}))
            .await
            .status(),
        StatusCode::OK
    );
    let (status, error) = json_of(app.delete(&user, &file_path).await).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(
        error["error"]["message"],
        "training file is in use by job \"first job\"; cancel or finish it first"
    );

    app.post(
        &user,
        &format!("{job_path}/cancel"),
        json!({"reason": "changed my mind"}),
    )
    .await;
    assert_eq!(
        app.delete(&user, &file_path).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.get(&user, &file_path).await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        app.delete(&user, &file_path).await.status(),
        StatusCode::NOT_FOUND
    );
    let (_, job) = json_of(app.get(&user, &job_path).await).await;
    assert_eq!(
        job["training_file_id"], file["id"],
        "the job still names its data"
    );
}

/// Marks a file as being enriched by a server that last heartbeated `minutes_ago`.
async fn fake_enrichment_in_progress(db: &Db, id: Uuid, minutes_ago: i64) {
    let heartbeat = control_plane::db::now() - chrono::Duration::minutes(minutes_ago);
    let update = "UPDATE training_files SET enrichment_status = 'processing', conversation_count = 0, updated_at = $2
                  WHERE id = $1";
    match db {
        Db::Sqlite(pool) => {
            sqlx::query(update)
                .bind(id)
                .bind(heartbeat)
                .execute(pool)
                .await
                .expect("update");
        }
        Db::Postgres(pool) => {
            // The updated_at trigger would stamp now(); step around it to fake an old heartbeat.
            let mut tx = pool.begin().await.expect("tx");
            sqlx::query("ALTER TABLE training_files DISABLE TRIGGER training_files_updated_at")
                .execute(&mut *tx)
                .await
                .expect("disable trigger");
            sqlx::query(update)
                .bind(id)
                .bind(heartbeat)
                .execute(&mut *tx)
                .await
                .expect("update");
            sqlx::query("ALTER TABLE training_files ENABLE TRIGGER training_files_updated_at")
                .execute(&mut *tx)
                .await
                .expect("enable trigger");
            tx.commit().await.expect("commit");
        }
    }
}

async fn stored_conversations(db: &Db, id: Uuid) -> i64 {
    let sql = "SELECT COUNT(*) FROM conversations WHERE training_file_id = $1";
    match db {
        Db::Sqlite(pool) => sqlx::query_scalar(sql)
            .bind(id)
            .fetch_one(pool)
            .await
            .expect("count"),
        Db::Postgres(pool) => sqlx::query_scalar(sql)
            .bind(id)
            .fetch_one(pool)
            .await
            .expect("count"),
    }
}

async fn an_abandoned_enrichment_is_taken_over_by_the_next_server(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let first = TestApp::spawn(&database).await;
    let user = first.user("ada@example.com", Role::User).await;
    let abandoned = first.upload_enriched(&user, chat_jsonl(60)).await;
    let busy = first.upload_enriched(&user, chat_jsonl(55)).await;
    let abandoned_id: Uuid = abandoned["id"].as_str().expect("id").parse().expect("uuid");
    let busy_id: Uuid = busy["id"].as_str().expect("id").parse().expect("uuid");
    // One server died mid-enrichment ten minutes ago, leaving conversations behind;
    // another is enriching right now.
    fake_enrichment_in_progress(&first.db, abandoned_id, 10).await;
    fake_enrichment_in_progress(&first.db, busy_id, 0).await;

    let second = TestApp::spawn(&database).await;
    let path = format!("/api/v1/training-files/{abandoned_id}");
    let file = poll(
        "the abandoned file is enriched again",
        std::time::Duration::from_secs(30),
        || async {
            let file: Value = second.get(&user, &path).await.json().await.ok()?;
            (file["enrichment_status"] == "completed").then_some(file)
        },
    )
    .await;
    assert_eq!(file["conversation_count"], 60);
    assert_eq!(
        stored_conversations(&second.db, abandoned_id).await,
        60,
        "leftovers are replaced, not doubled"
    );
    let (_, busy) = json_of(
        second
            .get(&user, &format!("/api/v1/training-files/{busy_id}"))
            .await,
    )
    .await;
    assert_eq!(
        busy["enrichment_status"], "processing",
        "a live enrichment elsewhere is left alone"
    );
}

async fn search_matches_wildcards_literally(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;
    for name in ["50% off", "plain", "snake_case"] {
        let response = app.upload(&user, name, "data.jsonl", chat_jsonl(2)).await;
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    for (search, expected) in [
        ("%", vec!["50% off"]),
        ("_", vec!["snake_case"]),
        ("\\", vec![]),
        ("PLAIN", vec!["plain"]),
    ] {
        let path = format!(
            "/api/v1/training-files?search={}",
            url::form_urlencoded::byte_serialize(search.as_bytes()).collect::<String>()
        );
        let (status, page) = json_of(app.get(&user, &path).await).await;
        assert_eq!(status, StatusCode::OK);
        let names: Vec<&str> = page["data"]
            .as_array()
            .map(|files| files.iter().filter_map(|f| f["name"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(names, expected, "search {search:?}");
    }
}

async fn names_are_capped(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;
    let long = "n".repeat(201);
    let (status, error) =
        json_of(app.upload(&user, &long, "data.jsonl", chat_jsonl(2)).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
    assert_eq!(field_names(&error), ["name"]);
    // Without a name, the file's own name stands in, cut to the same length.
    let file_name = format!("{}.jsonl", "f".repeat(100_000));
    let (status, file) = json_of(app.upload(&user, "", &file_name, chat_jsonl(2)).await).await;
    assert_eq!(status, StatusCode::CREATED, "{file}");
    assert_eq!(file["name"].as_str().map(|n| n.chars().count()), Some(200));
}

/// A replica that died mid-enrichment leaves its file `processing`; the sweep of a server
/// that keeps running (no restart) starts it over, replacing the partial rows.
async fn a_running_server_takes_over_an_abandoned_enrichment(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let mut config = settings(&database);
    config.enrichment.sweep_every_seconds = 1;
    config.enrichment.abandoned_after_seconds = 60;
    let app = TestApp::spawn_with(config).await;
    let user = app.user("ada@example.com", Role::User).await;
    let file = app.upload_enriched(&user, chat_jsonl(60)).await;
    let id: Uuid = file["id"].as_str().expect("id").parse().expect("uuid");
    fake_enrichment_in_progress(&app.db, id, 10).await;
    let path = format!("/api/v1/training-files/{id}");
    let file = poll(
        "the sweep to finish the abandoned file",
        std::time::Duration::from_secs(30),
        || async {
            let file: Value = app.get(&user, &path).await.json().await.ok()?;
            (file["enrichment_status"] == "completed").then_some(file)
        },
    )
    .await;
    assert_eq!(file["conversation_count"], 60);
    assert_eq!(stored_conversations(&app.db, id).await, 60, "not doubled");
}

/// Two runs of one file, the first slow rather than dead: once the second claimed it, the
/// first can neither heartbeat nor finish, and rows it still wrote do not count.
async fn a_run_that_lost_its_claim_neither_finishes_nor_counts(backend: Backend) {
    use control_plane::db::files::{self, EnrichmentResult, NewConversation};
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;
    let file = app.upload_enriched(&user, chat_jsonl(60)).await;
    let id: Uuid = file["id"].as_str().expect("id").parse().expect("uuid");
    fake_enrichment_in_progress(&app.db, id, 10).await;
    let rows = |count: i64| -> Vec<NewConversation> {
        (1..=count)
            .map(|line| NewConversation {
                line_number: line,
                persona: None,
                emotional_arc: None,
                topic: None,
                quality_score: None,
                human_reviewed: None,
                messages: serde_json::from_value(json!([{"role": "user", "content": "hi"}]))
                    .expect("messages"),
                tools: None,
                text: None,
                metadata: None,
                token_count: 5,
            })
            .collect()
    };
    let later = control_plane::db::now() + chrono::Duration::minutes(1);
    let slow = files::claim_for_enrichment(&app.db, id, later)
        .await
        .expect("claim")
        .expect("first claim");
    files::insert_conversations(&app.db, id, slow, &rows(2))
        .await
        .expect("rows");
    // The first run looks dead to a second server, which takes the file over.
    let fresh = files::claim_for_enrichment(&app.db, id, later + chrono::Duration::minutes(1))
        .await
        .expect("claim")
        .expect("second claim");
    files::insert_conversations(&app.db, id, fresh, &rows(3))
        .await
        .expect("rows");
    files::insert_conversations(&app.db, id, slow, &rows(4))
        .await
        .expect("stray rows");
    assert!(!files::enrichment_heartbeat(&app.db, id, slow)
        .await
        .expect("heartbeat"));
    let result = EnrichmentResult {
        file_format: "jsonl".into(),
        conversation_count: 6,
        training_pairs_count: 6,
        average_quality_score: None,
        quality_scores: json!({}),
        scaffolding_distribution: json!({}),
        human_review: json!({}),
        token_counts: Default::default(),
    };
    assert!(!files::finish_enrichment(&app.db, id, slow, &result)
        .await
        .expect("finish"));
    files::fail_enrichment(&app.db, id, slow, None, "too late")
        .await
        .expect("fail");
    assert!(files::finish_enrichment(&app.db, id, fresh, &result)
        .await
        .expect("finish"));
    let path = format!("/api/v1/training-files/{id}");
    let (_, file) = json_of(app.get(&user, &path).await).await;
    assert_eq!(file["enrichment_status"], "completed");
    assert_eq!(file["conversation_count"], 3, "the count is the rows kept");
    assert_eq!(stored_conversations(&app.db, id).await, 3);
}

/// PostgreSQL cannot store U+0000 and SQLite can: the parser refuses such a record, so a
/// file ends the same on both, naming the line.
async fn nul_characters_fail_a_file_alike_on_both_backends(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;
    let mut data = chat_jsonl(3);
    data.extend_from_slice(
        br#"{"messages":[{"role":"user","content":"a\u0000b"},{"role":"assistant","content":"ok"}]}"#,
    );
    data.push(b'\n');
    let file = app.upload_enriched(&user, data).await;
    assert_eq!(file["enrichment_status"], "failed", "{file}");
    assert_eq!(
        file["enrichment_error"]
            .as_str()
            .map(|e| e.contains("line 4: message 1 contains U+0000")),
        Some(true),
        "{file}"
    );
}
