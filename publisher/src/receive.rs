//! The vendor's receiver for the usage reports `tallyd` uploads (`report_upload_url`).
//!
//! tallyd POSTs each spooled report (the armoured text, `Content-Type: text/plain`, its
//! spool file name in `X-Tally-Report`), oldest first, and moves it to `sent/` only after
//! a 2xx answer; on any other answer it keeps the report and retries the same one later
//! (daemon/src/upload.rs). So this receiver answers:
//!
//! - `201` once a new report is verified and durably stored (temp file, fsync, rename,
//!   fsync of the directory), `200` for a report already stored (a retry after a lost
//!   answer: acknowledged, never stored twice);
//! - `4xx` with the reason as text when the report must not be stored: `400` not a
//!   readable report or a forged one (bad signature), `403` no bundle in the vendor's
//!   bundle directory binds its server key (unknown customer), `409` out of order or a
//!   fork of the chain stored so far, `413` larger than the limit;
//! - `5xx` when it could not store (disk full...): tallyd retries.
//!
//! The checks are `verify-report`'s ([`reconcile::verify_site_chain`]): the signature,
//! that the signer is a server a bundle binds, and that the report follows the last one
//! stored for that server's site (number, previous-report digest, event numbers). Reports
//! are stored as `DIR/<customer id>/<server key fingerprint>/tally-report-NNNNNNNN.report`,
//! the names tallyd gives them, so `verify-report` and `reconcile` read a server's
//! directory as is. A cluster's members sign one chain (whichever node leads exports the
//! next report), stored in one directory: that of the member whose report came first.
//!
//! [`Inbox`] is the decision and the storage, without HTTP; [`serve`] puts it behind
//! axum, over TLS (rustls) or plain HTTP.

use crate::reconcile::{self, ReportFile};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tally_protocol::bundle::{self, Bundle};
use tally_protocol::report;

/// Largest bundle file read from the bundle directory.
const MAX_BUNDLE_FILE: u64 = 1024 * 1024;
/// Most bundle files read from the bundle directory (in all its subdirectories).
const MAX_BUNDLE_FILES: usize = 100_000;

/// What happened to an upload: the HTTP status and the text answered (also logged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// HTTP status code.
    pub status: u16,
    /// The reason, one line.
    pub message: String,
}

impl Outcome {
    fn new(status: u16, message: impl Into<String>) -> Outcome {
        Outcome {
            status,
            message: message.into(),
        }
    }
}

/// Where reports are stored and the bundles they are checked against.
#[derive(Debug)]
pub struct Inbox {
    dir: PathBuf,
    bundles: PathBuf,
    /// One upload decided and stored at a time: the check "follows the last stored
    /// report" and the store must not interleave with another upload's.
    lock: Mutex<()>,
}

impl Inbox {
    /// Reports go under `dir`; `bundles` is the directory of the bundles the vendor
    /// issued (`*.bundle`, also in subdirectories, e.g. one per customer), read at each
    /// upload so that a new customer's bundle counts without a restart.
    pub fn new(dir: &Path, bundles: &Path) -> Inbox {
        Inbox {
            dir: dir.to_path_buf(),
            bundles: bundles.to_path_buf(),
            lock: Mutex::new(()),
        }
    }

