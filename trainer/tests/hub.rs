//! Models named by hub id: downloaded through hf-hub from a local stand-in that speaks the
//! hub's file protocol (`GET /{repo}/resolve/{revision}/{file}` with ranges, `etag` and
//! `x-repo-commit` headers), then served from the cache when `HF_HUB_OFFLINE=1`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Serves `files` of the repo `org/tiny` until the process ends; returns its address and
/// the paths requested.
fn stand_in_hub(files: HashMap<String, Vec<u8>>) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = format!("http://{}", listener.local_addr().expect("address"));
    let requested = Arc::new(Mutex::new(Vec::new()));
    let log = requested.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut range_start = 0usize;
            let mut range_end: Option<usize> = None;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() || line.trim().is_empty() {
                    break;
                }
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    let (start, end) = value.trim().split_once('-').unwrap_or(("0", ""));
                    range_start = start.parse().unwrap_or(0);
                    range_end = end.parse().ok();
                }
            }
            let path = request_line
                .split_whitespace()
                .nth(1)
                .unwrap_or("/")
                .to_owned();
            log.lock().expect("log").push(path.clone());
            let file = path
                .strip_prefix("/org/tiny/resolve/main/")
                .and_then(|name| files.get(name));
            let response = match file {
                None => b"HTTP/1.1 404 Not Found\r\nx-error-code: EntryNotFound\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
                Some(bytes) => {
                    let end = range_end.unwrap_or(bytes.len() - 1).min(bytes.len() - 1);
                    let body = &bytes[range_start.min(bytes.len())..=end];
                    let etag = hex::encode(Sha256::digest(bytes));
                    let mut head = format!(
                        "HTTP/1.1 206 Partial Content\r\nx-repo-commit: {COMMIT}\r\netag: \"{etag}\"\r\n\
                         content-range: bytes {range_start}-{end}/{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        bytes.len(),
                        body.len()
                    )
                    .into_bytes();
                    head.extend_from_slice(body);
                    head
                }
            };
            let _ = stream.write_all(&response);
        }
    });
    (address, requested)
}

fn trainer(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_trainer"));
    command
        .args(args)
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_ENDPOINT");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("trainer runs")
}

#[test]
fn hub_ids_download_once_then_work_offline() {
    let dir = tempfile::tempdir().expect("temp dir");
    let source = dir.path().join("source");
    let output = trainer(&["init-model", "--out", &source.display().to_string()], &[]);
    assert!(output.status.success());
    let files: HashMap<String, Vec<u8>> = std::fs::read_dir(&source)
        .expect("files")
        .map(|entry| {
            let entry = entry.expect("entry");
            (
                entry.file_name().to_string_lossy().into_owned(),
                std::fs::read(entry.path()).expect("bytes"),
            )
        })
        .collect();
    let (endpoint, requested) = stand_in_hub(files);
    let data = dir.path().join("data.jsonl");
    std::fs::write(
        &data,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n",
    )
    .expect("data");
    let hf_home = dir.path().join("hf").display().to_string();
    let eval = |env: &[(&str, &str)]| {
        trainer(
            &[
                "eval",
                "--model",
                "org/tiny",
                "--data",
                &data.display().to_string(),
            ],
            env,
        )
    };

    let online = eval(&[("HF_HOME", &hf_home), ("HF_ENDPOINT", &endpoint)]);
    assert!(
        online.status.success(),
        "{}",
        String::from_utf8_lossy(&online.stderr)
    );
    let paths = requested.lock().expect("log").clone();
    for file in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        assert!(
            paths.iter().any(|p| p.ends_with(file)),
            "{file} was fetched: {paths:?}"
        );
    }
    let snapshot = dir.path().join(format!(
        "hf/hub/models--org--tiny/snapshots/{COMMIT}/config.json"
    ));
    assert!(snapshot.exists(), "the hub cache layout is used");

    // Offline, from the cache alone, with a hub that no longer answers.
    let offline = eval(&[
        ("HF_HOME", &hf_home),
        ("HF_HUB_OFFLINE", "1"),
        ("HF_ENDPOINT", "http://127.0.0.1:9"),
    ]);
    assert!(
        offline.status.success(),
        "{}",
        String::from_utf8_lossy(&offline.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&online.stdout),
        String::from_utf8_lossy(&offline.stdout),
        "the same model either way"
    );

    let missing = trainer(
        &[
            "eval",
            "--model",
            "org/other",
            "--data",
            &data.display().to_string(),
        ],
        &[("HF_HOME", &hf_home), ("HF_HUB_OFFLINE", "1")],
    );
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("org/other/config.json: not in the Hugging Face cache"),
        "{stderr}"
    );

    let not_a_model = trainer(
        &[
            "eval",
            "--model",
            "./no/such/dir/x",
            "--data",
            &data.display().to_string(),
        ],
        &[],
    );
    assert!(String::from_utf8_lossy(&not_a_model.stderr).contains("not a hub id"));
}
