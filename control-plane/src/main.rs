use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use outrigger_control_plane::{app, mesh::Mesh};

#[derive(Parser)]
#[command(
    name = "outrigger-control-plane",
    version,
    about = "The Outrigger control plane (xDS v3 over ADS)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the mesh file to proxies over ADS, and reload it when it changes.
    Serve {
        #[arg(long)]
        mesh: PathBuf,
        #[arg(long, default_value = "127.0.0.1:15010")]
        xds: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:15014")]
        admin: SocketAddr,
        /// Worker threads; 0 (the default) means one per core.
        #[arg(long, default_value_t = 0)]
        workers: usize,
    },
    /// Validate a mesh file and exit: 0 if valid, 1 with the error otherwise.
    Check { mesh: PathBuf },
    /// Run the whole mesh locally: control plane, a sidecar, two upstreams, traffic, and a
    /// live mesh-file change.
    Demo {
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        duration: std::time::Duration,
    },
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    outrigger_proxy::runtime_config::parse_duration(s)
        .ok_or_else(|| format!("`{s}` is not a duration such as 10s"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own summary; only problems should interrupt it.
    let level = if matches!(cli.command, Command::Demo { .. }) {
        "warn"
    } else {
        "info"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Demo { duration } => {
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
            match rt.block_on(outrigger_control_plane::demo::run(duration)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("demo failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check { mesh } => {
            let source = mesh.display().to_string();
            let result = std::fs::read_to_string(&mesh)
                .map_err(|e| outrigger_proxy::config_error::ConfigError::io(&source, &e))
                .and_then(|t| Mesh::parse(&source, &t));
            match result {
                Ok(m) => {
                    println!("{source}: ok ({} services)", m.services.len());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Serve {
            mesh,
            xds,
            admin,
            workers,
        } => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if workers > 0 {
                builder.worker_threads(workers);
            }
            let rt = builder.enable_all().build().expect("tokio runtime");
            rt.block_on(async move {
                let options = app::Options {
                    mesh_path: mesh,
                    xds_address: xds,
                    admin_address: admin,
                    identity: Default::default(),
                };
                match app::start(options).await {
                    Ok(_cp) => {
                        let _ = tokio::signal::ctrl_c().await;
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("{e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}
