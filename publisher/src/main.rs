//! `tally-publisher`: the vendor's tool. Keys, bundles, activation requests, return
//! proofs, FlexLM and RLM import, usage reports. Works on files only, except `receive`, the
//! server tallyd uploads its reports to.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tally_protocol::activation;
use tally_protocol::bundle::{self, Bundle};
use tally_protocol::keys::{self, PublicKey, SecretKey};
use tally_protocol::time::UnixTime;
use tally_publisher::{flexlm, reconcile, spec::Spec};

// sysexits codes, shared with tallyd and tally: 64 usage, 65 a file that does not
// verify or parse, 69 `receive` cannot listen.
use tally_protocol::exit::{EX_DATAERR, EX_UNAVAILABLE, EX_USAGE};
/// Largest input file read.
const MAX_INPUT: u64 = 16 * 1024 * 1024;

#[derive(Parser)]
#[command(name = "tally-publisher", version, about = "tally vendor tool")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make a vendor key pair: PREFIX.key (secret, 0600) and PREFIX.pub.
    Keygen {
        /// Path prefix of the two files.
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue a bundle from a spec, bound to the server of an activation request (or,
    /// with `--request` repeated, to the servers of one cluster).
    Issue {
        /// The vendor secret key (the `.key` file of `keygen`).
        #[arg(long, alias = "key")]
        vendor_key: PathBuf,
        /// The bundle spec (TOML).
        #[arg(long)]
        spec: PathBuf,
        /// The customer's activation request. Repeat it (up to 7 times) to bind one
        /// cluster: one request from each of its servers, each a different server.
        /// The spec's seats are the cluster's, counted once, not per server.
        #[arg(long, required = true)]
        request: Vec<PathBuf>,
        /// Where to write the bundle.
        #[arg(long)]
        out: PathBuf,
        /// Issue even if a feature or the bundle has already ended (warns on stderr);
        /// without it such a spec is refused with exit 65.
        #[arg(long)]
        allow_expired: bool,
    },
    /// Show what a tally file (bundle, activation request, return proof, key) says.
    Inspect {
        /// The file.
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check that a bundle is intact and signed by the given vendor key.
    Verify {
        /// The vendor public key (the `.pub` file of `keygen`).
        #[arg(long)]
        vendor_pub: PathBuf,
        /// The bundle.
        bundle: PathBuf,
    },
    /// Check a return proof: signed by the server the bundle was bound to.
    VerifyReturn {
        /// The returned bundle.
        #[arg(long)]
        bundle: PathBuf,
        /// The return proof.
        proof: PathBuf,
    },
    /// Verify usage reports: signatures, the server key the bundle binds, and one
    /// unbroken chain (give the reports in order).
    VerifyReport {
        /// A bundle the reporting server serves, or a directory of `*.bundle` files
        /// (repeatable); the reports must be signed by a server one of them binds.
        #[arg(long, required = true)]
        bundle: Vec<PathBuf>,
        /// The reports, in order.
        #[arg(required = true)]
        reports: Vec<PathBuf>,
    },
    /// Reconcile usage reports against a customer's bundles: licensed seats over time,
    /// peak, average, seat-hours, overdraft, denials, users, per feature and period.
    /// With `--dir`, many customers' reports at once: one summary table.
    Reconcile {
        /// A bundle of the customer, or a directory of `*.bundle` files (repeatable: give
        /// all of them; the reports' bundle history says which counted when, and reports
        /// without one fall back to these, superseded ones dropped). With `--dir`, the
        /// `*.bundle` files under DIR count too.
        #[arg(long, required_unless_present = "dir")]
        bundle: Vec<PathBuf>,
        /// A directory tree of many customers' `*.report` files (and `*.bundle` files):
        /// reports are grouped by site (the server that signed them, or the members of
        /// one cluster, any of which signs), each chain verified and reconciled, and one
        /// summary table written (customer, feature, licensed, peak, overdraft
        /// seat-hours, denials).
        #[arg(long, conflicts_with = "reports")]
        dir: Option<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value = "json")]
        format: Format,
        /// Write here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The reports, in order.
        #[arg(required_unless_present = "dir")]
        reports: Vec<PathBuf>,
    },
    /// Receive the usage reports tallyd uploads (`report_upload_url`): verify each against
    /// the customer's bundles and the chain stored so far, store it once, durably.
    Receive {
        /// Address to listen on, e.g. 0.0.0.0:8443 (with --tls-cert) or 127.0.0.1:8080
        /// (plain HTTP behind your TLS proxy).
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Where reports are stored: DIR/CUSTOMER/SERVER-KEY/tally-report-N.report.
        #[arg(long)]
        dir: PathBuf,
        /// The bundles you issued (`*.bundle`, also one subdirectory level per customer
        /// and one below); a report is accepted only from a server one of them binds.
        #[arg(long)]
        bundles: PathBuf,
        /// TLS certificate chain (PEM) to serve HTTPS with; without it plain HTTP, on a
        /// loopback address only.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The certificate's private key (PEM, mode 0600).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Largest report accepted, MiB (larger: 413).
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=512))]
        max_report_mib: u64,
    },
    /// Turn a FlexLM license file into a bundle spec to review and issue.
    ImportFlexlm {
        /// The FlexLM license file.
        license: PathBuf,
        /// Where to write the spec.
        #[arg(long)]
        out: PathBuf,
    },
    /// Turn an RLM license file into a bundle spec to review and issue.
    ImportRlm {
        /// The RLM license file.
        license: PathBuf,
        /// Where to write the spec (a new file); left out, the spec goes to standard
        /// output and the review list to standard error.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write the manual pages: tally-publisher(1) and one per subcommand
    /// (tally-publisher-issue(1), ...). Hidden: the packages run it at build time.
    #[command(hide = true)]
    Man {
        /// The directory to write them into (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

/// Reconciliation output formats.
#[derive(Clone, Copy, clap::ValueEnum)]
enum Format {
    /// JSON for programs.
    Json,
    /// CSV for spreadsheets.
    Csv,
    /// A printable HTML page with a chart per feature.
    Html,
}

/// A failure and its exit code.
struct Failure(u8, anyhow::Error);

fn usage(e: impl Into<anyhow::Error>) -> Failure {
    Failure(EX_USAGE, e.into())
}

fn data(e: impl Into<anyhow::Error>) -> Failure {
    Failure(EX_DATAERR, e.into())
}

/// `tally-publisher man`: the pages from the clap definition.
fn write_man_pages(out: &Path) -> Result<(), Failure> {
    use clap::CommandFactory;
    let written = std::fs::create_dir_all(out)
        .and_then(|()| tally_protocol::man::write_command_pages(Cli::command(), "1", out))
        .map_err(|e| usage(anyhow!("{}: {e}", out.display())))?;
    for path in written {
        println!("{}", path.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli: Cli = match tally_protocol::cli::parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let result = match cli.command {
        Command::Keygen { out } => keygen(&out),
        Command::Man { out } => write_man_pages(&out),
        Command::Issue {
            vendor_key,
            spec,
            request,
            out,
            allow_expired,
        } => issue(&vendor_key, &spec, &request, &out, allow_expired),
        Command::Inspect { file, json } => inspect(&file, json),
        Command::Verify { vendor_pub, bundle } => verify(&vendor_pub, &bundle),
        Command::VerifyReturn { bundle, proof } => verify_return(&bundle, &proof),
        Command::ImportFlexlm { license, out } => import_flexlm(&license, &out),
        Command::ImportRlm { license, out } => import_rlm(&license, out.as_deref()),
        Command::Receive {
            listen,
            dir,
            bundles,
            tls_cert,
            tls_key,
            max_report_mib,
        } => receive(
            listen,
            &dir,
            &bundles,
            tls_cert.as_deref().zip(tls_key.as_deref()),
            max_report_mib,
        ),
        Command::VerifyReport { bundle, reports } => {
            verify_reports(&bundle, &reports).map(|links| {
                let events: usize = links.iter().map(|l| l.report.report.events.len()).sum();
                let (first, last) = (
                    links
                        .first()
                        .map(|l| l.report.report.report_seq)
                        .unwrap_or(0),
                    links
                        .last()
                        .map(|l| l.report.report.report_seq)
                        .unwrap_or(0),
                );
                let runs = tally_publisher::reconcile::signer_runs(&links);
                let signers: std::collections::BTreeSet<&str> =
                    runs.iter().map(|r| r.signer.as_str()).collect();
                println!(
                    "{} verified: {}, {}, one unbroken chain signed by {}",
                    tally_publisher::reconcile::plural_of(links.len() as u64, "report", "reports"),
                    tally_publisher::reconcile::numbered_span("report", "reports", first, last),
                    tally_publisher::reconcile::plural_of(events as u64, "event", "events"),
                    match signers.len() {
                        0 => "the bound server".to_string(),
                        n => format!("{n} bound servers of one cluster (each change of signer is a failover)"),
                    }
                );
                // A cluster's chain: who signed what, so the vendor sees the failovers.
                for run in &runs {
                    println!("  {run}");
                }
            })
        }
        Command::Reconcile {
            bundle,
            dir: Some(dir),
            format,
            out,
            ..
        } => reconcile_dir(&bundle, &dir, format, out.as_deref()),
        Command::Reconcile {
            bundle,
            dir: None,
            format,
            out,
            reports,
        } => reconcile_reports(&bundle, &reports, format, out.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, e)) => {
            eprintln!("tally-publisher: {e:#}");
            ExitCode::from(code)
        }
    }
}

/// Reads a text file with a size bound; errors name the file.
fn read(path: &Path) -> Result<String, Failure> {
    read_bounded(path, MAX_INPUT)
}

/// Reads a regular file of at most `limit` bytes, without blocking: a FIFO or a device
/// among the inputs (a `*.bundle` in a directory, a report) is refused, not waited on
/// or read without end; the bound is the bytes read, not the length metadata claims.
fn read_bounded(path: &Path, limit: u64) -> Result<String, Failure> {
    use std::io::Read;
    let at = || format!("{}", path.display());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .with_context(at)
        .map_err(usage)?;
    let meta = file.metadata().with_context(at).map_err(usage)?;
    if !meta.is_file() {
        return Err(data(anyhow!("{}: not a regular file", path.display())));
    }
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .with_context(at)
        .map_err(data)?;
    if bytes.len() as u64 > limit {
        return Err(data(anyhow!(
            "{}: larger than {limit} bytes",
            path.display()
        )));
    }
    String::from_utf8(bytes).map_err(|_| data(anyhow!("{}: not a text file", path.display())))
}

fn write_new(path: &Path, contents: &str, mode: u32) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| {
            format!(
                "creating {} (an existing file is never overwritten)",
                path.display()
            )
        })?;
    file.write_all(contents.as_bytes())
        .and_then(|_| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

fn keygen(prefix: &Path) -> Result<(), Failure> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed)
        .context("reading the OS random source")
        .map_err(|e| Failure(70, e))?;
    let key = SecretKey::from_seed(seed);
    let secret = prefix.with_extension("key");
    let public = prefix.with_extension("pub");
    write_new(&secret, &key.to_armored(), 0o600).map_err(usage)?;
    write_new(&public, &keys::public_key_to_armored(&key.public()), 0o644).map_err(usage)?;
    println!(
        "vendor key pair created\n  secret  {} (0600: keep it offline, back it up)\n  public  {} (give it to tallyd and build it into your application)\n  fingerprint {}",
        secret.display(),
        public.display(),
        key.public().fingerprint()
    );
    Ok(())
}

fn load_secret(path: &Path) -> Result<SecretKey, Failure> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .with_context(|| format!("{}", path.display()))
        .map_err(usage)?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(usage(anyhow!(
            "{}: secret key is readable by group or others (mode {:o}); run `chmod 600 {}`",
            path.display(),
            mode & 0o777,
            path.display()
        )));
    }
    SecretKey::from_armored(&read(path)?)
        .with_context(|| format!("{}", path.display()))
        .map_err(data)
}

