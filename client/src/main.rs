//! `tally`: the command-line client for scripts, users and admins.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tally_client::grace::{LostSeatTerms, OnLostSeat, SeatGrace};
use tally_client::{
    cache, Client, ClientConfig, ClientError, LeaseHandle, LeaseStatus, Session, Trust, Want,
};
use tally_protocol::bundle::{FeatureGrant, VerifiedBundle};
use tally_protocol::lease::LeaseId;
use tally_protocol::time::UnixTime;
use tally_protocol::wire::{plural, AdminOp, Denial, DenialReason, ErrorCode, StatusReply};

/// Writes a line to stdout through [`write_out`]: a closed pipe ends `tally` quietly.
macro_rules! outln {
    ($($arg:tt)*) => { write_out(format_args!("{}\n", format_args!($($arg)*))) };
}

/// Writes a line to stderr; a closed or broken stderr is ignored (there is nowhere
/// left to say anything, and `tally run` must go on tending its command's seat).
macro_rules! errln {
    () => { write_err(format_args!("\n")) };
    ($($arg:tt)*) => { write_err(format_args!("{}\n", format_args!($($arg)*))) };
}

/// Writes to stderr without a line break; see [`errln`].
macro_rules! err {
    ($($arg:tt)*) => { write_err(format_args!($($arg)*)) };
}

// sysexits codes, shared with tallyd and tally-publisher. Here: 65 an edited
// borrowed-lease cache, 69 no license server reached, 74 the output cannot be written,
// 75 a denied checkout (try again later), 77 a server the vendor does not vouch for or
// a wrong admin token.
use tally_protocol::exit::{
    EX_CANTCREAT, EX_DATAERR, EX_IOERR, EX_NOPERM, EX_PROTOCOL, EX_SOFTWARE, EX_TEMPFAIL,
    EX_UNAVAILABLE, EX_USAGE,
};
/// Shell convention: the command could not be executed.
const EXIT_CANNOT_EXECUTE: u8 = 126;
/// Shell convention: the command was not found.
const EXIT_NOT_FOUND: u8 = 127;

/// How long `tally run` waits between attempts to get a seat again after losing it.
const RECONNECT_INTERVAL: Duration = Duration::from_secs(1);
/// `tally run`: the command was stopped because it ran without a seat for longer than
/// the vendor's grace (sysexits "temporary failure", as for a denied checkout: no seat).
const EXIT_LOST_SEAT: u8 = EX_TEMPFAIL;
/// How long a command stopped for want of a seat has between SIGTERM and SIGKILL.
const STOP_KILL_AFTER: Duration = Duration::from_secs(5);