    /// Decides on one uploaded report and stores it if it is new and belongs.
    pub fn accept(&self, text: &str) -> Outcome {
        let _one = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let verified = match report::read(text) {
            Ok(v) => v,
            Err(e) => return Outcome::new(400, format!("refused: not a valid usage report: {e}")),
        };
        let r = &verified.report;
        let key = r.server_key;
        let bundles = match self.load_bundles() {
            Ok(b) => b,
            Err(e) => return Outcome::new(500, format!("cannot read the bundle directory: {e}")),
        };
        let Some(anchor) = bundles.iter().find(|b| b.is_bound_to(&key)) else {
            return Outcome::new(
                403,
                format!(
                    "refused: unknown server: no bundle in the vendor's bundle directory binds server key {} (the report names customer(s) {})",
                    key.fingerprint(),
                    if r.customers.is_empty() { "none".to_string() } else { r.customers.join(", ") }
                ),
            );
        };
        // A cluster's members sign one chain (whichever leads exports the next report):
        // it is stored in one directory, the one of the member that started it.
        let site = reconcile::site_bundles(&bundles, &key);
        let customer_dir = self.dir.join(path_part(&anchor.customer.id));
        let dir_of = |k: &tally_protocol::keys::PublicKey| {
            customer_dir.join(k.fingerprint().replace(':', ""))
        };
        let server_dir = reconcile::site_keys(&bundles, &key)
            .iter()
            .map(dir_of)
            .find(|d| d.is_dir())
            .unwrap_or_else(|| dir_of(&key));
        let seq = r.report_seq;
        let name = |n: u64| format!("tally-report-{n:08}.report");
        let what = format!(
            "report {seq} of server {} (customer {})",
            key.fingerprint(),
            anchor.customer.id
        );
        let stored = match stored_seqs(&server_dir) {
            Ok(s) => s,
            Err(e) => {
                return Outcome::new(500, format!("cannot read {}: {e}", server_dir.display()))
            }
        };
        if stored.contains(&seq) {
            let path = server_dir.join(name(seq));
            return match std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| report::read(&t).map_err(|e| e.to_string()))
            {
                Ok(old) if old.digest == verified.digest => {
                    Outcome::new(200, format!("{what} is already stored; not stored twice"))
                }
                Ok(_) => Outcome::new(
                    409,
                    format!(
                        "refused: {what} is already stored with different contents: this report forks the chain"
                    ),
                ),
                Err(e) => Outcome::new(500, format!("cannot read the stored {}: {e}", path.display())),
            };
        }
        let last = stored.last().copied();
        let mut files = Vec::new();
        match last {
            None if seq != 1 => {
                return Outcome::new(
                    409,
                    format!(
                        "refused: {what} is out of order: nothing is stored for this server yet, so report 1 comes first (place earlier reports in {} to start later)",
                        server_dir.display()
                    ),
                )
            }
            Some(l) if seq != l + 1 => {
                return Outcome::new(
                    409,
                    format!(
                        "refused: {what} is out of order: the last stored is report {l}, so report {} comes next",
                        l + 1
                    ),
                )
            }
            None => {}
            Some(l) => {
                let path = server_dir.join(name(l));
                match std::fs::read_to_string(&path) {
                    Ok(text) => files.push(ReportFile {
                        name: format!("stored report {l}"),
                        text,
                    }),
                    Err(e) => {
                        return Outcome::new(500, format!("cannot read {}: {e}", path.display()))
                    }
                }
            }
        }
        files.push(ReportFile {
            name: format!("uploaded report {seq}"),
            text: text.to_string(),
        });
        if let Err(problems) = reconcile::verify_site_chain(&site, &files) {
            return Outcome::new(409, format!("refused: {}", problems.join("; ")));
        }
        match store(&self.dir, &server_dir, &name(seq), text) {
            Ok(path) => Outcome::new(201, format!("{what} stored as {}", path.display())),
            Err(e) => Outcome::new(503, format!("{what} not stored: {e}")),
        }
    }

    /// Every bundle under the bundle directory (and its subdirectories, two levels).
    /// A file that does not load is skipped with a warning: it binds nobody, so it can
    /// only make an upload be refused, never accepted.
    fn load_bundles(&self) -> std::io::Result<Vec<Bundle>> {
        let mut paths = Vec::new();
        collect_bundles(&self.bundles, 2, &mut paths)?;
        paths.sort();
        let mut out = Vec::new();
        for p in paths {
            match read_bundle(&p) {
                Ok(b) => out.push(b),
                Err(e) => eprintln!("tally-publisher receive: skipping {}: {e}", p.display()),
            }
        }
        Ok(out)
    }
}

fn collect_bundles(dir: &Path, depth: u32, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() && depth > 0 {
            collect_bundles(&path, depth - 1, out)?;
        } else if kind.is_file() && path.extension().is_some_and(|x| x == "bundle") {
            if out.len() >= MAX_BUNDLE_FILES {
                return Err(std::io::Error::other(format!(
                    "more than {MAX_BUNDLE_FILES} bundle files"
                )));
            }
            out.push(path);
        }
    }
    Ok(())
}

/// Why a file of the bundle directory was skipped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleFileError {
    /// It could not be opened or read.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A FIFO, device or directory.
    #[error("not a regular file")]
    NotRegular,
    /// Larger than any bundle.
    #[error("larger than {MAX_BUNDLE_FILE} bytes")]
    TooLarge,
    /// Not UTF-8.
    #[error("not a text file")]
    NotText,
    /// Not a bundle, or its signature does not verify.
    #[error(transparent)]
    Bundle(#[from] bundle::BundleError),
}