fn load_public(path: &Path) -> Result<PublicKey, Failure> {
    keys::public_key_from_armored(&read(path)?)
        .with_context(|| format!("{}", path.display()))
        .map_err(data)
}

fn issue(
    key: &Path,
    spec_path: &Path,
    request_paths: &[PathBuf],
    out: &Path,
    allow_expired: bool,
) -> Result<(), Failure> {
    if request_paths.len() > bundle::MAX_CLUSTER {
        return Err(usage(anyhow!(
            "{} activation requests given; one bundle binds at most {} servers",
            request_paths.len(),
            bundle::MAX_CLUSTER
        )));
    }
    let vendor = load_secret(key)?;
    let spec = Spec::parse(spec_path, &read(spec_path)?).map_err(data)?;
    // Each request is checked on its own: signed by the very key it asks to bind, so
    // nobody adds to a cluster a server whose key they do not hold.
    let mut requests: Vec<activation::ActivationRequest> = Vec::new();
    for (i, path) in request_paths.iter().enumerate() {
        let request = activation::request_from_armored(&read(path)?)
            .with_context(|| format!("{}", path.display()))
            .map_err(data)?;
        if let Some(j) = requests
            .iter()
            .position(|r| r.server_key == request.server_key)
        {
            return Err(data(anyhow!(
                "{} and {} are requests of the same server (key {}); a cluster needs one request from each of its servers",
                request_paths[j].display(),
                request_paths[i].display(),
                request.server_key.fingerprint()
            )));
        }
        requests.push(request);
    }
    let mut random = [0u8; 4];
    getrandom::getrandom(&mut random)
        .context("reading the OS random source")
        .map_err(|e| Failure(70, e))?;
    let issued = UnixTime::now();
    let default_id = format!(
        "{}-{}-{}",
        spec.customer.id.trim(),
        issued.date().replace('-', ""),
        keys::hex(&random)
    );
    let bundle = spec
        .to_cluster_bundle(spec_path, &requests, default_id, issued)
        .map_err(data)?;
    bundle
        .check_cluster()
        .map_err(|e| data(anyhow::Error::from(e)))?;
    // A bundle that has already ended would be refused or count nothing at the customer:
    // almost always a typo in a date, caught here rather than by the customer's IT.
    let ended = tally_publisher::spec::already_ended(&bundle, issued);
    if !ended.is_empty() {
        if !allow_expired {
            return Err(data(anyhow!(
                "{}: {}; fix the dates, or pass --allow-expired to issue it anyway",
                spec_path.display(),
                ended.join("; ")
            )));
        }
        for what in &ended {
            eprintln!("tally-publisher: warning: {}: {what}", spec_path.display());
        }
    }
    let signed = bundle::sign(&bundle, &vendor);
    write_new(out, &bundle::to_armored(&signed), 0o644).map_err(usage)?;
    println!(
        "bundle {} written to {}\n  customer  {} ({})",
        bundle.id,
        out.display(),
        bundle.customer.name,
        bundle.customer.id,
    );
    if let [request] = requests.as_slice() {
        println!(
            "  bound to  server key {} on host {} ({})",
            request.server_key.fingerprint(),
            request.hostname,
            request.host_fingerprint
        );
    } else {
        println!(
            "  bound to  {} servers (one cluster; seats count once for it)",
            requests.len()
        );
        for request in &requests {
            println!(
                "  server    key {} on host {} ({})",
                request.server_key.fingerprint(),
                request.hostname,
                request.host_fingerprint
            );
        }
    }
    print_features(&bundle);
    Ok(())
}