#[derive(Parser)]
#[command(name = "tally", version, about = "tally license client")]
struct Cli {
    /// License server as HOST[:PORT]; repeat (or separate with commas) for a search path
    /// tried in order. Default 127.0.0.1:27300.
    #[arg(
        long = "server",
        env = "TALLY_SERVER",
        value_delimiter = ',',
        global = true
    )]
    servers: Vec<String>,
    /// Trust the built-in demo vendor key (for `tallyd demo` only).
    #[arg(long, global = true)]
    demo: bool,
    /// A vendor public key file (`.pub`) to trust; repeatable. `--vendor-pub`, as in
    /// `tally-publisher verify`; the older `--vendor-key` still works, hidden from help.
    #[arg(long = "vendor-pub", alias = "vendor-key", global = true)]
    vendor_keys: Vec<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show features, seats in use, their holders and who waits.
    Status {
        /// Show only this feature (like `lmstat -f`); exits 65 if the server has no
        /// such feature.
        feature: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The admin token file, for servers that show their status to admins only.
        #[arg(long)]
        admin_token_file: Option<PathBuf>,
    },
    /// Borrow seats for a laptop going offline: kept in your cache and honoured with no
    /// server until the period ends (or `tally return`).
    Borrow {
        /// The feature.
        feature: String,
        /// How long: 12h, 3d, 1w (hours, days, weeks).
        #[arg(long = "for", value_parser = parse_period)]
        period: Duration,
        /// Seats, at least 1.
        #[arg(long, default_value_t = 1, value_parser = parse_count)]
        count: u32,
        /// The application version to borrow for: the seat then serves no higher one
        /// (without it, any version the licence allows).
        #[arg(long, value_parser = parse_version)]
        version: Option<String>,
        /// The application's build date, YYYY-MM-DD, checked against maintenance dates
        /// now as the server would (offline, the licence terms are checked again).
        #[arg(long, value_parser = parse_date)]
        build_date: Option<UnixTime>,
    },
    /// Give borrowed seats of a feature back early.
    Return {
        /// The feature.
        feature: String,
    },
    /// Check what usually goes wrong: server reachable over UDP, trust chain, clock
    /// skew, licence expiry, and (with a feature) whether this user may check it out.
    Doctor {
        /// A feature to try a checkout of (checked in at once).
        feature: Option<String>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the manual pages: tally(1) and one per subcommand (tally-run(1), ...).
    /// Hidden: the packages run it at build time.
    #[command(hide = true)]
    Man {
        /// The directory to write them into (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Administrative operations; need the server's admin token.
    Admin {
        /// File holding the admin token (the server's `admin.token`).
        #[arg(long)]
        admin_token_file: PathBuf,
        #[command(subcommand)]
        op: AdminCommand,
    },
    /// Check out seats, run a command while holding them, check them in when it exits.
    ///
    /// SIGTERM, SIGINT and SIGHUP are passed on to the command; `tally` waits for it and
    /// checks the seats in. Exits with the command's status (128+N if killed by signal
    /// N); 75 if the seats were denied, or if the command was stopped after running
    /// without a seat for longer than the vendor's grace; 128+N if signal N came while
    /// waiting for a seat.
    Run {
        /// The feature to check out.
        feature: String,
        /// Seats to check out, at least 1.
        #[arg(long, default_value_t = 1, value_parser = parse_count)]
        count: u32,
        /// The application version to present (for version ceilings), like 2027.1.
        #[arg(long, value_parser = parse_version)]
        version: Option<String>,
        /// The application's build date, YYYY-MM-DD (for maintenance dates).
        #[arg(long, value_parser = parse_date)]
        build_date: Option<UnixTime>,
        /// Wait up to this many seconds in the queue when no seat is free.
        #[arg(long, default_value_t = 0)]
        wait: u32,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Re-read the server's bundles and policy without dropping any lease. Prints each
    /// refused bundle file; exits 65 if any was refused or the policy is broken.
    Reload,
    /// Remove a lease (as shown by `tally status`); its holder learns on its next
    /// heartbeat and its user gets no seat of the feature on that host for the server's
    /// hold-off (`remove_holdoff_secs`).
    Remove {
        /// The lease id, like L00c0ffee00c0ffee.
        #[arg(value_parser = parse_lease_id)]
        lease: LeaseId,
    },
    /// Stop the server gracefully; leases are kept in its store.
    Shutdown,
    /// Export a signed usage report of everything not exported yet.
    Report {
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
    },
    /// Show a three-server site's cluster (members, roles, replication lag), or add or
    /// remove a member. Runs on the leader, found from any member `--server` names.
    Cluster {
        #[command(subcommand)]
        op: Option<ClusterCommand>,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Members, their roles and how far each is behind the leader (the default).
    Show,
    /// Add a server: one the `[[cluster]]` tables of the members' configs name (reloaded)
    /// and the served bundle binds, started with `join_cluster = true`. It catches up
    /// as a learner, then votes. Exits 75 if it did not finish in time: run it again.
    Add {
        /// Its key fingerprint (as `tallyd init` prints it) or node id.
        member: String,
    },
    /// Remove a member, such as a server that was lost (remove it before adding its
    /// replacement: every quorum stays made of live servers).
    Remove {
        /// Its node id (as `tally admin cluster` shows it) or key fingerprint.
        member: String,
    },
}

fn parse_period(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a period like 12h, 3d or 1w"))?;
    let hours = match unit {
        "h" => n,
        "d" => n * 24,
        "w" => n * 24 * 7,
        _ => return Err(format!("'{text}' is not a period like 12h, 3d or 1w")),
    };
    if hours == 0 {
        return Err("the period must be at least 1h".into());
    }
    Ok(Duration::from_secs(hours * 3600))
}

/// A seat count: a whole number, at least 1 (0 is refused here, before anything is
/// sent).
fn parse_count(text: &str) -> Result<u32, String> {
    match text.trim().parse::<u32>() {
        Ok(0) => Err("the seat count must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!(
            "'{text}' is not a seat count (a whole number, at least 1)"
        )),
    }
}

/// An application version as vendors write them: starts with a digit, then digits,
/// letters and `.`, `-`, `_`, `+` (2027, 2027.1, 12.0.3b).
fn parse_version(text: &str) -> Result<String, String> {
    let ok = text.starts_with(|c: char| c.is_ascii_digit())
        && text.len() <= tally_protocol::wire::MAX_NAME_LEN
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+'));
    if ok {
        Ok(text.to_string())
    } else {
        Err(format!(
            "'{}' is not a version: a version starts with a digit, like 2027, 2027.1 or 12.0.3b",
            shown(text)
        ))
    }
}

fn parse_lease_id(text: &str) -> Result<LeaseId, String> {
    let hex = text.strip_prefix('L').unwrap_or(text);
    u64::from_str_radix(hex, 16)
        .map(LeaseId)
        .map_err(|_| format!("'{text}' is not a lease id like L00c0ffee00c0ffee"))
}

fn parse_date(text: &str) -> Result<UnixTime, String> {
    UnixTime::from_date(text).ok_or_else(|| format!("'{text}' is not a date like 2027-06-30"))
}

/// A failure with its exit code.
struct Failure {
    code: u8,
    message: String,
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Failure {
        let code = match &e {
            ClientError::Denied(_) | ClientError::SeatInUse(_) => EX_TEMPFAIL,
            ClientError::Untrusted(_) => EX_NOPERM,
            ClientError::Config(_) => EX_USAGE,
            ClientError::Server(e) => server_exit_code(e.code),
            ClientError::Protocol(_) => EX_PROTOCOL,
            _ => EX_UNAVAILABLE,
        };
        Failure {
            code,
            message: e.to_string(),
        }
    }
}

/// The exit code for a failure the server reports, by its code (the README's list).
fn server_exit_code(code: ErrorCode) -> u8 {
    match code {
        ErrorCode::Unauthorized | ErrorCode::AdminDisabled => EX_NOPERM,
        ErrorCode::UnknownLease | ErrorCode::ReloadFailed => EX_DATAERR,
        ErrorCode::StorageUnavailable
        | ErrorCode::ShuttingDown
        | ErrorCode::NotLeader
        | ErrorCode::ClusterChange => EX_TEMPFAIL,
        ErrorCode::Internal => EX_SOFTWARE,
        _ => EX_PROTOCOL,
    }
}

/// Writes to stdout. A closed pipe (`tally status | head -1`) ends the process quietly
/// with status 0, as the reader has what it wanted; any other write error (a full
/// disk) is said and ends it with 74.
fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        write_err(format_args!("tally: cannot write the output: {e}\n"));
        std::process::exit(EX_IOERR.into());
    }
}

