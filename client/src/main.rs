//! `tally`: the command-line client for scripts, users and admins.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tally_client::{
    cache, local_identity, Client, ClientConfig, ClientError, LeaseHandle, LeaseStatus, Session,
    Trust, Want,
};
use tally_protocol::lease::LeaseId;
use tally_protocol::time::UnixTime;
use tally_protocol::wire::{AdminOp, StatusReply};
use tokio::sync::oneshot;

/// sysexits: usage error.
const EX_USAGE: u8 = 64;
/// sysexits: no license server could be reached.
const EX_UNAVAILABLE: u8 = 69;
/// sysexits: bad data (an edited borrowed-lease cache).
const EX_DATAERR: u8 = 65;
/// sysexits: cannot create an output file.
const EX_CANTCREAT: u8 = 73;
/// sysexits: internal error.
const EX_SOFTWARE: u8 = 70;
/// sysexits: temporary failure; here, the checkout was denied (try again later).
const EX_TEMPFAIL: u8 = 75;
/// sysexits: protocol error.
const EX_PROTOCOL: u8 = 76;
/// sysexits: permission denied; here, the server is not vouched for by the vendor.
const EX_NOPERM: u8 = 77;
/// Shell convention: the command could not be executed.
const EXIT_CANNOT_EXECUTE: u8 = 126;
/// Shell convention: the command was not found.
const EXIT_NOT_FOUND: u8 = 127;

