//! Usage reports: the export the ledger task runs against the store (build, chain,
//! compact), and the spool reports are written into for upload. The shell asks for an
//! export through the ledger task (`Shared::request_export`), so that a report sees every
//! journal event decided before it.

use crate::error::Error;
use crate::journal::{self, Exported, ReportIdentity};
use crate::store::{Store, StoreError};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tally_protocol::bundle::VerifiedBundle;
use tally_protocol::keys::SecretKey;
use tally_protocol::time::UnixTime;
use tracing::warn;

pub use crate::params::ReportSettings;

/// The report settings with the spool's state: reports exported but not yet written,
/// and the uploader's wake-up.
pub(crate) struct Reports {
    /// Where and when reports are written.
    pub(crate) settings: ReportSettings,
    /// Reports exported but not yet written to the spool (never dropped).
    unspooled: tokio::sync::Mutex<Vec<(u64, String)>>,
    /// Wakes the uploader after an export.
    pub(crate) upload_wake: Arc<tokio::sync::Notify>,
}

impl Reports {
    /// Reports with nothing exported yet.
    pub(crate) fn new(settings: ReportSettings) -> Reports {
        Reports {
            settings,
            unspooled: tokio::sync::Mutex::new(Vec::new()),
            upload_wake: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Who signs and is named in the next report: this server, its host, and the
    /// customers and bundles served.
    pub(crate) fn identity(
        &self,
        key: &SecretKey,
        bundles: &[VerifiedBundle],
    ) -> Box<ReportIdentity> {
        let mut customers = Vec::new();
        let mut bundle_ids = Vec::new();
        for v in bundles.iter() {
            if !customers.contains(&v.bundle.customer.id) {
                customers.push(v.bundle.customer.id.clone());
            }
            bundle_ids.push(v.bundle.id.clone());
        }
        Box::new(ReportIdentity {
            key: key.clone(),
            host_fingerprint: self.settings.host_fingerprint.clone(),
            customers,
            bundle_ids,
        })
    }

    /// Writes an exported report into the spool, after any earlier ones that could
    /// not be written; a report that cannot be written is kept and retried.
    pub(crate) async fn spool(
        &self,
        dir: &Path,
        exported: Exported,
    ) -> Result<Option<PathBuf>, Error> {
        let mut unspooled = self.unspooled.lock().await;
        unspooled.push((exported.report_seq, exported.text));
        let mut last = None;
        while let Some((seq, text)) = unspooled.first().cloned() {
            let path = dir.join(format!("tally-report-{seq:08}.report"));
            match write_blocking(path.clone(), text).await {
                Ok(()) => {
                    unspooled.remove(0);
                    last = Some(path);
                    self.upload_wake.notify_one();
                }
                Err(cause) => return Err(Error::Spool { path, cause }),
            }
        }
        Ok(last)
    }

    /// A copy of a report exported for the admin goes to the spool too, if there is
    /// one; a copy that cannot be written is logged, the admin has the report.
    pub(crate) async fn spool_copy(&self, exported: &Exported) {
        if let Some(dir) = &self.settings.spool {
            let path = dir.join(format!("tally-report-{:08}.report", exported.report_seq));
            if let Err(e) = write_blocking(path.clone(), exported.text.clone()).await {
                warn!(path = %path.display(), error = %e, "spool copy failed");
            }
            self.upload_wake.notify_one();
        }
    }

    /// Reports waiting in the spool directory (listed on the blocking pool: a slow
    /// or huge directory must not hold an async worker).
    pub(crate) async fn spool_files(&self) -> usize {
        let Some(dir) = self.settings.spool.clone() else {
            return 0;
        };
        tokio::task::spawn_blocking(move || {
            std::fs::read_dir(dir)
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .filter(|e| e.path().extension().is_some_and(|x| x == "report"))
                        .count()
                })
                .unwrap_or(0)
        })
        .await
        .unwrap_or(0)
    }
}

/// Builds the next report, of the journal up to entry `upto` (the last one written when
/// the export was asked for: the ledger task goes on writing while it runs). Writes
/// nothing: the ledger task proposes the chain's new state (and the compaction of what
/// is old enough) through the log. Runs on the blocking pool.
pub(crate) fn export(
    store: &Store,
    identity: &ReportIdentity,
    (now, upto): (UnixTime, u64),
) -> Result<Exported, StoreError> {
    let state = store.report_state()?;
    let (mut entries, unreadable) = store.journal_after(state.last_event)?;
    entries.retain(|e| e.seq <= upto);
    if unreadable > 0 {
        warn!(
            unreadable,
            "journal records could not be read; the report names the gap"
        );
    }
    Ok(journal::build_report(identity, &state, entries, now))
}

fn write_report(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    crate::files::write_atomic(path, text.as_bytes(), 0o644)
}

/// Writes a report on the blocking pool (fsyncs must not hold an async worker).
async fn write_blocking(path: PathBuf, text: String) -> std::io::Result<()> {
    tokio::task::spawn_blocking(move || write_report(&path, &text))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}