/// Writes to stderr, ignoring failure (see [`errln`]).
fn write_err(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = std::io::stderr().lock().write_fmt(args);
}

fn main() -> ExitCode {
    let cli: Cli = match tally_protocol::cli::parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    // A bare level shows tally's own steps, not quinn's and rustls's (see log_directive).
    let directive = tally_client::log_directive(std::env::var("TALLY_LOG").ok().as_deref());
    {
        use tracing_subscriber::prelude::*;
        let filter = tracing_subscriber::EnvFilter::try_new(&directive).unwrap_or_else(|e| {
            eprintln!("tally: TALLY_LOG={directive:?} is not a log filter ({e}); using warn");
            tracing_subscriber::EnvFilter::new("warn")
        });
        tracing_subscriber::registry()
            .with(filter)
            .with(tally_protocol::cli::stderr_layer())
            .init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            errln!("tally: cannot start the async runtime: {e}");
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            // Messages carry names from the server (holders, features); an older or
            // hostile server must not drive this terminal with them.
            errln!("tally: {}", shown(&f.message));
            ExitCode::from(f.code)
        }
    }
}

fn write_new_file(path: &std::path::Path, text: &str) -> Result<(), Failure> {
    use std::io::Write;
    let fail = |e: std::io::Error| Failure {
        code: EX_CANTCREAT,
        message: format!("{}: {e}", path.display()),
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(fail)?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(fail)
}

fn read_token(path: &std::path::Path) -> Result<String, Failure> {
    std::fs::read_to_string(path)
        .map(|t| t.trim().to_string())
        .map_err(|e| Failure {
            code: EX_USAGE,
            message: format!("{}: {e}", path.display()),
        })
}

fn client_config(cli: &Cli) -> Result<ClientConfig, Failure> {
    let usage = |message: String| Failure {
        code: EX_USAGE,
        message,
    };
    let trust = match (cli.demo, cli.vendor_keys.is_empty()) {
        (true, true) => Trust::Demo,
        (false, false) => {
            let mut keys = Vec::new();
            for path in &cli.vendor_keys {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| usage(format!("{}: {e}", path.display())))?;
                let key = tally_protocol::keys::public_key_from_armored(&text)
                    .map_err(|e| usage(format!("{}: {e}", path.display())))?;
                keys.push(key);
            }
            Trust::Vendor(keys)
        }
        (true, false) => return Err(usage(
            "--demo and --vendor-pub exclude each other: demo trust is for the demo server only"
                .into(),
        )),
        (false, true) => {
            return Err(usage(
                "say which vendor to trust: --vendor-pub FILE (the vendor's public key), \
                 or --demo for a `tallyd demo` server"
                    .into(),
            ))
        }
    };
    let servers = if cli.servers.is_empty() {
        vec![format!("127.0.0.1:{}", tally_protocol::wire::DEFAULT_PORT)]
    } else {
        cli.servers.clone()
    };
    Ok(ClientConfig::new(servers, trust))
}

