//! `tallyd`: thin main. Parses the command line, sets up logging, prints, and maps
//! failures to sysexits codes; the subcommands' bodies live in the library
//! (`start`: init, check-config, run; `returns`, `diagnose`, `demo`;
//! `tally_config::options` for import-options).

use anyhow::{anyhow, Context, Result};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tally_config::{
    DaemonConfig, DEFAULT_HEARTBEAT_SECS, DEFAULT_IDLE_TIMEOUT_SECS, DEFAULT_LEASE_TTL_SECS,
};
use tally_daemon::server::{Server, ServerParams};
use tally_daemon::start::{self, StartError};
use tally_daemon::{demo, host, identity, signals};
use tally_protocol::activation::{self, ActivationRequest};
use tally_protocol::bundle::Seats;
use tally_protocol::keys::SecretKey;
use tally_protocol::time::UnixTime;

// sysexits codes, shared with tally and tally-publisher: 64 command line or
// configuration, 65 a refused bundle file, 70 a failure at run time, 75 another tallyd
// holds the data directory (try again).
use tally_protocol::exit::{EX_DATAERR, EX_SOFTWARE, EX_TEMPFAIL, EX_USAGE};

/// Target of the line that says why tallyd exits: written to the log file only, since
/// stderr gets the plain `tallyd: ...` message.
const EXIT_TARGET: &str = "tallyd_exit";

