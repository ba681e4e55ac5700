//! [`Client`]: leases that look after themselves.
//!
//! A background task heartbeats every held lease in one batched request per interval.
//! It also watches the connection: the moment it closes (the server stopped, restarted
//! or timed the connection out), the leases are marked `Reconnecting` and the task
//! connects again (the next server of the list if need be) after a short random delay,
//! backing off while no server answers, so that thousands of clients of a restarted
//! server do not all knock at the same instant. Reconnected, it re-attaches the leases
//! with their secrets; an application whose server comes back within the TTL sees no
//! interruption. A lease the server no longer knows becomes `Lost` with the reason.
//!
//! Dropping a [`LeaseHandle`] checks it in. A checkin that cannot be delivered because
//! no server answers (a restart) is kept and delivered as soon as a connection is back,
//! so the seat of a job that ended during a restart returns within seconds of the
//! restart rather than after its TTL.

use crate::cache::{self, BorrowedLease};
use crate::{ClientConfig, ClientError, Lease, Session};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tally_protocol::lease::LeaseId;
use tally_protocol::time::UnixTime;
use tally_protocol::wire::{CheckoutRequest, LeaseRef, LeaseState, StatusReply};
use tokio::sync::{watch, Notify};

/// The first reconnection attempt after a lost connection comes after a random delay
/// below this, so the clients of a restarted server spread their handshakes.
const RECONNECT_JITTER: Duration = Duration::from_millis(500);
/// Reconnection attempts back off from this...
const RECONNECT_MIN: Duration = Duration::from_millis(250);
/// ...doubling up to this.
const RECONNECT_MAX: Duration = Duration::from_secs(10);
/// Borrowed leases a checkout tries (each one the server no longer holds is forgotten)
/// before it asks the server.
const MAX_BORROWED_TRIES: usize = 8;

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
    /// Checkins no server has answered yet; sent first whenever a session is up.
    undelivered: Mutex<Vec<LeaseRef>>,
    /// Held while checkins are on their way, so that "nothing queued" means "delivered"
    /// to whoever looks next, not "taken by another task that may still fail".
    delivering: tokio::sync::Mutex<()>,
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
    /// For a borrowed lease: the locks of the seats this handle uses on this machine.
    _borrowed_seats: Option<cache::SeatLocks>,
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

    /// Checks the lease in now and waits for the server's answer. While no server
    /// answers (a restart), keeps trying for [`ClientConfig::checkin_grace`]; if that
    /// runs out the error is returned and the checkin stays queued: the client delivers
    /// it as soon as it reaches a server again (for as long as the [`Client`] lives).
    pub async fn checkin(mut self) -> Result<(), ClientError> {
        let Some(inner) = self.inner.take() else {
            return Ok(());
        };
        match inner.forget(self.lease.id()) {
            Some(lease_ref) => {
                inner.queue_checkin(lease_ref);
                inner.deliver_checkins().await
            }
            None => Ok(()),
        }
    }
}

