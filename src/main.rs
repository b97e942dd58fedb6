//! `agent-env`: parses the command line, sets up logging and hands over to the library.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use agent_env_operator::cli::{self, Cli, LogFormat};
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// A pass over a large fleet makes and frees many small values on every
/// worker thread: mimalloc does that faster than the system allocator and
/// hands freed memory back instead of holding it in per-thread arenas.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_new(&cli.log).unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match cli.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.init(),
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if cli.command.is_small() {
        runtime.worker_threads(1);
    }
    if let Some(n) = cli.command.blocking_threads() {
        runtime.max_blocking_threads(n);
    }
    let runtime = runtime
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    runtime.block_on(cli::run(cli))
}
