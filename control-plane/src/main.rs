use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use outrigger_control_plane::ca::Ca;
use outrigger_control_plane::inject::Injector;
use outrigger_control_plane::kube_client::{self, KubeAccess};
use outrigger_control_plane::token_review::TokenReviewer;
use outrigger_control_plane::{app, inspect, mesh::Mesh, stat, tap};
use outrigger_core::duration::duration_arg;
use outrigger_core::spiffe::SpiffeId;

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

// Parsed once at start: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
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
        #[arg(long, default_value = "24h", value_parser = duration_arg)]
        cert_lifetime: std::time::Duration,
        /// Also serve ADS over mTLS on this address; each proxy then gets the config of the
        /// identity its certificate proves.
        #[arg(long)]
        secure_xds: Option<SocketAddr>,
        /// Host names (or IPs) the mTLS port's certificate also carries, besides the control
        /// plane's SPIFFE ID: a gRPC app's xDS client checks the host it dials (repeatable).
        #[arg(long = "server-name")]
        server_names: Vec<String>,
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
        /// Also take services from the cluster (`--kube-api`): Services, EndpointSlices and
        /// the Pods behind them, watched and folded into the mesh file.
        #[arg(long)]
        kube_services: bool,
        /// This replica's name, for the Lease that picks the one replica writing the routes'
        /// status (the pod name; default: host name and process id).
        #[arg(long, env = "POD_NAME")]
        instance: Option<String>,
        /// The namespace of that Lease (the control plane's own).
        #[arg(long, env = "POD_NAMESPACE", default_value = "outrigger")]
        lease_namespace: String,
        /// Serve the sidecar-injecting admission webhook (HTTPS, `POST /inject`) here.
        #[arg(long)]
        webhook: Option<SocketAddr>,
        /// The host names of the webhook's certificate (its Service's DNS names).
        #[arg(long, value_delimiter = ',', default_value = "outrigger.outrigger.svc")]
        webhook_dns: Vec<String>,
        /// How often proxies report their load (the service graph's resolution).
        #[arg(long, default_value = "5s", value_parser = duration_arg)]
        load_report_interval: std::time::Duration,
        #[command(flatten)]
        sidecar: SidecarFlags,
    },
    /// Add the sidecar to Kubernetes YAML (Deployments, StatefulSets, DaemonSets, ReplicaSets,
    /// Jobs, CronJobs, Pods, Lists; any number of documents): reads a file or `-` for standard
    /// input, writes the result to standard output. Running it twice changes nothing.
    Inject {
        #[arg(short, long, default_value = "-")]
        filename: PathBuf,
        #[command(flatten)]
        sidecar: SidecarFlags,
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
        #[arg(long, default_value = "24h", value_parser = duration_arg)]
        lifetime: std::time::Duration,
    },
    /// With a mesh file: validate it and exit, 0 if valid, 1 with the error otherwise.
    /// Without: ask the running control plane what is wrong (mesh and route errors, services
    /// with no ready endpoint, certificates near expiry, proxies that NACKed, are behind or
    /// are gone), one line and a hint each; exits 1 if anything is.
    Check {
        mesh: Option<PathBuf>,
        /// The control plane's admin port.
        #[arg(long, default_value = "127.0.0.1:15014", env = "OUTRIGGER_ADMIN")]
        admin: String,
        #[arg(short, long, value_enum, default_value = "table")]
        output: stat::Output,
    },
    /// Each proxy's config versions (sent, ACKed, NACKed) and last NACK, as the control plane
    /// saw them: our proxies, Envoys and gRPC clients alike.
    ProxyStatus {
        #[arg(long, default_value = "127.0.0.1:15014", env = "OUTRIGGER_ADMIN")]
        admin: String,
        #[arg(short, long, value_enum, default_value = "table")]
        output: stat::Output,
    },
    /// One proxy's running routes, clusters or endpoints (with outlier state), from its admin
    /// port.
    ProxyConfig {
        #[arg(value_enum, default_value = "clusters")]
        part: inspect::ConfigPart,
        #[arg(long, default_value = "127.0.0.1:15020")]
        proxy: String,
        /// Instead, any xDS client (an Envoy, a gRPC app) by node id: what the control plane
        /// at --admin serves it.
        #[arg(long)]
        node: Option<String>,
        #[arg(long, default_value = "127.0.0.1:15014", env = "OUTRIGGER_ADMIN")]
        admin: String,
        #[arg(short, long, value_enum, default_value = "table")]
        output: stat::Output,
    },
    /// Golden signals (success rate, requests per second, latency) of each service or each
    /// caller → callee edge, from the proxies' load reports.
    Stat {
        #[arg(value_enum, default_value = "services")]
        what: stat::What,
        /// The control plane's admin port.
        #[arg(long, default_value = "127.0.0.1:15014", env = "OUTRIGGER_ADMIN")]
        admin: String,
        /// The span the figures cover.
        #[arg(long, default_value = "1m", value_parser = duration_arg)]
        window: std::time::Duration,
        /// Order of the rows (default: by name for services, busiest first for edges).
        #[arg(long, value_enum)]
        sort: Option<stat::SortBy>,
        /// Redraw as new reports arrive, until interrupted.
        #[arg(long)]
        watch: bool,
        #[arg(short, long, value_enum, default_value = "table")]
        output: stat::Output,
    },
    /// Live requests through one proxy: method, path, status, latency, caller and trace ID.
    Tap(tap::TapArgs),
}

