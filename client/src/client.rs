//! [`Client`]: leases that look after themselves.
//!
//! A background task heartbeats every held lease in one batched request per interval.
//! When the connection is lost it marks the leases `Reconnecting`, connects again (the
//! next server of the list if need be) and re-attaches them with their secrets; an
//! application whose server comes back within the TTL sees no interruption. A lease the
//! server no longer knows becomes `Lost` with the reason. Dropping a [`LeaseHandle`]
//! checks it in.

use crate::cache::{self, BorrowedLease};
use crate::{ClientConfig, ClientError, Lease, Session};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tally_protocol::lease::LeaseId;
use tally_protocol::time::UnixTime;
use tally_protocol::wire::{CheckoutRequest, LeaseRef, LeaseState, StatusReply};
use tokio::sync::{watch, Notify};

/// How long to wait between reconnection attempts.
const RECONNECT_INTERVAL: Duration = Duration::from_secs(1);

/// What the application wants to check out.
#[derive(Debug, Clone)]
pub struct Want {
    /// The feature.
    pub feature: String,
    /// Seats.
    pub count: u32,
    /// The application's version, for version ceilings.
    pub version: Option<String>,
    /// The application's build date, for maintenance dates.
    pub build_date: Option<UnixTime>,
    /// How long to wait in the queue when no seat is free.
    pub wait: Duration,
}

impl Want {
    /// One seat of `feature`, no version, no wait.
    pub fn feature(feature: &str) -> Want {
        Want {
            feature: feature.to_string(),
            count: 1,
            version: None,
            build_date: None,
            wait: Duration::ZERO,
        }
    }

    fn request(&self, borrow: Duration) -> CheckoutRequest {
        CheckoutRequest {
            feature: self.feature.clone(),
            count: self.count,
            version: self.version.clone(),
            build_date: self.build_date,
            wait_secs: self.wait.as_secs().min(u32::MAX as u64) as u32,
            borrow_secs: borrow.as_secs(),
        }
    }
}

/// A lease's state as the application sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseStatus {
    /// Held and heartbeating.
    Active,
    /// The connection was lost; the client is reconnecting and will re-attach.
    Reconnecting,
    /// A borrowed lease, valid without a server until this time.
    Borrowed {
        /// When it ends.
        until: UnixTime,
    },
    /// The seat is gone; the text says why (removed by an administrator, expired).
    Lost(String),
}

struct Entry {
    lease_ref: LeaseRef,
    status: watch::Sender<LeaseStatus>,
}

struct Inner {
    config: ClientConfig,
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
    leases: Mutex<HashMap<LeaseId, Entry>>,
    wake: Notify,
    closed: std::sync::atomic::AtomicBool,
    runtime: tokio::runtime::Handle,
}

/// A client with self-managing leases. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("servers", &self.inner.config.servers)
            .finish_non_exhaustive()
    }
}

/// A held lease. Dropping it checks it in (in the background).
pub struct LeaseHandle {
    lease: Lease,
    status: watch::Receiver<LeaseStatus>,
    inner: Option<Arc<Inner>>,
}

impl std::fmt::Debug for LeaseHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseHandle")
            .field("id", &self.lease.id())
            .field("feature", &self.lease.grant.feature)
            .field("status", &*self.status.borrow())
            .finish()
    }
}

impl LeaseHandle {
    /// The lease id.
    pub fn id(&self) -> LeaseId {
        self.lease.id()
    }

    /// The grant as the server sent it (token included).
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// The current status.
    pub fn status(&self) -> LeaseStatus {
        self.status.borrow().clone()
    }

    /// A receiver that sees every status change (`changed().await`).
    pub fn watch(&self) -> watch::Receiver<LeaseStatus> {
        self.status.clone()
    }

    /// Checks the lease in now and waits for the server's answer.
    pub async fn checkin(mut self) -> Result<(), ClientError> {
        let Some(inner) = self.inner.take() else {
            return Ok(());
        };
        let r = inner.forget(self.lease.id());
        match r {
            Some(lease_ref) => inner.checkin(lease_ref).await,
            None => Ok(()),
        }
    }
}

impl Drop for LeaseHandle {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            if let Some(lease_ref) = inner.forget(self.lease.id()) {
                let handle = inner.runtime.clone();
                // Best effort: if the runtime is shutting down, the TTL reclaims the seat.
                handle.spawn(async move {
                    let _ = inner.checkin(lease_ref).await;
                });
            }
        }
    }
}