impl Drop for LeaseHandle {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            if let Some(lease_ref) = inner.forget(self.lease.id()) {
                inner.queue_checkin(lease_ref);
                let handle = inner.runtime.clone();
                // Best effort: if the runtime is shutting down, the TTL reclaims the seat.
                handle.spawn(async move {
                    let _ = inner.deliver_checkins().await;
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

    fn queue_checkin(&self, lease_ref: LeaseRef) {
        self.undelivered
            .lock()
            .expect("undelivered lock")
            .push(lease_ref);
    }

    /// Sends the queued checkins once on `session`; they stay queued if it fails.
    async fn send_checkins(&self, session: &Arc<Session>) -> Result<(), ClientError> {
        let _delivering = self.delivering.lock().await;
        let refs: Vec<LeaseRef> = std::mem::take(&mut *self.undelivered.lock().expect("lock"));
        if refs.is_empty() {
            return Ok(());
        }
        match session.checkin(&refs).await {
            // Answered: delivered, whatever the answer (a lease the server no longer
            // knows is not held either).
            Ok(answers) => {
                tracing::debug!(server = %session.server(), ?answers, "checkins delivered");
                Ok(())
            }
            Err(e) => {
                self.undelivered.lock().expect("lock").extend(refs);
                if e.is_connection_loss() {
                    self.drop_session(session).await;
                }
                Err(e)
            }
        }
    }

    /// Delivers the queued checkins, reconnecting with backoff for up to the configured
    /// grace while no server answers.
    async fn deliver_checkins(&self) -> Result<(), ClientError> {
        let deadline = tokio::time::Instant::now() + self.config.checkin_grace;
        let mut backoff = Backoff::default();
        loop {
            let result = match self.session().await {
                Ok(session) => self.send_checkins(&session).await,
                Err(e) => Err(e),
            };
            tracing::debug!(?result, "checkin delivery attempt");
            match result {
                Err(e) if e.is_connection_loss() => {
                    let pause = backoff.next();
                    if tokio::time::Instant::now() + pause >= deadline {
                        tracing::warn!(
                            error = %e,
                            "checkin not delivered yet; it is sent when a server answers again"
                        );
                        self.wake.notify_one();
                        return Err(e);
                    }
                    tokio::time::sleep(pause).await;
                }
                other => return other,
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

    /// One round of the background task: deliver queued checkins, heartbeat
    /// everything, or reconnect. `None` means no server answered.
    async fn tend(&self) -> Option<Duration> {
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
                return None;
            }
        };
        let interval = session.heartbeat_interval();
        if let Err(e) = self.send_checkins(&session).await {
            if e.is_connection_loss() {
                self.set_all(LeaseStatus::Reconnecting);
                return None;
            }
            tracing::warn!(error = %e, "checkin failed");
        }
        if refs.is_empty() {
            return Some(interval);
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
                Some(interval)
            }
            Err(e) if e.is_connection_loss() => {
                tracing::warn!(error = %e, "connection lost; reconnecting");
                self.drop_session(&session).await;
                self.set_all(LeaseStatus::Reconnecting);
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat failed");
                Some(interval)
            }
        }
    }

    /// The session now held, without connecting.
    async fn current_session(&self) -> Option<Arc<Session>> {
        self.session.lock().await.clone()
    }
}

/// Exponential backoff with jitter: each pause is a random point in the upper half of
/// a window that doubles from [`RECONNECT_MIN`] to [`RECONNECT_MAX`].
#[derive(Default)]
struct Backoff {
    attempt: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let window = RECONNECT_MIN
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(RECONNECT_MAX);
        self.attempt = self.attempt.saturating_add(1);
        window / 2 + jitter(window / 2)
    }
}

/// A random duration below `max` (spreading reconnects needs no cryptographic quality:
/// the clock's nanoseconds, the pid and a counter, mixed).
fn jitter(max: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    let nanos = max.as_nanos().max(1) as u64;
    Duration::from_nanos(h.finish() % nanos)
}

async fn tend_forever(inner: std::sync::Weak<Inner>) {
    let mut wait = Duration::ZERO;
    let mut backoff = Backoff::default();
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        if strong.closed.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let session = strong.current_session().await;
        let closed = async {
            match &session {
                Some(s) => s.closed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = strong.wake.notified() => {}
            _ = closed => {
                // Noticed at once, not at the next heartbeat: the server stopped,
                // restarted or dropped us. Reconnect after a short random delay.
                let broken = session.expect("closed only resolves for a session");
                tracing::warn!(server = %broken.server(), "connection closed; reconnecting");
                strong.drop_session(&broken).await;
                strong.set_all(LeaseStatus::Reconnecting);
                drop(broken);
                let pause = jitter(RECONNECT_JITTER);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = strong.wake.notified() => {}
                }
            }
        }
        if strong.closed.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        wait = match strong.tend().await {
            Some(interval) => {
                backoff = Backoff::default();
                interval
            }
            None => backoff.next(),
        };
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
            undelivered: Mutex::new(Vec::new()),
            delivering: tokio::sync::Mutex::new(()),
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

    /// Checks seats out. A borrowed lease from this server in the per-user cache that
    /// serves `want` (see [`cache::claim`]: feature, count, version, dates, and a seat free
    /// on this machine) is used instead of taking a second seat; when none does, the
    /// server decides as for any checkout.
    pub async fn checkout(&self, want: &Want) -> Result<LeaseHandle, ClientError> {
        let session = self.inner.session().await?;
        if let Some(handle) = self.borrowed_seat(&session, want).await? {
            return Ok(handle);
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
            _borrowed_seats: None,
        })
    }

