//! The state every connection task reads: the way to the ledger task, the server key,
//! the bundles shown in hello, settings, reloads, reports and counters; and what a
//! client may see of a denial.

use crate::admission::Admission;
use crate::error::{storage_fault, Error};
use crate::journal::Exported;
use crate::ledger_task::LedgerHandle;
use crate::metrics::Metrics;
use crate::reload::Reloads;
use crate::reports::Reports;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tally_protocol::bundle::VerifiedBundle;
use tally_protocol::keys::SecretKey;
use tally_protocol::wire::{DenialReason, ReloadOutcome};

/// State every connection task reads.
pub(crate) struct Shared {
    /// The way to the ledger task.
    pub(crate) ledger: LedgerHandle,
    pub(crate) key: SecretKey,
    /// The bundles presented in hello, replaced on reload.
    pub(crate) bundles: RwLock<Arc<Vec<VerifiedBundle>>>,
    pub(crate) heartbeat_secs: u64,
    pub(crate) demo: bool,
    pub(crate) next_conn: AtomicU64,
    /// Reloads of bundles and policy.
    pub(crate) reloads: Reloads,
    pub(crate) admin_token: Option<String>,
    pub(crate) status_needs_token: bool,
    pub(crate) next_waiter: AtomicU64,
    /// The hold-off after an admin removal (for the admin's answer).
    pub(crate) remove_holdoff: Duration,
    /// Notified by an admin shutdown request.
    pub(crate) shutdown: tokio::sync::Notify,
    /// Report settings and the spool.
    pub(crate) reports: Reports,
    pub(crate) metrics: Arc<Metrics>,
    /// Connection and checkout limits.
    pub(crate) admission: Arc<Admission>,
    /// Requests read and not yet answered to the end: a stop waits (bounded) for them.
    pub(crate) answering: AtomicUsize,
    /// Whether this server leads (grants) or sends clients to the member that does.
    pub(crate) role: tokio::sync::watch::Receiver<crate::consensus::Role>,
    /// The Raft node running now, for peers' connections.
    pub(crate) node: crate::consensus::NodeSlot,
    /// The cluster's member keys (`None`: a single server, no peers admitted).
    pub(crate) peers: Option<tally_cluster::net::PeerKeys>,
    /// The members `[[cluster]]` names now (replaced by a reload), with their keys: the
    /// servers `tally admin cluster add` may add. Empty on a single server.
    pub(crate) members: RwLock<Vec<tally_cluster::net::PeerNode>>,
}

impl Shared {
    /// A denial as a client may see it: with `status_needs_token`, who holds the seats
    /// is for admins only (the count stays); a storage fault is named by its kind,
    /// without the server's paths or internal error text (the log has those).
    pub(crate) fn client_view(&self, reason: DenialReason) -> DenialReason {
        match reason {
            DenialReason::AllSeatsInUse {
                feature,
                total,
                in_use,
                requested,
                holders,
            } => DenialReason::AllSeatsInUse {
                feature,
                total,
                in_use,
                requested,
                holders: if self.status_needs_token {
                    Vec::new()
                } else {
                    holders
                },
            },
            DenialReason::OverdraftInUse {
                feature,
                total,
                overdraft,
                in_use,
                requested,
                holders,
            } => DenialReason::OverdraftInUse {
                feature,
                total,
                overdraft,
                in_use,
                requested,
                holders: if self.status_needs_token {
                    Vec::new()
                } else {
                    holders
                },
            },
            DenialReason::StorageUnavailable { what } => DenialReason::StorageUnavailable {
                what: storage_fault(&what),
            },
            other => other,
        }
    }

    /// Reloads bundles and policy; every way it ends is logged and kept in the metrics.
    pub(crate) async fn reload(&self) -> ReloadOutcome {
        self.reloads
            .reload(
                &self.bundles,
                &self.ledger,
                &self.metrics,
                (self.peers.as_ref(), &self.members),
            )
            .await
    }

    /// Asks the ledger task for the next report.
    pub(crate) async fn request_export(&self) -> Result<Exported, Error> {
        let bundles = self.bundles.read().expect("bundles lock").clone();
        let identity = self.reports.identity(&self.key, &bundles);
        self.ledger
            .export(identity, self.reports.settings.retention)
            .await?
    }

    /// Exports into the spool; a report that cannot be written is kept and retried.
    pub(crate) async fn export_to_spool(&self) -> Result<Option<std::path::PathBuf>, Error> {
        let Some(dir) = self.reports.settings.spool.clone() else {
            return Ok(None);
        };
        let exported = self.request_export().await?;
        self.reports.spool(&dir, exported).await
    }

    /// This cluster member's Raft node running now and the peer keys admitted, or `None`
    /// on a single server (or while the node restarts after a disk fault).
    pub(crate) fn cluster_node(
        &self,
    ) -> Option<(crate::consensus::Node, tally_cluster::net::PeerKeys)> {
        let peers = self.peers.clone()?;
        let node = self
            .node
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        Some((node, peers))
    }

    /// Whether `token` is the admin token (compared in constant time).
    pub(crate) fn is_admin(&self, token: Option<&str>) -> bool {
        match (&self.admin_token, token) {
            (Some(expected), Some(given)) => {
                constant_time_eq(given.trim().as_bytes(), expected.as_bytes())
            }
            _ => false,
        }
    }
}

/// Compares secrets without an early exit, so timing does not reveal a prefix.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