async fn run(cli: Cli) -> Result<u8, Failure> {
    if let Command::Completions { shell } = &cli.command {
        use clap::CommandFactory;
        let mut script = Vec::new();
        clap_complete::generate(*shell, &mut Cli::command(), "tally", &mut script);
        outln!("{}", String::from_utf8_lossy(&script).trim_end());
        return Ok(0);
    }
    if let Command::Man { out } = &cli.command {
        use clap::CommandFactory;
        let written = std::fs::create_dir_all(out)
            .and_then(|()| tally_protocol::man::write_command_pages(Cli::command(), "1", out))
            .map_err(|e| Failure {
                code: EX_CANTCREAT,
                message: format!("{}: {e}", out.display()),
            })?;
        for path in written {
            outln!("{}", path.display());
        }
        return Ok(0);
    }
    let config = client_config(&cli)?;
    match cli.command {
        Command::Completions { .. } | Command::Man { .. } => Ok(0),
        Command::Doctor { feature } => Ok(doctor(config, feature).await),
        Command::Borrow {
            feature,
            period,
            count,
            version,
            build_date,
        } => {
            let client = Client::connect(config).await?;
            let mut want = Want::feature(&feature);
            want.count = count;
            want.version = version;
            want.build_date = build_date;
            let result = client.borrow(&want, period).await;
            client.close().await;
            let borrowed = result?;
            outln!(
                "borrowed {} of '{feature}' until {} (lease {}); it works with no server until then",
                plural(count, "seat", "seats"),
                borrowed.until,
                borrowed.lease.id()
            );
            Ok(0)
        }
        Command::Return { feature } => {
            let client = Client::connect(config).await?;
            let result = client.return_borrowed(&feature).await;
            client.close().await;
            match result? {
                0 => {
                    errln!("tally: no borrowed seat of '{feature}' from this server");
                    Ok(EX_DATAERR)
                }
                n => {
                    outln!(
                        "returned {} of '{feature}'",
                        plural(n as u64, "borrowed lease", "borrowed leases")
                    );
                    Ok(0)
                }
            }
        }
        Command::Status {
            feature,
            json,
            admin_token_file,
        } => {
            let token = match &admin_token_file {
                Some(path) => Some(read_token(path)?),
                None => None,
            };
            let session = match Session::connect(&config).await {
                Ok(session) => session,
                Err(e @ ClientError::NoServer(_)) => {
                    return show_borrowed_offline(&config, json, e.into())
                }
                Err(e) => return Err(e.into()),
            };
            let mut status = session.status(token.as_deref()).await?;
            let demo = session.hello().demo;
            let server = session.server();
            let bundles = session.bundles().to_vec();
            session.close().await;
            if let Some(feature) = &feature {
                // `lmstat -f FEATURE`: just that one, or a clear "no such feature".
                status.features.retain(|f| &f.name == feature);
                if status.features.is_empty() {
                    return Err(Failure {
                        code: EX_DATAERR,
                        message: format!("feature '{feature}' is not licensed on server {server}"),
                    });
                }
            }
            if json {
                print_status_json(&status, &server.to_string(), demo);
            } else {
                print_status(&status, &bundles, &server.to_string(), demo);
            }
            Ok(0)
        }
        Command::Admin {
            admin_token_file,
            op,
        } => {
            let token = read_token(&admin_token_file)?;
            let (op, out) = match op {
                AdminCommand::Reload => {
                    // Its own request: the answer lists every refusal.
                    let session = Session::connect(&config).await?;
                    let result = session.admin_reload(token.trim()).await;
                    session.close().await;
                    return Ok(print_reload(&result?));
                }
                AdminCommand::Remove { lease } => (AdminOp::Remove { lease }, None),
                AdminCommand::Shutdown => (AdminOp::Shutdown, None),
                AdminCommand::Report { out } => (AdminOp::ExportReport, Some(out)),
                AdminCommand::Cluster { op } => match op.unwrap_or(ClusterCommand::Show) {
                    ClusterCommand::Show => (AdminOp::ClusterShow, None),
                    ClusterCommand::Add { member } => (AdminOp::ClusterAdd { member }, None),
                    ClusterCommand::Remove { member } => (AdminOp::ClusterRemove { member }, None),
                },
            };
            let session = Session::connect(&config).await?;
            let exporting = out.is_some();
            let request = session.admin_reply(token.trim(), op);
            // A large journal takes a while to export: show that it is under way.
            let result = if exporting && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                tokio::pin!(request);
                let started = std::time::Instant::now();
                loop {
                    tokio::select! {
                        r = &mut request => { errln!(); break r; }
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {
                            err!("\rexporting the usage report... {:.0} s", started.elapsed().as_secs_f64());
                        }
                    }
                }
            } else {
                request.await
            };
            session.close().await;
            let reply = result?;
            if let (Some(out), Some(report)) = (out, reply.report) {
                write_new_file(&out, &report)?;
                outln!("{} written to {}", reply.message, out.display());
            } else {
                outln!("{}", reply.message);
            }
            Ok(0)
        }
        Command::Run {
            feature,
            count,
            version,
            build_date,
            wait,
            command,
        } => {
            let want = Want {
                feature,
                count,
                version,
                build_date,
                wait: Duration::from_secs(wait as u64),
                // `tally run` tries again itself, and tells its user (see `supervise`).
                reacquire: false,
            };
            run_with_seat(config, want, command).await
        }
    }
}

async fn run_with_seat(
    config: ClientConfig,
    want: Want,
    command: Vec<String>,
) -> Result<u8, Failure> {
    // Installed before anything else: a signal that arrived while connecting or waiting
    // in the queue must not take the default action, which would leave the queue to the
    // server's idle timeout (and hand a dead process a seat meanwhile).
    let mut signals = Signals::install().map_err(|e| Failure {
        code: EX_SOFTWARE,
        message: format!("cannot install signal handlers: {e}"),
    })?;
    // Admins see the program that holds the seat, not the wrapper.
    let mut config = config;
    if let Some(name) = std::path::Path::new(&command[0]).file_name() {
        config.identity.program = name.to_string_lossy().chars().take(200).collect();
    }
    let connected = tokio::select! {
        c = Client::connect_online(config.clone()) => c,
        signal = signals.next() => return Ok(128 + signal as u8),
    };
    let (client, handle, terms) = match connected {
        Ok(client) => {
            // The vendor's terms come from the bundles this server proved it serves.
            let terms = match client.session().await {
                Ok(s) => s.lost_seat_terms(&want.feature),
                Err(_) => LostSeatTerms::DEFAULT,
            };
            let checkout = tokio::select! {
                r = checkout_showing_queue(&client, &want) => r,
                signal = signals.next() => {
                    // Dropping the checkout stops its stream (the server takes the wait
                    // out of the queue); closing tells the server the connection is gone
                    // now, so nothing is granted to this process any more.
                    client.close().await;
                    errln!("tally: stopped waiting for a seat of '{}' (signal {signal})", want.feature);
                    return Ok(128 + signal as u8);
                }
            };
            match checkout {
                Ok(handle) => (Some(client), handle, terms),
                Err(ClientError::Denied(denial)) => {
                    client.close().await;
                    errln!("tally: denied: {}", shown(&denial.to_string()));
                    return Ok(EX_TEMPFAIL);
                }
                Err(e) => {
                    client.close().await;
                    return Err(e.into());
                }
            }
        }
        Err(e @ ClientError::NoServer(_)) => {
            // Offline: a seat borrowed earlier is honoured until it ends, for what it
            // was borrowed for and by one program per seat (see `cache::claim`).
            match cache::claim(&config.trust, &want, None, UnixTime::now()) {
                Ok(cache::Claim::Held(claimed)) => {
                    errln!(
                        "tally: no license server reachable; using the seat of '{}' borrowed until {}",
                        want.feature, claimed.borrowed.until
                    );
                    (None, LeaseHandle::borrowed(claimed), LostSeatTerms::DEFAULT)
                }
                Ok(cache::Claim::Refused(why)) => {
                    errln!("tally: denied: {why}");
                    errln!("tally: no license server reachable, so only borrowed seats can serve");
                    return Ok(EX_TEMPFAIL);
                }
                Ok(cache::Claim::NotBorrowed) => return Err(e.into()),
                Err(cache_error) => {
                    return Err(Failure {
                        code: EX_DATAERR,
                        message: cache_error.to_string(),
                    })
                }
            }
        }
        Err(e) => return Err(e.into()),
    };
    tracing::info!(lease = %handle.id(), "checked out");
    let child = match tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            // Checked in before the connection closes (a checkin left to the handle's
            // drop could lose the race with the close; the close would free it anyway).
            let _ = handle.checkin().await;
            if let Some(c) = client {
                c.close().await;
            }
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                EXIT_NOT_FOUND
            } else {
                EXIT_CANNOT_EXECUTE
            };
            errln!("tally: cannot run {}: {e}", command[0]);
            return Ok(code);
        }
    };
    let seat = Seat {
        client,
        handle: Some(handle),
        want,
        grace: SeatGrace::new(terms),
    };
    supervise(child, seat, &mut signals, &command[0]).await
}

