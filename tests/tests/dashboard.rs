//! The dashboard in headless Chromium: sign in, upload a file, watch a running job's page
//! update live, cancel it, validate a finished job, create a budget; a screenshot of every page at desktop and phone
//! width, and no console errors. Needs Chromium and chromedriver (scripts/browser-env; scripts/test
//! installs them and runs this test).

use std::time::Duration;

use end_to_end::browser::Browser;
use end_to_end::{chat_jsonl, poll, tiny_model, Agent, Api, ControlPlane, EMAIL, PASSWORD};
use serde_json::json;

const LONG: Duration = Duration::from_secs(240);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium and chromedriver: scripts/browser-env (scripts/test runs it)"]
async fn a_user_signs_in_uploads_watches_a_job_live_and_cancels_it() {
    let plane = ControlPlane::start(false).await;
    let api = Api::login(&plane).await;
    let scratch = tempfile::tempdir().expect("temp dir");
    let model = tiny_model(scratch.path());
    let dataset = scratch.path().join("support-chats.jsonl");
    std::fs::write(&dataset, chat_jsonl(40)).expect("dataset");
    let browser = Browser::start("dashboard").await;

    // Sign in through the form.
    browser.goto(&format!("{}/training/jobs", plane.url)).await;
    browser.wait_for_text("h1", "LoRA platform", LONG).await;
    browser.screenshot("login").await;
    browser.type_into("#email", EMAIL).await;
    browser.type_into("#password", PASSWORD).await;
    browser.click("button[type=submit]").await;
    browser.wait_for_text("h1", "Overview", LONG).await;
    browser.screenshot("home").await;

    // Upload a training file with the page's own form; its page shows the enrichment.
    browser.goto(&format!("{}/training/files", plane.url)).await;
    browser.wait_for_text("h1", "Training files", LONG).await;
    browser
        .type_into("#file", &dataset.display().to_string())
        .await;
    browser.type_into("#name", "support chats").await;
    browser.click("#upload button[type=submit]").await;
    browser.wait_for_text("h1", "support chats", LONG).await;
    poll("enrichment to show on the file page", LONG, || async {
        browser.eval("location.reload()").await;
        let text = browser.text("main").await;
        text.contains("Eligible for training").then_some(())
    })
    .await;
    browser.screenshot("file").await;
    let file_id = browser
        .eval("return location.pathname.split('/').pop()")
        .await
        .as_str()
        .expect("file id")
        .to_owned();
    browser.goto(&format!("{}/training/files", plane.url)).await;
    browser.wait_for_text("main", "support chats", LONG).await;
    browser.screenshot("files").await;

    // Create, configure and start a long job in the browser; an agent runs it; its page
    // updates without a reload.
    browser
        .goto(&format!("{}/training/create", plane.url))
        .await;
    browser.wait_for_text("h1", "New training job", LONG).await;
    browser.type_into("#file-search", "support").await;
    browser.click(&format!("option[value='{file_id}']")).await;
    browser.type_into("#name", "watched live").await;
    browser
        .replace("#base_model", &model.display().to_string())
        .await;
    browser.screenshot("create").await;
    browser.click("form.stacked button[type=submit]").await;
    browser.wait_for_text("h1", "Configure", LONG).await;
    browser.type_into("input[name=epochs]", "100").await;
    browser.type_into("input[name=batch_size]", "2").await;
    browser.wait_for_text("#estimate", "(spot at $", LONG).await;
    // What it rests on, from POST /api/v1/jobs/estimate: no run of this model yet, so
    // throughput modelled from the size its config.json gives.
    browser
        .wait_for_text("#estimate-basis", "modelled:", LONG)
        .await;
    browser.click("input[name=keep_best]").await;
    browser.click("input[name=export_gguf]").await;
    browser.screenshot("configure").await;
    browser.click("form.stacked button[type=submit]").await;
    browser
        .wait_for_text("#start", "Start training", LONG)
        .await;
    browser.click("#start").await;
    browser.wait_for_text(".badge", "queued", LONG).await;
    let job = browser
        .eval("return location.pathname.split('/').pop()")
        .await
        .as_str()
        .expect("job id")
        .to_owned();
    browser.wait_for_text("h1", "watched live", LONG).await;
    // The form's evaluation and export choices are the job's.
    let configured = api.get(&format!("/jobs/{job}")).await;
    assert_eq!(
        configured["hyperparameters"]["keep_best"], true,
        "{configured}"
    );
    assert_eq!(configured["exports"], serde_json::json!(["gguf"]));
    browser.eval("window.__samePage = true").await;
    let _agent = Agent::start(&plane, "worker", &["--spot-provider", "none"]);
    let first = browser.wait_for_text("#progress", "step", LONG).await;
    poll("the step count to move live", LONG, || async {
        let now = browser.text("#progress").await;
        (now != first && !now.is_empty()).then_some(())
    })
    .await;
    assert_eq!(
        browser.eval("return window.__samePage === true").await,
        json!(true),
        "updated in place, not by reloading"
    );
    browser
        .wait_for_text("#events", "Training started", LONG)
        .await;
    browser.screenshot("job-training").await;
    browser.resize(375, 812).await;
    browser.screenshot("job-training-phone").await;
    browser.resize(1440, 900).await;

    // Cancel from the page.
    browser.type_into("#reason", "seen enough").await;
    browser.click("button.danger").await;
    browser.wait_for_text(".badge", "cancelled", LONG).await;
    browser.screenshot("job-cancelled").await;
    let view = api.wait_status(&job, "cancelled", LONG).await;
    assert_eq!(view["cancelled_reason"], "seen enough");

    browser.goto(&format!("{}/training/jobs", plane.url)).await;
    browser.wait_for_text("main", "watched live", LONG).await;
    browser.screenshot("jobs").await;
    // A short second job, finished by the agent, to compare with the cancelled one.
    let short = api
        .start_job(
            &file_id,
            "short run",
            &model,
            json!({"epochs": 1, "batch_size": 4, "max_seq_len": 64}),
        )
        .await;
    api.wait_status(&short, "completed", LONG).await;
    browser
        .goto(&format!("{}/training/history", plane.url))
        .await;
    browser.wait_for_text("main", "short run", LONG).await;
    browser.screenshot("history").await;
    browser
        .goto(&format!(
            "{}/training/compare?jobId={job}&jobId={short}",
            plane.url
        ))
        .await;
    browser.wait_for_text("main", "differs", LONG).await;
    browser.screenshot("compare").await;

    // Validation: from the job page's link, run the suites with the page's form; the
    // scorecard appears when the agent is done (progress arrives over the job's stream).
    browser
        .goto(&format!("{}/training/job/{short}", plane.url))
        .await;
    browser.click("#validation-link").await;
    browser
        .wait_for_text("h1", "Validation: short run", LONG)
        .await;
    browser.replace("#max_samples", "3").await;
    browser.replace("#max_new_tokens", "12").await;
    browser.click("#validate").await;
    browser.wait_for_text("#scorecard", "completed", LONG).await;
    let scorecard = browser.text("#scorecard").await;
    assert!(
        scorecard.contains("Perplexity") && scorecard.contains("Stop behaviour"),
        "{scorecard}"
    );
    let gates = browser.text("#gates").await;
    assert!(gates.contains("configure a judge"), "{gates}");
    browser.screenshot("validation").await;
    browser.resize(375, 812).await;
    browser.screenshot("validation-phone").await;
    browser.resize(1440, 900).await;
    browser.goto(&format!("{}/fleet", plane.url)).await;
    browser.wait_for_text("main", "worker", LONG).await;
    browser.screenshot("fleet").await;

    browser
        .goto(&format!("{}/training/templates", plane.url))
        .await;
    browser.wait_for_text("h1", "Job templates", LONG).await;
    browser.screenshot("templates").await;

    // Costs: a budget created on its page, then the cost overview with the cancelled
    // job's spend.
    browser.goto(&format!("{}/cost/budgets", plane.url)).await;
    browser.wait_for_text("h1", "Budgets", LONG).await;
    browser.type_into("#name", "GPU month").await;
    browser.type_into("#amount", "250").await;
    browser.click("form.stacked button[type=submit]").await;
    browser
        .wait_for_text("table.table td", "GPU month", LONG)
        .await;
    browser.screenshot("budgets").await;
    browser.goto(&format!("{}/cost", plane.url)).await;
    browser.wait_for_text("h1", "Costs", LONG).await;
    browser
        .wait_for_text(".cards .card .muted", "GPU month", LONG)
        .await;
    browser.screenshot("cost").await;

    // Keyboard: the first Tab lands on the skip link, the next ones on the navigation.
    browser.goto(&format!("{}/", plane.url)).await;
    browser.wait_for_text("h1", "Overview", LONG).await;
    browser.press_tab().await;
    assert_eq!(
        browser
            .eval("return document.activeElement.className")
            .await,
        json!("skip")
    );
    browser.press_tab().await;
    browser.press_tab().await;
    assert_eq!(
        browser
            .eval("return document.activeElement.getAttribute('href')")
            .await,
        json!("/")
    );
    let errors = browser.console_errors().await;
    browser.close().await;
    assert!(errors.is_empty(), "console errors: {errors:#?}");
}