/// A bundle file, signature checked against its own signer (the vendor's own files, as
/// `verify-report` reads them), bounded and without blocking on a FIFO.
fn read_bundle(path: &Path) -> Result<Bundle, BundleFileError> {
    use std::io::Read;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(BundleFileError::NotRegular);
    }
    let mut bytes = Vec::new();
    file.take(MAX_BUNDLE_FILE + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_BUNDLE_FILE {
        return Err(BundleFileError::TooLarge);
    }
    let text = String::from_utf8(bytes).map_err(|_| BundleFileError::NotText)?;
    let signed = bundle::from_armored(&text)?;
    Ok(bundle::verify(&signed, &[signed.signer])?.bundle)
}

/// A customer id as one path component: ASCII letters, digits, `.`, `-`, `_` kept,
/// anything else `_`, never `.` or `..` (the id comes from a vendor-signed bundle, but a
/// path must not depend on that).
fn path_part(id: &str) -> String {
    let s: String = id
        .chars()
        .take(128)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.chars().all(|c| c == '.') {
        format!("_{s}")
    } else {
        s
    }
}

/// The report numbers stored in a server's directory, ascending.
fn stored_seqs(dir: &Path) -> std::io::Result<Vec<u64>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut seqs = Vec::new();
    for entry in entries {
        let name = entry?.file_name();
        if let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix("tally-report-"))
            .and_then(|n| n.strip_suffix(".report"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            seqs.push(n);
        }
    }
    seqs.sort_unstable();
    Ok(seqs)
}

/// Creates `dir` and the directories above it up to `root`, each new one made durable
/// by an fsync of its parent.
fn create_durable(root: &Path, dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        if dir != root && parent.starts_with(root) {
            create_durable(root, parent)?;
        }
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        sync_dir(parent)?;
    } else {
        std::fs::create_dir_all(dir)?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Writes `text` as `dir/name` whole: a temp file, fsync, rename, fsync of the directory.
/// Only after this returns is the upload acknowledged.
fn store(root: &Path, dir: &Path, name: &str, text: &str) -> std::io::Result<PathBuf> {
    create_durable(root, dir)?;
    let tmp = dir.join(format!(".{name}.tmp"));
    // A temp file left by a crash mid-write is garbage: the report was never acknowledged.
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)?;
    let written = file
        .write_all(text.as_bytes())
        .and_then(|_| file.sync_all());
    drop(file);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let path = dir.join(name);
    std::fs::rename(&tmp, &path)?;
    sync_dir(dir)?;
    Ok(path)
}

/// How the receiver listens.
#[derive(Debug)]
pub struct Options {
    /// Largest report accepted, bytes (larger: 413).
    pub max_bytes: usize,
    /// TLS server configuration; `None`: plain HTTP (loopback only, checked by the caller).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// Most connections open at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Most report bodies being read at once (each may be up to the size limit in memory).
pub const MAX_CONCURRENT_UPLOADS: usize = 4;
/// A connection with no progress for this long is closed (a stalled or idle client).
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Longest a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Why the receiver's TLS certificate and key could not be used. The texts name the
/// files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsConfigError {
    /// The certificate file could not be read.
    #[error("{path}: {cause}")]
    ReadCertificate {
        /// The certificate file.
        path: PathBuf,
        /// Why.
        cause: rustls::pki_types::pem::Error,
    },
    /// An entry of the certificate file is not a PEM certificate.
    #[error("{path}: not a PEM certificate: {cause}")]
    NotPem {
        /// The certificate file.
        path: PathBuf,
        /// Why.
        cause: rustls::pki_types::pem::Error,
    },
    /// The certificate file holds no certificate.
    #[error("{path}: holds no certificate")]
    NoCertificate {
        /// The certificate file.
        path: PathBuf,
    },
    /// The key file holds no PEM private key.
    #[error("{path}: no PEM private key in it: {cause}")]
    NoKey {
        /// The key file.
        path: PathBuf,
        /// Why.
        cause: rustls::pki_types::pem::Error,
    },
    /// rustls refused the TLS versions (a broken build).
    #[error("TLS versions: {0}")]
    TlsVersions(rustls::Error),
    /// rustls refused the certificate and key together (e.g. they do not match).
    #[error("{cert} and {key} do not make a usable certificate and key: {cause}")]
    Unusable {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls's error.
        cause: rustls::Error,
    },
}

