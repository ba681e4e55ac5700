//! What the operations endpoint (`http`) may ask of a running server: status, counters,
//! lease removal and reloads, through the same ledger task and reload path as QUIC
//! clients and SIGHUP.

use crate::clock::now;
use crate::error::Error;
use crate::metrics::{Metrics, RecentDenial};
use crate::shared::Shared;
use std::sync::Arc;
use tally_protocol::bundle::VerifiedBundle;
use tally_protocol::lease::LeaseId;
use tally_protocol::wire::{ReloadOutcome, StatusReply};
use tracing::info;

/// What the operations endpoint may ask of a running server.
#[derive(Clone)]
pub struct OpsHandle {
    shared: Arc<Shared>,
}

impl OpsHandle {
    /// The handle of a running server.
    pub(crate) fn new(shared: Arc<Shared>) -> OpsHandle {
        OpsHandle { shared }
    }

    /// This member's view of its cluster (members, role, leader, term, replication
    /// lag); `None` for a single server, or while its Raft node is stopped.
    pub fn cluster_view(&self) -> Option<tally_cluster::ops::ClusterView> {
        let (node, _) = self.shared.cluster_node()?;
        let metrics = node.metrics().borrow().clone();
        Some(tally_cluster::ops::ClusterView::from_metrics(&metrics))
    }

    /// Whether a reader with this bearer token may see status and metrics.
    pub fn may_read(&self, token: Option<&str>) -> bool {
        !self.shared.status_needs_token || self.is_admin(token)
    }

    /// Whether this bearer token is the admin token.
    pub fn is_admin(&self, token: Option<&str>) -> bool {
        self.shared.is_admin(token)
    }

    /// The counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// The ledger's status.
    pub async fn raw_status(&self) -> Result<StatusReply, Error> {
        let features = self.shared.ledger.status().await?;
        Ok(StatusReply {
            server_time: now().wall,
            server_fingerprint: self.shared.key.public().fingerprint(),
            features,
        })
    }

    /// Status as the dashboard and `/api/status` show it.
    pub async fn status(&self) -> Result<serde_json::Value, Error> {
        let s = self.raw_status().await?;
        let recent: Vec<RecentDenial> = self
            .shared
            .metrics
            .recent
            .lock()
            .expect("metrics lock")
            .iter()
            .rev()
            .cloned()
            .collect();
        let mut doc = s.to_json(self.shared.demo);
        doc["recent_denials"] = serde_json::json!(recent);
        let bundles = self.shared.bundles.read().expect("bundles lock").clone();
        add_bundles(&mut doc, &bundles);
        let reloads = self.shared.metrics.reloads.lock().expect("metrics lock");
        doc["refused_bundles"] = serde_json::json!(reloads.refused);
        doc["last_reload"] = match &reloads.last {
            Some(last) => serde_json::json!({
                "at": last.at.to_string(),
                "ok": last.ok,
                "summary": last.summary,
            }),
            None => serde_json::Value::Null,
        };
        Ok(doc)
    }

    /// Client connections open now.
    pub fn connections(&self) -> usize {
        self.shared.admission.connections()
    }

    /// Reports waiting in the spool directory.
    pub async fn spool_files(&self) -> usize {
        self.shared.reports.spool_files().await
    }

    /// Removes a lease.
    pub async fn remove(&self, lease: LeaseId) -> Result<bool, Error> {
        let removed = self.shared.ledger.remove(lease).await?;
        if removed {
            info!(%lease, "lease removed by the administrator (dashboard)");
        }
        Ok(removed)
    }

    /// Reloads bundles and policy (logged like a SIGHUP).
    pub async fn reload(&self) -> ReloadOutcome {
        self.shared.reload().await
    }
}

/// Adds the bundles served to a status document, for the dashboard: `bundles` (id,
/// vendor, customer, features, end) and, per feature, the ids of the bundles that grant
/// it (a package's components included), so an admin can tell the vendor which
/// contract a number comes from.
fn add_bundles(doc: &mut serde_json::Value, bundles: &[VerifiedBundle]) {
    let grants =
        |b: &VerifiedBundle, feature: &str| b.bundle.features.iter().any(|g| g.serves(feature));
    if let Some(features) = doc["features"].as_array_mut() {
        for f in features {
            let name = f["name"].as_str().unwrap_or_default().to_string();
            f["bundles"] = serde_json::json!(bundles
                .iter()
                .filter(|b| grants(b, &name))
                .map(|b| b.bundle.id.as_str())
                .collect::<Vec<_>>());
        }
    }
    doc["bundles"] = serde_json::json!(bundles
        .iter()
        .map(|b| serde_json::json!({
            "id": b.bundle.id,
            "vendor": b.bundle.vendor,
            "customer_id": b.bundle.customer.id,
            "customer_name": b.bundle.customer.name,
            "features": b.bundle.features.iter().map(|g| g.name.as_str()).collect::<Vec<_>>(),
            "valid_until": b.bundle.valid_until.map(|u| u.last_day()),
        }))
        .collect::<Vec<_>>());
}