/// The seat `tally run` holds for its command, and the vendor's grace for it.
struct Seat {
    /// `None` for a borrowed seat used offline: nothing to tend.
    client: Option<Client>,
    /// `None` while the seat is lost and another is being sought.
    handle: Option<LeaseHandle>,
    want: Want,
    grace: SeatGrace,
}

/// Runs the command to its end: forwards SIGTERM, SIGINT and SIGHUP to it, watches the
/// seat (reconnects are the library's; a lost seat is sought again), applies the vendor's
/// lost-seat grace, and when the command has exited checks the seat in. Returns the
/// command's exit status, or [`EXIT_LOST_SEAT`] if it was stopped for want of a seat.
async fn supervise(
    mut child: tokio::process::Child,
    mut seat: Seat,
    signals: &mut Signals,
    program: &str,
) -> Result<u8, Failure> {
    let pid = child.id().map(|p| p as i32);
    let feature = seat.want.feature.clone();
    let mut watch = seat.handle.as_ref().map(LeaseHandle::watch);
    let mut reacquire: Option<Reacquire> = None;
    // The end of the administrator's hold-off last announced (announced once).
    let mut held_off_until: Option<UnixTime> = None;
    // When the grace ran out in the current spell without a seat (acted on once).
    let mut acted = false;
    // Set once the command is being stopped for want of a seat: when to SIGKILL it.
    let mut kill_at: Option<tokio::time::Instant> = None;
    let mut stopped_for_lost_seat = false;
    let mut killed = false;
    let status = loop {
        let grace_deadline = seat
            .grace
            .deadline()
            .filter(|_| !acted)
            .map(tokio::time::Instant::from_std);
        tokio::select! {
            status = child.wait() => break status,
            signal = signals.next() => {
                if let Some(pid) = pid {
                    if signal == libc::SIGINT && sys::sigint_came_from_terminal(pid) {
                        // The terminal sent it to the whole foreground group: the command
                        // has it already, and a second one could abort what the first
                        // asked it to cancel.
                        tracing::debug!("SIGINT from the terminal; the command has it already");
                    } else {
                        sys::send_signal(pid, signal);
                    }
                }
            }
            changed = async { watch.as_mut().expect("guarded").changed().await }, if watch.is_some() => {
                let status = watch.as_mut().expect("guarded").borrow_and_update().clone();
                if changed.is_err() && !matches!(status, LeaseStatus::Lost(_)) {
                    // Nobody tends this lease (a borrowed seat): nothing more to watch.
                    watch = None;
                    continue;
                }
                let was_without = seat.grace.without_seat_since().is_some();
                seat.grace.observe(&status, std::time::Instant::now());
                match status {
                    LeaseStatus::Reconnecting => {
                        if !was_without {
                            errln!("tally: lost the connection to the license server; reconnecting");
                        }
                    }
                    LeaseStatus::Active => {
                        acted = false;
                        if was_without {
                            errln!("tally: reconnected; the seat is still held");
                        }
                    }
                    LeaseStatus::Borrowed { .. } => acted = false,
                    LeaseStatus::Lost(why) => {
                        errln!("tally: lost the seat of '{feature}': {why}; trying to get one again");
                        watch = None;
                        seat.handle = None;
                        if let Some(client) = &seat.client {
                            reacquire = Some(try_again(client, &seat.want));
                        }
                    }
                }
            }
            result = async { reacquire.as_mut().expect("guarded").await }, if reacquire.is_some() => {
                reacquire = None;
                match result {
                    Ok(new) => {
                        errln!("tally: got a seat of '{feature}' again");
                        seat.grace.observe(&LeaseStatus::Active, std::time::Instant::now());
                        acted = false;
                        watch = Some(new.watch());
                        seat.handle = Some(new);
                    }
                    Err(ClientError::Denied(Denial {
                        reason: DenialReason::RemovedByAdministrator { until, .. },
                    })) => {
                        // Asking every second would only be refused (and logged by the
                        // server) until the hold-off ends: ask again then.
                        if held_off_until != Some(until) {
                            errln!(
                                "tally: the administrator removed the seat of '{feature}'; \
                                 no seat for this user on this host until {until}"
                            );
                            held_off_until = Some(until);
                        }
                        if let Some(client) = &seat.client {
                            reacquire = Some(try_again_at(client, &seat.want, until));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "still no seat");
                        if let Some(client) = &seat.client {
                            reacquire = Some(try_again(client, &seat.want));
                        }
                    }
                }
            }
            _ = sleep_until_some(grace_deadline) => {
                acted = true;
                let terms = seat.grace.terms();
                match terms.action {
                    OnLostSeat::Stop => {
                        errln!(
                            "tally: no seat of '{feature}' for {} s, the grace the vendor allows; \
                             stopping {program} (SIGTERM, then SIGKILL after {} s); exit status {EXIT_LOST_SEAT}",
                            terms.grace_secs,
                            STOP_KILL_AFTER.as_secs()
                        );
                        stopped_for_lost_seat = true;
                        if let Some(pid) = pid {
                            sys::send_signal(pid, libc::SIGTERM);
                        }
                        kill_at = Some(tokio::time::Instant::now() + STOP_KILL_AFTER);
                    }
                    OnLostSeat::Warn => errln!(
                        "tally: warning: {program} has run without a seat of '{feature}' for more than {} s; \
                         the vendor lets it go on, but the licence is not being honoured",
                        terms.grace_secs
                    ),
                }
            }
            _ = sleep_until_some(kill_at.filter(|_| !killed)) => {
                killed = true;
                errln!("tally: {program} did not stop within {} s; killing it", STOP_KILL_AFTER.as_secs());
                if let Some(pid) = pid {
                    sys::send_signal(pid, libc::SIGKILL);
                }
            }
        }
    };
    drop(reacquire);
    if let Some(handle) = seat.handle.take() {
        if let Err(e) = handle.checkin().await {
            tracing::warn!(error = %e, "checkin failed; the seat returns when its TTL runs out");
        }
    }
    if let Some(client) = seat.client.take() {
        client.close().await;
    }
    let status = status.map_err(|e| Failure {
        code: EX_SOFTWARE,
        message: format!("waiting for {program}: {e}"),
    })?;
    if stopped_for_lost_seat {
        return Ok(EXIT_LOST_SEAT);
    }
    Ok(exit_code(status))
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One attempt to get a seat again after losing it.
type Reacquire =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<LeaseHandle, ClientError>> + Send>>;

/// Starts an attempt to get a seat again, a moment after the loss (or the previous
/// attempt), without waiting in the queue, as a licensed application would.
fn try_again(client: &Client, want: &Want) -> Reacquire {
    let client = client.clone();
    let want = Want {
        wait: Duration::ZERO,
        ..want.clone()
    };
    Box::pin(async move {
        tokio::time::sleep(RECONNECT_INTERVAL).await;
        client.checkout(&want).await
    })
}

/// Starts an attempt to get a seat again when the hold-off after an administrator's
/// removal ends (`until`, the server's wall clock; bounded to the hold-offs a server
/// sets, so a far-off or skewed time still retries within the hour).
fn try_again_at(client: &Client, want: &Want, until: UnixTime) -> Reacquire {
    let client = client.clone();
    let want = Want {
        wait: Duration::ZERO,
        ..want.clone()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let delay = Duration::from_secs(until.0.saturating_sub(now).min(3600)).max(RECONNECT_INTERVAL);
    Box::pin(async move {
        tokio::time::sleep(delay).await;
        client.checkout(&want).await
    })
}

/// SIGINT, SIGTERM and SIGHUP as one stream. A signal this process was started with
/// ignored (`nohup`, a background job of a script) stays ignored, for `tally` and for
/// the command it runs, as it would be without `tally`.
struct Signals {
    streams: Vec<(i32, tokio::signal::unix::Signal)>,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut streams = Vec::new();
        for (number, kind) in [
            (libc::SIGINT, SignalKind::interrupt()),
            (libc::SIGTERM, SignalKind::terminate()),
            (libc::SIGHUP, SignalKind::hangup()),
        ] {
            if !sys::ignored(number) {
                streams.push((number, signal(kind)?));
            }
        }
        Ok(Signals { streams })
    }

    /// The next signal's number.
    async fn next(&mut self) -> i32 {
        if self.streams.is_empty() {
            return std::future::pending().await;
        }
        std::future::poll_fn(|cx| {
            for (number, stream) in &mut self.streams {
                if let std::task::Poll::Ready(Some(())) = stream.poll_recv(cx) {
                    return std::task::Poll::Ready(*number);
                }
            }
            std::task::Poll::Pending
        })
        .await
    }
}

/// The few system calls `tally run` needs that std does not offer.
mod sys {
    #![allow(unsafe_code)]

    /// Whether `signal` is ignored in this process (inherited from whoever started it).
    pub fn ignored(signal: i32) -> bool {
        // SAFETY: a null new action only reads the current one into `old`, which is a
        // zeroed, properly aligned sigaction owned by this frame.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(signal, std::ptr::null(), &mut old) == 0
                && old.sa_sigaction == libc::SIG_IGN
        }
    }

    /// Sends `signal` to the command: to its process group if it made one of its own
    /// (so its helpers hear it too), else to the command alone.
    pub fn send_signal(pid: i32, signal: i32) {
        // SAFETY: getpgid, getpgrp and kill take plain integers and touch no memory.
        unsafe {
            let group = libc::getpgid(pid);
            let target = if group == pid && group != libc::getpgrp() {
                -pid
            } else {
                pid
            };
            libc::kill(target, signal);
        }
    }

    /// Whether a SIGINT we got was most likely sent by the terminal (Ctrl-C) to the whole
    /// foreground process group, the command included: this process's group is the
    /// terminal's foreground group and the command is in it.
    pub fn sigint_came_from_terminal(pid: i32) -> bool {
        // SAFETY: tcgetpgrp, getpgrp and getpgid take plain integers and touch no memory;
        // tcgetpgrp on a descriptor that is not our terminal fails with -1.
        unsafe {
            let ours = libc::getpgrp();
            let foreground = [0, 1, 2].iter().any(|&fd| libc::tcgetpgrp(fd) == ours);
            foreground && libc::getpgid(pid) == ours
        }
    }
}
/// Checks out, printing the queue position while the checkout waits.
async fn checkout_showing_queue(client: &Client, want: &Want) -> Result<LeaseHandle, ClientError> {
    client
        .checkout_showing_queue(want, |p| {
            errln!(
                "tally: waiting for a seat of '{}' (position {p} in the queue)",
                want.feature
            );
        })
        .await
}

