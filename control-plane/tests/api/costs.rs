//! Stage 7 over HTTP: budgets (validation, who sees and keeps them, spend, alerts once per
//! period and threshold, `block_start`) and cost reports equal to the cost records they
//! sum, with attribution filters and isolation, on both backends.

use chrono::TimeZone;
use control_plane::db::cost_tracking::{self, CostRecord};
use control_plane::db::jobs;
use control_plane::domain::Role;
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{field_names, json_of, Backend, TestApp, TestDatabase, User};
use testkit::on_both_backends;

on_both_backends!(budgets_are_validated_and_kept_by_their_owners);
on_both_backends!(reports_equal_the_cost_records_they_sum);
on_both_backends!(budgets_alert_once_per_threshold_and_block_starts);
on_both_backends!(the_budgets_page_creates_edits_and_deletes);
on_both_backends!(an_alert_reaches_the_webhook_signed_and_retried);
on_both_backends!(templates_carry_attribution_to_their_jobs);
on_both_backends!(new_jobs_take_the_user_s_default_attribution);
on_both_backends!(estimates_are_answered_before_a_job_exists);
on_both_backends!(increase_requests_are_asked_for_and_decided_by_admins);
on_both_backends!(artifacts_cost_storage_while_kept_and_network_per_download);
on_both_backends!(a_running_job_counts_with_its_live_cost_in_every_report);

fn budget(name: &str, amount: f64) -> Value {
    json!({"name": name, "amount": amount, "period": "monthly"})
}

