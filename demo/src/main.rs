//! `outrigger-demo`: the whole mesh in one process, on loopback. It links both the control
//! plane and the proxy, which is why it is a crate of its own: neither binary depends on the
//! other.

mod mesh;

use std::process::ExitCode;

use clap::Parser;
use outrigger_core::duration::duration_arg;

#[derive(Parser)]
#[command(
    name = "outrigger-demo",
    version,
    about = "The Outrigger mesh on loopback: a control plane, a sidecar, traffic and a live canary shift"
)]
struct Cli {
    /// How long the traffic runs; the canary weights change halfway.
    #[arg(long, default_value = "10s", value_parser = duration_arg)]
    duration: std::time::Duration,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own summary; only problems should interrupt it.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(mesh::run(cli.duration)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}