/// `tally doctor`: one line per check, then a verdict. Exits 0 when nothing failed,
/// 69 only when no server answered, 77 when the one that answered is not trusted, and
/// 75 when the server answered but the licence does not serve (expired, denied).
async fn doctor(config: ClientConfig, feature: Option<String>) -> u8 {
    use tally_client::doctor::{self, Verdict};
    let verdict = doctor::run(&config, feature.as_deref(), &mut |line| {
        outln!("{:<5} {}", line.level.label(), shown(&line.text));
    })
    .await;
    match verdict {
        Verdict::Healthy => 0,
        Verdict::NoServer => EX_UNAVAILABLE,
        Verdict::Untrusted => EX_NOPERM,
        Verdict::Expired | Verdict::Denied => EX_TEMPFAIL,
        Verdict::CheckoutFailed(e) => Failure::from(e).code,
    }
}

fn exit_code(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => 128u8.saturating_add(signal as u8),
        (None, None) => EX_SOFTWARE,
    }
}

/// Prints a reload's outcome: the summary on stdout when everything loaded, else each
/// refusal and the broken policy on stderr. Exit 0 only when everything loaded; 65 (bad
/// data) when a bundle file or the policy was refused; 75 when the reload could not run
/// (a stuck reload, a server without a bundle directory, shutting down).
fn print_reload(outcome: &tally_protocol::wire::ReloadOutcome) -> u8 {
    for r in &outcome.refused {
        errln!("tally: refused: {}", shown(&r.to_string()));
    }
    if let Some(p) = &outcome.policy_error {
        errln!("tally: policy refused: {}", shown(&p.to_string()));
    }
    if outcome.ok() {
        outln!("{}", shown(&outcome.summary));
        0
    } else {
        errln!("tally: {}", shown(&outcome.summary));
        if outcome.error.is_some() {
            EX_TEMPFAIL
        } else {
            EX_DATAERR
        }
    }
}

