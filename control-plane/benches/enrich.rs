//! Enrichment throughput and peak memory: one process per run, so the peak RSS
//! (VmHWM) is this run's alone.
//!
//!   cargo bench -p control-plane --bench enrich -- <sqlite|postgres> <conversations>
//!
//! Prints one table row: backend, conversations, file MiB, seconds, conversations/s,
//! RSS before, peak RSS, and at the end the resident heap (anonymous) and file pages (on
//! SQLite, mostly the database read through its memory map, which the kernel can drop).
//! `scripts/bench-enrich` runs the matrix.

use std::io::Write;
use std::time::Instant;

use control_plane::db::files::{self, NewFile};
use control_plane::db::users;
use control_plane::domain::{Email, Role};
use control_plane::enrichment::Enricher;
use serde_json::json;
use uuid::Uuid;

#[path = "support/mod.rs"]
mod support;
use support::database;

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with(field))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}

fn write_dataset(path: &std::path::Path, conversations: usize) -> std::io::Result<u64> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let personas = ["anxious", "curious", "frustrated", "grieving", "hopeful"];
    for i in 0..conversations {
        let line = json!({
            "messages": [
                {"role": "system", "content": "You are a patient, empathetic support assistant."},
                {"role": "user", "content": format!("I have a question about my account, number {i}. It keeps logging me out.")},
                {"role": "assistant", "content": "I'm sorry that keeps happening. Let's check your session settings together: open Settings, then Security."},
                {"role": "user", "content": "Found it. What next?"},
                {"role": "assistant", "content": "Turn on 'Remember this device' and sign in again. Tell me if it happens once more."},
            ],
            "metadata": {
                "persona": personas[i % personas.len()],
                "emotional_arc": if i % 2 == 0 { "frustration_to_relief" } else { "confusion_to_clarity" },
                "topic": format!("topic-{}", i % 12),
                "quality_scores": {"empathy": 3.0 + (i % 3) as f64, "clarity": 4.0, "appropriateness": 4.5},
                "human_reviewed": i % 5 == 0,
            }
        });
        serde_json::to_writer(&mut out, &line)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(std::fs::metadata(path)?.len())
}

#[tokio::main]
async fn main() {
    let args = support::positional_args();
    let backend = args.first().map_or("sqlite", String::as_str).to_owned();
    let conversations: usize = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(100_000);

    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bench.jsonl");
    let bytes = write_dataset(&path, conversations).expect("dataset written");
    let (db, _database) = database(&backend).await;
    db.migrate().await.expect("migrations");
    let email = Email::parse("bench@example.com").expect("email");
    let user = users::create_user(&db, &email, "not-a-hash", Role::User)
        .await
        .expect("user")
        .expect("new user");
    let file_id = Uuid::new_v4();
    let path_text = path.to_string_lossy().into_owned();
    files::insert(
        &db,
        NewFile {
            id: file_id,
            user_id: user.id,
            name: "bench",
            description: None,
            file_path: &path_text,
            file_size: bytes as i64,
            mime_type: None,
            sha256: "",
        },
    )
    .await
    .expect("file row");

    let rss_before = rss_kib("VmRSS:");
    let enricher = Enricher::new(
        db.clone(),
        protocol::dataset::DEFAULT_MAX_RECORD_BYTES,
        20,
        std::time::Duration::from_secs(120),
    );
    let started = Instant::now();
    enricher.run(file_id).await.expect("enrichment runs");
    let seconds = started.elapsed().as_secs_f64();
    let file = files::get(&db, file_id)
        .await
        .expect("read back")
        .expect("file");
    assert_eq!(
        file.enrichment_status,
        control_plane::domain::EnrichmentStatus::Completed,
        "{:?}",
        file.enrichment_error
    );
    assert_eq!(file.conversation_count, conversations as i64);
    let peak = rss_kib("VmHWM:");
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "| {backend:<8} | {conversations:>9} | {:>8.1} | {seconds:>7.2} | {:>10.0} | {:>8.1} | {:>8.1} | {:>8.1} | {:>8.1} |",
        bytes as f64 / 1048576.0,
        conversations as f64 / seconds,
        mib(rss_before),
        mib(peak),
        mib(rss_kib("RssAnon:")),
        mib(rss_kib("RssFile:")),
    );
    db.close().await;
}
