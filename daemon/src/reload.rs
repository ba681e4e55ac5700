//! Reloading bundles and policy (SIGHUP, `tally admin reload`, the dashboard): read on a
//! thread of its own with a deadline, handed to the ledger task, and every way it ends
//! made into one `ReloadOutcome`, logged and kept for the operations endpoint.

use crate::clock::now;
use crate::journal;
use crate::ledger_task::LedgerHandle;
use crate::metrics::{LastReload, Metrics};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tally_protocol::bundle::VerifiedBundle;
use tally_protocol::wire::ReloadOutcome;
use tokio::sync::oneshot;
use tracing::{info, warn};

/// How long a reload may take to read the bundle directory and the policy. A reload
/// that cannot finish in time (a file that never answers) is given up: the previous
/// bundles stay, and neither shutdown nor later reloads wait for it. Below the
/// client's request timeout (10 s), so `tally admin reload` hears why.
const RELOAD_DEADLINE: Duration = Duration::from_secs(5);

pub use crate::params::{ReloadError, Reloaded, Reloader};

/// A reload's outcome as one text: the summary, then each refusal.
pub fn outcome_text(outcome: &ReloadOutcome) -> String {
    let mut text = outcome.summary.clone();
    for r in &outcome.refused {
        text.push_str(&format!("\n  refused: {r}"));
    }
    text
}

/// Where a reload puts a cluster member's `[[cluster]]` members: the keys admitted at
/// the peer handshake and the members `tally admin cluster add` may add (`None` keys:
/// a single server).
pub(crate) type Members<'a> = (
    Option<&'a tally_cluster::net::PeerKeys>,
    &'a RwLock<Vec<tally_cluster::net::PeerNode>>,
);

/// The reloader and what keeps reloads one at a time.
pub(crate) struct Reloads {
    reloader: Option<Reloader>,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
    /// Reload threads still reading: more than 0 while a reload is waited for, and
    /// after one missed its deadline until it ends (then no other one starts, so at
    /// most one thread is ever stuck).
    running: Arc<AtomicUsize>,
}