/// Where `tallyd` looks for its configuration by default.
const DEFAULT_CONFIG: &str = "/etc/tally/tallyd.toml";

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
    /// Create the server identity (key pair) and admin token, both 0600.
    Init(SiteArgs),
    /// Write an activation request to send to the vendor.
    Request {
        #[command(flatten)]
        site: SiteArgs,
        /// Where to write the request.
        #[arg(long)]
        out: PathBuf,
        /// A reference for the vendor (order number, contract id).
        #[arg(long)]
        customer_ref: Option<String>,
    },
    /// Check the configuration and bundles and print what would be served.
    CheckConfig {
        /// The configuration file.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Serve the bundles of the configuration.
    Run {
        /// The configuration file.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Also append every log line to this file (overrides the config's `log_file`);
        /// reopened on SIGHUP.
        #[arg(long)]
        log_file: Option<PathBuf>,
    },
    /// Write a support bundle for the vendor's support: versions, configuration, bundle
    /// summaries, ledger summary and recent log lines. Holds no key and no token.
    Diagnose {
        /// The configuration file.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Where to write it (JSON).
        #[arg(long)]
        out: PathBuf,
    },
    /// Give a bundle back (to move seats to new hardware): stops this server from ever
    /// loading it again and writes a return proof signed by the server key.
    /// Run it with tallyd stopped.
    Return {
        /// The configuration file.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The id of the bundle to return.
        #[arg(long)]
        bundle: String,
        /// Where to write the return proof.
        #[arg(long)]
        out: PathBuf,
    },
    /// Convert a FlexLM options file into a policy file to review: each rule names its
    /// source line; lines with no tally equivalent are printed on stderr and listed at
    /// the end of the policy. Exit 0 when written, 65 for a file that is not an options
    /// file (the message names the line).
    ImportOptions {
        /// The FlexLM options file.
        file: PathBuf,
        /// Where to write the policy; standard output when omitted.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace an existing --out file.
        #[arg(long, requires = "out")]
        force: bool,
    },
    /// Write the manual pages: tallyd(8), one per subcommand (tallyd-run(8), ...) and
    /// tallyd.toml(5). Hidden: the packages run it at build time.
    #[command(hide = true)]
    Man {
        /// The directory to write them into (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

/// The commented example configuration (packaging/tallyd.toml), the documentation of
/// every setting: tallyd.toml(5) is made from it, so the two cannot disagree.
const EXAMPLE_CONFIG: &str = include_str!("../../packaging/tallyd.toml");

/// Where the data directory comes from: `--data-dir`, else the config file's.
#[derive(clap::Args)]
struct SiteArgs {
    /// Data directory (overrides the config file's).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The configuration file, read for its data directory.
    #[arg(long)]
    config: Option<PathBuf>,
}

impl SiteArgs {
    fn data_dir(&self) -> Result<PathBuf, Failure> {
        if let Some(dir) = &self.data_dir {
            return Ok(dir.clone());
        }
        let path = self
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
        if self.config.is_none() && !path.exists() {
            return Ok(PathBuf::from(tally_config::DEFAULT_DATA_DIR));
        }
        Ok(DaemonConfig::load(&path).map_err(usage)?.data_dir)
    }
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
    /// Most connections at once from one IP address.
    #[arg(long, default_value_t = tally_config::DEFAULT_MAX_CONNECTIONS_PER_ADDRESS)]
    max_connections_per_address: usize,
    /// Checkouts per second one IP address may ask for (burst: twice that); 0: no limit.
    #[arg(long, default_value_t = tally_config::DEFAULT_CHECKOUT_RATE)]
    checkout_rate: u32,
    /// A policy file (reservations, limits, include/exclude) to try out.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// After `tally admin remove`, seconds the removed user gets no seat of that feature
    /// on that host; 0: none.
    #[arg(long, default_value_t = tally_config::DEFAULT_REMOVE_HOLDOFF_SECS)]
    remove_holdoff_secs: u64,
    /// Spool directory for usage reports (written every --report-interval-secs and at stop).
    #[arg(long)]
    report_dir: Option<PathBuf>,
    /// How often to write a usage report into --report-dir, seconds.
    #[arg(long, default_value_t = tally_config::DEFAULT_REPORT_INTERVAL_SECS)]
    report_interval_secs: u64,
    /// Upload spooled reports to this https:// URL (needs --report-dir).
    #[arg(long, requires = "report_dir")]
    report_upload_url: Option<String>,
    /// Extra CA certificates (PEM) to trust for --report-upload-url.
    #[arg(long)]
    report_upload_ca: Option<PathBuf>,
    /// Address of the dashboard and metrics endpoint; by default the QUIC port + 1 on the
    /// same address (a free port when --listen has port 0).
    #[arg(long)]
    http_listen: Option<SocketAddr>,
}

/// Failures sorted by exit code.
enum Failure {
    /// Bad command line, config or files: exit 64.
    Usage(anyhow::Error),
    /// Bad data (a refused bundle): exit 65.
    Data(anyhow::Error),
    /// Failure while serving: exit 70.
    Runtime(anyhow::Error),
    /// Another tallyd holds the data directory: exit 75.
    InUse(anyhow::Error),
}

fn usage(e: impl Into<anyhow::Error>) -> Failure {
    Failure::Usage(e.into())
}

/// The exit code of each way `tallyd` can fail to start or stop serving: a refused
/// bundle file 65, another tallyd on the data directory 75, a failure while serving
/// 70, anything else (command line, config, files, binding) 64.
impl From<StartError> for Failure {
    fn from(e: StartError) -> Failure {
        match e {
            e @ StartError::Refused(_) => Failure::Data(e.into()),
            e @ StartError::InUse { .. } => Failure::InUse(e.into()),
            e @ (StartError::Runtime(_) | StartError::Signal(_) | StartError::Serve(_)) => {
                Failure::Runtime(e.into())
            }
            e => Failure::Usage(e.into()),
        }
    }
}

fn main() -> ExitCode {
    let cli: Cli = match tally_protocol::cli::parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    init_logging();
    let result = match cli.command {
        Command::Demo(args) => run_demo(args),
        Command::Init(site) => init(&site),
        Command::Request {
            site,
            out,
            customer_ref,
        } => request(&site, &out, customer_ref),
        Command::CheckConfig { config } => check_config(&config),
        Command::Run { config, log_file } => run(&config, log_file.as_deref()),
        Command::Return {
            config,
            bundle,
            out,
        } => return_bundle(&config, &bundle, &out),
        Command::Diagnose { config, out } => diagnose(&config, &out),
        Command::ImportOptions { file, out, force } => import_options(&file, out.as_deref(), force),
        Command::Man { out } => write_man_pages(&out),
    };
    let (e, code) = match result {
        Ok(()) => return ExitCode::SUCCESS,
        Err(Failure::Usage(e)) => (e, EX_USAGE),
        Err(Failure::Data(e)) => (e, EX_DATAERR),
        Err(Failure::Runtime(e)) => (e, EX_SOFTWARE),
        Err(Failure::InUse(e)) => (e, EX_TEMPFAIL),
    };
    eprintln!("tallyd: {e:#}");
    // A site that reads the log file, not stderr, learns why tallyd stopped too.
    tracing::error!(target: EXIT_TARGET, "exit {code}: {e:#}");
    ExitCode::from(code)
}

/// Log lines go to stderr (journald under systemd) and, once `run` opens one, to the log
/// file ([`tally_daemon::logfile`]), in the same format without colours.
/// `RUST_LOG` sets the level (default `info`, with openraft's own lines at `error` and
/// its replication's off: its info lines, such as elections and votes, are the consensus
/// engine's diary, and it logs every RPC to a member that is down, twice a second, as a
/// warning and an error; tallyd logs what matters of them in its own words, once: a
/// member that does not answer, and answers again, in `cluster::net`).
fn init_logging() {
    /// See above.
    const DEFAULT_LOG_FILTER: &str = "info,openraft=error,openraft::replication=off";
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let stderr = tally_protocol::cli::stderr_layer().with_filter(
        tracing_subscriber::filter::filter_fn(|m| m.target() != EXIT_TARGET),
    );
    let file = tracing_subscriber::fmt::layer()
        .with_writer(&tally_daemon::logfile::LOG_FILE)
        .with_ansi(false);
    tracing_subscriber::registry()
        .with(filter)
        .with(stderr)
        .with(file)
        .init();
}

/// `tallyd man`: the pages of the commands from their clap definitions, and the
/// configuration's page from [`EXAMPLE_CONFIG`].
fn write_man_pages(out: &Path) -> Result<(), Failure> {
    use clap::CommandFactory;
    use tally_protocol::man;
    let failed = |e: std::io::Error| usage(anyhow!("{}: {e}", out.display()));
    std::fs::create_dir_all(out).map_err(failed)?;
    let mut written = man::write_command_pages(Cli::command(), "8", out).map_err(failed)?;
    let config = man::config_page(
        &man::ConfigPage {
            name: "tallyd.toml",
            section: "5",
            version: env!("CARGO_PKG_VERSION"),
            summary: "configuration of tallyd, the tally license server",
            path: DEFAULT_CONFIG,
            description: &[
                "`tallyd run`, `check-config`, `request`, `init`, `diagnose` and `return` \
                 read it (`--config FILE`, default /etc/tally/tallyd.toml). The file is \
                 TOML; an unknown key is an error. `tallyd check-config` checks it and \
                 the bundles it points at. Settings take effect when tallyd starts; a \
                 reload (SIGHUP, `tally admin reload`) reads the bundles and the policy \
                 file again.",
                "Each setting below is shown with its default value; one shown after # \
                 is not set by default, with an example value.",
            ],
            see_also: &["tallyd(8)", "tally(1)", "tally-publisher(1)"],
        },
        EXAMPLE_CONFIG,
    );
    written.push(man::write_page(out, "tallyd.toml.5", &config).map_err(failed)?);
    for path in written {
        println!("{}", path.display());
    }
    Ok(())
}

fn init(site: &SiteArgs) -> Result<(), Failure> {
    println!("{}", start::init(&site.data_dir()?)?);
    Ok(())
}

fn request(site: &SiteArgs, out: &Path, customer_ref: Option<String>) -> Result<(), Failure> {
    let data_dir = site.data_dir()?;
    let key = start::load_identity(&data_dir)?;
    let request = ActivationRequest {
        server_key: key.public(),
        host_fingerprint: host::fingerprint(),
        hostname: host::hostname(),
        os: host::os(),
        virtualization: host::virtualization(),
        customer_reference: customer_ref,
        created_at: UnixTime::now(),
    };
    tally_daemon::files::write_atomic(
        out,
        activation::request_to_armored(&request, &key).as_bytes(),
        0o644,
    )
    .with_context(|| format!("writing {}", out.display()))
    .map_err(usage)?;
    println!(
        "activation request written to {}\n  server key  {}\n  host        {} ({})\n  send it to your vendor; no network connection is needed",
        out.display(),
        request.server_key.fingerprint(),
        request.hostname,
        request.host_fingerprint
    );
    Ok(())
}

fn check_config(config_path: &Path) -> Result<(), Failure> {
    let checked = start::check_config(config_path)?;
    print!("{}", checked.report);
    for refusal in &checked.refused {
        eprintln!("tallyd: {refusal}");
    }
    Ok(checked.verdict()?)
}

fn run(config_path: &Path, log_file: Option<&Path>) -> Result<(), Failure> {
    start::run(config_path, log_file, |at| {
        println!(
            "tallyd listening on {} (UDP), serving {} bundle(s); server key {}",
            at.addr, at.bundles, at.server_key
        );
        if let Some(http) = at.http {
            println!("dashboard http://{http}/  (metrics: http://{http}/metrics)");
        }
    })?;
    Ok(())
}

fn diagnose(config_path: &Path, out: &Path) -> Result<(), Failure> {
    use tally_daemon::diagnose::{self, SiteFacts};
    let config_text = std::fs::read_to_string(config_path)
        .map_err(|e| usage(anyhow!("{}: {e}", config_path.display())))?;
    let site = start::load_site(config_path);
    let facts = match &site {
        Ok(site) => Ok(SiteFacts {
            server_key: site.key.public(),
            loaded: &site.loaded,
            data_dir: &site.config.data_dir,
        }),
        Err(e) => Err(e as &dyn std::error::Error),
    };
    let log_file = DaemonConfig::load(config_path)
        .ok()
        .and_then(|c| c.log_file);
    let doc = diagnose::document(
        config_path,
        &config_text,
        facts,
        log_file.as_deref(),
        UnixTime::now(),
    )
    .map_err(usage)?;
    let text = serde_json::to_string_pretty(&doc).map_err(|e| Failure::Runtime(e.into()))?;
    // 0600: a support file describes the site (hosts, bundles, paths, log lines).
    tally_daemon::files::write_atomic(out, text.as_bytes(), 0o600)
        .with_context(|| format!("writing {}", out.display()))
        .map_err(usage)?;
    println!(
        "support bundle written to {} (no keys, no tokens)",
        out.display()
    );
    Ok(())
}

fn import_options(file: &Path, out: Option<&Path>, force: bool) -> Result<(), Failure> {
    use tally_config::options;
    let name = file.display().to_string();
    let bytes = tally_daemon::files::read_regular(file, options::MAX_OPTIONS_LEN)
        .map_err(|e| Failure::Data(anyhow!("{name}: {e}")))?;
    let converted = options::convert_bytes(&name, &bytes).map_err(|e| Failure::Data(e.into()))?;
    for u in &converted.unmapped {
        eprintln!("{name}:{}: not mapped: {} -- {}", u.line, u.text, u.reason);
    }
    let Some(out) = out else {
        print!("{}", converted.policy);
        return Ok(());
    };
    let write = if force {
        tally_daemon::files::write_atomic
    } else {
        tally_daemon::files::create_atomic
    };
    write(out, converted.policy.as_bytes(), 0o644).map_err(|e| {
        usage(if e.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow!("{} exists; --force replaces it", out.display())
        } else {
            anyhow!("writing {}: {e}", out.display())
        })
    })?;
    println!(
        "policy written to {}: {} line(s) mapped, {} not mapped (on stderr and at its end); \
         review it, name it as `policy` in tallyd.toml, then run tallyd check-config",
        out.display(),
        converted.mapped,
        converted.unmapped.len()
    );
    Ok(())
}

fn return_bundle(config_path: &Path, id: &str, out: &Path) -> Result<(), Failure> {
    use tally_daemon::returns::{self, ReturnSite};
    let site = start::load_site(config_path)?;
    let returned = returns::return_bundle(
        &ReturnSite {
            data_dir: &site.config.data_dir,
            bundle_dir: &site.config.bundle_dir,
            key: &site.key,
            rules: &site.rules,
            loaded: &site.loaded,
        },
        id,
        out,
        UnixTime::now(),
    )
    .map_err(|e| {
        if e.is_in_use() {
            Failure::InUse(e.into())
        } else if e.is_runtime() {
            Failure::Runtime(e.into())
        } else {
            usage(e)
        }
    })?;
    if let Some(e) = &returned.journal_error {
        // The return itself is recorded; the reports then miss only its moment.
        eprintln!("tallyd: warning: the return could not be journaled for usage reports: {e}");
    }
    println!(
        "bundle {id} ({}) returned: this server will never load it again",
        returned.file.display()
    );
    println!("  stopped serving:");
    for g in &returned.stopped_serving {
        println!("    {} (bundle {})", g.description, g.bundle);
    }
    if !returned.retired.is_empty() {
        println!(
            "  bundles it superseded, which never count here again: {}",
            returned.retired.join(", ")
        );
    }
    let outstanding = returned.outstanding;
    println!(
        "return proof written to {}; send it to your vendor{}",
        out.display(),
        if outstanding > 0 {
            format!(
                " ({} still recorded as held)",
                tally_protocol::wire::plural(outstanding as u64, "seat was", "seats were")
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

fn run_demo(args: DemoArgs) -> Result<(), Failure> {
    let config = DaemonConfig {
        listen: args.listen,
        lease_ttl_secs: args.lease_ttl_secs,
        heartbeat_secs: args.heartbeat_secs,
        idle_timeout_secs: args.idle_timeout_secs,
        max_connections_per_address: args.max_connections_per_address,
        checkout_rate: args.checkout_rate,
        checkout_burst: args.checkout_rate.saturating_mul(2).max(1),
        ..Default::default()
    };
    config
        .validate(Path::new("<command line>"))
        .map_err(usage)?;
    // The throwaway directory lives as long as this function, i.e. the whole run.
    let (throwaway, data_dir) = match args.data_dir {
        Some(dir) => {
            identity::create_private_dir(&dir).map_err(usage)?;
            (None, dir)
        }
        None => {
            let dir = tempfile::Builder::new()
                .prefix("tally-demo-")
                .tempdir()
                .context("creating a throwaway data directory")
                .map_err(usage)?;
            let path = dir.path().to_path_buf();
            (Some(dir), path)
        }
    };
    let policy = start::load_policy(args.policy.as_deref())?;
    let uploader = match (&args.report_upload_url, &args.report_dir) {
        (Some(url), Some(dir)) => Some(Arc::new(
            tally_daemon::upload::Uploader::new(url, args.report_upload_ca.as_deref(), dir)
                .map_err(usage)?,
        )),
        _ => None,
    };
    let (key, _) = identity::load_or_create(&data_dir).map_err(usage)?;
    let (admin_token, _) = identity::load_or_create_admin_token(&data_dir).map_err(usage)?;
    let bundle = demo::load_or_issue(&data_dir, &key, UnixTime::now()).map_err(usage)?;
    let store = start::open_store(&data_dir)?;

    let runtime = tokio::runtime::Runtime::new()
        .context("starting the async runtime")
        .map_err(Failure::Runtime)?;
    runtime.block_on(async {
        let shutdown = signals::shutdown_requested().map_err(|e| Failure::Runtime(e.into()))?;
        let server = Server::bind(ServerParams {
            listen: config.listen,
            identity: key.clone(),
            bundles: vec![bundle.clone()],
            store,
            cluster: Vec::new(),
            join_cluster: false,
            lease_ttl: Duration::from_secs(config.lease_ttl_secs),
            heartbeat: Duration::from_secs(config.heartbeat_secs),
            idle_timeout: Duration::from_secs(config.idle_timeout_secs),
            demo: true,
            reloader: None,
            admin_token: Some(admin_token),
            reload_signal: None,
            remove_holdoff: Duration::from_secs(args.remove_holdoff_secs),
            refused: Vec::new(),
            policy,
            status_needs_token: false,
            limits: tally_daemon::admission::Limits::from_config(&config),
            http_listen: Some(args.http_listen.unwrap_or_else(|| {
                let mut a = args.listen;
                if a.port() != 0 {
                    a.set_port(a.port().wrapping_add(1));
                }
                a
            })),
            reports: tally_daemon::server::ReportSettings {
                host_fingerprint: host::fingerprint(),
                spool: args.report_dir.clone(),
                interval: Some(Duration::from_secs(args.report_interval_secs.max(1))),
                uploader,
                ..Default::default()
            },
        })
        .await
        .map_err(usage)?;
        let addr = server
            .local_addr()
            .map_err(|e| Failure::Runtime(e.into()))?;
        print_demo_banner(addr, &data_dir, throwaway.is_some(), &key, &bundle.bundle);
        if let Some(http) = server.http_addr() {
            println!("  dashboard    http://{http}/  (metrics: http://{http}/metrics)");
        }
        signals::notify_systemd("READY=1");
        server
            .run(shutdown)
            .await
            .map_err(|e| Failure::Runtime(e.into()))
    })?;
    drop(throwaway);
    Ok(())
}

fn print_demo_banner(
    addr: SocketAddr,
    data_dir: &Path,
    throwaway: bool,
    key: &SecretKey,
    bundle: &tally_protocol::bundle::Bundle,
) {
    let features: Vec<String> = bundle
        .features
        .iter()
        .map(|f| {
            let seats = match f.seats {
                Seats::Counted(n) => format!("{n} seats"),
                Seats::Uncounted => "uncounted".into(),
            };
            match f.expires {
                Some(e) if f.evaluation => {
                    format!("{} ({seats}, evaluation until {})", f.name, e.last_day())
                }
                Some(e) => format!("{} ({seats}, until {})", f.name, e.last_day()),
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
    println!(
        "  admin token  {}",
        data_dir.join(identity::ADMIN_TOKEN_FILE).display()
    );
    println!();
    println!("Try it from another terminal:");
    println!("  tally --server {addr} --demo status");
    println!("  tally --server {addr} --demo run solver -- sleep 30");
    println!("(from the source tree, `tally` is `cargo run --release --bin tally --`)");
    println!("Stop with Ctrl-C.");
}