fn print_features(bundle: &Bundle) {
    for f in &bundle.features {
        println!("  feature   {}", f.describe());
    }
}

fn inspect(path: &Path, json: bool) -> Result<(), Failure> {
    use tally_publisher::inspect::{self, InspectError};
    let text = read_large(path)?;
    let inspected = inspect::read(&text).map_err(|e| {
        let code = match e {
            InspectError::SecretKey => usage,
            _ => data,
        };
        let e = match e {
            InspectError::Invalid(e) => anyhow::Error::from_boxed(e),
            e => anyhow::Error::new(e),
        };
        code(e.context(path.display().to_string()))
    })?;
    match inspected.json().filter(|_| json) {
        Some(doc) => println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default()),
        None => print!("{}", inspected.text()),
    }
    Ok(())
}

fn verify(vendor_pub: &Path, bundle_path: &Path) -> Result<(), Failure> {
    let vendor = load_public(vendor_pub)?;
    let signed = bundle::from_armored(&read(bundle_path)?)
        .with_context(|| format!("{}", bundle_path.display()))
        .map_err(data)?;
    let verified = bundle::verify(&signed, &[vendor])
        .with_context(|| format!("{}", bundle_path.display()))
        .map_err(data)?;
    println!(
        "{}: bundle {} is intact and signed by vendor key {}",
        bundle_path.display(),
        verified.bundle.id,
        vendor.fingerprint()
    );
    Ok(())
}

