//! Builds the application from settings: database, migrations, background work, router.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::configuration::Settings;
use crate::db::report_writer::ReportWriter;
use crate::db::Db;
use crate::domain::GpuCatalog;
use crate::enrichment::Enricher;
use crate::live::LiveUpdates;
use crate::service::account::LoginLimiter;
use crate::service::AppState;
use crate::storage::ArtifactStore;
use crate::telemetry::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("database: {0}")]
    Database(#[from] crate::db::DbError),
    #[error(transparent)]
    Catalog(#[from] crate::domain::gpu_catalog::CatalogError),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("live updates: {0}")]
    Listener(#[from] sqlx::Error),
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
}

pub struct Application {
    listener: TcpListener,
    address: SocketAddr,
    state: AppState,
}

/// Opens the database named by the settings (creating the data directory for SQLite)
/// and brings its schema up to date.
pub async fn open_database(settings: &Settings) -> Result<Db, StartupError> {
    let url = settings.database_url();
    if url.starts_with("sqlite:") {
        std::fs::create_dir_all(&settings.data_dir).map_err(|source| StartupError::DataDir {
            path: settings.data_dir.display().to_string(),
            source,
        })?;
    }
    let db = Db::connect_with(&url, &settings.database).await?;
    db.migrate().await?;
    Ok(db)
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Application, StartupError> {
        let db = open_database(&settings).await?;
        Self::with_database(settings, db).await
    }

    pub async fn with_database(settings: Settings, db: Db) -> Result<Application, StartupError> {
        let catalog = GpuCatalog::load(settings.gpu_catalog_path())?;
        for dir in [settings.uploads_dir(), settings.artifacts_dir()] {
            std::fs::create_dir_all(&dir).map_err(|source| StartupError::DataDir {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let live = LiveUpdates::new(db.clone());
        live.start_listener().await?;
        let enricher = Enricher::new(
            db.clone(),
            settings.limits.max_record_bytes,
            settings.limits.max_reported_errors,
            Duration::from_secs(settings.enrichment.abandoned_after_seconds),
        );
        enricher.resume_backlog().await?;
        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|source| StartupError::Listen {
                    address: settings.listen,
                    source,
                })?;
        let address = listener
            .local_addr()
            .map_err(|source| StartupError::Listen {
                address: settings.listen,
                source,
            })?;
        let artifacts = ArtifactStore::open(&settings)?;
        let signing_key =
            crate::db::artifacts::server_key(&db, "download_signing", &crate::auth::new_token(""))
                .await?;
        let state = AppState {
            artifacts,
            signing_key: Arc::from(signing_key),
            work_available: Arc::new(tokio::sync::Notify::new()),
            known_agents: Arc::default(),
            running_attempts: Arc::default(),
            login_limiter: Arc::new(LoginLimiter::new(
                settings.auth.login_max_failures,
                Duration::from_secs(settings.auth.login_window_seconds),
            )),
            metrics: Arc::new(Metrics::new(db.backend())),
            reports: ReportWriter::new(&db, &settings.database),
            db,
            settings: Arc::new(settings),
            catalog: Arc::new(catalog),
            live,
            enricher,
        };
        Ok(Application {
            listener,
            address,
            state,
        })
    }

    /// The bound address (useful with port 0).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        tracing::info!(address = %self.address, database = self.state.db.backend(), "control plane listening");
        crate::service::recovery::spawn_sweeper(self.state.clone());
        crate::service::cost::spawn_storage_sweeper(self.state.clone());
        let metrics = self.state.metrics.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                every.tick().await;
                metrics.run_upkeep();
            }
        });
        self.state.enricher.spawn_sweeper(Duration::from_secs(
            self.state.settings.enrichment.sweep_every_seconds.max(1),
        ));
        let app = router(self.state.clone());
        axum::serve(
            self.listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .await?;
        self.state.db.close().await;
        Ok(())
    }
}

/// The JSON API and the dashboard on one router, with the middleware every request
/// passes: the same-origin rule for cookie writes, request metrics and tracing.
pub fn router(state: AppState) -> axum::Router {
    crate::http::router()
        .merge(crate::web::router())
        .fallback(not_found)
        .method_not_allowed_fallback(crate::http::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::request::same_origin_for_cookies,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::http::ops::track_requests,
        ))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// Unknown addresses: the API's JSON error under `/api/`, the dashboard's page elsewhere.
async fn not_found(request: axum::extract::Request) -> axum::response::Response {
    use axum::response::IntoResponse;
    if request.uri().path().starts_with("/api/") {
        crate::http::no_such_route().await.into_response()
    } else {
        crate::web::no_such_page().await.into_response()
    }
}