/// A TLS configuration from a PEM certificate chain and its PEM private key.
pub fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsConfigError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut chain = Vec::new();
    let certs =
        CertificateDer::pem_file_iter(cert).map_err(|cause| TlsConfigError::ReadCertificate {
            path: cert.to_path_buf(),
            cause,
        })?;
    for c in certs {
        chain.push(c.map_err(|cause| TlsConfigError::NotPem {
            path: cert.to_path_buf(),
            cause,
        })?);
    }
    if chain.is_empty() {
        return Err(TlsConfigError::NoCertificate {
            path: cert.to_path_buf(),
        });
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|cause| TlsConfigError::NoKey {
        path: key.to_path_buf(),
        cause,
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsConfigError::TlsVersions)?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|cause| TlsConfigError::Unusable {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            cause,
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves uploads on `listener` until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    inbox: Arc<Inbox>,
    options: Options,
) -> std::io::Result<()> {
    let state = State {
        inbox,
        max_bytes: options.max_bytes,
        uploads: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_UPLOADS)),
    };
    let app = axum::Router::new().fallback(upload).with_state(state);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    match options.tls {
        Some(tls) => {
            let (tx, rx) = tokio::sync::mpsc::channel(MAX_CONNECTIONS);
            let local = listener.local_addr()?;
            tokio::spawn(tls_accept(
                listener,
                tokio_rustls::TlsAcceptor::from(tls),
                slots,
                tx,
            ));
            axum::serve(TlsListener { rx, local }, app).await
        }
        None => axum::serve(PlainListener { listener, slots }, app).await,
    }
}

#[derive(Clone)]
struct State {
    inbox: Arc<Inbox>,
    max_bytes: usize,
    uploads: Arc<tokio::sync::Semaphore>,
}

async fn upload(
    axum::extract::State(state): axum::extract::State<State>,
    request: axum::extract::Request,
) -> axum::response::Response {
    use axum::http::{header, Method, StatusCode};
    use axum::response::IntoResponse;
    let answer = |o: Outcome| {
        let status = StatusCode::from_u16(o.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("{}\n", o.message),
        )
            .into_response()
    };
    if request.method() != Method::POST {
        let mut r = answer(Outcome::new(
            405,
            "POST a usage report here (tallyd's report_upload_url)",
        ));
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
        return r;
    }
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = Outcome::new(
        413,
        format!(
            "refused: larger than {} bytes (tally-publisher receive --max-report-mib)",
            state.max_bytes
        ),
    );
    let name = request
        .headers()
        .get("x-tally-report")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().take(100).collect::<String>());
    if declared.is_some_and(|n| n > state.max_bytes as u64) {
        // Read and drop the body first (bounded): a client like tallyd's writes the whole
        // body before it reads the answer, and would see a broken pipe, not this reason.
        if declared.is_some_and(|n| n <= DRAIN_LIMIT) {
            let _ = read_body(request.into_body(), 0).await;
        }
        log(&too_large, name.as_deref());
        return answer(too_large);
    }
    let Ok(_permit) = state.uploads.clone().acquire_owned().await else {
        return answer(Outcome::new(503, "shutting down"));
    };
    let body = match read_body(request.into_body(), state.max_bytes).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            log(&too_large, name.as_deref());
            return answer(too_large);
        }
        Err(e @ BodyError::BrokeOff(_)) => {
            let o = Outcome::new(400, format!("refused: {e}"));
            log(&o, name.as_deref());
            return answer(o);
        }
    };
    let outcome = match String::from_utf8(body) {
        Err(_) => Outcome::new(
            400,
            "refused: not a text file (a usage report is UTF-8 text)",
        ),
        Ok(text) => {
            let inbox = state.inbox.clone();
            tokio::task::spawn_blocking(move || inbox.accept(&text))
                .await
                .unwrap_or_else(|_| Outcome::new(500, "the check failed"))
        }
    };
    log(&outcome, name.as_deref());
    answer(outcome)
}

/// Most bytes of a too-large upload read (and dropped) so that its sender hears the 413;
/// beyond it the connection is closed. No tallyd report is larger.
const DRAIN_LIMIT: u64 = report::MAX_REPORT_TEXT as u64;