/// How long `tally run` waits between reconnection attempts after losing the server.
const RECONNECT_INTERVAL: Duration = Duration::from_secs(1);

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
    /// A vendor public key file to trust; repeatable.
    #[arg(long = "vendor-key", global = true)]
    vendor_keys: Vec<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show features, seats in use, their holders and who waits.
    Status {
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
        /// Seats.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// The application version to borrow for: the seat then serves no higher one
        /// (without it, any version the licence allows).
        #[arg(long)]
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
    /// Exits with the command's status; 75 if the seats were denied.
    Run {
        /// The feature to check out.
        feature: String,
        /// Seats to check out.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// The application version to present (for version ceilings).
        #[arg(long)]
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
    /// Re-read the server's bundles and policy without dropping any lease.
    Reload,
    /// Remove a lease (as shown by `tally status`); its holder learns on its next heartbeat.
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
            ClientError::Denied(_) => EX_TEMPFAIL,
            ClientError::Untrusted(_) => EX_NOPERM,
            ClientError::Config(_) => EX_USAGE,
            ClientError::Protocol(_) | ClientError::Server(_) => EX_PROTOCOL,
            _ => EX_UNAVAILABLE,
        };
        Failure {
            code,
            message: e.to_string(),
        }
    }
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
            tracing_subscriber::EnvFilter::try_from_env("TALLY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tally: cannot start the async runtime: {e}");
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("tally: {}", f.message);
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
            "--demo and --vendor-key exclude each other: demo trust is for the demo server only"
                .into(),
        )),
        (false, true) => {
            return Err(usage(
                "say which vendor to trust: --vendor-key FILE (the vendor's public key), \
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
        clap_complete::generate(*shell, &mut Cli::command(), "tally", &mut std::io::stdout());
        return Ok(0);
    }
    let config = client_config(&cli)?;
    match cli.command {
        Command::Completions { .. } => Ok(0),
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
            println!(
                "borrowed {} seat(s) of '{feature}' until {} (lease {}); it works with no server until then",
                count,
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
                    eprintln!("tally: no borrowed seat of '{feature}' from this server");
                    Ok(EX_DATAERR)
                }
                n => {
                    println!("returned {n} borrowed lease(s) of '{feature}'");
                    Ok(0)
                }
            }
        }
        Command::Status {
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
            let status = session.status(token.as_deref()).await?;
            let demo = session.hello().demo;
            let server = session.server();
            session.close().await;
            if json {
                print_status_json(&status, &server.to_string(), demo);
            } else {
                print_status(&status, &server.to_string(), demo);
            }
            Ok(0)
        }
        Command::Admin {
            admin_token_file,
            op,
        } => {
            let token = read_token(&admin_token_file)?;
            let (op, out) = match op {
                AdminCommand::Reload => (AdminOp::Reload, None),
                AdminCommand::Remove { lease } => (AdminOp::Remove { lease }, None),
                AdminCommand::Shutdown => (AdminOp::Shutdown, None),
                AdminCommand::Report { out } => (AdminOp::ExportReport, Some(out)),
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
                        r = &mut request => { eprintln!(); break r; }
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {
                            eprint!("\rexporting the usage report... {:.0} s", started.elapsed().as_secs_f64());
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
                println!("{} written to {}", reply.message, out.display());
            } else {
                println!("{}", reply.message);
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
    // Admins see the program that holds the seat, not the wrapper.
    let mut config = config;
    if let Some(name) = std::path::Path::new(&command[0]).file_name() {
        config.identity.program = name.to_string_lossy().chars().take(200).collect();
    }
    let (client, handle) = match Client::connect(config.clone()).await {
        Ok(client) => match checkout_showing_queue(&client, &want).await {
            Ok(handle) => (Some(client), handle),
            Err(ClientError::Denied(denial)) => {
                client.close().await;
                eprintln!("tally: denied: {denial}");
                return Ok(EX_TEMPFAIL);
            }
            Err(e) => return Err(e.into()),
        },
        Err(e @ ClientError::NoServer(_)) => {
            // Offline: a seat borrowed earlier is honoured until it ends, for what it
            // was borrowed for and by one program per seat (see `cache::claim`).
            match cache::claim(&config.trust, &want, None, now()) {
                Ok(cache::Claim::Held(claimed)) => {
                    eprintln!(
                        "tally: no license server reachable; using the seat of '{}' borrowed until {}",
                        want.feature, claimed.borrowed.until
                    );
                    (None, LeaseHandle::borrowed(claimed))
                }
                Ok(cache::Claim::Refused(why)) => {
                    eprintln!("tally: denied: {why}");
                    eprintln!(
                        "tally: no license server reachable, so only borrowed seats can serve"
                    );
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
    // SIGINT from the terminal goes to the whole process group: the command handles it,
    // and we stay to check the seat in after it exits.
    tokio::spawn(async { while tokio::signal::ctrl_c().await.is_ok() {} });
    let mut child = match tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            drop(handle);
            if let Some(c) = client {
                c.close().await;
            }
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                EXIT_NOT_FOUND
            } else {
                EXIT_CANNOT_EXECUTE
            };
            eprintln!("tally: cannot run {}: {e}", command[0]);
            return Ok(code);
        }
    };
    let (stop_tx, stop_rx) = oneshot::channel();
    let keeper = tokio::spawn(keep_seat(client, handle, want, stop_rx));
    let status = child.wait().await;
    let _ = stop_tx.send(());
    let _ = keeper.await;
    let status = status.map_err(|e| Failure {
        code: EX_SOFTWARE,
        message: format!("waiting for {}: {e}", command[0]),
    })?;
    Ok(exit_code(status))
}

/// Checks out, printing the queue position while the checkout waits.
async fn checkout_showing_queue(client: &Client, want: &Want) -> Result<LeaseHandle, ClientError> {
    let checkout = client.checkout(want);
    if want.wait.is_zero() {
        return checkout.await;
    }
    tokio::pin!(checkout);
    let me = local_identity();
    let mut shown = None;
    loop {
        tokio::select! {
            result = &mut checkout => return result,
            _ = tokio::time::sleep(Duration::from_millis(1000)) => {
                let Ok(status) = client.status().await else { continue };
                let position = status
                    .features
                    .iter()
                    .find(|f| f.name == want.feature)
                    .and_then(|f| f.queue.iter().position(|q| q.client.pid == me.pid && q.client.host == me.host));
                if let Some(p) = position {
                    if shown != Some(p) {
                        eprintln!("tally: waiting for a seat of '{}' (position {} in the queue)", want.feature, p + 1);
                        shown = Some(p);
                    }
                }
            }
        }
    }
}

/// `tally doctor`: one line per check, then a verdict. Exits 0 when nothing failed.
async fn doctor(config: ClientConfig, feature: Option<String>) -> u8 {
    let mut failed = 0u8;
    let mut report = |level: &str, text: String| {
        println!("{level:<5} {text}");
        if level == "FAIL" && failed == 0 {
            failed = 1;
        }
    };
    let session = match Session::connect(&config).await {
        Ok(s) => {
            report(
                "ok",
                format!(
                    "server {} answers over QUIC (UDP); tallyd {}",
                    s.server(),
                    s.hello().server_version
                ),
            );
            report(
                "ok",
                format!(
                    "trust chain: server key {} is vouched for by a trusted vendor bundle",
                    s.server_key().fingerprint()
                ),
            );
            s
        }
        Err(ClientError::Untrusted(why)) => {
            report("FAIL", format!("trust chain: {why}"));
            report(
                "",
                "fix: the application must trust the vendor key that signed the server's bundle (--vendor-key),                  and the server must serve a bundle issued for its own key"
                    .into(),
            );
            return EX_NOPERM;
        }
        Err(e) => {
            report("FAIL", format!("no server reachable: {e}"));
            report(
                "",
                format!(
                    "fix: check that tallyd runs on {} and that UDP port {} is open in the firewalls between here and there",
                    config.servers.join(", "),
                    tally_protocol::wire::DEFAULT_PORT
                ),
            );
            return EX_UNAVAILABLE;
        }
    };
    let skew = now().0 as i64 - session.hello().server_time.0 as i64;
    if skew.abs() > 300 {
        report(
            "WARN",
            format!(
                "clock skew: this machine is {} s {} the server; fix: synchronise both with NTP",
                skew.abs(),
                if skew > 0 { "ahead of" } else { "behind" }
            ),
        );
    } else {
        report("ok", format!("clock skew {skew} s"));
    }
    let today = now();
    for b in session.bundles() {
        for f in &b.bundle.features {
            match f.expires.or(b.bundle.valid_until) {
                Some(end) if end <= today => report(
                    "FAIL",
                    format!("'{}' expired at the end of {}", f.name, end.last_day()),
                ),
                Some(end) if end.0 - today.0 <= 30 * 86_400 => report(
                    "WARN",
                    format!(
                        "'{}' ends after {} ({} days); ask the vendor for a renewal",
                        f.name,
                        end.last_day(),
                        (end.0 - today.0) / 86_400
                    ),
                ),
                _ => {}
            }
        }
    }
    if let Some(feature) = feature {
        let want = tally_protocol::wire::CheckoutRequest {
            feature: feature.clone(),
            count: 1,
            version: None,
            build_date: None,
            wait_secs: 0,
            borrow_secs: 0,
        };
        match session.checkout(&want).await {
            Ok(lease) => {
                let _ = session.checkin(&[lease.lease_ref()]).await;
                report(
                    "ok",
                    format!("'{feature}' can be checked out by {}", config.identity),
                );
            }
            Err(ClientError::Denied(d)) => {
                report("FAIL", format!("'{feature}' for {}: {d}", config.identity))
            }
            Err(e) => report("FAIL", format!("checkout of '{feature}': {e}")),
        }
    }
    session.close().await;
    if failed > 0 {
        EX_UNAVAILABLE
    } else {
        0
    }
}

fn now() -> UnixTime {
    UnixTime(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    )
}

fn exit_code(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => 128u8.saturating_add(signal as u8),
        (None, None) => EX_SOFTWARE,
    }
}

/// Heartbeats the lease while the command runs; on connection loss reconnects (next
/// server in the list if need be) and re-attaches the lease with its secret, so a server
/// restart or network blip costs no second seat. Checks the lease in when told to stop.
/// Watches the lease while the command runs: reports reconnects, and when the seat is
/// lost (removed by an administrator, expired) tries to get one again, as a licensed
/// application would. Checks the seat in when told to stop.
async fn keep_seat(
    client: Option<Client>,
    mut handle: LeaseHandle,
    want: Want,
    mut stop: oneshot::Receiver<()>,
) {
    let Some(client) = client else {
        // A borrowed seat: nothing to tend.
        let _ = stop.await;
        return;
    };
    let mut watch = handle.watch();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            changed = watch.changed() => {
                let status = watch.borrow().clone();
                if changed.is_err() && !matches!(status, LeaseStatus::Lost(_)) {
                    // Nobody tends this lease (a borrowed seat): nothing more to watch.
                    let _ = (&mut stop).await;
                    break;
                }
                match status {
                    LeaseStatus::Reconnecting => eprintln!("tally: lost the connection to the license server; reconnecting"),
                    LeaseStatus::Active => eprintln!("tally: reconnected; the seat is still held"),
                    LeaseStatus::Borrowed { .. } => {}
                    LeaseStatus::Lost(why) => {
                        eprintln!("tally: lost the seat of '{}': {why}; trying to get one again", want.feature);
                        loop {
                            tokio::select! {
                                _ = &mut stop => {
                                    client.close().await;
                                    return;
                                }
                                _ = tokio::time::sleep(RECONNECT_INTERVAL) => {}
                            }
                            match client.checkout(&Want { wait: Duration::ZERO, ..want.clone() }).await {
                                Ok(new) => {
                                    eprintln!("tally: got a seat of '{}' again", want.feature);
                                    handle = new;
                                    watch = handle.watch();
                                    break;
                                }
                                Err(e) => tracing::warn!(error = %e, "still no seat"),
                            }
                        }
                    }
                }
            }
        }
    }
    if let Err(e) = handle.checkin().await {
        tracing::warn!(error = %e, "checkin failed; the seat returns when its TTL runs out");
    }
    client.close().await;
}

fn print_status(status: &StatusReply, server: &str, demo: bool) {
    let demo = if demo { " (demo)" } else { "" };
    println!(
        "server {server}{demo}, key {}, time {}",
        status.server_fingerprint, status.server_time
    );
    println!("{:<20} {:>7} {:>7}  EXPIRES", "FEATURE", "IN USE", "TOTAL");
    for f in &status.features {
        let total = f
            .total
            .map(|t| t.to_string())
            .unwrap_or_else(|| "uncounted".into());
        let expires = match f.expires {
            Some(e) => format!("until {}", e.last_day()),
            None => "permanent".into(),
        };
        let eval = if f.evaluation { " (evaluation)" } else { "" };
        let over = if f.overdraft_in_use > 0 {
            format!(" ({} in overdraft)", f.overdraft_in_use)
        } else {
            String::new()
        };
        println!(
            "{:<20} {:>7} {:>7}  {expires}{eval}{over}",
            f.name, f.in_use, total
        );
        for h in &f.holders {
            let borrowed = h
                .borrowed_until
                .map(|u| format!("  borrowed until {u}"))
                .unwrap_or_default();
            println!(
                "  {}  {}  pid {}  {}  {} seat(s) since {}{borrowed}",
                h.lease, h.client, h.client.pid, h.client.program, h.count, h.since
            );
        }
        for (i, q) in f.queue.iter().enumerate() {
            println!(
                "  queued #{}  {}  pid {}  {}  {} seat(s) since {}",
                i + 1,
                q.client,
                q.client.pid,
                q.client.program,
                q.count,
                q.since
            );
        }
    }
}

/// `tally status` with no server reachable: what this user has borrowed and until when.
/// Exits 0 when there is a borrowed seat to show (the seats work; the server's absence
/// is said on stderr), else fails as before (69).
fn show_borrowed_offline(
    config: &ClientConfig,
    json: bool,
    offline: Failure,
) -> Result<u8, Failure> {
    let borrowed = cache::list(&config.trust, now()).map_err(|e| Failure {
        code: EX_DATAERR,
        message: e.to_string(),
    })?;
    if borrowed.is_empty() {
        return Err(offline);
    }
    eprintln!("tally: {}", offline.message);
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
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).unwrap_or_else(|_| "{}".into())
        );
    } else {
        println!("no license server reachable; seats borrowed by you, usable here until they end:");
        println!("{:<20} {:>7}  {:<18} UNTIL", "FEATURE", "SEATS", "LEASE");
        for b in &borrowed {
            println!(
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
    println!(
        "{}",
        serde_json::to_string_pretty(&doc).unwrap_or_else(|_| "{}".into())
    );
}