/// What the injected sidecar runs and where it finds the control plane.
#[derive(clap::Args)]
struct SidecarFlags {
    #[arg(long, default_value = "outrigger/proxy:0.1.0")]
    proxy_image: String,
    /// The CA as the sidecar reaches it: the control plane's TLS port.
    #[arg(long, default_value = "outrigger.outrigger.svc:15012")]
    ca_address: String,
    /// The mesh's root (PEM) that injected sidecars check the CA against, mounted into each
    /// pod. `serve` uses its own CA's; `inject` needs this or `--ca`.
    #[arg(long)]
    ca_root: Option<PathBuf>,
    /// Sidecars reach the CA in plaintext and trust whoever answers: local development only.
    #[arg(long)]
    ca_plaintext: bool,
    /// xDS over mTLS as the sidecar reaches it.
    #[arg(long, default_value = "outrigger.outrigger.svc:15012")]
    xds_address: String,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// A classic sidecar (a regular container plus an init container) for clusters before
    /// Kubernetes 1.29, instead of a native sidecar.
    #[arg(long)]
    classic: bool,
}

impl SidecarFlags {
    /// The injector, with the CA root from `--ca-root` (the webhook otherwise takes its
    /// own CA's).
    fn injector(&self) -> Result<Injector, CliError> {
        let ca_root_pem = match &self.ca_root {
            None => None,
            Some(path) => Some(std::fs::read_to_string(path).map_err(file_error(path))?),
        };
        Ok(Injector {
            image: self.proxy_image.clone(),
            ca_address: self.ca_address.clone(),
            ca_root_pem,
            ca_plaintext: self.ca_plaintext,
            xds_address: self.xds_address.clone(),
            control_plane_identity: SpiffeId::control_plane(&self.trust_domain).to_string(),
            trust_domain: self.trust_domain.clone(),
            native: !self.classic,
        })
    }
}

