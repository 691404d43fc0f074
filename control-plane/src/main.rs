use std::io::Read;
use std::net::SocketAddr;

use anyhow::{bail, Context};
use chrono::Duration;
use clap::{Parser, Subcommand};
use control_plane::configuration::{Overrides, Settings};
use control_plane::domain::Role;
use control_plane::service::account::{create_account, create_enrollment_token};
use control_plane::startup::{open_database, Application};

/// Requests, report batches and enrichment allocate and free many small buffers across
/// threads; glibc's malloc spent a fifth of enrichment's time in its own bookkeeping.
/// The crate's `override` feature routes SQLite's own allocations here as well.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// LoRA fine-tuning control plane.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    overrides: Overrides,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP server (migrations run first).
    Serve {
        /// Address to listen on (default 127.0.0.1:8080).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Create a user; the password is read from standard input.
    CreateUser {
        #[arg(long)]
        email: String,
        #[arg(long, default_value = "user")]
        role: Role,
        /// Read the password from standard input (required: passwords never go on the command line).
        #[arg(long, required = true)]
        password_stdin: bool,
    },
    /// Print a new token agents enroll with.
    CreateEnrollmentToken {
        /// Lifetime, such as 30m, 24h or 7d.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        expires_in: Duration,
    },
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: i64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a number and a unit (s, m, h, d)"))?;
    match unit {
        "s" => Ok(Duration::seconds(number)),
        "m" => Ok(Duration::minutes(number)),
        "h" | "" => Ok(Duration::hours(number)),
        "d" => Ok(Duration::days(number)),
        _ => Err(format!("{text:?}: unknown unit {unit:?}; use s, m, h or d")),
    }
    .and_then(|d| {
        if d > Duration::zero() {
            Ok(d)
        } else {
            Err("must be positive".into())
        }
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        if let Ok(mut signal) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            signal.recv().await;
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! { () = ctrl_c => {}, () = terminate => {} }
    tracing::info!("shutting down");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    control_plane::telemetry::init();
    let cli = Cli::parse();
    let mut settings = Settings::load(&cli.overrides).context("loading settings")?;
    match cli.command {
        Command::Serve { listen } => {
            if let Some(listen) = listen {
                settings.listen = listen;
            }
            let app = Application::build(settings).await?;
            app.run_until(shutdown_signal()).await?;
        }
        Command::Migrate => {
            let db = open_database(&settings).await?;
            println!("migrations applied ({})", db.backend());
        }
        Command::CreateUser {
            email,
            role,
            password_stdin: _,
        } => {
            let mut password = String::new();
            std::io::stdin()
                .read_to_string(&mut password)
                .context("reading the password from stdin")?;
            let password = password.trim_end_matches(['\n', '\r']).to_owned();
            let db = open_database(&settings).await?;
            match create_account(&db, &email, password, role).await {
                Ok(user) => println!(
                    "created {} user {} ({})",
                    user.role().as_str(),
                    user.email,
                    user.id
                ),
                Err(error) => bail!("{error}"),
            }
        }
        Command::CreateEnrollmentToken { expires_in } => {
            let db = open_database(&settings).await?;
            let (token, expires_at) = create_enrollment_token(&db, expires_in).await?;
            eprintln!("enrollment token (valid until {expires_at}); it is shown only once:");
            println!("{token}");
        }
    }
    Ok(())
}
