//! Uploading spooled usage reports to the vendor: HTTPS POST, oldest first, retried with
//! backoff. A report leaves the spool (for `sent/`) only once the vendor's server answered
//! 2xx; nothing unacknowledged is ever dropped.

use anyhow::{bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

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
    pub fn new(url: &str, extra_ca: Option<&Path>, spool: &Path) -> Result<Uploader> {
        if !url.starts_with("https://") {
            bail!("report_upload_url must be an https:// URL, not {url}");
        }
        let mut roots =
            rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = extra_ca {
            let mut added = 0;
            for cert in CertificateDer::pem_file_iter(path)
                .with_context(|| format!("reading {}", path.display()))?
            {
                let cert =
                    cert.with_context(|| format!("{}: not a PEM certificate", path.display()))?;
                roots
                    .add(cert)
                    .with_context(|| format!("{}: unusable CA certificate", path.display()))?;
                added += 1;
            }
            if added == 0 {
                bail!("{}: holds no certificate", path.display());
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .context("TLS versions")?
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
                pass.error = Some(format!("{}: {e:#}", file.display()));
                pass.pending = files.len() - i;
                return pass;
            }
            pass.sent += 1;
        }
        pass
    }

    fn upload_one(&self, file: &Path) -> Result<()> {
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
            Ok(r) => bail!("the vendor's server answered {}", r.status()),
            Err(ureq::Error::Status(code, _)) => bail!("the vendor's server answered {code}"),
            Err(e) => bail!("upload failed: {e}"),
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
