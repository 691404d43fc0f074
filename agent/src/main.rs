use clap::{Parser, Subcommand};

/// LoRA fine-tuning agent for a GPU host.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enroll (first run), then claim and run jobs until stopped.
    Run(agent::config::Flags),
}

/// The trainer runs in this process: its per-op tensor allocations are reused by mimalloc
/// instead of being page-faulted in again every step (see the trainer's binary).
#[global_allocator]
static ALLOCATOR: allocator::MiMalloc = allocator::MiMalloc;

fn main() -> anyhow::Result<()> {
    // Before the runtime starts its threads: mimalloc's options and the environment are
    // not synchronised, and CUDA reads its variables once.
    allocator::keep_freed_memory();
    trainer::train::shorten_candle_spin();
    let Command::Run(flags) = Cli::parse().command;
    let config = agent::config::AgentConfig::load(flags).map_err(anyhow::Error::msg)?;
    agent::gpu_choice::apply(config.gpu.as_ref()).map_err(anyhow::Error::msg)?;
    run(config)
}

#[tokio::main]
async fn run(config: agent::config::AgentConfig) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,agent=info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never in log files or collectors.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    agent::daemon::run(config).await?;
    Ok(())
}
