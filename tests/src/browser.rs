//! Headless Chromium driven over WebDriver with fantoccini: a chromedriver process for the
//! test, a session at desktop size, and the few conveniences the dashboard tests share
//! (waiting for text, screenshots under `target/screenshots/<test>/`, the console's errors).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use axum::http::Method;
use fantoccini::actions::{InputSource, KeyAction, KeyActions};
use fantoccini::key::Key;
use fantoccini::wd::{Capabilities, WebDriverCompatibleCommand};
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{json, Value};

use crate::poll;

pub struct Browser {
    client: Client,
    driver: Child,
    screenshots: PathBuf,
}

fn driver_path() -> PathBuf {
    std::env::var_os("LORA_CHROMEDRIVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromedriver"))
}

/// Chromium's log of the page's console (`goog:loggingPrefs`), which W3C WebDriver has no
/// command for: chromedriver serves it at `/session/{id}/se/log`.
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base: &url::Url,
        session: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/se/log", session.unwrap_or_default()))
    }

    fn method_and_body(&self, _: &url::Url) -> (Method, Option<String>) {
        (Method::POST, Some(json!({"type": "browser"}).to_string()))
    }
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session at desktop size.
    pub async fn start(test: &str) -> Browser {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            listener.local_addr().expect("address").port()
        };
        let driver = Command::new(driver_path())
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (install it with scripts/browser-env)");
        let binary = std::env::var("LORA_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let capabilities: Capabilities = serde_json::from_value(json!({
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {"binary": binary, "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1440,900"]}
        }))
        .expect("capabilities");
        let webdriver = format!("http://127.0.0.1:{port}");
        let client = poll("chromedriver to start", Duration::from_secs(30), || {
            let mut builder = ClientBuilder::new(HttpConnector::new());
            builder.capabilities(capabilities.clone());
            let webdriver = webdriver.clone();
            async move { builder.connect(&webdriver).await.ok() }
        })
        .await;
        let screenshots = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/screenshots")
            .join(test);
        std::fs::create_dir_all(&screenshots).expect("screenshot dir");
        Browser {
            client,
            driver,
            screenshots,
        }
    }

    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("navigates");
    }

    async fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
    }

    pub async fn click(&self, css: &str) {
        self.find(css).await.click().await.expect("clicks");
    }

    /// Types `text` after what the field holds.
    pub async fn type_into(&self, css: &str, text: &str) {
        self.find(css).await.send_keys(text).await.expect("types");
    }

    /// Clears the field, then types `text`.
    pub async fn replace(&self, css: &str, text: &str) {
        let field = self.find(css).await;
        field.clear().await.expect("clears");
        field.send_keys(text).await.expect("types");
    }

    /// Presses Tab, as a keyboard user moving to the next control.
    pub async fn press_tab(&self) {
        let tab = char::from(Key::Tab);
        let keys = KeyActions::new("keyboard".into())
            .then(KeyAction::Down { value: tab })
            .then(KeyAction::Up { value: tab });
        self.client
            .perform_actions(keys)
            .await
            .expect("presses Tab");
    }

    /// Runs `script` in the page and returns its value.
    pub async fn eval(&self, script: &str) -> Value {
        self.client
            .execute(script, Vec::new())
            .await
            .unwrap_or_else(|e| panic!("script {script:?}: {e}"))
    }

    /// The text of the first element matching `css`, or "" when there is none.
    pub async fn text(&self, css: &str) -> String {
        let script = format!(
            "const e = document.querySelector({}); return e ? e.textContent : '';",
            json!(css)
        );
        self.eval(&script)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Waits until the element matching `css` contains `expected`.
    pub async fn wait_for_text(&self, css: &str, expected: &str, timeout: Duration) -> String {
        poll(&format!("{css} to show {expected:?}"), timeout, || async {
            let text = self.text(css).await;
            text.contains(expected).then_some(text)
        })
        .await
    }

    pub async fn resize(&self, width: u32, height: u32) {
        self.client
            .set_window_size(width, height)
            .await
            .expect("resizes");
    }

    /// Saves a PNG of the viewport as `<name>.png`.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("screenshot");
        let path = self.screenshots.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("screenshot written");
        path
    }

    /// Console messages at error level since the last call.
    pub async fn console_errors(&self) -> Vec<String> {
        let entries = self
            .client
            .issue_cmd(BrowserLog)
            .await
            .expect("browser log");
        entries
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
}

impl Browser {
    /// Ends the session, so chromedriver closes Chromium before it is stopped itself.
    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