/// Why an upload's body was not read whole.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    /// Larger than the limit (the rest was read and dropped, up to [`DRAIN_LIMIT`]).
    #[error("larger than the limit")]
    TooLarge,
    /// The connection failed or stalled (see [`Timed`]) before the body's end.
    #[error("the upload broke off: {0}")]
    BrokeOff(axum::Error),
}

/// The request body, at most `limit` bytes kept: [`BodyError::TooLarge`] when larger
/// (the rest is read and dropped, up to [`DRAIN_LIMIT`]), [`BodyError::BrokeOff`] when
/// the connection failed or stalled before its end.
async fn read_body(mut body: axum::body::Body, limit: usize) -> Result<Vec<u8>, BodyError> {
    use axum::body::HttpBody;
    let mut out = Vec::new();
    let mut seen: u64 = 0;
    loop {
        let frame = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await;
        match frame {
            None if seen > limit as u64 => return Err(BodyError::TooLarge),
            None => return Ok(out),
            Some(Err(_)) if seen > limit as u64 => return Err(BodyError::TooLarge),
            Some(Err(e)) => return Err(BodyError::BrokeOff(e)),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    seen = seen.saturating_add(data.len() as u64);
                    if seen > DRAIN_LIMIT {
                        return Err(BodyError::TooLarge);
                    }
                    if seen <= limit as u64 {
                        out.extend_from_slice(&data);
                    } else if !out.is_empty() {
                        out = Vec::new();
                    }
                }
            }
        }
    }
}

/// One line per upload on stderr: what came, what was answered and why.
fn log(outcome: &Outcome, name: Option<&str>) {
    let name = name.map(|n| n.escape_debug().to_string());
    eprintln!(
        "tally-publisher receive: {} {}: {}",
        outcome.status,
        name.as_deref().unwrap_or("(unnamed upload)"),
        outcome.message
    );
}

/// Accepts TCP connections under the connection cap and hands each to the server once
/// its TLS handshake finished (in a task of its own, so a slow handshake holds up no one).
async fn tls_accept(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    slots: Arc<tokio::sync::Semaphore>,
    tx: tokio::sync::mpsc::Sender<(
        Timed<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
        std::net::SocketAddr,
    )>,
) {
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(a) => a,
            Err(_) => {
                // Out of descriptors and the like: wait instead of spinning.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let Ok(Ok(tls)) =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
            else {
                return;
            };
            let _ = tx.send((Timed::new(tls, slot), addr)).await;
        });
    }
}

/// TLS connections whose handshake is done, for axum.
struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<(
        Timed<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
        std::net::SocketAddr,
    )>,
    local: std::net::SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = Timed<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task never ends while the listener lives; if it did, serve
            // nothing more rather than spin.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Plain TCP connections under the connection cap (loopback, behind the vendor's proxy).
struct PlainListener {
    listener: tokio::net::TcpListener,
    slots: Arc<tokio::sync::Semaphore>,
}

impl axum::serve::Listener for PlainListener {
    type Io = Timed<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, addr) = match self.listener.accept().await {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                continue;
            };
            return (Timed::new(stream, slot), addr);
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// A connection that holds a connection slot and fails once nothing moved on it for
/// [`IDLE_TIMEOUT`], so a stalled client cannot keep a slot (or an upload permit).
struct Timed<S> {
    inner: S,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl<S> Timed<S> {
    fn new(inner: S, slot: tokio::sync::OwnedSemaphorePermit) -> Timed<S> {
        Timed {
            inner,
            deadline: Box::pin(tokio::time::sleep(IDLE_TIMEOUT)),
            _slot: slot,
        }
    }

    fn progress(&mut self) {
        let next = tokio::time::Instant::now() + IDLE_TIMEOUT;
        self.deadline.as_mut().reset(next);
    }

    fn expired(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        std::future::Future::poll(self.deadline.as_mut(), cx).is_ready()
    }
}

fn timed_out() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "connection idle too long")
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Timed<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut self.inner).poll_read(cx, buf) {
            std::task::Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.progress();
                }
                std::task::Poll::Ready(r)
            }
            std::task::Poll::Pending if self.expired(cx) => {
                std::task::Poll::Ready(Err(timed_out()))
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Timed<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match std::pin::Pin::new(&mut self.inner).poll_write(cx, buf) {
            std::task::Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    self.progress();
                }
                std::task::Poll::Ready(r)
            }
            std::task::Poll::Pending if self.expired(cx) => {
                std::task::Poll::Ready(Err(timed_out()))
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