fn verify_return(bundle_path: &Path, proof_path: &Path) -> Result<(), Failure> {
    let signed = bundle::from_armored(&read(bundle_path)?)
        .with_context(|| format!("{}", bundle_path.display()))
        .map_err(data)?;
    let verified = bundle::verify(&signed, &[signed.signer])
        .with_context(|| format!("{}", bundle_path.display()))
        .map_err(data)?;
    let b = verified.bundle;
    let proof = activation::return_from_armored(&read(proof_path)?)
        .with_context(|| format!("{}", proof_path.display()))
        .map_err(data)?;
    let check = || -> Result<()> {
        if b.binding.is_empty() {
            bail!(
                "bundle {} is not bound to a server; nothing to return",
                b.id
            );
        }
        let Some(binding) = b.binding_of(&proof.server_key) else {
            let bound: Vec<String> = b.bound_keys().iter().map(|k| k.fingerprint()).collect();
            bail!(
                "signed by server key {}, but bundle {} is bound to server key {}",
                proof.server_key.fingerprint(),
                b.id,
                bound.join(", ")
            );
        };
        if proof.bundle_id != b.id {
            bail!("returns bundle {}, not bundle {}", proof.bundle_id, b.id);
        }
        if proof.host_fingerprint != binding.host_fingerprint {
            bail!(
                "made on host {}, but bundle {} is bound to host {}",
                proof.host_fingerprint,
                b.id,
                binding.host_fingerprint
            );
        }
        Ok(())
    };
    check()
        .with_context(|| format!("{}", proof_path.display()))
        .map_err(data)?;
    println!(
        "{}: bundle {} was returned on {} by the server it was bound to ({} seat(s) still recorded as held)",
        proof_path.display(),
        b.id,
        proof.returned_at,
        proof.leases_outstanding
    );
    match &proof.released {
        Some(released) => {
            println!("  the server stopped serving:");
            for g in &released.stopped_serving {
                println!("    {} (bundle {})", g.description, g.bundle);
            }
            if released.stopped_serving.is_empty() {
                println!("    nothing (the bundle served no seat there)");
            }
            if !released.retired.is_empty() {
                println!(
                    "  and recorded that these bundles, which it superseded, never count there again: {}",
                    released.retired.join(", ")
                );
            }
            let missing: Vec<&String> = b
                .supersedes
                .iter()
                .filter(|s| !released.retired.contains(s))
                .collect();
            if !missing.is_empty() {
                println!(
                    "  warning: the proof does not retire {}, which bundle {} supersedes",
                    missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
                    b.id
                );
            }
            println!("  you may issue its seats to a new server");
        }
        None if !b.supersedes.is_empty() => println!(
            "  warning: this proof (format version 1, from an older tallyd) does not say what the server stopped serving; \
             such a tallyd serves the bundles {} superseded ({}) again after a restart: have that server's tallyd \
             upgraded (which keeps them superseded) before you issue its seats to a new server",
            b.id,
            b.supersedes.join(", ")
        ),
        None => println!("  you may issue its seats to a new server"),
    }
    Ok(())
}