impl Reloads {
    /// Reloads with `reloader`; none possible when `None`.
    pub(crate) fn new(reloader: Option<Reloader>) -> Reloads {
        Reloads {
            reloader,
            reloading: tokio::sync::Mutex::new(()),
            running: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Re-reads the bundles and hands them to the ledger; every lease is kept. SIGHUP, the
    /// admin request and the dashboard all come here, so they log the same lines: one per
    /// refused file (file and reason), one for the outcome; and the operations endpoint
    /// shows the outcome.
    pub(crate) async fn reload(
        &self,
        bundles: &RwLock<Arc<Vec<VerifiedBundle>>>,
        ledger: &LedgerHandle,
        metrics: &Metrics,
        cluster: Members<'_>,
    ) -> ReloadOutcome {
        let at = now().wall;
        let outcome = self.reload_bundles(bundles, ledger, cluster).await;
        for r in &outcome.refused {
            // The same words as at the start and in `check-config`: FILE: refused: REASON.
            warn!("reload: {}: refused: {}", r.source, r.reason);
        }
        if outcome.ok() {
            info!(bundles = outcome.loaded.len(), "{}", outcome.summary);
        } else {
            warn!(
                bundles = outcome.loaded.len(),
                refused = outcome.refused.len(),
                "{}",
                outcome.summary
            );
        }
        let mut record = metrics.reloads.lock().expect("metrics lock");
        if outcome.error.is_none() && outcome.policy_error.is_none() {
            // The directory was read: its refusals are the ones in force now.
            record.refused = outcome.refused.clone();
        }
        if outcome.ok() {
            record.last_success = Some(at);
        } else {
            record.failures += 1;
        }
        record.last = Some(LastReload {
            at,
            ok: outcome.ok(),
            summary: outcome.summary.clone(),
        });
        outcome
    }

    /// The reload itself; every way it can end is an outcome.
    async fn reload_bundles(
        &self,
        bundles_served: &RwLock<Arc<Vec<VerifiedBundle>>>,
        ledger: &LedgerHandle,
        (peer_keys, members_now): Members<'_>,
    ) -> ReloadOutcome {
        let serving = || -> Vec<String> {
            bundles_served
                .read()
                .expect("bundles lock")
                .iter()
                .map(|b| b.bundle.id.clone())
                .collect()
        };
        let failed = |error: String| ReloadOutcome {
            loaded: serving(),
            refused: Vec::new(),
            policy_error: None,
            summary: format!(
                "reload failed: {error}; still serving the previous bundles and policy"
            ),
            error: Some(error),
        };
        let _one_at_a_time = self.reloading.lock().await;
        let Some(reloader) = self.reloader.clone() else {
            return failed("this server has no bundle directory to reload from".into());
        };
        if self.running.load(Ordering::Acquire) > 0 {
            return failed(
                "an earlier reload is still stuck reading the bundle directory or the policy \
                 (a file on a hung mount?)"
                    .into(),
            );
        }
        let read = match self.read(reloader) {
            Ok(read) => read,
            Err(e) => return failed(format!("cannot start the reload: {e}")),
        };
        let Reloaded {
            bundles,
            refused,
            policy,
            cluster,
        } = match tokio::time::timeout(RELOAD_DEADLINE, read).await {
            Err(_) => {
                return failed(format!(
                    "reading the bundles and the policy did not finish within {} s (a file that \
                     never answers?)",
                    RELOAD_DEADLINE.as_secs()
                ))
            }
            Ok(Err(_)) => return failed("the reload ended without an answer".into()),
            Ok(Ok(Err(ReloadError::Other(e)))) => return failed(e),
            Ok(Ok(Err(ReloadError::Policy(broken)))) => {
                return ReloadOutcome {
                    loaded: serving(),
                    refused: Vec::new(),
                    summary: format!(
                        "reload refused: the policy file {} is broken: {}; nothing was reloaded \
                         (the previous policy and bundles stay in force)",
                        broken.source, broken.reason
                    ),
                    policy_error: Some(broken),
                    error: None,
                }
            }
            Ok(Ok(Ok(reloaded))) => reloaded,
        };
        let plain: Vec<_> = bundles.iter().map(|b| b.bundle.clone()).collect();
        // The set in force until now is the one shown in hello (one reload at a time).
        let before: Vec<_> = bundles_served
            .read()
            .expect("bundles lock")
            .iter()
            .map(|b| b.bundle.clone())
            .collect();
        let changes = journal::bundle_changes(&before, &plain, "reload", now().wall);
        let sent = ledger.reload(plain, changes, policy).await;
        if sent.is_err() {
            return failed("the server is shutting down".into());
        }
        let loaded: Vec<String> = bundles.iter().map(|b| b.bundle.id.clone()).collect();
        *bundles_served.write().expect("bundles lock") = Arc::new(bundles);
        if let (Some(members), Some(keys)) = (cluster, peer_keys) {
            let mut now_in = members_now.write().expect("members lock");
            if *now_in != members {
                // Peers are admitted by the new keys from the next handshake on; who
                // votes changes only by `tally admin cluster add` and `remove`.
                keys.replace(members.iter().map(|m| m.key));
                let named: Vec<String> = members
                    .iter()
                    .map(|m| format!("{} at {}", m.key.fingerprint(), m.addr))
                    .collect();
                info!(members = %named.join(", "), "reload: the cluster's configured members changed");
                *now_in = members;
            }
        }
        let count = loaded.len();
        let summary = if refused.is_empty() {
            format!("reloaded: serving {count} bundle(s); every lease kept")
        } else {
            format!(
                "reloaded: serving {count} bundle(s), {} bundle file(s) refused; every lease kept",
                refused.len()
            )
        };
        ReloadOutcome {
            loaded,
            refused,
            policy_error: None,
            error: None,
            summary,
        }
    }

    /// Starts `reloader` on a thread of its own; its answer comes on the receiver.
    fn read(
        &self,
        reloader: Reloader,
    ) -> std::io::Result<oneshot::Receiver<Result<Reloaded, ReloadError>>> {
        // A thread of its own, not tokio's blocking pool: the runtime waits for its
        // blocking tasks when it shuts down, and a stuck read must not keep tallyd alive.
        let (tx, rx) = oneshot::channel();
        let running = self.running.clone();
        running.fetch_add(1, Ordering::AcqRel);
        let spawned = std::thread::Builder::new()
            .name("tallyd-reload".into())
            .spawn(move || {
                let result = reloader();
                running.fetch_sub(1, Ordering::AcqRel);
                let _ = tx.send(result);
            });
        if let Err(e) = spawned {
            self.running.fetch_sub(1, Ordering::AcqRel);
            return Err(e);
        }
        Ok(rx)
    }
}