impl Inner {
    fn forget(&self, id: LeaseId) -> Option<LeaseRef> {
        self.leases
            .lock()
            .expect("leases lock")
            .remove(&id)
            .map(|e| e.lease_ref)
    }

    async fn session(&self) -> Result<Arc<Session>, ClientError> {
        let mut guard = self.session.lock().await;
        if let Some(s) = guard.as_ref() {
            return Ok(s.clone());
        }
        let session = Arc::new(Session::connect(&self.config).await?);
        *guard = Some(session.clone());
        Ok(session)
    }

    async fn drop_session(&self, broken: &Arc<Session>) {
        let mut guard = self.session.lock().await;
        if guard.as_ref().is_some_and(|s| Arc::ptr_eq(s, broken)) {
            *guard = None;
        }
    }

    async fn checkin(&self, lease_ref: LeaseRef) -> Result<(), ClientError> {
        let session = self.session().await?;
        match session.checkin(&[lease_ref]).await {
            Ok(_) => Ok(()),
            Err(e) => {
                if e.is_connection_loss() {
                    self.drop_session(&session).await;
                }
                Err(e)
            }
        }
    }

    fn set_all(&self, status: LeaseStatus) {
        for e in self.leases.lock().expect("leases lock").values() {
            e.status.send_if_modified(|s| {
                let changed = *s != status;
                *s = status.clone();
                changed
            });
        }
    }

    /// One round of the background task: heartbeat everything, or reconnect.
    async fn tend(&self) -> Duration {
        let refs: Vec<(LeaseId, LeaseRef)> = self
            .leases
            .lock()
            .expect("leases lock")
            .iter()
            .map(|(id, e)| (*id, e.lease_ref.clone()))
            .collect();
        let session = match self.session().await {
            Ok(s) => s,
            Err(_) => {
                self.set_all(LeaseStatus::Reconnecting);
                return RECONNECT_INTERVAL;
            }
        };
        let interval = session.heartbeat_interval();
        if refs.is_empty() {
            return interval;
        }
        let only_refs: Vec<LeaseRef> = refs.iter().map(|(_, r)| r.clone()).collect();
        match session.heartbeat(&only_refs).await {
            Ok(states) => {
                let mut leases = self.leases.lock().expect("leases lock");
                for ((id, _), state) in refs.iter().zip(states) {
                    let reason = match state {
                        LeaseState::Active => None,
                        LeaseState::Removed => Some("removed by an administrator"),
                        _ => Some("the server no longer knows this lease (it expired)"),
                    };
                    match reason {
                        None => {
                            if let Some(e) = leases.get(id) {
                                e.status.send_if_modified(|s| {
                                    let changed = *s != LeaseStatus::Active;
                                    *s = LeaseStatus::Active;
                                    changed
                                });
                            }
                        }
                        Some(why) => {
                            if let Some(e) = leases.remove(id) {
                                let _ = e.status.send(LeaseStatus::Lost(why.to_string()));
                            }
                        }
                    }
                }
                interval
            }
            Err(e) if e.is_connection_loss() => {
                tracing::warn!(error = %e, "connection lost; reconnecting");
                self.drop_session(&session).await;
                self.set_all(LeaseStatus::Reconnecting);
                // Reconnect and re-attach right away.
                Duration::ZERO
            }
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat failed");
                interval
            }
        }
    }
}

async fn tend_forever(inner: std::sync::Weak<Inner>) {
    let mut wait = Duration::ZERO;
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        if strong.closed.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if !wait.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = strong.wake.notified() => {}
            }
        }
        wait = strong.tend().await;
        if wait.is_zero() {
            wait = Duration::from_millis(50);
        }
    }
}