fn load_bundle_any_signer(path: &Path) -> Result<Bundle, Failure> {
    let signed = bundle::from_armored(&read(path)?)
        .with_context(|| format!("{}", path.display()))
        .map_err(data)?;
    Ok(bundle::verify(&signed, &[signed.signer])
        .with_context(|| format!("{}", path.display()))
        .map_err(data)?
        .bundle)
}

fn read_large(path: &Path) -> Result<String, Failure> {
    read_bounded(path, tally_protocol::report::MAX_REPORT_TEXT as u64)
}

/// The bundles of `--bundle` arguments: files, and the `*.bundle` files of directories
/// (in name order).
fn load_bundles(args: &[PathBuf]) -> Result<Vec<Bundle>, Failure> {
    let mut out = Vec::new();
    for arg in args {
        if arg.is_dir() {
            let mut paths: Vec<PathBuf> = std::fs::read_dir(arg)
                .with_context(|| format!("{}", arg.display()))
                .map_err(usage)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "bundle"))
                .collect();
            paths.sort();
            if paths.is_empty() {
                return Err(usage(anyhow!("{}: no *.bundle file in it", arg.display())));
            }
            for p in paths {
                out.push(load_bundle_any_signer(&p)?);
            }
        } else {
            out.push(load_bundle_any_signer(arg)?);
        }
    }
    Ok(out)
}