/// Text from elsewhere as it may reach a terminal: control characters (escape
/// sequences, line breaks) written as `\u{..}` escapes.
fn shown(text: &str) -> std::borrow::Cow<'_, str> {
    tally_protocol::wire::escape_unprintable(text)
}

fn print_status(status: &StatusReply, bundles: &[VerifiedBundle], server: &str, demo: bool) {
    // Each line is escaped whole: names of holders and features come from the server.
    macro_rules! say {
        ($($arg:tt)*) => { outln!("{}", shown(&format!($($arg)*))) };
    }
    let demo = if demo { " (demo)" } else { "" };
    say!(
        "server {server}{demo}, key {}, time {}",
        status.server_fingerprint,
        status.server_time
    );
    say!(
        "{:<20} {:>7} {:>9} {:>9}  {:<12} EXPIRES",
        "FEATURE",
        "IN USE",
        "TOTAL",
        "RESERVED",
        "VERSIONS"
    );
    for f in &status.features {
        let total = f
            .total
            .map(|t| t.to_string())
            .unwrap_or_else(|| "uncounted".into());
        let expires = match f.expires {
            Some(e) if e <= status.server_time => format!("expired {}", e.last_day()),
            Some(e) => format!("until {}", e.last_day()),
            None => "permanent".into(),
        };
        // The ceiling comes from the vendor-signed bundles this server presented.
        let versions = tally_client::info::feature_info(bundles, &f.name, status.server_time)
            .and_then(|i| i.version_ceiling)
            .map(|c| format!("up to {c}"))
            .unwrap_or_else(|| "any".into());
        let eval = if f.evaluation { " (evaluation)" } else { "" };
        let over = if f.overdraft_in_use > 0 {
            format!(" ({} in overdraft)", f.overdraft_in_use)
        } else {
            String::new()
        };
        say!(
            "{:<20} {:>7} {:>9} {:>9}  {:<12} {expires}{eval}{over}",
            f.name,
            f.in_use,
            total,
            f.reserved,
            versions
        );
        // The vendor-signed grant says how the seats count (shared, a suite, tokens).
        let grant = bundles
            .iter()
            .flat_map(|b| b.bundle.features.iter())
            .find(|g| g.name == f.name);
        let (sharers, alone) = shared_holders(grant, &f.holders);
        for (key, group) in &sharers {
            let first = group[0];
            let leases: Vec<String> = group.iter().map(|h| h.lease.to_string()).collect();
            let pids: Vec<String> = group.iter().map(|h| h.client.pid.to_string()).collect();
            let seats = key.1 * key.2;
            say!(
                "  {}  {} sharing {} ({} {}, leases {})  since {}",
                first.client,
                plural(group.len() as u64, "process", "processes"),
                plural(seats, "seat", "seats"),
                if group.len() == 1 { "pid" } else { "pids" },
                pids.join(", "),
                leases.join(", "),
                first.since
            );
        }
        for h in alone {
            let borrowed = h
                .borrowed_until
                .map(|u| format!("  borrowed until {u}"))
                .unwrap_or_default();
            let over = if h.overdraft { "  (overdraft)" } else { "" };
            let draws = match grant {
                Some(g) => match (&g.tokens, bundles_suite_of(bundles, &f.name)) {
                    (Some(t), _) => format!(
                        "  = {} of {}",
                        plural(
                            u64::from(h.count) * u64::from(t.per_seat),
                            "token",
                            "tokens"
                        ),
                        t.pool
                    ),
                    (None, Some(suite)) => format!("  (suite {suite})"),
                    _ => String::new(),
                },
                None => bundles_suite_of(bundles, &f.name)
                    .map(|suite| format!("  (suite {suite})"))
                    .unwrap_or_default(),
            };
            say!(
                "  {}  {}  pid {}  {}  {} since {}{draws}{borrowed}{over}",
                h.lease,
                h.client,
                h.client.pid,
                h.client.program,
                plural(h.count, "seat", "seats"),
                h.since
            );
        }
        for (i, q) in f.queue.iter().enumerate() {
            say!(
                "  queued #{}  {}  pid {}  {}  {} since {}",
                i + 1,
                q.client,
                q.client.pid,
                q.client.program,
                plural(q.count, "seat", "seats"),
                q.since
            );
        }
    }
}