async fn budgets_are_validated_and_kept_by_their_owners(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let ada = app.user("ada@example.com", Role::User).await;
    let bob = app.user("bob@example.com", Role::User).await;
    let admin = app.user("root@example.com", Role::Admin).await;

    let bad = json!({"name": " ", "amount": -5, "period": "fortnightly", "alert_threshold": 0,
                     "enforcement": "maybe", "team": "  "});
    let (status, error) = json_of(app.post(&ada, "/api/v1/budgets", bad).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
    let mut fields = field_names(&error);
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "alert_threshold",
            "amount",
            "enforcement",
            "name",
            "period",
            "team"
        ],
        "{error}"
    );

    let (status, created) =
        json_of(app.post(&ada, "/api/v1/budgets", budget("ml", 250.0)).await).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["current_spend"], 0.0);
    assert_eq!(created["remaining"], 250.0);
    assert_eq!(created["alert_threshold"], 80.0);
    assert_eq!(created["enforcement"], "none");
    assert_eq!(created["scope"], "personal");
    let id = created["id"].as_str().expect("id").to_owned();
    let path = format!("/api/v1/budgets/{id}");

    // Another user's budget does not exist for them.
    assert_eq!(app.get(&bob, &path).await.status(), StatusCode::NOT_FOUND);
    let replaced = app.put(&bob, &path, budget("mine now", 1.0)).await;
    assert_eq!(replaced.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        app.delete(&bob, &path).await.status(),
        StatusCode::NOT_FOUND
    );
    let (_, listed) = json_of(app.get(&bob, "/api/v1/budgets").await).await;
    assert_eq!(listed["data"], json!([]));

    // Shared budgets: admins only, and they must name what they count.
    let shared = json!({"name": "research", "amount": 1000, "period": "quarterly", "scope": "shared",
                        "team": "research", "enforcement": "block_start"});
    let refused = app.post(&ada, "/api/v1/budgets", shared.clone()).await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let unnamed = json!({"name": "all", "amount": 1000, "period": "annual", "scope": "shared"});
    let (status, error) = json_of(app.post(&admin, "/api/v1/budgets", unnamed).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(field_names(&error), ["scope"]);
    let (status, team_budget) = json_of(app.post(&admin, "/api/v1/budgets", shared).await).await;
    assert_eq!(status, StatusCode::CREATED, "{team_budget}");
    let team_path = format!(
        "/api/v1/budgets/{}",
        team_budget["id"].as_str().expect("id")
    );
    // Everyone sees a shared budget; only admins change it.
    let (_, listed) = json_of(app.get(&bob, "/api/v1/budgets").await).await;
    assert_eq!(listed["data"][0]["name"], "research");
    let edited = app.put(&bob, &team_path, budget("hijacked", 1.0)).await;
    assert_eq!(edited.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        app.delete(&bob, &team_path).await.status(),
        StatusCode::FORBIDDEN
    );

    // The owner replaces and deletes their own.
    let (status, replaced) = json_of(
        app.put(
            &ada,
            &path,
            json!({"name": "ml", "amount": 300,
        "period": "weekly", "alert_threshold": 90, "enforcement": "block_start"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{replaced}");
    assert_eq!(replaced["amount"], 300.0);
    assert_eq!(replaced["period"], "weekly");
    assert_eq!(replaced["enforcement"], "block_start");
    let (status, replaced) = json_of(
        app.put(
            &ada,
            &path,
            json!({"name": "ml", "amount": 300,
        "period": "weekly", "enforcement": "stop_at_cap"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{replaced}");
    let (_, kept) = json_of(app.get(&ada, &path).await).await;
    assert_eq!(kept["enforcement"], "stop_at_cap");
    assert_eq!(
        app.delete(&ada, &path).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(app.get(&ada, &path).await.status(), StatusCode::NOT_FOUND);
}

/// A draft job with attribution, and its cost record of `cost` dollars.
async fn job_costing(app: &TestApp, user: &User, attribution: Value, cost: f64) -> Uuid {
    let file = app
        .upload_enriched(user, crate::helpers::chat_jsonl(60))
        .await;
    let mut body = json!({"training_file_id": file["id"], "name": "costed", "base_model": "m"});
    body.as_object_mut()
        .expect("object")
        .extend(attribution.as_object().expect("attribution").clone());
    let (status, job) = json_of(app.post(user, "/api/v1/jobs", body).await).await;
    assert_eq!(status, StatusCode::CREATED, "{job}");
    let id: Uuid = job["id"].as_str().expect("id").parse().expect("uuid");
    record_cost(app, id, cost).await;
    id
}

async fn record_cost(app: &TestApp, id: Uuid, cost: f64) {
    let job = jobs::get_any(&app.db, id)
        .await
        .expect("read")
        .expect("job");
    let record = CostRecord {
        compute: cost,
        gpu_hours: cost / 4.0,
        spot_savings: cost / 5.0,
    };
    cost_tracking::replace(&app.db, &job, &record, control_plane::db::now())
        .await
        .expect("cost record");
}

async fn reports_equal_the_cost_records_they_sum(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let ada = app.user("ada@example.com", Role::User).await;
    let bob = app.user("bob@example.com", Role::User).await;
    let research = json!({"team": "research", "project": "tone", "tags": {"sweep": "lr"}});
    job_costing(&app, &ada, research.clone(), 12.5).await;
    job_costing(&app, &ada, research, 7.25).await;
    job_costing(
        &app,
        &ada,
        json!({"team": "ops", "cost_center": "cc-9"}),
        3.0,
    )
    .await;
    job_costing(&app, &bob, json!({"team": "research"}), 100.0).await;

    let (status, summary) = json_of(app.get(&ada, "/api/v1/cost-tracking/summary").await).await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    assert_eq!(summary["total_cost"], 22.75, "{summary}");
    assert_eq!(summary["compute_cost"], 22.75);
    assert_eq!(summary["job_count"], 3);
    assert_eq!(summary["total_gpu_hours"], 22.75 / 4.0);
    assert_eq!(summary["total_spot_savings"], 4.55);
    let breakdown = summary["breakdown_by_job"].as_array().expect("breakdown");
    let costs: Vec<f64> = breakdown
        .iter()
        .map(|j| j["total_cost"].as_f64().expect("cost"))
        .collect();
    assert_eq!(costs, [12.5, 7.25, 3.0], "costliest first");
    assert_eq!(breakdown[0]["team"], "research");
    assert_eq!(
        summary["by_team"][0],
        json!({"name": "research", "total_cost": 19.75, "job_count": 2})
    );
    assert_eq!(
        summary["by_cost_center"][0]["total_cost"], 19.75,
        "no cost center first"
    );

    let (_, research) = json_of(
        app.get(
            &ada,
            "/api/v1/cost-tracking/summary?team=research&project=tone",
        )
        .await,
    )
    .await;
    assert_eq!(research["total_cost"], 19.75, "{research}");
    assert_eq!(research["job_count"], 2);
    let (_, bobs) = json_of(
        app.get(&bob, "/api/v1/cost-tracking/summary?period=year")
            .await,
    )
    .await;
    assert_eq!(
        bobs["total_cost"], 100.0,
        "each user sees their own: {bobs}"
    );

    // Trends: every bucket present, their sum the summary's total.
    for period in ["day", "week", "month"] {
        let (status, trends) = json_of(
            app.get(
                &ada,
                &format!("/api/v1/cost-tracking/trends?period={period}"),
            )
            .await,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{trends}");
        let data = trends["data"].as_array().expect("data");
        assert!(!data.is_empty());
        let total: f64 = data
            .iter()
            .map(|p| p["total_cost"].as_f64().expect("cost"))
            .sum();
        let jobs: i64 = data
            .iter()
            .map(|p| p["job_count"].as_i64().expect("count"))
            .sum();
        assert!((total - 22.75).abs() < 1e-9, "{period}: {trends}");
        assert_eq!(jobs, 3);
        assert_eq!(data.last().expect("today")["total_cost"], 22.75, "{period}");
    }
    let (_, days) = json_of(app.get(&ada, "/api/v1/cost-tracking/trends").await).await;
    assert_eq!(
        days["data"].as_array().expect("days").len(),
        30,
        "the last 30 days by day"
    );

    // Bad queries name their fields.
    let (status, error) = json_of(
        app.get(&ada, "/api/v1/cost-tracking/summary?period=fortnight&team=")
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(field_names(&error), ["period", "team"]);
    let (status, error) = json_of(
        app.get(
            &ada,
            "/api/v1/cost-tracking/trends?start_date=2026-13-01&period=hour",
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
    assert_eq!(field_names(&error), ["period"]);
    let (status, error) = json_of(
        app.get(
            &ada,
            "/api/v1/cost-tracking/summary?start_date=2026-13-01&end_date=2026-01-02",
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(field_names(&error), ["start_date"]);
}

async fn budgets_alert_once_per_threshold_and_block_starts(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let ada = app.user("ada@example.com", Role::User).await;

    // Alerts: 50% and 100% of $10, each once, as warnings on the job that crossed them.
    let limit = json!({"name": "tone", "amount": 10, "period": "monthly", "alert_threshold": 50,
                       "project": "tone"});
    let (status, created) = json_of(app.post(&ada, "/api/v1/budgets", limit).await).await;
    assert_eq!(status, StatusCode::CREATED);
    let budget_path = format!("/api/v1/budgets/{}", created["id"].as_str().expect("id"));
    let job_id = job_costing(&app, &ada, json!({"project": "tone"}), 6.0).await;
    let job = || async {
        jobs::get_any(&app.db, job_id)
            .await
            .expect("read")
            .expect("job")
    };
    let budget_events = || async {
        let (_, events) = json_of(
            app.get(
                &ada,
                &format!("/api/v1/jobs/{job_id}/events?event_type=warning"),
            )
            .await,
        )
        .await;
        events["data"].as_array().expect("events").clone()
    };
    let check = control_plane::service::budget::alert_if_crossed;
    check(&app.state, &job().await).await.expect("checked");
    check(&app.state, &job().await)
        .await
        .expect("checked again");
    let warnings = budget_events().await;
    assert_eq!(warnings.len(), 1, "once per threshold: {warnings:?}");
    assert!(
        warnings[0]["message"]
            .as_str()
            .expect("message")
            .contains("passed 50%"),
        "{warnings:?}"
    );
    record_cost(&app, job_id, 11.0).await;
    check(&app.state, &job().await).await.expect("checked");
    check(&app.state, &job().await)
        .await
        .expect("checked again");
    let warnings = budget_events().await;
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert_eq!(warnings[1]["severity"], "error");
    assert!(warnings[1]["message"]
        .as_str()
        .expect("message")
        .contains("reached 100%"));
    let (_, standing) = json_of(app.get(&ada, &budget_path).await).await;
    assert_eq!(standing["current_spend"], 11.0, "{standing}");
    assert_eq!(standing["remaining"], 0.0);
    assert_eq!(standing["percent_used"], 110.0);
    assert_eq!(standing["alerts"].as_array().expect("alerts").len(), 2);
    // Prometheus: each active budget's spend and amount.
    let exposition = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let budget_id = created["id"].as_str().expect("id");
    assert!(
        exposition.contains(&format!(
            "lora_budget_spend_dollars{{budget=\"{budget_id}\"}} 11"
        )),
        "{exposition}"
    );
    assert!(exposition.contains(&format!(
        "lora_budget_amount_dollars{{budget=\"{budget_id}\"}} 10"
    )));
    // A job of another project does not count.
    job_costing(&app, &ada, json!({"project": "other"}), 50.0).await;
    let (_, standing) = json_of(app.get(&ada, &budget_path).await).await;
    assert_eq!(standing["current_spend"], 11.0);

    // block_start: the configured job's estimate (up to $11.25) exceeds what is left.
    let cap = json!({"name": "cap", "amount": 20, "period": "monthly", "project": "tone",
                     "enforcement": "block_start"});
    let (_, cap) = json_of(app.post(&ada, "/api/v1/budgets", cap).await).await;
    // A model whose size its name does not tell, never run: the preset's table prices it.
    let file = app
        .upload_enriched(&ada, crate::helpers::chat_jsonl(60))
        .await;
    let (_, draft) = json_of(
        app.post(
            &ada,
            "/api/v1/jobs",
            json!({"training_file_id": file["id"], "name": "tone", "base_model": "in-house/tone"}),
        )
        .await,
    )
    .await;
    let id = draft["id"].as_str().expect("id");
    let configure = json!({"gpu_type": "spot", "gpu_model": "H100-80GB", "project": "tone"});
    let (status, configured) = json_of(
        app.put(&ada, &format!("/api/v1/jobs/{id}/configure"), configure)
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{configured}");
    assert_eq!(configured["project"], "tone", "configure sets attribution");
    assert_eq!(configured["estimated_cost_max"], 11.25);
    assert_eq!(
        configured["estimate_basis"]["throughput"]["source"],
        "preset"
    );
    let (status, refused) = json_of(
        app.post(&ada, &format!("/api/v1/jobs/{id}/start"), json!({}))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
    let rule = refused["error"]["rules"][0].as_str().expect("rule");
    assert!(
        rule.contains("budget \"cap\" has $9.00 left") && rule.contains("up to $11.25"),
        "{rule}"
    );
    let (_, still) = json_of(app.get(&ada, &format!("/api/v1/jobs/{id}")).await).await;
    assert_eq!(still["status"], "configured");
    let raised = json!({"name": "cap", "amount": 40, "period": "monthly", "project": "tone",
                        "enforcement": "block_start"});
    let cap_path = format!("/api/v1/budgets/{}", cap["id"].as_str().expect("id"));
    assert_eq!(
        app.put(&ada, &cap_path, raised).await.status(),
        StatusCode::OK
    );
    let started = app
        .post(&ada, &format!("/api/v1/jobs/{id}/start"), json!({}))
        .await;
    assert_eq!(started.status(), StatusCode::OK);

    // The dashboard's cost page: the banner for the budget past its threshold, the budget
    // cards, this month's spend and the costliest jobs; nothing of it for another user.
    let cookie = crate::dashboard::sign_in(&app, "ada@example.com").await;
    let (status, html) = crate::dashboard::page(&app, &cookie, "/cost").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        html.contains("Budget “tone” has used 110.0% of $10.00"),
        "{html}"
    );
    assert!(
        html.contains("$11.00 <span class=\"muted\">of $10.00</span>"),
        "{html}"
    );
    assert!(html.contains("monthly, personal: project tone"));
    assert!(
        html.contains("<div class=\"figure\">$61.00</div><div class=\"muted\">spent</div>"),
        "{html}"
    );
    assert!(html.contains(&format!("/training/job/{job_id}")));
    let (_, home) = crate::dashboard::page(&app, &cookie, "/").await;
    assert!(
        home.contains("Budget “tone” has used 110.0% of $10.00 this period"),
        "{home}"
    );
    // The job page names what the job is charged to and the budgets it counts against.
    let (_, job_page) =
        crate::dashboard::page(&app, &cookie, &format!("/training/job/{job_id}")).await;
    assert!(job_page.contains("<dd>project tone</dd>"), "{job_page}");
    assert!(
        job_page.contains("tone: $11.00 of $10.00 monthly (110.0%)"),
        "{job_page}"
    );
    // Every other page carries the banner too, from the alerts recorded this period.
    let banner = "Budget “tone” passed 100% of $10.00 this period ($11.00 spent when it alerted)";
    assert!(job_page.contains(banner), "{job_page}");
    let (_, jobs_page) = crate::dashboard::page(&app, &cookie, "/training/jobs").await;
    assert!(jobs_page.contains(banner), "{jobs_page}");
    app.user("eve@example.com", Role::User).await;
    let cookie = crate::dashboard::sign_in(&app, "eve@example.com").await;
    let (_, jobs_page) = crate::dashboard::page(&app, &cookie, "/training/jobs").await;
    assert!(
        !jobs_page.contains("Budget “"),
        "another user's alerts: {jobs_page}"
    );
    let (_, html) = crate::dashboard::page(&app, &cookie, "/cost").await;
    assert!(
        html.contains("No budgets yet") && html.contains("No spend this month"),
        "{html}"
    );
    assert!(!html.contains("tone"));
}

/// Posts a dashboard form with the session; the status and the page (or redirect target).
async fn submit(
    app: &TestApp,
    cookie: &str,
    path: &str,
    form: &[(&str, &str)],
) -> (StatusCode, String) {
    let response = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
        .post(app.url(path))
        .header(reqwest::header::COOKIE, cookie)
        .form(form)
        .send()
        .await
        .expect("form");
    let status = response.status();
    let location = response
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|l| l.to_str().ok())
        .map(str::to_owned);
    let body = response.text().await.unwrap_or_default();
    (status, location.unwrap_or(body))
}

async fn the_budgets_page_creates_edits_and_deletes(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    app.user("ada@example.com", Role::User).await;
    app.user("bob@example.com", Role::User).await;
    let ada = crate::dashboard::sign_in(&app, "ada@example.com").await;
    let bob = crate::dashboard::sign_in(&app, "bob@example.com").await;
    let form = |amount: &'static str, scope: &'static str| {
        vec![
            ("name", "GPU month"),
            ("amount", amount),
            ("period", "monthly"),
            ("alert_threshold", "75"),
            ("alert_enabled", "on"),
            ("team", ""),
            ("project", "tone"),
            ("cost_center", ""),
            ("is_active", "on"),
            ("scope", scope),
            ("enforcement", "block_start"),
        ]
    };

    // Bad input comes back on the form, each problem named, with what was typed.
    let (status, html) = submit(&app, &ada, "/cost/budgets", &form("lots", "personal")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        html.contains("amount: must be a number of dollars"),
        "{html}"
    );
    assert!(html.contains("value=\"lots\""));
    let (status, html) = submit(&app, &ada, "/cost/budgets", &form("10", "shared")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(html.contains("only admins keep shared budgets"));

    let (status, location) = submit(&app, &ada, "/cost/budgets", &form("120.5", "personal")).await;
    assert_eq!(
        (status, location.as_str()),
        (StatusCode::SEE_OTHER, "/cost/budgets")
    );
    let (_, html) = crate::dashboard::page(&app, &ada, "/cost/budgets").await;
    assert!(html.contains("$0.00 of $120.50 (0.0%)"), "{html}");
    assert!(html.contains("monthly, personal: project tone"));
    let id = html
        .split("/cost/budgets?edit=")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("an edit link")
        .to_owned();
    let (_, edit) = crate::dashboard::page(&app, &ada, &format!("/cost/budgets?edit={id}")).await;
    assert!(
        edit.contains("value=\"120.50\"") && edit.contains("Save budget"),
        "{edit}"
    );

    let (status, _) = submit(
        &app,
        &ada,
        &format!("/cost/budgets/{id}"),
        &form("200", "personal"),
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, html) = crate::dashboard::page(&app, &ada, "/cost/budgets").await;
    assert!(html.contains("of $200.00"), "{html}");

    // Another user can neither see, edit nor delete it.
    let (_, theirs) = crate::dashboard::page(&app, &bob, "/cost/budgets").await;
    assert!(!theirs.contains("GPU month"));
    let (status, _) = crate::dashboard::page(&app, &bob, &format!("/cost/budgets?edit={id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = submit(
        &app,
        &bob,
        &format!("/cost/budgets/{id}"),
        &form("1", "personal"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = submit(&app, &bob, &format!("/cost/budgets/{id}/delete"), &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, _) = submit(&app, &ada, &format!("/cost/budgets/{id}/delete"), &[]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, html) = crate::dashboard::page(&app, &ada, "/cost/budgets").await;
    assert!(html.contains("No budgets yet"));
}

/// A stand-in webhook receiver on a free port: answers 503 to its first request and 200
/// to the rest, and keeps each request's signature header and body.
async fn webhook_receiver() -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
) {
    use axum::http::HeaderMap;
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = received.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let kept = kept.clone();
            async move {
                let signature = headers
                    .get("x-lora-signature")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let mut kept = kept.lock().expect("lock");
                kept.push((signature, body));
                if kept.len() == 1 {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("address"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

async fn an_alert_reaches_the_webhook_signed_and_retried(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let (url, received) = webhook_receiver().await;
    let mut settings = crate::helpers::settings(&database);
    settings.budgets.webhook_url = Some(url);
    settings.budgets.webhook_secret =
        Some(control_plane::configuration::Secret("hook-secret".into()));
    settings.budgets.webhook_first_retry_ms = 10;
    let app = TestApp::spawn_with(settings).await;
    let ada = app.user("ada@example.com", Role::User).await;
    let (_, created) = json_of(
        app.post(&ada, "/api/v1/budgets", budget("hooked", 10.0))
            .await,
    )
    .await;
    let budget_path = format!("/api/v1/budgets/{}", created["id"].as_str().expect("id"));
    let job_id = job_costing(&app, &ada, json!({}), 9.0).await;
    let job = jobs::get_any(&app.db, job_id)
        .await
        .expect("read")
        .expect("job");
    control_plane::service::budget::alert_if_crossed(&app.state, &job)
        .await
        .expect("checked");

    // The alert is stored at once; the webhook goes out in the background.
    let (_, standing) = json_of(app.get(&ada, &budget_path).await).await;
    assert_eq!(standing["alerts"].as_array().expect("alerts").len(), 1);
    let sent = crate::helpers::poll(
        "the webhook retried and sent",
        std::time::Duration::from_secs(20),
        || async {
            let (_, standing) = json_of(app.get(&ada, &budget_path).await).await;
            (standing["alerts"][0]["webhook_status"] == "sent").then_some(standing)
        },
    )
    .await;
    assert_eq!(sent["alerts"][0]["webhook_attempts"], 2, "{sent}");
    let requests = received.lock().expect("lock").clone();
    assert_eq!(requests.len(), 2, "one failure, one success");
    let (signature, body) = &requests[1];
    let expected = control_plane::auth::sign("hook-secret", body);
    assert_eq!(signature, &format!("sha256={expected}"));
    let payload: Value = serde_json::from_str(body).expect("JSON");
    assert_eq!(payload["type"], "budget_alert");
    assert_eq!(payload["budget_name"], "hooked");
    assert_eq!(payload["threshold"], 80.0);
    assert_eq!(payload["spend"], 9.0);
    assert_eq!(payload["job_id"], job_id.to_string());
}

async fn templates_carry_attribution_to_their_jobs(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let ada = app.user("ada@example.com", Role::User).await;
    let source = job_costing(
        &app,
        &ada,
        json!({"team": "research", "project": "tone",
        "tags": {"sweep": "lr"}}),
        1.0,
    )
    .await;
    // From a job: its attribution, where the request names none; the request's wins.
    let (status, template) = json_of(
        app.post(
            &ada,
            "/api/v1/templates",
            json!({"name": "tone recipe", "source_job_id": source, "project": "tone-v2"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{template}");
    assert_eq!(template["team"], "research");
    assert_eq!(template["project"], "tone-v2");
    assert_eq!(template["tags"], json!({"sweep": "lr"}));
    let file = app
        .upload_enriched(&ada, crate::helpers::chat_jsonl(60))
        .await;
    let path = format!(
        "/api/v1/templates/{}/use",
        template["id"].as_str().expect("id")
    );
    let (status, used) = json_of(
        app.post(
            &ada,
            &path,
            json!({"training_file_id": file["id"], "name": "from the recipe", "base_model": "m"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{used}");
    let (_, job) = json_of(
        app.get(
            &ada,
            &format!("/api/v1/jobs/{}", used["job_id"].as_str().expect("id")),
        )
        .await,
    )
    .await;
    assert_eq!(job["team"], "research");
    assert_eq!(job["project"], "tone-v2");
    assert_eq!(job["tags"], json!({"sweep": "lr"}));
    // Bad attribution on a template is named like on a job.
    let (status, error) = json_of(
        app.post(
            &ada,
            "/api/v1/templates",
            json!({"name": "bad", "tags": {"n": 1}}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(field_names(&error), ["tags.n"]);
}

async fn new_jobs_take_the_user_s_default_attribution(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let ada = app.user("ada@example.com", Role::User).await;
    let bob = app.user("bob@example.com", Role::User).await;
    let defaults = json!({"team": "research", "cost_center": "cc-7", "tags": {"owner": "ada"}});
    let (status, me) = json_of(
        app.put(&ada, "/api/v1/auth/me/default-attribution", defaults)
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["preferences"]["default_attribution"]["team"], "research");
    let (status, error) = json_of(
        app.put(
            &ada,
            "/api/v1/auth/me/default-attribution",
            json!({"team": "x".repeat(101)}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(field_names(&error), ["team"]);

    // A job naming none gets the defaults; one naming some keeps its own for those.
    let plain = job_costing(&app, &ada, json!({}), 1.0).await;
    let own = job_costing(&app, &ada, json!({"team": "ops", "project": "tone"}), 1.0).await;
    let (_, plain) = json_of(app.get(&ada, &format!("/api/v1/jobs/{plain}")).await).await;
    assert_eq!(
        (plain["team"].as_str(), plain["cost_center"].as_str()),
        (Some("research"), Some("cc-7"))
    );
    assert_eq!(plain["tags"], json!({"owner": "ada"}));
    let (_, own) = json_of(app.get(&ada, &format!("/api/v1/jobs/{own}")).await).await;
    assert_eq!(
        (own["team"].as_str(), own["project"].as_str()),
        (Some("ops"), Some("tone"))
    );
    assert_eq!(own["cost_center"], "cc-7");
    // Another user's jobs are theirs alone.
    let theirs = job_costing(&app, &bob, json!({}), 1.0).await;
    let (_, theirs) = json_of(app.get(&bob, &format!("/api/v1/jobs/{theirs}")).await).await;
    assert_eq!(theirs["team"], Value::Null);

    // The dashboard's account page keeps the same setting.
    let cookie = crate::dashboard::sign_in(&app, "bob@example.com").await;
    let (status, page) = submit(
        &app,
        &cookie,
        "/account/attribution",
        &[
            ("team", "search"),
            ("project", ""),
            ("cost_center", ""),
            ("tags", "experiment=lr\n"),
        ],
    )
    .await;
    assert_eq!(
        (status, page.as_str()),
        (StatusCode::SEE_OTHER, "/account?saved=1")
    );
    let (_, page) = crate::dashboard::page(&app, &cookie, "/account").await;
    assert!(
        page.contains("value=\"search\"") && page.contains("experiment=lr"),
        "{page}"
    );
    let next = job_costing(&app, &bob, json!({}), 1.0).await;
    let (_, next) = json_of(app.get(&bob, &format!("/api/v1/jobs/{next}")).await).await;
    assert_eq!(next["team"], "search");
    assert_eq!(next["tags"], json!({"experiment": "lr"}));
    let (status, page) = submit(
        &app,
        &cookie,
        "/account/attribution",
        &[
            ("team", " "),
            ("project", ""),
            ("cost_center", ""),
            ("tags", "=orphan"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(page.contains("tags"), "{page}");
}

/// `POST /jobs/estimate`: the body of create + configure, answered with tokens (counted by
/// enrichment), the throughput it rests on, duration, cost and completion window; the same
/// estimate a job configured with that body keeps; every bad field named.
async fn estimates_are_answered_before_a_job_exists(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let ada = app.user("ada@example.com", Role::User).await;
    let bob = app.user("bob@example.com", Role::User).await;
    let file = app
        .upload_enriched(&ada, crate::helpers::chat_jsonl(60))
        .await;
    let file_id = file["id"].as_str().expect("id");
    // Enrichment counted 1,730 tokens (each conversation: three messages of 4 template
    // tokens plus a quarter of their characters), none past 128.
    assert_eq!(file["token_counts"]["total"], 1730, "{file}");
    assert_eq!(file["token_counts"]["truncated"]["128"], 1730);

    let body = json!({"training_file_id": file_id, "name": "sizing", "base_model": "HuggingFaceTB/SmolLM2-135M",
                      "team": "ml", "gpu_type": "ondemand", "gpu_model": "A100-80GB",
                      "hyperparameters": {"epochs": 3, "max_seq_len": 512}});
    let (status, estimate) =
        json_of(app.post(&ada, "/api/v1/jobs/estimate", body.clone()).await).await;
    assert_eq!(status, StatusCode::OK, "{estimate}");
    assert_eq!(estimate["tokens_per_epoch"], 1730);
    assert_eq!(estimate["total_tokens"], 5190);
    assert_eq!(estimate["epochs"], 3);
    assert!(estimate["token_method"]
        .as_str()
        .is_some_and(|m| m.contains("characters / 4")));
    assert_eq!(estimate["throughput"]["source"], "modelled");
    assert_eq!(estimate["throughput"]["peak_tflops"], 312.0);
    assert_eq!(estimate["hourly_rate"], 4.1);
    assert_eq!(estimate["gpu_type"], "ondemand");
    let at = |field: &str| {
        chrono::DateTime::parse_from_rfc3339(estimate[field].as_str().expect(field)).expect("time")
    };
    assert!(at("completion_earliest") < at("completion_latest"));
    assert!(at("estimated_start_time") <= at("completion_earliest"));
    // Nothing was created.
    let (_, jobs) = json_of(app.get(&ada, "/api/v1/jobs").await).await;
    assert_eq!(jobs["data"], json!([]));

    // A job configured with the same body keeps the same estimate.
    let (status, job) = json_of(
        app.post(
            &ada,
            "/api/v1/jobs",
            json!({"training_file_id": file_id, "name": "sizing", "base_model": "HuggingFaceTB/SmolLM2-135M"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{job}");
    let configure = json!({"gpu_type": "ondemand", "gpu_model": "A100-80GB",
                           "hyperparameters": {"epochs": 3, "max_seq_len": 512}});
    let (status, configured) = json_of(
        app.put(
            &ada,
            &format!("/api/v1/jobs/{}/configure", job["id"].as_str().expect("id")),
            configure,
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{configured}");
    let kept = &configured["estimate_basis"];
    for field in [
        "tokens_per_epoch",
        "total_tokens",
        "throughput",
        "duration_hours_min",
        "duration_hours_max",
        "cost_min",
        "cost_max",
    ] {
        assert_eq!(kept[field], estimate[field], "{field}: {kept}");
    }
    assert_eq!(
        configured["estimated_duration_hours_max"],
        estimate["duration_hours_max"]
    );

    // Every bad field named; another user's file is not theirs to size.
    let bad = json!({"training_file_id": file_id, "base_model": " ", "gpu_type": "cheap", "gpu_model": "Z80",
                     "preset_id": uuid::Uuid::new_v4()});
    let (status, error) = json_of(app.post(&bob, "/api/v1/jobs/estimate", bad).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
    let mut fields = field_names(&error);
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "base_model",
            "gpu_model",
            "gpu_type",
            "preset_id",
            "training_file_id"
        ],
        "{error}"
    );
    let (status, error) = json_of(
        app.post(
            &ada,
            "/api/v1/jobs/estimate",
            json!({"training_file_id": file_id, "base_model": "m", "gpu_type": "spot",
                   "gpu_model": "H100-80GB", "hyperparameters": {"epochs": 0}}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(field_names(&error), ["hyperparameters.epochs"]);
}

/// Budget increase requests: asked for by whoever sees the budget, with a reason; decided
/// by admins only; an approval changes the budget, a denial does not; each is kept with
/// who decided, when and why; the budgets page lists and decides them.
async fn increase_requests_are_asked_for_and_decided_by_admins(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let ada = app.user("ada@example.com", Role::User).await;
    let bob = app.user("bob@example.com", Role::User).await;
    let root = app.user("root@example.com", Role::Admin).await;
    let (_, created) = json_of(
        app.post(&ada, "/api/v1/budgets", budget("lab", 100.0))
            .await,
    )
    .await;
    let id = created["id"].as_str().expect("id").to_owned();
    let ask = format!("/api/v1/budgets/{id}/increase-requests");

    let (status, error) = json_of(
        app.post(&ada, &ask, json!({"amount": 80, "reason": "  "}))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
    assert_eq!(field_names(&error), ["amount", "reason"]);
    let stranger = app
        .post(&bob, &ask, json!({"amount": 500, "reason": "mine"}))
        .await;
    assert_eq!(stranger.status(), StatusCode::NOT_FOUND);

    let (status, first) = json_of(
        app.post(
            &ada,
            &ask,
            json!({"amount": 150, "reason": "two more sweeps"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(first["status"], "pending");
    assert_eq!(first["current_amount"], 100.0);
    assert_eq!(first["requested_amount"], 150.0);
    assert_eq!(first["budget_name"], "lab");
    assert_eq!(first["requested_by_email"], "ada@example.com");
    let first_id = first["id"].as_str().expect("id").to_owned();
    assert_eq!(requests_seen(&app, &ada).await, 1);
    assert_eq!(requests_seen(&app, &bob).await, 0, "only your own");
    assert_eq!(
        requests_seen(&app, &root).await,
        1,
        "admins see every request"
    );

    // Only admins decide; a denial leaves the budget as it was.
    let decide = |request: &str, verdict: &str| {
        format!("/api/v1/budget-increase-requests/{request}/{verdict}")
    };
    let refused = app
        .post(&ada, &decide(&first_id, "approve"), json!({}))
        .await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let (status, denied) = json_of(
        app.post(
            &root,
            &decide(&first_id, "deny"),
            json!({"note": "wait for next month"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{denied}");
    assert_eq!(denied["status"], "denied");
    assert_eq!(denied["decision_note"], "wait for next month");
    assert_eq!(denied["decided_by"], json!(root.id));
    assert!(denied["decided_at"].is_string());
    let (status, again) = json_of(
        app.post(&root, &decide(&first_id, "approve"), json!({}))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");
    assert!(again["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("already denied")));
    let (_, standing) = json_of(app.get(&ada, &format!("/api/v1/budgets/{id}")).await).await;
    assert_eq!(standing["amount"], 100.0);

    // An approval sets the amount asked for.
    let (_, second) = json_of(
        app.post(
            &ada,
            &ask,
            json!({"amount": 220.456, "reason": "the eval sweep"}),
        )
        .await,
    )
    .await;
    let second_id = second["id"].as_str().expect("id").to_owned();
    assert_eq!(second["requested_amount"], 220.46);
    let (status, approved) = json_of(
        app.post(&root, &decide(&second_id, "approve"), json!({}))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{approved}");
    assert_eq!(approved["status"], "approved");
    let (_, standing) = json_of(app.get(&ada, &format!("/api/v1/budgets/{id}")).await).await;
    assert_eq!(standing["amount"], 220.46);
    let (_, pending) = json_of(
        app.get(&root, "/api/v1/budget-increase-requests?status=pending")
            .await,
    )
    .await;
    assert_eq!(pending["data"], json!([]));
    let (status, error) = json_of(
        app.get(&root, "/api/v1/budget-increase-requests?status=maybe")
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(field_names(&error), ["status"]);
    let missing = app
        .post(
            &root,
            &decide(&uuid::Uuid::new_v4().to_string(), "deny"),
            json!({}),
        )
        .await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);

    // The budgets page: Ada asks from the dashboard; the admin sees it and approves it.
    let cookie = crate::dashboard::sign_in(&app, "ada@example.com").await;
    let (status, _) = submit(
        &app,
        &cookie,
        &format!("/cost/budgets/{id}/increase"),
        &[("amount", "300"), ("reason", "a bigger base model")],
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, page) = crate::dashboard::page(&app, &cookie, "/cost/budgets").await;
    assert!(page.contains("a bigger base model"), "{page}");
    assert!(page.contains("$220.46 → $300.00"), "{page}");
    assert!(!page.contains(">Approve<"), "only admins decide: {page}");
    let (status, page) = submit(
        &app,
        &cookie,
        &format!("/cost/budgets/{id}/increase"),
        &[("amount", "10"), ("reason", "less")],
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        page.contains("amount: must be more than the budget"),
        "{page}"
    );
    let admin = crate::dashboard::sign_in(&app, "root@example.com").await;
    let (_, page) = crate::dashboard::page(&app, &admin, "/cost/budgets").await;
    assert!(
        page.contains("ada@example.com") && page.contains(">Approve<"),
        "{page}"
    );
    let (_, requests) = json_of(
        app.get(&root, "/api/v1/budget-increase-requests?status=pending")
            .await,
    )
    .await;
    let third = requests["data"][0]["id"].as_str().expect("id").to_owned();
    let (status, _) = submit(
        &app,
        &admin,
        &format!("/cost/budgets/requests/{third}/approve"),
        &[("note", "ok")],
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, standing) = json_of(app.get(&ada, &format!("/api/v1/budgets/{id}")).await).await;
    assert_eq!(standing["amount"], 300.0);
}

async fn requests_seen(app: &TestApp, user: &User) -> usize {
    let (_, list) = json_of(app.get(user, "/api/v1/budget-increase-requests").await).await;
    list["data"].as_array().expect("data").len()
}

/// A job's record carries its artifacts' storage (bytes × price × months kept) and network
/// (bytes × price × downloads through signed links), in the job's cost and the reports.
async fn artifacts_cost_storage_while_kept_and_network_per_download(backend: Backend) {
    use sha2::Digest;
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let ada = app.user("ada@example.com", Role::User).await;
    let job = app.queued_job(&ada).await;
    let secret = app.enroll_agent("host").await;
    let (_, assignment) = app.claim_now(&secret).await;
    let attempt = assignment["attempt_id"].as_str().expect("attempt");
    let bytes = vec![7u8; 1000];
    let sha = hex::encode(sha2::Sha256::digest(&bytes));
    let uploaded = app
        .client
        .put(app.url(&format!(
            "/api/v1/agent/attempts/{attempt}/artifacts?kind=adapter_weights&name=a.safetensors&sha256={sha}"
        )))
        .bearer_auth(&secret)
        .body(bytes)
        .send()
        .await
        .expect("upload");
    assert_eq!(uploaded.status(), StatusCode::CREATED);
    let cancelled = app
        .post(
            &ada,
            &format!("/api/v1/jobs/{job}/cancel"),
            json!({"reason": "enough"}),
        )
        .await;
    assert_eq!(cancelled.status(), StatusCode::OK);
    let (_, artifacts) = json_of(
        app.get(&ada, &format!("/api/v1/jobs/{job}/artifacts"))
            .await,
    )
    .await;
    let artifact = &artifacts["data"][0];
    let artifact_id = artifact["id"].as_str().expect("id");
    for _ in 0..2 {
        let (_, link) = json_of(
            app.get(&ada, &format!("/api/v1/artifacts/{artifact_id}/download"))
                .await,
        )
        .await;
        let served = app
            .client
            .get(link["download_url"].as_str().expect("url"))
            .send()
            .await
            .expect("download");
        assert_eq!(served.bytes().await.expect("bytes").len(), 1000);
    }
    // A month after the upload, at $1,000,000 per GB-month and $2,000,000 per GB
    // downloaded: 1,000 bytes kept a month cost $1, downloaded twice $4.
    let stored = chrono::DateTime::parse_from_rfc3339(artifact["created_at"].as_str().expect("at"))
        .expect("time")
        .with_timezone(&chrono::Utc);
    let month = chrono::Duration::milliseconds((30.4375 * 86_400_000.0) as i64);
    let pricing = control_plane::domain::gpu_catalog::Pricing {
        storage_gb_month: 1e6,
        network_gb: 2e6,
    };
    let job_id: Uuid = job.parse().expect("uuid");
    let updated =
        cost_tracking::refresh_artifact_costs(&app.db, Some(job_id), &pricing, stored + month)
            .await
            .expect("refresh");
    assert_eq!(updated, 1);
    let (_, cost) = json_of(app.get(&ada, &format!("/api/v1/jobs/{job}/cost")).await).await;
    assert_eq!(cost["storage_cost"], 1.0, "{cost}");
    assert_eq!(cost["network_cost"], 4.0, "{cost}");
    let compute = cost["compute_cost"].as_f64().expect("compute");
    assert_eq!(
        cost["total_cost"].as_f64(),
        Some(jobs::round_cents(compute + 5.0))
    );
    let (_, summary) = json_of(app.get(&ada, "/api/v1/cost-tracking/summary").await).await;
    assert_eq!(summary["storage_cost"], 1.0, "{summary}");
    assert_eq!(summary["network_cost"], 4.0);
    // The shipped prices: 1,000 bytes for a month are far below a cent.
    cost_tracking::refresh_artifact_costs(
        &app.db,
        Some(job_id),
        &Default::default(),
        stored + month,
    )
    .await
    .expect("refresh");
    let (_, cost) = json_of(app.get(&ada, &format!("/api/v1/jobs/{job}/cost")).await).await;
    assert_eq!(cost["storage_cost"], 0.0);
}

/// Reports over whole days read the daily rollup, others the records; both count a running
/// job at its live cost, not the record an earlier attempt left, and agree.
async fn a_running_job_counts_with_its_live_cost_in_every_report(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let app = TestApp::spawn(&database).await;
    let ada = app.user("ada@example.com", Role::User).await;
    job_costing(&app, &ada, json!({"team": "ml"}), 2.0).await;
    let running = app.queued_job(&ada).await;
    let secret = app.enroll_agent("host").await;
    app.claim_now(&secret).await;
    let running: Uuid = running.parse().expect("uuid");
    // An earlier attempt left a $5 record; the attempt running now has cost $7 in all.
    record_cost(&app, running, 5.0).await;
    let job = jobs::get_any(&app.db, running)
        .await
        .expect("read")
        .expect("job");
    assert_eq!(job.status, control_plane::domain::JobStatus::Provisioning);
    sqlx_update_current_cost(&app, running, 7.0).await;

    let (_, summary) = json_of(app.get(&ada, "/api/v1/cost-tracking/summary").await).await;
    assert_eq!(summary["total_cost"], 9.0, "{summary}");
    assert_eq!(summary["job_count"], 2);
    let (_, trends) = json_of(app.get(&ada, "/api/v1/cost-tracking/trends").await).await;
    let trend_total: f64 = trends["data"]
        .as_array()
        .expect("buckets")
        .iter()
        .filter_map(|b| b["total_cost"].as_f64())
        .sum();
    assert!((trend_total - 9.0).abs() < 1e-9, "{trends}");
    // A range that does not fall on day boundaries reads the records: the same answer.
    let now = control_plane::db::now();
    let filter = cost_tracking::SpendFilter {
        user_id: Some(ada.id),
        from: Some(now - chrono::Duration::hours(1)),
        until: Some(now + chrono::Duration::hours(1)),
        ..Default::default()
    };
    let totals = cost_tracking::totals(&app.db, &filter)
        .await
        .expect("totals");
    assert!((totals.total_cost - 9.0).abs() < 1e-9, "{totals:?}");
    assert_eq!(totals.job_count, 2);
    let by_team = cost_tracking::by_dimension(&app.db, &filter, cost_tracking::Dimension::Team)
        .await
        .expect("teams");
    let whole_days = cost_tracking::SpendFilter {
        from: Some(
            chrono::Utc.from_utc_datetime(&now.date_naive().and_time(chrono::NaiveTime::MIN)),
        ),
        until: None,
        ..filter.clone()
    };
    let by_team_days =
        cost_tracking::by_dimension(&app.db, &whole_days, cost_tracking::Dimension::Team)
            .await
            .expect("teams");
    let lines = |groups: &[cost_tracking::GroupSpend]| -> Vec<(Option<String>, i64, i64)> {
        groups
            .iter()
            .map(|g| {
                (
                    g.name.clone(),
                    (g.total_cost * 100.0).round() as i64,
                    g.job_count,
                )
            })
            .collect()
    };
    assert_eq!(lines(&by_team), lines(&by_team_days));
    assert_eq!(
        lines(&by_team),
        [(None, 700, 1), (Some("ml".to_owned()), 200, 1)]
    );
}

async fn sqlx_update_current_cost(app: &TestApp, job: Uuid, cost: f64) {
    let sql = "UPDATE training_jobs SET current_cost = $2 WHERE id = $1";
    match &app.db {
        control_plane::db::Db::Sqlite(pool) => sqlx::query(sql)
            .bind(job)
            .bind(cost)
            .execute(pool)
            .await
            .map(drop),
        control_plane::db::Db::Postgres(pool) => sqlx::query(sql)
            .bind(job)
            .bind(cost)
            .execute(pool)
            .await
            .map(drop),
    }
    .expect("current cost");
}