fn verify_reports(
    bundle_paths: &[PathBuf],
    reports: &[PathBuf],
) -> Result<Vec<reconcile::ChainLink>, Failure> {
    let bundles = load_bundles(bundle_paths)?;
    let mut files = Vec::new();
    for p in reports {
        files.push(reconcile::ReportFile {
            name: p.display().to_string(),
            text: read_large(p)?,
        });
    }
    reconcile::verify_chain_all(&bundles, &files).map_err(|problems| {
        for p in &problems {
            eprintln!("tally-publisher: {p}");
        }
        data(anyhow!("{} problem(s) in the report chain", problems.len()))
    })
}

fn reconcile_reports(
    bundle_paths: &[PathBuf],
    reports: &[PathBuf],
    format: Format,
    out: Option<&Path>,
) -> Result<(), Failure> {
    let links = verify_reports(bundle_paths, reports)?;
    let bundles = load_bundles(bundle_paths)?;
    let r = reconcile::reconcile_all(&bundles, &links);
    let text = match format {
        Format::Json => serde_json::to_string_pretty(&r).map_err(|e| data(anyhow!(e)))? + "\n",
        Format::Csv => reconcile::to_csv(&r),
        Format::Html => reconcile::to_html(&r),
    };
    write_output(out, &text, links.len())
}

/// Writes a reconciliation to `out`, or to standard output.
fn write_output(out: Option<&Path>, text: &str, reports: usize) -> Result<(), Failure> {
    match out {
        Some(path) => {
            std::fs::write(path, text)
                .with_context(|| format!("writing {}", path.display()))
                .map_err(usage)?;
            println!(
                "reconciliation of {reports} report(s) written to {}",
                path.display()
            );
        }
        None => print!("{text}"),
    }
    Ok(())
}