fn inject(filename: &Path, injector: &Injector) -> ExitCode {
    let text = if filename == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map(|_| text)
    } else {
        std::fs::read_to_string(filename)
    };
    let text = match text {
        Ok(t) => t,
        Err(e) => {
            eprintln!("inject: {}: {e}", filename.display());
            return ExitCode::FAILURE;
        }
    };
    match injector.inject_yaml(&text) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("inject: {}: {e}", filename.display());
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = "info";
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Inject { filename, sidecar } => match sidecar.injector() {
            Ok(injector) => inject(&filename, &injector),
            Err(e) => {
                eprintln!("inject: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Stat {
            what,
            admin,
            window,
            sort,
            watch,
            output,
        } => {
            block_on(async move {
                loop {
                    let graph = match stat::fetch(&admin, window).await {
                        Ok(graph) => graph,
                        Err(e) => {
                            eprintln!("stat: {e}");
                            return ExitCode::FAILURE;
                        }
                    };
                    let text = stat::render(&graph, what, sort, output);
                    if !watch {
                        print!("{text}");
                        return ExitCode::SUCCESS;
                    }
                    // Clear the screen and draw again from its top.
                    print!("\x1b[2J\x1b[H{text}");
                    let every = std::time::Duration::from_secs_f64(graph.interval_seconds.max(1.0));
                    tokio::time::sleep(every).await;
                }
            })
        }
        Command::Tap(args) => report(block_on(tap::run(&args)).map(|()| String::new()), "tap"),
        Command::Check {
            mesh: None,
            admin,
            output,
        } => {
            let (text, healthy) = block_on(inspect::check(&admin, output));
            print!("{text}");
            if healthy {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::ProxyStatus { admin, output } => report(
            block_on(inspect::proxy_status(&admin, output)),
            "proxy-status",
        ),
        Command::ProxyConfig {
            part,
            proxy,
            node,
            admin,
            output,
        } => {
            let source = match &node {
                Some(node) => inspect::Source::Node {
                    admin: &admin,
                    node,
                },
                None => inspect::Source::Proxy(&proxy),
            };
            report(
                block_on(inspect::proxy_config(source, part, output)),
                "proxy-config",
            )
        }
        Command::Check {
            mesh: Some(mesh), ..
        } => {
            let source = mesh.display().to_string();
            let result = std::fs::read_to_string(&mesh)
                .map_err(|e| outrigger_core::config_error::ConfigError::io(&source, &e))
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
            server_names,
            kube_api,
            kube_token_file,
            kube_ca_file,
            webhook,
            webhook_dns,
            sidecar,
            kube_services,
            instance,
            lease_namespace,
            load_report_interval,
        } => {
            if kube_services && kube_api.is_none() {
                eprintln!("--kube-services needs --kube-api");
                return ExitCode::FAILURE;
            }
            let kube_access = kube_api.map(|url| KubeAccess {
                url,
                token_file: kube_token_file,
                ca_file: kube_ca_file,
            });
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if workers > 0 {
                builder.worker_threads(workers);
            }
            let rt = builder.enable_all().build().expect("tokio runtime");
            rt.block_on(async move {
                // The client's connection pool lives on the runtime, so it is made here.
                let kube = match kube_access.as_ref().map(kube_client::client).transpose() {
                    Ok(kube) => kube,
                    Err(e) => {
                        eprintln!("serve: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                let token_review = kube
                    .clone()
                    .map(|kube| std::sync::Arc::new(TokenReviewer::new(kube.client)));
                let options = app::Options {
                    mesh_path: mesh,
                    xds_address: xds,
                    admin_address: admin,
                    identity: app::IdentityOptions {
                        ca_dir: ca,
                        cert_lifetime,
                        secure_xds_address: secure_xds,
                        server_names,
                        token_review,
                    },
                    load_reports: outrigger_control_plane::service_graph::Limits {
                        interval: load_report_interval,
                        ..Default::default()
                    },
                };
                match app::start(options).await {
                    Ok(cp) => {
                        if let (true, Some(kube)) = (kube_services, kube) {
                            let holder = instance.unwrap_or_else(default_instance);
                            let lease = outrigger_control_plane::lease::Lease::new(
                                kube.client.clone(),
                                &lease_namespace,
                                STATUS_LEASE,
                                &holder,
                                STATUS_LEASE_DURATION,
                            );
                            cp.watch_cluster(kube, Some(std::sync::Arc::new(lease)));
                        }
                        if let Some(address) = webhook {
                            let ca = cp.ca.load_full();
                            let started = outrigger_control_plane::admission::start(
                                address,
                                &ca,
                                &webhook_dns,
                                match sidecar.injector() {
                                    Ok(injector) => injector,
                                    Err(e) => {
                                        eprintln!("serve: {e}");
                                        return ExitCode::FAILURE;
                                    }
                                },
                            )
                            .await;
                            if let Err(e) = started {
                                eprintln!("{e}");
                                return ExitCode::FAILURE;
                            }
                        }
                        wait_for_shutdown().await;
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

/// Why a command could not do its work; printed, and the exit code is 1.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("{path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Spiffe(#[from] outrigger_core::spiffe::SpiffeError),
    #[error(transparent)]
    Ca(#[from] outrigger_control_plane::ca::CaError),
}

fn file_error(path: &Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
    move |source| CliError::File {
        path: path.display().to_string(),
        source,
    }
}

fn issue(
    ca_dir: &Path,
    id: &str,
    out: &Path,
    lifetime: std::time::Duration,
) -> Result<(), CliError> {
    let id = SpiffeId::parse(id)?;
    let ca = Ca::load(ca_dir, &id.trust_domain)?;
    let (chain, key) = ca.issue(&id, lifetime)?;
    let write = |name: &str, text: &str| {
        let path = out.join(name);
        std::fs::write(&path, text).map_err(file_error(&path))
    };
    std::fs::create_dir_all(out).map_err(file_error(out))?;
    write("cert.pem", &chain)?;
    let key_path = out.join("key.pem");
    outrigger_control_plane::ca::write_private(&key_path, key.as_bytes())
        .map_err(file_error(&key_path))?;
    write("bundle.pem", ca.bundle_pem())
}

/// The Lease whose holder writes the routes' status, and how long a claim on it lasts.
const STATUS_LEASE: &str = "outrigger-status-writer";
const STATUS_LEASE_DURATION: std::time::Duration = std::time::Duration::from_secs(15);

fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}

/// SIGTERM (what Kubernetes sends) or Ctrl-C.
async fn wait_for_shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Runs one command-line call on a small runtime of its own.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

/// Prints a view, or its error; the exit code says which.
fn report(
    result: Result<String, outrigger_control_plane::admin_client::AdminError>,
    what: &str,
) -> ExitCode {
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{what}: {e}");
            ExitCode::FAILURE
        }
    }
}