/// A shared feature's holders by the group they share seats in: (key, seats per set,
/// sets) to the group's holders, in order of arrival; and the holders that share
/// nothing (every holder when the grant shares nothing; a borrow never shares). A group
/// holds one set of seats per `limit` sharers.
#[allow(clippy::type_complexity)]
fn shared_holders<'a>(
    grant: Option<&FeatureGrant>,
    holders: &'a [tally_protocol::wire::HolderStatus],
) -> (
    Vec<(
        (String, u64, u64),
        Vec<&'a tally_protocol::wire::HolderStatus>,
    )>,
    Vec<&'a tally_protocol::wire::HolderStatus>,
) {
    let Some(share) = grant.and_then(|g| g.share) else {
        return (Vec::new(), holders.iter().collect());
    };
    let mut groups: Vec<((String, u32), Vec<&tally_protocol::wire::HolderStatus>)> = Vec::new();
    let mut alone = Vec::new();
    for h in holders {
        if h.borrowed_until.is_some() {
            alone.push(h);
            continue;
        }
        let c = &h.client;
        let key = format!(
            "{}\0{}\0{}",
            if share.user { c.user.as_str() } else { "" },
            if share.host {
                c.host.to_ascii_lowercase()
            } else {
                String::new()
            },
            if share.display {
                c.display.as_deref().unwrap_or("")
            } else {
                ""
            },
        );
        match groups
            .iter_mut()
            .find(|(k, _)| k.0 == key && k.1 == h.count)
        {
            Some((_, g)) => g.push(h),
            None => groups.push(((key, h.count), vec![h])),
        }
    }
    let groups = groups
        .into_iter()
        .map(|((key, count), g)| {
            let sets = match share.limit {
                0 => 1,
                l => (g.len() as u64).div_ceil(u64::from(l)),
            };
            ((key, u64::from(count), sets), g)
        })
        .collect();
    (groups, alone)
}

/// The suite whose component `feature` is, in the bundles the server presented.
fn bundles_suite_of<'a>(bundles: &'a [VerifiedBundle], feature: &str) -> Option<&'a str> {
    bundles
        .iter()
        .flat_map(|b| b.bundle.features.iter())
        .find(|g| g.suite && g.components.iter().any(|c| c.name == feature))
        .map(|g| g.name.as_str())
}

/// `tally status` with no server reachable: what this user has borrowed and until when.
/// Exits 0 when there is a borrowed seat to show (the seats work; the server's absence
/// is said on stderr), else fails as before (69).
fn show_borrowed_offline(
    config: &ClientConfig,
    json: bool,
    offline: Failure,
) -> Result<u8, Failure> {
    let borrowed = cache::list(&config.trust, UnixTime::now()).map_err(|e| Failure {
        code: EX_DATAERR,
        message: e.to_string(),
    })?;
    if borrowed.is_empty() {
        return Err(offline);
    }
    errln!("tally: {}", offline.message);
    if json {
        let leases: Vec<serde_json::Value> = borrowed
            .iter()
            .map(|b| {
                serde_json::json!({
                    "feature": b.lease.grant.feature,
                    "count": b.lease.grant.count,
                    "lease": b.lease_ref.id.to_string(),
                    "borrowed_until": b.until.to_string(),
                    "server_fingerprint": b.server_key.fingerprint(),
                })
            })
            .collect();
        let doc = serde_json::json!({ "server": null, "offline": true, "borrowed": leases });
        outln!(
            "{}",
            serde_json::to_string_pretty(&doc).unwrap_or_else(|_| "{}".into())
        );
    } else {
        outln!("no license server reachable; seats borrowed by you, usable here until they end:");
        outln!("{:<20} {:>7}  {:<18} UNTIL", "FEATURE", "SEATS", "LEASE");
        for b in &borrowed {
            outln!(
                "{:<20} {:>7}  {:<18} {}",
                b.lease.grant.feature,
                b.lease.grant.count,
                b.lease_ref.id.to_string(),
                b.until
            );
        }
    }
    Ok(0)
}

fn print_status_json(status: &StatusReply, server: &str, demo: bool) {
    let mut doc = status.to_json(demo);
    doc["server"] = serde_json::json!(server);
    outln!(
        "{}",
        serde_json::to_string_pretty(&doc).unwrap_or_else(|_| "{}".into())
    );
}
