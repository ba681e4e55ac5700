//! `tallyd`: thin main. Parses the command line, sets up logging, loads everything it
//! needs *before* binding a port, and maps failures to sysexits codes.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tally_config::{DEFAULT_HEARTBEAT_SECS, DEFAULT_IDLE_TIMEOUT_SECS, DEFAULT_LEASE_TTL_SECS};
use tally_daemon::server::{now, Server, ServerParams};
use tally_daemon::{demo, identity, signals, store::Store};

/// sysexits: command line or configuration error.
const EX_USAGE: u8 = 64;
/// sysexits: the software failed at run time.
const EX_SOFTWARE: u8 = 70;

#[derive(Parser)]
#[command(name = "tallyd", version, about = "tally license server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a self-contained demo server with a self-issued demo bundle.
    Demo(DemoArgs),
    /// Create the server identity (key pair, 0600) in a data directory.
    Init {
        /// Data directory.
        #[arg(long, default_value = tally_config::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Data directory to use and reuse; a throwaway one is created when omitted.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// UDP address to listen on.
    #[arg(long, default_value = "127.0.0.1:27300")]
    listen: SocketAddr,
    /// Seconds without a heartbeat before a lease is reclaimed.
    #[arg(long, default_value_t = DEFAULT_LEASE_TTL_SECS)]
    lease_ttl_secs: u64,
    /// Heartbeat interval asked of clients, seconds.
    #[arg(long, default_value_t = DEFAULT_HEARTBEAT_SECS)]
    heartbeat_secs: u64,
    /// QUIC idle timeout, seconds: how fast the seat of a vanished client comes back.
    #[arg(long, default_value_t = DEFAULT_IDLE_TIMEOUT_SECS)]
    idle_timeout_secs: u64,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal; under systemd or in a pipe they are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Demo(args) => run_demo(args),
        Command::Init { data_dir } => init(&data_dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(e)) => {
            eprintln!("tallyd: {e:#}");
            ExitCode::from(EX_USAGE)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("tallyd: {e:#}");
            ExitCode::from(EX_SOFTWARE)
        }
    }
}

/// Failures sorted by exit code.
enum Failure {
    /// Bad command line, config or files: exit 64.
    Usage(anyhow::Error),
    /// Failure while serving: exit 70.
    Runtime(anyhow::Error),
}

fn init(data_dir: &std::path::Path) -> Result<(), Failure> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))
        .map_err(Failure::Usage)?;
    let (key, created) = identity::load_or_create(data_dir).map_err(Failure::Usage)?;
    let verb = if created { "created" } else { "exists" };
    println!(
        "server identity {verb}: {}\nserver key fingerprint: {}",
        data_dir.join(identity::IDENTITY_FILE).display(),
        key.public().fingerprint()
    );
    Ok(())
}

fn run_demo(args: DemoArgs) -> Result<(), Failure> {
    let config = tally_config::DaemonConfig {
        listen: args.listen,
        lease_ttl_secs: args.lease_ttl_secs,
        heartbeat_secs: args.heartbeat_secs,
        idle_timeout_secs: args.idle_timeout_secs,
        ..Default::default()
    };
    config
        .validate(std::path::Path::new("<command line>"))
        .map_err(|e| Failure::Usage(e.into()))?;
    // The throwaway directory lives as long as this function, i.e. the whole run.
    let (throwaway, data_dir) = match args.data_dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("creating {}", dir.display()))
                .map_err(Failure::Usage)?;
            (None, dir)
        }
        None => {
            let dir = tempfile::Builder::new()
                .prefix("tally-demo-")
                .tempdir()
                .context("creating a throwaway data directory")
                .map_err(Failure::Usage)?;
            let path = dir.path().to_path_buf();
            (Some(dir), path)
        }
    };
    let (key, _) = identity::load_or_create(&data_dir).map_err(Failure::Usage)?;
    let bundle = demo::load_or_issue(&data_dir, &key, now().wall).map_err(Failure::Usage)?;
    let store = Store::open(&data_dir.join("store"))
        .context("opening the seat store")
        .map_err(Failure::Usage)?;

    let runtime = tokio::runtime::Runtime::new()
        .context("starting the async runtime")
        .map_err(Failure::Runtime)?;
    runtime.block_on(async {
        let shutdown = signals::shutdown_requested().map_err(Failure::Runtime)?;
        let server = Server::bind(ServerParams {
            listen: config.listen,
            identity: key.clone(),
            bundles: vec![bundle.clone()],
            store,
            lease_ttl: Duration::from_secs(config.lease_ttl_secs),
            heartbeat: Duration::from_secs(config.heartbeat_secs),
            idle_timeout: Duration::from_secs(config.idle_timeout_secs),
            demo: true,
        })
        .map_err(Failure::Usage)?;
        let addr = server.local_addr().map_err(Failure::Runtime)?;
        print_demo_banner(addr, &data_dir, throwaway.is_some(), &key, &bundle.bundle);
        server.run(shutdown).await.map_err(Failure::Runtime)
    })?;
    drop(throwaway);
    Ok(())
}

fn print_demo_banner(
    addr: SocketAddr,
    data_dir: &std::path::Path,
    throwaway: bool,
    key: &tally_protocol::keys::SecretKey,
    bundle: &tally_protocol::bundle::Bundle,
) {
    let features: Vec<String> = bundle
        .features
        .iter()
        .map(|f| {
            let seats = match f.seats {
                tally_protocol::bundle::Seats::Counted(n) => format!("{n} seats"),
                tally_protocol::bundle::Seats::Uncounted => "uncounted".into(),
            };
            match f.expires {
                Some(e) if f.evaluation => {
                    format!("{} ({seats}, evaluation until {})", f.name, e.date())
                }
                Some(e) => format!("{} ({seats}, until {})", f.name, e.date()),
                None => format!("{} ({seats})", f.name),
            }
        })
        .collect();
    let kept = if throwaway {
        "throwaway, removed on exit; pass --data-dir to keep leases across restarts"
    } else {
        "kept; a restart with the same --data-dir keeps identity and leases"
    };
    println!("tally demo server");
    println!("  listening on {addr} (UDP, QUIC, ALPN tally/1)");
    println!("  data dir     {} ({kept})", data_dir.display());
    println!("  server key   {}", key.public().fingerprint());
    println!("  serving      {}", features.join(", "));
    println!();
    println!("Try it from another terminal:");
    println!("  tally --server {addr} --demo status");
    println!("  tally --server {addr} --demo run solver -- sleep 30");
    println!("(from the source tree, `tally` is `cargo run --release --bin tally --`)");
    println!("Stop with Ctrl-C.");
}
