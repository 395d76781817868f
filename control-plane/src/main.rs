use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use outrigger_control_plane::ca::Ca;
use outrigger_control_plane::{app, mesh::Mesh};
use outrigger_proxy::spiffe::SpiffeId;

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
        /// The CA's directory (`ca.crt`, `ca.key`, optional `bundle.crt`); without it, a
        /// root is generated at start and lives as long as the process.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// How long the certificates the CA signs last, unless a proxy asks for less.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        cert_lifetime: std::time::Duration,
        /// Also serve ADS over mTLS on this address; each proxy then gets the config of the
        /// identity its certificate proves.
        #[arg(long)]
        secure_xds: Option<SocketAddr>,
        /// Check bootstrap tokens the mesh file does not know with this Kubernetes API server's
        /// TokenReview (for example https://kubernetes.default.svc).
        #[arg(long)]
        kube_api: Option<String>,
        /// The control plane's own credential for the API server.
        #[arg(
            long,
            default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
        )]
        kube_token_file: PathBuf,
        /// The CA that signs the API server's certificate.
        #[arg(
            long,
            default_value = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
        )]
        kube_ca_file: PathBuf,
    },
    /// Make a new root CA in a directory, for `serve --ca`.
    CaInit {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
    /// Issue a key and certificate for a workload outside the mesh (a test client, an Envoy):
    /// writes `cert.pem`, `key.pem` and `bundle.pem` to `--out`.
    Issue {
        #[arg(long)]
        ca: PathBuf,
        /// spiffe://<trust-domain>/ns/<namespace>/sa/<account>
        #[arg(long)]
        id: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        lifetime: std::time::Duration,
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
        Command::CaInit { dir, trust_domain } => {
            match Ca::generate(&trust_domain).and_then(|ca| ca.save(&dir)) {
                Ok(()) => {
                    println!("{}: new root CA for {trust_domain}", dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Issue {
            ca,
            id,
            out,
            lifetime,
        } => match issue(&ca, &id, &out, lifetime) {
            Ok(()) => {
                println!("{}: {id}, valid for {lifetime:?}", out.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Serve {
            mesh,
            xds,
            admin,
            workers,
            ca,
            cert_lifetime,
            secure_xds,
            kube_api,
            kube_token_file,
            kube_ca_file,
        } => {
            let token_review = match kube_api {
                None => None,
                Some(api) => match token_reviewer(&api, &kube_token_file, &kube_ca_file) {
                    Ok(r) => Some(std::sync::Arc::new(r)),
                    Err(e) => {
                        eprintln!("{e}");
                        return ExitCode::FAILURE;
                    }
                },
            };
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
                    identity: app::IdentityOptions {
                        ca_dir: ca,
                        cert_lifetime,
                        secure_xds_address: secure_xds,
                        token_review,
                    },
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

fn issue(ca_dir: &Path, id: &str, out: &Path, lifetime: std::time::Duration) -> Result<(), String> {
    let id = SpiffeId::parse(id)?;
    let ca = Ca::load(ca_dir, &id.trust_domain).map_err(|e| e.to_string())?;
    let (chain, key) = ca.issue(&id, lifetime).map_err(|e| e.to_string())?;
    let write = |name: &str, text: &str| {
        std::fs::write(out.join(name), text)
            .map_err(|e| format!("{}: {e}", out.join(name).display()))
    };
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    write("cert.pem", &chain)?;
    write("key.pem", &key)?;
    write("bundle.pem", ca.bundle_pem())
}

fn token_reviewer(
    api: &str,
    token_file: &Path,
    ca_file: &Path,
) -> Result<outrigger_control_plane::token_review::TokenReviewer, String> {
    let token = std::fs::read_to_string(token_file)
        .map_err(|e| format!("{}: {e}", token_file.display()))?;
    let ca = std::fs::read(ca_file).map_err(|e| format!("{}: {e}", ca_file.display()))?;
    outrigger_control_plane::token_review::TokenReviewer::new(api, token.trim().to_string(), &ca)
}