fn receive(
    listen: std::net::SocketAddr,
    dir: &Path,
    bundles: &Path,
    tls: Option<(&Path, &Path)>,
    max_report_mib: u64,
) -> Result<(), Failure> {
    use tally_publisher::receive;
    for (what, d) in [("--dir", dir), ("--bundles", bundles)] {
        if !d.is_dir() {
            return Err(usage(anyhow!("{what} {}: not a directory", d.display())));
        }
    }
    let tls = match tls {
        Some((cert, key)) => {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(key)
                .with_context(|| format!("{}", key.display()))
                .map_err(usage)?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(usage(anyhow!(
                    "{}: private key is readable by group or others (mode {:o}); run `chmod 600 {}`",
                    key.display(),
                    mode & 0o777,
                    key.display()
                )));
            }
            Some(receive::tls_config(cert, key).map_err(usage)?)
        }
        // tallyd uploads over https only: plain HTTP is for a TLS proxy on this machine.
        None if !listen.ip().is_loopback() => {
            return Err(usage(anyhow!(
                "without --tls-cert and --tls-key the receiver speaks plain HTTP, which it does \
                 only on a loopback address (behind your TLS proxy); {listen} is not one"
            )))
        }
        None => None,
    };
    // One receiver per directory: "follows the last stored report" is decided under a
    // lock held in this process only. The lock goes with the process.
    let lock_path = dir.join(".tally-receive.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o644)
        .open(&lock_path)
        .with_context(|| format!("{}", lock_path.display()))
        .map_err(usage)?;
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(Failure(
                75,
                anyhow!("another tally-publisher receive is using {}", dir.display()),
            ));
        }
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
        .map_err(|e| Failure(70, e))?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening on {listen}"))
            .map_err(|e| Failure(EX_UNAVAILABLE, e))?;
        let local = listener.local_addr().map_err(|e| Failure(70, e.into()))?;
        println!(
            "tally-publisher receive: receiving usage reports on {scheme}://{local}/ into {} (bundles from {})",
            dir.display(),
            bundles.display()
        );
        let _ = std::io::stdout().flush();
        let inbox = std::sync::Arc::new(receive::Inbox::new(dir, bundles));
        let options = receive::Options {
            max_bytes: (max_report_mib * 1024 * 1024) as usize,
            tls,
        };
        let served = receive::serve(listener, inbox, options)
            .await
            .context("serving")
            .map_err(|e| Failure(70, e));
        drop(lock);
        served
    })
}

/// Deepest directory level `reconcile --dir` descends to.
const MAX_DIR_DEPTH: usize = 16;
/// Most files `reconcile --dir` reads.
const MAX_DIR_FILES: usize = 100_000;
/// Most report bytes `reconcile --dir` reads in all (every report is held in memory).
const MAX_DIR_BYTES: u64 = 2 * 1024 * 1024 * 1024;

/// The `*.report` and `*.bundle` files under `dir`, in path order. Symbolic links are not
/// followed (no loops, nothing outside the tree); depth and count are bounded.
fn walk(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>), Failure> {
    let mut reports = Vec::new();
    let mut bundles = Vec::new();
    let mut pending = vec![(dir.to_path_buf(), 0usize)];
    while let Some((d, depth)) = pending.pop() {
        let entries = std::fs::read_dir(&d)
            .with_context(|| format!("{}", d.display()))
            .map_err(usage)?;
        for entry in entries {
            let entry = entry
                .with_context(|| format!("{}", d.display()))
                .map_err(usage)?;
            let path = entry.path();
            let kind = entry
                .file_type()
                .with_context(|| format!("{}", path.display()))
                .map_err(usage)?;
            if kind.is_dir() {
                if depth + 1 > MAX_DIR_DEPTH {
                    return Err(usage(anyhow!(
                        "{}: deeper than {MAX_DIR_DEPTH} directory levels",
                        path.display()
                    )));
                }
                pending.push((path, depth + 1));
            } else if kind.is_file() {
                match path.extension().and_then(|x| x.to_str()) {
                    Some("report") => reports.push(path),
                    Some("bundle") => bundles.push(path),
                    _ => continue,
                }
                if reports.len() + bundles.len() > MAX_DIR_FILES {
                    return Err(usage(anyhow!(
                        "{}: more than {MAX_DIR_FILES} report and bundle files",
                        dir.display()
                    )));
                }
            }
        }
    }
    reports.sort();
    bundles.sort();
    Ok((reports, bundles))
}

