//! Uploading spooled usage reports to the vendor: HTTPS POST, oldest first, retried with
//! backoff. A report leaves the spool (for `sent/`) only once the vendor's server answered
//! 2xx; nothing unacknowledged is ever dropped.

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::CertificateDer;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Why the uploader could not be set up, or one report not be uploaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UploadError {
    /// Reports go over HTTPS only.
    #[error("report_upload_url must be an https:// URL, not {0}")]
    NotHttps(String),
    /// The CA file could not be read.
    #[error("reading {path}: {cause}")]
    ReadCa {
        /// The CA file.
        path: PathBuf,
        /// Why.
        cause: pem::Error,
    },
    /// An entry of the CA file is not a PEM certificate.
    #[error("{path}: not a PEM certificate: {cause}")]
    NotPem {
        /// The CA file.
        path: PathBuf,
        /// Why.
        cause: pem::Error,
    },
    /// rustls refused a CA certificate.
    #[error("{path}: unusable CA certificate: {cause}")]
    UnusableCa {
        /// The CA file.
        path: PathBuf,
        /// Why.
        cause: rustls::Error,
    },
    /// The CA file holds no certificate.
    #[error("{path}: holds no certificate")]
    NoCertificate {
        /// The CA file.
        path: PathBuf,
    },
    /// rustls refused the TLS versions (a broken build).
    #[error("TLS versions: {0}")]
    TlsVersions(rustls::Error),
    /// A spooled report could not be read or moved to `sent/`.
    #[error(transparent)]
    Spool(#[from] std::io::Error),
    /// The vendor's server answered something else than 2xx.
    #[error("the vendor's server answered {0}")]
    Status(u16),
    /// The request did not get an answer (DNS, connection, TLS, timeout).
    #[error("upload failed: {0}")]
    Transport(Box<ureq::Error>),
}

/// Longest wait between attempts after failures.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// Uploads spooled reports to one URL.
pub struct Uploader {
    url: String,
    agent: ureq::Agent,
    spool: PathBuf,
}

impl std::fmt::Debug for Uploader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uploader")
            .field("url", &self.url)
            .field("spool", &self.spool)
            .finish()
    }
}

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// Reports acknowledged in this pass.
    pub sent: usize,
    /// Reports still waiting.
    pub pending: usize,
    /// Why the pass stopped early, if it did.
    pub error: Option<String>,
}

impl Uploader {
    /// An uploader to `url` (https only) trusting the public web roots, plus the CA
    /// certificates in `extra_ca` (a PEM file) for a vendor with its own CA.
    pub fn new(url: &str, extra_ca: Option<&Path>, spool: &Path) -> Result<Uploader, UploadError> {
        if !url.starts_with("https://") {
            return Err(UploadError::NotHttps(url.to_string()));
        }
        let mut roots =
            rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = extra_ca {
            let mut added = 0;
            let certs =
                CertificateDer::pem_file_iter(path).map_err(|cause| UploadError::ReadCa {
                    path: path.to_path_buf(),
                    cause,
                })?;
            for cert in certs {
                let cert = cert.map_err(|cause| UploadError::NotPem {
                    path: path.to_path_buf(),
                    cause,
                })?;
                roots.add(cert).map_err(|cause| UploadError::UnusableCa {
                    path: path.to_path_buf(),
                    cause,
                })?;
                added += 1;
            }
            if added == 0 {
                return Err(UploadError::NoCertificate {
                    path: path.to_path_buf(),
                });
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(UploadError::TlsVersions)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let agent = ureq::AgentBuilder::new()
            .tls_config(Arc::new(tls))
            .timeout(Duration::from_secs(60))
            .build();
        Ok(Uploader {
            url: url.to_string(),
            agent,
            spool: spool.to_path_buf(),
        })
    }

    /// Spooled reports not yet acknowledged, oldest first.
    pub fn pending(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.spool)
            .map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "report"))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
    }

    /// Uploads pending reports in order; stops at the first failure (the chain goes in
    /// order, so a later report never overtakes an earlier one).
    pub fn upload_pending(&self) -> Pass {
        let mut pass = Pass::default();
        let files = self.pending();
        for (i, file) in files.iter().enumerate() {
            if let Err(e) = self.upload_one(file) {
                pass.error = Some(format!("{}: {e}", file.display()));
                pass.pending = files.len() - i;
                return pass;
            }
            pass.sent += 1;
        }
        pass
    }

    fn upload_one(&self, file: &Path) -> Result<(), UploadError> {
        // Regular files only, without blocking, bounded: something else dropped into
        // the spool must not hang or balloon the uploader.
        let text =
            crate::files::read_regular_text(file, tally_protocol::report::MAX_REPORT_TEXT as u64)?;
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("report");
        match self
            .agent
            .post(&self.url)
            .set("Content-Type", "text/plain; charset=utf-8")
            .set("X-Tally-Report", name)
            .send_string(&text)
        {
            Ok(r) if (200..300).contains(&r.status()) => {}
            Ok(r) => return Err(UploadError::Status(r.status())),
            Err(ureq::Error::Status(code, _)) => return Err(UploadError::Status(code)),
            Err(e) => return Err(UploadError::Transport(Box::new(e))),
        }
        let sent = self.spool.join("sent");
        std::fs::create_dir_all(&sent)?;
        std::fs::rename(file, sent.join(name))?;
        Ok(())
    }
}

/// Runs upload passes forever: after each export (`wake`) and on a backoff schedule while
/// reports are pending.
pub async fn run(uploader: Arc<Uploader>, wake: Arc<tokio::sync::Notify>) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let u = uploader.clone();
        let pass = tokio::task::spawn_blocking(move || u.upload_pending())
            .await
            .unwrap_or_default();
        if pass.sent > 0 {
            tracing::info!(sent = pass.sent, "usage reports uploaded");
        }
        let wait = match &pass.error {
            Some(e) => {
                tracing::warn!(
                    pending = pass.pending,
                    retry_in_secs = backoff.as_secs(),
                    "report upload: {e}"
                );
                let w = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                w
            }
            None => {
                backoff = Duration::from_secs(1);
                MAX_BACKOFF
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = wake.notified() => {}
        }
    }
}
