//! The control plane as the agent sees it: typed calls of the agent protocol over
//! HTTP(S) with rustls, the agent's secret on every call, and retries with backoff for
//! network errors and 5xx answers.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use protocol::agent::{
    ArtifactUpload, AttemptOutcome, ClaimRequest, Heartbeat, HeartbeatReply, ReportBatch,
    ReportReply, Work,
};
use protocol::validation::{ValidationOutcome, ValidationProgress};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use crate::error::{AgentError, Result};

#[derive(Clone)]
pub struct ControlPlane {
    http: reqwest::Client,
    api: String,
    secret: Option<String>,
}

#[derive(serde::Deserialize)]
struct Registered {
    agent_id: Uuid,
    agent_secret: String,
}

/// Exponential backoff from 250 ms to 30 s.
pub struct Backoff(u32);

impl Backoff {
    pub fn new() -> Backoff {
        Backoff(0)
    }

    pub async fn wait(&mut self) {
        let millis = (250u64 << self.0.min(7)).min(30_000);
        self.0 += 1;
        tokio::time::sleep(Duration::from_millis(millis)).await;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

impl ControlPlane {
    pub fn new(base_url: &str, ca_cert: Option<&Path>) -> Result<ControlPlane> {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(Duration::from_secs(10));
        if let Some(path) = ca_cert {
            let pem = std::fs::read(path).map_err(|e| AgentError::io(path, e))?;
            let certificate = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))?;
            builder = builder.add_root_certificate(certificate);
        }
        Ok(ControlPlane {
            http: builder.build().map_err(AgentError::Http)?,
            api: format!("{}/api/v1", base_url.trim_end_matches('/')),
            secret: None,
        })
    }