fn reconcile_dir(
    bundle_paths: &[PathBuf],
    dir: &Path,
    format: Format,
    out: Option<&Path>,
) -> Result<(), Failure> {
    let (report_paths, found_bundles) = walk(dir)?;
    if report_paths.is_empty() {
        return Err(usage(anyhow!(
            "{}: no *.report file under it",
            dir.display()
        )));
    }
    let mut bundles = if bundle_paths.is_empty() {
        Vec::new()
    } else {
        load_bundles(bundle_paths)?
    };
    for p in &found_bundles {
        bundles.push(load_bundle_any_signer(p)?);
    }
    let mut files = Vec::new();
    let mut total: u64 = 0;
    for p in &report_paths {
        let limit = (tally_protocol::report::MAX_REPORT_TEXT as u64)
            .min(MAX_DIR_BYTES.saturating_sub(total));
        let budget_cut = limit < tally_protocol::report::MAX_REPORT_TEXT as u64;
        let text = read_bounded(p, limit).map_err(|e| {
            if budget_cut && e.1.to_string().contains("larger than") {
                usage(anyhow!(
                    "{}: the reports under {} hold more than {MAX_DIR_BYTES} bytes in all; reconcile part of the tree at a time",
                    p.display(),
                    dir.display()
                ))
            } else {
                e
            }
        })?;
        total += text.len() as u64;
        files.push(reconcile::ReportFile {
            name: p.display().to_string(),
            text,
        });
    }
    let summary = reconcile::reconcile_many(&bundles, files).map_err(|problems| {
        for p in &problems {
            eprintln!("tally-publisher: {p}");
        }
        data(anyhow!(
            "{} problem(s) in the reports under {}; nothing reconciled",
            problems.len(),
            dir.display()
        ))
    })?;
    let text = match format {
        Format::Json => {
            serde_json::to_string_pretty(&summary).map_err(|e| data(anyhow!(e)))? + "\n"
        }
        Format::Csv => reconcile::summary_csv(&summary),
        Format::Html => reconcile::summary_html(&summary),
    };
    write_output(out, &text, report_paths.len())
}

fn import_flexlm(license: &Path, out: &Path) -> Result<(), Failure> {
    let text = read(license)?;
    let import = flexlm::import(&license.display().to_string(), &text)
        .with_context(|| format!("{}", license.display()))
        .map_err(data)?;
    write_new(out, &import.spec, 0o644).map_err(usage)?;
    print_review(
        &import,
        &out.display().to_string(),
        &mut std::io::stdout().lock(),
    );
    Ok(())
}

/// What an import wrote and its review list (also at the top of the spec): nothing is
/// dropped without a word.
fn print_review(import: &flexlm::Import, out: &str, to: &mut dyn Write) {
    // Output errors (a closed pipe) are not the import's failure: the spec is written.
    let _ = writeln!(
        to,
        "{} feature entr{} written to {out}",
        import.features,
        if import.features == 1 { "y" } else { "ies" },
    );
    for (title, notes) in [
        ("the site", &import.site),
        ("not mapped (dropped)", &import.unmapped),
        ("mapped, not exactly the same", &import.approximated),
        ("left out, superseded", &import.superseded),
        ("EXPIRED already", &import.expired),
    ] {
        if !notes.is_empty() {
            let _ = writeln!(to, "{title}: {}", notes.len());
            for n in notes.iter() {
                let _ = writeln!(to, "  {}", tally_protocol::wire::escape_unprintable(n));
            }
        }
    }
    let spec = if out == "standard output" {
        "SPEC"
    } else {
        out
    };
    let _ = writeln!(to, "fill in [customer], review, then: tally-publisher issue --vendor-key VENDOR.key --spec {spec} --request REQUEST --out BUNDLE");
}

/// `import-rlm`: as `import-flexlm`, for an RLM license file; without `--out` the spec
/// goes to standard output and the review list to standard error.
fn import_rlm(license: &Path, out: Option<&Path>) -> Result<(), Failure> {
    let text = read(license)?;
    let import = tally_publisher::rlm::import(&license.display().to_string(), &text)
        .with_context(|| format!("{}", license.display()))
        .map_err(data)?;
    match out {
        Some(out) => {
            write_new(out, &import.spec, 0o644).map_err(usage)?;
            print_review(
                &import,
                &out.display().to_string(),
                &mut std::io::stdout().lock(),
            );
        }
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(import.spec.as_bytes())
                .and_then(|_| stdout.flush())
                .context("writing the spec to standard output")
                .map_err(usage)?;
            print_review(&import, "standard output", &mut std::io::stderr().lock());
        }
    }
    Ok(())
}
