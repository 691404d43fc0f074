//! The API checked with the ecosystem's own tools, as its users would meet them:
//! openapi-spec-validator (the served document is valid OpenAPI 3.1), schemathesis
//! (generated requests against the running server: no server error, every documented
//! response matching its schema) and openapi-python-client (a generated client logs in and
//! reads typed results). `scripts/api-tools-env` installs them; `scripts/test` passes their
//! directory in `LORA_API_TOOLS`.

use std::path::PathBuf;
use std::process::{Command, Output};

use control_plane::domain::Role;
use serde_json::Value;

use crate::helpers::{Backend, TestApp, TestDatabase};

/// How long schemathesis may generate requests, per backend.
const SCHEMATHESIS_SECONDS: &str = "120";

fn tool(name: &str) -> PathBuf {
    let dir = std::env::var("LORA_API_TOOLS").expect("LORA_API_TOOLS: run through scripts/test");
    PathBuf::from(dir).join(name)
}

/// Runs a command off the async runtime, so the server under test keeps answering.
async fn run(mut command: Command) -> Output {
    tokio::task::spawn_blocking(move || command.output().expect("the tool runs"))
        .await
        .expect("the tool's thread")
}

fn described(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the OpenAPI tools: scripts/test provides them"]
async fn the_served_document_is_valid_openapi_3_1() {
    let database = TestDatabase::create(Backend::Sqlite).await;
    let app = TestApp::spawn(&database).await;
    let document = app.openapi_document().await;
    assert!(document["openapi"]
        .as_str()
        .is_some_and(|v| v.starts_with("3.1")));
    assert!(
        document["servers"]
            .as_array()
            .is_some_and(|s| !s.is_empty()),
        "servers are listed"
    );
    let path = database.data_dir.path().join("openapi.json");
    std::fs::write(&path, document.to_string()).expect("document written");

    let mut validator = Command::new(tool("openapi-spec-validator"));
    validator.arg(&path);
    let output = run(validator).await;
    assert!(output.status.success(), "{}", described(&output));
}

mod schemathesis {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs the OpenAPI tools: scripts/test provides them"]
    async fn sqlite() {
        finds_no_server_error_and_no_response_off_schema(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs the OpenAPI tools: scripts/test provides them"]
    async fn postgres() {
        finds_no_server_error_and_no_response_off_schema(Backend::Postgres).await;
    }
}

async fn finds_no_server_error_and_no_response_off_schema(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::Admin).await;
    // Some real resources, so the generated requests find more than 404s.
    app.draft_job(&user).await;

    let mut schemathesis = Command::new(tool("schemathesis"));
    schemathesis
        .current_dir(database.data_dir.path())
        .args([
            "run",
            &app.url("/api/v1/openapi.json"),
            "--url",
            &app.address,
        ])
        .args(["--header", &format!("Authorization: Bearer {}", user.token)])
        .args(["--checks", "not_a_server_error,response_schema_conformance"])
        // Logging out would revoke the token the rest of the run uses.
        .args(["--exclude-path", "/api/v1/auth/logout"])
        .args(["--max-examples", "10", "--max-time", SCHEMATHESIS_SECONDS])
        .args(["--request-timeout", "10", "--generation-deterministic"])
        .arg("--no-color");
    let output = run(schemathesis).await;
    assert!(output.status.success(), "{}", described(&output));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the OpenAPI tools: scripts/test provides them"]
async fn a_generated_python_client_logs_in_and_reads_typed_results() {
    let database = TestDatabase::create(Backend::Sqlite).await;
    let app = TestApp::spawn(&database).await;
    let user = app.user("ada@example.com", Role::User).await;
    let (_, job) = app.draft_job(&user).await;
    let dir = database.data_dir.path();
    std::fs::write(
        dir.join("openapi.json"),
        app.openapi_document().await.to_string(),
    )
    .expect("document written");

    let mut generate = Command::new(tool("openapi-python-client"));
    generate.current_dir(dir).args([
        "generate",
        "--path",
        "openapi.json",
        "--output-path",
        "lora_client",
        "--meta",
        "none",
    ]);
    let output = run(generate).await;
    assert!(output.status.success(), "{}", described(&output));

    let script = r#"
import sys
from lora_client import AuthenticatedClient, Client
from lora_client.api.auth import login
from lora_client.api.jobs import get_job, list_jobs
from lora_client.api.presets import list_presets
from lora_client.models import Credentials, JobStatus, JobView, LoginResponse

base, job_id = sys.argv[1:3]
session = login.sync(client=Client(base_url=base), body=Credentials(email="ada@example.com", password="password-123"))
assert isinstance(session, LoginResponse), session
client = AuthenticatedClient(base_url=base, token=session.token)
presets = list_presets.sync(client=client)
assert {"Conservative", "Balanced", "Aggressive"} <= {p.name for p in presets.data}, presets
jobs = list_jobs.sync(client=client)
assert [str(j.id) for j in jobs.data] == [job_id], jobs
job = get_job.sync(id=job_id, client=client)
assert isinstance(job, JobView), job
assert job.status == JobStatus.DRAFT and job.name == "first job", job
print("client ok")
"#;
    let mut python = Command::new(tool("python"));
    python
        .current_dir(dir)
        .args(["-c", script, &app.address])
        .arg(job["id"].as_str().expect("job id"));
    let output = run(python).await;
    assert!(output.status.success(), "{}", described(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("client ok"));
}

/// What client generators need of the document, checked without them: unique operation
/// ids (they name the methods), a description on every response, path parameters that
/// are in the path.
#[tokio::test]
async fn every_operation_has_its_own_id_and_every_response_a_description() {
    let database = TestDatabase::create(Backend::Sqlite).await;
    let app = TestApp::spawn(&database).await;
    let document: Value = app.openapi_document().await;
    let mut ids = std::collections::BTreeMap::<String, usize>::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("path item") {
            let id = operation["operationId"].as_str().expect("operationId");
            *ids.entry(id.to_owned()).or_default() += 1;
            for (status, response) in operation["responses"].as_object().expect("responses") {
                assert!(
                    response["description"]
                        .as_str()
                        .is_some_and(|d| !d.is_empty()),
                    "{method} {path} {status} has a description"
                );
            }
            for parameter in operation["parameters"].as_array().into_iter().flatten() {
                if parameter["in"] == "path" {
                    let name = parameter["name"].as_str().expect("name");
                    assert!(
                        path.contains(&format!("{{{name}}}")),
                        "{method} {path}: path parameter {name} is in the path"
                    );
                }
            }
        }
    }
    let repeated: Vec<_> = ids.iter().filter(|(_, count)| **count > 1).collect();
    assert!(repeated.is_empty(), "repeated operation ids: {repeated:?}");
}