    pub fn with_secret(mut self, secret: String) -> ControlPlane {
        self.secret = Some(secret);
        self
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.api));
        match &self.secret {
            Some(secret) => request.bearer_auth(secret),
            None => request,
        }
    }

    /// Sends a request until it gets an answer that is not a network error or 5xx; a
    /// 4xx is returned as an error at once (retrying would not help).
    async fn send_retrying(
        &self,
        what: &str,
        build: impl Fn() -> reqwest::RequestBuilder,
        attempts: u32,
    ) -> Result<reqwest::Response> {
        let mut backoff = Backoff::new();
        let mut tries = 0;
        loop {
            tries += 1;
            let last_try = attempts > 0 && tries >= attempts;
            match build().send().await {
                Ok(response) if response.status().is_server_error() && !last_try => {
                    tracing::warn!(what, status = %response.status(), "control plane error; retrying");
                }
                Ok(response) if response.status().is_client_error() => {
                    let status = response.status();
                    let body = response.text().await.unwrap_or_default();
                    return Err(AgentError::Rejected {
                        what: what.to_owned(),
                        status: status.as_u16(),
                        body,
                    });
                }
                Ok(response) => return Ok(response),
                Err(error) if !last_try => {
                    tracing::warn!(what, %error, "control plane unreachable; retrying");
                }
                Err(error) => return Err(AgentError::Http(error)),
            }
            backoff.wait().await;
        }
    }

    async fn post_json<B: Serialize, R: DeserializeOwned>(
        &self,
        what: &str,
        path: &str,
        body: &B,
        attempts: u32,
    ) -> Result<R> {
        let response = self
            .send_retrying(
                what,
                || self.request(Method::POST, path).json(body),
                attempts,
            )
            .await?;
        response.json().await.map_err(AgentError::Http)
    }

    /// Enrolls with a one-time token; returns (agent id, secret).
    pub async fn register(
        &self,
        enrollment_token: &str,
        name: &str,
        labels: &std::collections::BTreeMap<String, String>,
        gpus: &[protocol::agent::GpuTelemetry],
    ) -> Result<(Uuid, String)> {
        let body = serde_json::json!({
            "enrollment_token": enrollment_token, "name": name, "labels": labels, "gpus": gpus,
        });
        let registered: Registered = self
            .post_json("enrollment", "/agents/register", &body, 5)
            .await?;
        Ok((registered.agent_id, registered.agent_secret))
    }

    pub async fn heartbeat(&self, beat: &Heartbeat) -> Result<HeartbeatReply> {
        self.post_json("heartbeat", "/agent/heartbeat", beat, 1)
            .await
    }

    /// Waits up to `wait_seconds` at the control plane for work.
    pub async fn claim(&self, request: &ClaimRequest) -> Result<Option<Work>> {
        let response = self
            .send_retrying(
                "claim",
                || {
                    self.request(Method::POST, "/agent/claim")
                        .timeout(Duration::from_secs(request.wait_seconds + 30))
                        .json(request)
                },
                1,
            )
            .await?;
        if response.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        response.json().await.map(Some).map_err(AgentError::Http)
    }

    /// One try: the outbox retries on its own schedule.
    pub async fn send_reports(&self, attempt: Uuid, batch: &ReportBatch) -> Result<ReportReply> {
        self.post_json(
            "reports",
            &format!("/agent/attempts/{attempt}/reports"),
            batch,
            1,
        )
        .await
    }

    pub async fn finish(&self, attempt: Uuid, outcome: &AttemptOutcome) -> Result<()> {
        let _: serde_json::Value = self
            .post_json(
                "finish",
                &format!("/agent/attempts/{attempt}/finish"),
                outcome,
                0,
            )
            .await?;
        Ok(())
    }

    /// Best effort: progress is shown live, and a lost update is no loss.
    pub async fn validation_progress(
        &self,
        validation: Uuid,
        progress: &ValidationProgress,
    ) -> Result<()> {
        let _: serde_json::Value = self
            .post_json(
                "validation progress",
                &format!("/agent/validations/{validation}/progress"),
                progress,
                1,
            )
            .await?;
        Ok(())
    }

    pub async fn finish_validation(
        &self,
        validation: Uuid,
        outcome: &ValidationOutcome,
    ) -> Result<()> {
        let _: serde_json::Value = self
            .post_json(
                "validation finish",
                &format!("/agent/validations/{validation}/finish"),
                outcome,
                0,
            )
            .await?;
        Ok(())
    }

    /// Downloads `path` (relative to the API root) to `target`, checking its SHA-256.
    pub async fn download(&self, path: &str, target: &Path, sha256: &str) -> Result<()> {
        let mut backoff = Backoff::new();
        for _ in 0..8 {
            match self.try_download(path, target, sha256).await {
                Ok(()) => return Ok(()),
                Err(AgentError::Http(error)) => {
                    tracing::warn!(path, %error, "download failed; retrying");
                    backoff.wait().await;
                }
                Err(other) => return Err(other),
            }
        }
        self.try_download(path, target, sha256).await
    }

    async fn try_download(&self, path: &str, target: &Path, sha256: &str) -> Result<()> {
        let response = self
            .send_retrying("download", || self.request(Method::GET, path), 5)
            .await?;
        let partial = target.with_extension("partial");
        let mut file = tokio::fs::File::create(&partial)
            .await
            .map_err(|e| AgentError::io(&partial, e))?;
        let mut hasher = Sha256::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(AgentError::Http)?;
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|e| AgentError::io(&partial, e))?;
        }
        file.flush()
            .await
            .map_err(|e| AgentError::io(&partial, e))?;
        let actual = hex::encode(hasher.finalize());
        if !actual.eq_ignore_ascii_case(sha256) {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(AgentError::Checksum {
                what: path.to_owned(),
                expected: sha256.to_owned(),
                actual,
            });
        }
        tokio::fs::rename(&partial, target)
            .await
            .map_err(|e| AgentError::io(target, e))
    }

    /// Uploads a file as an artifact of `attempt`, streamed from disk; retried until the
    /// control plane has it (a repeat of stored bytes is answered as stored).
    pub async fn upload(&self, attempt: Uuid, file: &Path, upload: &ArtifactUpload) -> Result<()> {
        let query = serde_urlencoded(upload);
        let path = format!("/agent/attempts/{attempt}/artifacts?{query}");
        let mut backoff = Backoff::new();
        loop {
            let handle = tokio::fs::File::open(file)
                .await
                .map_err(|e| AgentError::io(file, e))?;
            let size = handle
                .metadata()
                .await
                .map_err(|e| AgentError::io(file, e))?
                .len();
            let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(handle));
            let result = self
                .request(Method::PUT, &path)
                .header(reqwest::header::CONTENT_LENGTH, size)
                .body(body)
                .send()
                .await;
            match result {
                Ok(response) if response.status().is_success() => return Ok(()),
                Ok(response) if response.status().is_client_error() => {
                    let status = response.status().as_u16();
                    return Err(AgentError::Rejected {
                        what: format!("upload of {}", upload.name),
                        status,
                        body: response.text().await.unwrap_or_default(),
                    });
                }
                Ok(response) => {
                    tracing::warn!(name = upload.name, status = %response.status(), "upload failed; retrying")
                }
                Err(error) => tracing::warn!(name = upload.name, %error, "upload failed; retrying"),
            }
            backoff.wait().await;
        }
    }
}

fn serde_urlencoded(upload: &ArtifactUpload) -> String {
    let mut pairs = vec![
        ("kind", upload.kind.as_str().to_owned()),
        ("name", upload.name.clone()),
        ("sha256", upload.sha256.clone()),
    ];
    if let Some(step) = upload.step {
        pairs.push(("step", step.to_string()));
    }
    if let Some(epoch) = upload.epoch {
        pairs.push(("epoch", epoch.to_string()));
    }
    pairs
        .into_iter()
        .map(|(k, v)| format!("{k}={}", percent_encode(&v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// SHA-256 of a file, hex, read in chunks.
pub fn sha256_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| AgentError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let read = file
            .read(&mut buffer)
            .map_err(|e| AgentError::io(path, e))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hex::encode(hasher.finalize()))
}