    /// A borrowed lease of this server that serves `want`, confirmed by the server; `None`
    /// sends the checkout to the server.
    async fn borrowed_seat(
        &self,
        session: &Arc<Session>,
        want: &Want,
    ) -> Result<Option<LeaseHandle>, ClientError> {
        let server_key = session.server_key();
        // Bounded: each round either returns or forgets one cache entry.
        for _ in 0..MAX_BORROWED_TRIES {
            let claimed = match cache::claim(
                &self.inner.config.trust,
                want,
                Some(&server_key),
                now(),
            ) {
                Ok(cache::Claim::Held(claimed)) => claimed,
                Ok(cache::Claim::Refused(why)) => {
                    tracing::info!(%why, "asking the server instead of the borrowed lease");
                    return Ok(None);
                }
                Ok(cache::Claim::NotBorrowed) => return Ok(None),
                Err(e) => {
                    tracing::warn!(error = %e, "borrowed-lease cache unusable; asking the server");
                    return Ok(None);
                }
            };
            // Online, the server has the last word: a copy of a cache whose lease was
            // returned early (or removed by the admin) must not be replayed.
            let lease_ref = claimed.borrowed.lease_ref.clone();
            match session.heartbeat(std::slice::from_ref(&lease_ref)).await {
                Ok(states) if states.first() == Some(&LeaseState::Active) => {
                    return Ok(Some(LeaseHandle::borrowed(claimed)));
                }
                Ok(_) => {
                    tracing::warn!(
                        lease = %lease_ref.id,
                        "the server no longer holds this borrowed lease; forgetting it"
                    );
                    drop(claimed);
                    let _ = cache::remove(lease_ref.id);
                }
                Err(e) => {
                    if e.is_connection_loss() {
                        self.inner.drop_session(session).await;
                    }
                    return Err(e);
                }
            }
        }
        Ok(None)
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
        // Every bundle with terms for the feature goes along, so that the lease can be
        // held to its version ceilings and dates offline; the first also vouches for
        // the server key.
        let grants = |b: &&tally_protocol::bundle::VerifiedBundle| {
            b.bundle
                .features
                .iter()
                .any(|f| f.name == want.feature || f.components.contains(&want.feature))
        };
        let mut bundles: Vec<_> = session
            .bundles()
            .iter()
            .filter(grants)
            .map(|b| b.signed.clone())
            .collect();
        if bundles.is_empty() {
            bundles.extend(session.bundles().first().map(|b| b.signed.clone()));
        }
        if bundles.is_empty() {
            return Err(ClientError::Protocol("server presented no bundle".into()));
        }
        cache::store(&lease, &bundles, want.version.as_deref())
            .map_err(|e| ClientError::Config(e.to_string()))?;
        cache::list(&self.inner.config.trust, now())
            .map_err(|e| ClientError::Config(e.to_string()))?
            .into_iter()
            .find(|b| b.lease_ref.id == lease.id())
            .ok_or_else(|| ClientError::Config("the borrowed lease did not reach the cache".into()))
    }

    /// Returns every borrowed lease of `feature` early; returns how many. Refused
    /// ([`ClientError::SeatInUse`]) while a program on this machine runs on one of its
    /// seats.
    pub async fn return_borrowed(&self, feature: &str) -> Result<usize, ClientError> {
        let session = self.inner.session().await?;
        let entries =
            cache::entries_for(feature).map_err(|e| ClientError::Config(e.to_string()))?;
        let mut returned = 0;
        for entry in entries {
            if entry.server_key != session.server_key() {
                continue;
            }
            // Held until the lease is gone, so that no program claims a seat meanwhile.
            let Some(_seats) =
                cache::lock_all(&entry).map_err(|e| ClientError::Config(e.to_string()))?
            else {
                return Err(ClientError::SeatInUse(format!(
                    "borrowed lease {} of '{feature}' is in use by a program on this machine; \
                     end it, then return the seats",
                    entry.lease_ref.id
                )));
            };
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
        for r in refs {
            self.inner.queue_checkin(r);
        }
        let pending = !self.inner.undelivered.lock().expect("lock").is_empty();
        if pending {
            // Waits out a server restart for up to the checkin grace.
            let _ = self.inner.deliver_checkins().await;
        }
        let session = self.inner.session.lock().await.take();
        if let Some(s) = session {
            // Closed even if a request still holds the session: the server must see
            // the close now, not after its idle timeout.
            s.close_shared().await;
        }
    }
}

impl LeaseHandle {
    /// A handle for a borrowed lease claimed from the cache ([`cache::claim`]): no
    /// heartbeats, no checkin on drop (the borrow runs to its end or is returned with
    /// `return_borrowed`); it holds the claimed seats' locks until dropped.
    pub fn borrowed(claimed: cache::Claimed) -> LeaseHandle {
        let cache::Claimed { borrowed, seats } = claimed;
        let (_tx, rx) = watch::channel(LeaseStatus::Borrowed {
            until: borrowed.until,
        });
        LeaseHandle {
            lease: borrowed.lease,
            status: rx,
            inner: None,
            _borrowed_seats: Some(seats),
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