impl Client {
    /// Connects to the first server that answers and proves trustworthy, and starts the
    /// background task. Must be called within a tokio runtime.
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        let session = Session::connect(&config).await?;
        let inner = Arc::new(Inner {
            config,
            session: tokio::sync::Mutex::new(Some(Arc::new(session))),
            leases: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            closed: std::sync::atomic::AtomicBool::new(false),
            runtime: tokio::runtime::Handle::current(),
        });
        tokio::spawn(tend_forever(Arc::downgrade(&inner)));
        Ok(Client { inner })
    }

    /// The current session, if connected (for status, attributes, the server's key).
    pub async fn session(&self) -> Result<Arc<Session>, ClientError> {
        self.inner.session().await
    }

    /// Checks seats out. A borrowed lease of the same feature from this server in the
    /// per-user cache is used instead of taking a second seat.
    pub async fn checkout(&self, want: &Want) -> Result<LeaseHandle, ClientError> {
        let session = self.inner.session().await?;
        if let Ok(Some(borrowed)) = cache::find(&self.inner.config.trust, &want.feature, now()) {
            if borrowed.server_key == session.server_key() {
                // Online, the server has the last word: a copy of a cache whose lease
                // was returned early (or removed by the admin) must not be replayed.
                match session
                    .heartbeat(std::slice::from_ref(&borrowed.lease_ref))
                    .await
                {
                    Ok(states) if states.first() == Some(&LeaseState::Active) => {
                        return Ok(LeaseHandle::borrowed(borrowed));
                    }
                    Ok(_) => {
                        tracing::warn!(
                            lease = %borrowed.lease_ref.id,
                            "the server no longer holds this borrowed lease; forgetting it"
                        );
                        let _ = cache::remove(borrowed.lease_ref.id);
                    }
                    Err(e) => {
                        if e.is_connection_loss() {
                            self.inner.drop_session(&session).await;
                        }
                        return Err(e);
                    }
                }
            }
        }
        let lease = match session.checkout(&want.request(Duration::ZERO)).await {
            Ok(l) => l,
            Err(e) => {
                if e.is_connection_loss() {
                    self.inner.drop_session(&session).await;
                }
                return Err(e);
            }
        };
        let (tx, rx) = watch::channel(LeaseStatus::Active);
        self.inner.leases.lock().expect("leases lock").insert(
            lease.id(),
            Entry {
                lease_ref: lease.lease_ref(),
                status: tx,
            },
        );
        Ok(LeaseHandle {
            lease,
            status: rx,
            inner: Some(self.inner.clone()),
        })
    }

    /// Borrows seats for `period` (a laptop going offline) and keeps the lease in the
    /// per-user cache, where it is honoured with no server until it ends.
    pub async fn borrow(
        &self,
        want: &Want,
        period: Duration,
    ) -> Result<BorrowedLease, ClientError> {
        let session = self.inner.session().await?;
        let lease = session.checkout(&want.request(period)).await?;
        let bundle = session
            .bundles()
            .first()
            .map(|b| b.signed.clone())
            .ok_or_else(|| ClientError::Protocol("server presented no bundle".into()))?;
        cache::store(&lease, &bundle).map_err(|e| ClientError::Config(e.to_string()))?;
        cache::find(&self.inner.config.trust, &want.feature, now())
            .map_err(|e| ClientError::Config(e.to_string()))?
            .ok_or_else(|| ClientError::Config("the borrowed lease did not reach the cache".into()))
    }

    /// Returns every borrowed lease of `feature` early; returns how many.
    pub async fn return_borrowed(&self, feature: &str) -> Result<usize, ClientError> {
        let session = self.inner.session().await?;
        let entries =
            cache::entries_for(feature).map_err(|e| ClientError::Config(e.to_string()))?;
        let mut returned = 0;
        for entry in entries {
            if entry.server_key != session.server_key() {
                continue;
            }
            session
                .checkin(std::slice::from_ref(&entry.lease_ref))
                .await?;
            cache::remove(entry.lease_ref.id).map_err(|e| ClientError::Config(e.to_string()))?;
            returned += 1;
        }
        Ok(returned)
    }

    /// The server's status.
    pub async fn status(&self) -> Result<StatusReply, ClientError> {
        self.inner.session().await?.status(None).await
    }

    /// Checks every lease in and closes the connection.
    pub async fn close(self) {
        self.inner
            .closed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.inner.wake.notify_one();
        let refs: Vec<LeaseRef> = self
            .inner
            .leases
            .lock()
            .expect("leases lock")
            .drain()
            .map(|(_, e)| e.lease_ref)
            .collect();
        let session = self.inner.session.lock().await.take();
        if let Some(s) = session {
            if !refs.is_empty() {
                let _ = s.checkin(&refs).await;
            }
            // Closed even if a request still holds the session: the server must see
            // the close now, not after its idle timeout.
            s.close_shared().await;
        }
    }
}

impl LeaseHandle {
    /// A handle for a borrowed lease from the cache: no heartbeats, no checkin on drop
    /// (the borrow runs to its end or is returned with `return_borrowed`).
    pub fn borrowed(b: BorrowedLease) -> LeaseHandle {
        let (_tx, rx) = watch::channel(LeaseStatus::Borrowed { until: b.until });
        LeaseHandle {
            lease: b.lease,
            status: rx,
            inner: None,
        }
    }
}

/// The wall clock as the client sees it.
pub(crate) fn now() -> UnixTime {
    UnixTime(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    )
}
