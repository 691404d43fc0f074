//! Spot interruption notices: AWS (IMDSv2 `spot/instance-action`), GCP (`preempted`),
//! Azure (Scheduled Events `Preempt`) and SIGTERM everywhere. The first notice is
//! published on a watch channel; the runner checkpoints and hands the job back.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use tokio::sync::watch;

use crate::config::{AgentConfig, SpotProvider};

#[derive(Debug, Clone)]
pub struct Notice {
    pub provider: &'static str,
    /// When the host goes away, as the cloud announced it.
    pub deadline: Option<DateTime<Utc>>,
    pub received_at: std::time::Instant,
    /// Azure: the event to acknowledge once the checkpoint is safe.
    azure_event: Option<String>,
}

pub type Notices = watch::Receiver<Option<Notice>>;

/// Starts the watchers the configuration asks for.
pub fn watch(config: &AgentConfig) -> Notices {
    let (sender, receiver) = watch::channel(None);
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap_or_default();
    let poll = Duration::from_millis(config.spot_poll_milliseconds.max(50));
    let auto = config.spot_provider == SpotProvider::Auto;
    let wanted = |p: SpotProvider| auto || config.spot_provider == p;
    if wanted(SpotProvider::Aws) {
        let watcher = Watcher::new(&http, &sender, poll, auto);
        tokio::spawn(watcher.run(Cloud::Aws(config.aws_metadata_url.clone())));
    }
    if wanted(SpotProvider::Gcp) {
        let watcher = Watcher::new(&http, &sender, poll, auto);
        tokio::spawn(watcher.run(Cloud::Gcp(config.gcp_metadata_url.clone())));
    }
    if wanted(SpotProvider::Azure) {
        let watcher = Watcher::new(&http, &sender, poll, auto);
        tokio::spawn(watcher.run(Cloud::Azure(config.azure_metadata_url.clone())));
    }
    tokio::spawn(sigterm(sender));
    receiver
}

/// Whether this host is spot capacity, as far as the configuration says.
pub fn is_spot(config: &AgentConfig) -> bool {
    !matches!(
        config.spot_provider,
        SpotProvider::None | SpotProvider::Auto
    )
}

async fn sigterm(sender: watch::Sender<Option<Notice>>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut terminate) = signal(SignalKind::terminate()) else {
            return;
        };
        terminate.recv().await;
        tracing::warn!("SIGTERM: treating it as an interruption notice");
        sender.send_replace(Some(Notice {
            provider: "sigterm",
            deadline: Some(Utc::now() + chrono::Duration::seconds(30)),
            received_at: std::time::Instant::now(),
            azure_event: None,
        }));
    }
}

enum Cloud {
    Aws(String),
    Gcp(String),
    Azure(String),
}

impl Cloud {
    fn name(&self) -> &'static str {
        match self {
            Cloud::Aws(_) => "aws",
            Cloud::Gcp(_) => "gcp",
            Cloud::Azure(_) => "azure",
        }
    }
}

struct Watcher {
    http: reqwest::Client,
    sender: watch::Sender<Option<Notice>>,
    poll: Duration,
    /// In auto mode a cloud whose endpoint does not answer at all is not this host's.
    give_up_when_unreachable: bool,
}

#[derive(Deserialize)]
struct AwsAction {
    time: Option<DateTime<Utc>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AzureEvents {
    #[serde(default)]
    events: Vec<AzureEvent>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AzureEvent {
    event_id: String,
    event_type: String,
    not_before: Option<String>,
}

impl Watcher {
    fn new(
        http: &reqwest::Client,
        sender: &watch::Sender<Option<Notice>>,
        poll: Duration,
        auto: bool,
    ) -> Watcher {
        Watcher {
            http: http.clone(),
            sender: sender.clone(),
            poll,
            give_up_when_unreachable: auto,
        }
    }

    async fn run(self, cloud: Cloud) {
        let mut reached = false;
        loop {
            match self.check(&cloud).await {
                Ok(Some((deadline, azure_event))) => {
                    tracing::warn!(
                        provider = cloud.name(),
                        ?deadline,
                        "spot interruption notice"
                    );
                    self.sender.send_replace(Some(Notice {
                        provider: cloud.name(),
                        deadline,
                        received_at: std::time::Instant::now(),
                        azure_event,
                    }));
                    return;
                }
                Ok(None) => reached = true,
                Err(error) if error.is_connect() || error.is_timeout() => {
                    if self.give_up_when_unreachable && !reached {
                        tracing::debug!(
                            provider = cloud.name(),
                            "no metadata endpoint; not watching"
                        );
                        return;
                    }
                }
                Err(error) => {
                    tracing::debug!(provider = cloud.name(), %error, "notice check failed")
                }
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    /// `Some((deadline, azure event))` when a notice is pending.
    async fn check(
        &self,
        cloud: &Cloud,
    ) -> Result<Option<(Option<DateTime<Utc>>, Option<String>)>, reqwest::Error> {
        match cloud {
            Cloud::Aws(base) => {
                let token = self
                    .http
                    .put(format!("{base}/latest/api/token"))
                    .header("X-aws-ec2-metadata-token-ttl-seconds", "21600")
                    .send()
                    .await?
                    .error_for_status()?
                    .text()
                    .await?;
                let response = self
                    .http
                    .get(format!("{base}/latest/meta-data/spot/instance-action"))
                    .header("X-aws-ec2-metadata-token", token)
                    .send()
                    .await?;
                if response.status() == reqwest::StatusCode::NOT_FOUND {
                    return Ok(None);
                }
                let action: AwsAction = response.error_for_status()?.json().await?;
                Ok(Some((action.time, None)))
            }
            Cloud::Gcp(base) => {
                let text = self
                    .http
                    .get(format!("{base}/computeMetadata/v1/instance/preempted"))
                    .header("Metadata-Flavor", "Google")
                    .send()
                    .await?
                    .error_for_status()?
                    .text()
                    .await?;
                // GCP sends SIGTERM ~30 s before the hard stop.
                Ok((text.trim() == "TRUE")
                    .then(|| (Some(Utc::now() + chrono::Duration::seconds(30)), None)))
            }
            Cloud::Azure(base) => {
                let events: AzureEvents = self
                    .http
                    .get(format!(
                        "{base}/metadata/scheduledevents?api-version=2020-07-01"
                    ))
                    .header("Metadata", "true")
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                Ok(events
                    .events
                    .into_iter()
                    .find(|e| e.event_type == "Preempt")
                    .map(|event| {
                        let deadline = event
                            .not_before
                            .as_deref()
                            .and_then(|t| DateTime::parse_from_rfc2822(t).ok())
                            .map(|t| t.with_timezone(&Utc));
                        (deadline, Some(event.event_id))
                    }))
            }
        }
    }
}

/// Tells Azure the host may go now (the checkpoint is safe); other clouds need nothing.
pub async fn acknowledge(config: &AgentConfig, notice: &Notice) {
    let Some(event_id) = &notice.azure_event else {
        return;
    };
    let url = format!(
        "{}/metadata/scheduledevents?api-version=2020-07-01",
        config.azure_metadata_url
    );
    let body = serde_json::json!({"StartRequests": [{"EventId": event_id}]});
    if let Err(error) = reqwest::Client::new()
        .post(url)
        .header("Metadata", "true")
        .json(&body)
        .send()
        .await
    {
        tracing::warn!(%error, "could not acknowledge the Azure event");
    }
}
