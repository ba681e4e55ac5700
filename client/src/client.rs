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
    /// Check out again by itself when the lease is lost because the server no longer
    /// holds it (its TTL ran out, its connection timed out and the seat went to someone
    /// else, a restore expired it): the handle reads `Lost` until a new seat is had
    /// (tried at every heartbeat round, without waiting in the queue), then `Active`
    /// again under a new lease id ([`LeaseHandle::held_id`]). Not after an
    /// administrator's removal, which stands.
    pub reacquire: bool,
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
            reacquire: false,
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
    /// The seat is gone; the text says why (removed by the administrator, expired).
    Lost(String),
}

struct Entry {
    /// The lease held now (after a reacquire, not the handle's first one; the map key
    /// stays the first id, so the handle finds its entry).
    lease_ref: LeaseRef,
    status: watch::Sender<LeaseStatus>,
    /// What to check out again when the lease is lost (`Want::reacquire`).
    reacquire: Option<Want>,
}

struct Inner {
    config: ClientConfig,
    /// When the last attempt to reach a server failed (cleared by a connect): while that
    /// is recent, checkouts a borrowed seat can serve do not wait for another attempt.
    offline_since: Mutex<Option<std::time::Instant>>,
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

    /// The id of the lease this handle holds now: its first one, or the one checked
    /// out again after a loss (`Want::reacquire`); `None` once checked in or lost for
    /// good.
    pub fn held_id(&self) -> Option<LeaseId> {
        match &self.inner {
            Some(inner) => inner
                .leases
                .lock()
                .expect("leases lock")
                .get(&self.lease.id())
                .map(|e| e.lease_ref.id),
            None => Some(self.lease.id()),
        }
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

/// How long the last handle's drop may block to deliver checkins that never went out.
const LAST_CHANCE: Duration = Duration::from_secs(2);

impl Drop for Inner {
    /// The last reference is gone with checkins still undelivered: typically the
    /// application's runtime shut down (`#[tokio::main]` returned) right after a lease
    /// was dropped, and the task spawned to check it in never ran. Nothing of this
    /// runtime can send any more, so a thread of its own connects afresh and delivers
    /// them, for at most [`LAST_CHANCE`]; otherwise the seats would wait for the server's
    /// idle timeout. Held leases that were never dropped go the same way.
    fn drop(&mut self) {
        let mut refs = std::mem::take(
            self.undelivered
                .get_mut()
                .unwrap_or_else(|e| e.into_inner()),
        );
        refs.extend(
            self.leases
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .drain()
                .map(|(_, e)| e.lease_ref),
        );
        if refs.is_empty() {
            return;
        }
        let mut config = self.config.clone();
        config.connect_timeout = config.connect_timeout.min(LAST_CHANCE);
        config.request_timeout = config.request_timeout.min(LAST_CHANCE);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("tally-last-checkin".into())
            .spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                runtime.block_on(async {
                    if let Ok(session) = Session::connect(&config).await {
                        let _ = session.checkin(&refs).await;
                        session.close().await;
                    }
                });
                let _ = done_tx.send(());
            });
        if spawned.is_ok() {
            let _ = done_rx.recv_timeout(LAST_CHANCE * 2);
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
        let session = match Session::connect(&self.config).await {
            Ok(s) => Arc::new(s),
            Err(e) => {
                if matches!(e, ClientError::NoServer(_)) {
                    *self.offline_since.lock().expect("offline lock") =
                        Some(std::time::Instant::now());
                }
                return Err(e);
            }
        };
        *self.offline_since.lock().expect("offline lock") = None;
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
                let mut again: Vec<(LeaseId, Want)> = Vec::new();
                {
                    let mut leases = self.leases.lock().expect("leases lock");
                    for ((id, _), state) in refs.iter().zip(states) {
                        let reason = match state {
                        LeaseState::Active => None,
                        LeaseState::Removed => Some("removed by the administrator"),
                        _ => Some(
                            "the server no longer holds this lease (its TTL ran out, or its connection timed out and the seat went to someone else)",
                        ),
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
                                let keep = state != LeaseState::Removed
                                    && leases.get(id).is_some_and(|e| e.reacquire.is_some());
                                if keep {
                                    if let Some(e) = leases.get(id) {
                                        let lost =
                                            LeaseStatus::Lost(format!("{why}; checking out again"));
                                        e.status.send_if_modified(|s| {
                                            let changed = *s != lost;
                                            *s = lost.clone();
                                            changed
                                        });
                                        again.extend(e.reacquire.clone().map(|w| (*id, w)));
                                    }
                                } else if let Some(e) = leases.remove(id) {
                                    let _ = e.status.send(LeaseStatus::Lost(why.to_string()));
                                }
                            }
                        }
                    }
                }
                self.reacquire(&session, again).await;
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

    /// A checkout on `session`; a session that failed under it is dropped, so the next
    /// call connects afresh.
    async fn checkout_on(
        &self,
        session: &Arc<Session>,
        request: &CheckoutRequest,
    ) -> Result<Lease, ClientError> {
        let result = session.checkout(request).await;
        if result.as_ref().is_err_and(ClientError::is_connection_loss) {
            self.drop_session(session).await;
        }
        result
    }

    /// Whether the last attempt to reach a server failed less than a reconnect backoff
    /// ago (the background task keeps trying meanwhile).
    fn recently_offline(&self) -> bool {
        self.offline_since
            .lock()
            .expect("offline lock")
            .is_some_and(|since| since.elapsed() < RECONNECT_MAX)
    }

    /// Checks out again for the lost leases whose application asked for it; a seat had
    /// takes the entry's place under the handle's key.
    async fn reacquire(&self, session: &Arc<Session>, lost: Vec<(LeaseId, Want)>) {
        for (key, want) in lost {
            let want = Want {
                wait: Duration::ZERO,
                ..want
            };
            match session.checkout(&want.request(Duration::ZERO)).await {
                Ok(lease) => {
                    let mut leases = self.leases.lock().expect("leases lock");
                    match leases.get_mut(&key) {
                        Some(e) => {
                            tracing::info!(old = %e.lease_ref.id, new = %lease.id(), feature = %want.feature, "lost seat checked out again");
                            e.lease_ref = lease.lease_ref();
                            let _ = e.status.send(LeaseStatus::Active);
                        }
                        // The application dropped the handle meanwhile.
                        None => self.queue_checkin(lease.lease_ref()),
                    }
                }
                Err(e) => tracing::debug!(error = %e, feature = %want.feature, "no seat yet"),
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
                // Our own `close` (the flag is set before the connection goes): nothing
                // to reconnect, and no warning at the end of every `tally run`.
                if strong.closed.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
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

/// How long a waiting checkout that lost its server pauses before asking again.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// How often a waiting checkout asks for its queue position.
const QUEUE_POLL: Duration = Duration::from_secs(1);

impl Client {
    /// Connects to the first server that answers and proves trustworthy, and starts the
    /// background task. Must be called within a tokio runtime.
    ///
    /// With no server reachable, it still succeeds if the per-user cache holds a valid
    /// borrowed seat trusted by `config`: checkouts are then served from borrowed seats
    /// (within their count, versions and dates; see [`cache::claim`]) while the
    /// background task keeps looking for a server.
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        Client::start(config, true).await
    }

    /// Like [`Client::connect`], but fails when no server answers even if borrowed seats
    /// could serve: for callers that handle the offline case themselves (`tally run`
    /// tells its user which borrowed seat it uses, or why none can serve).
    pub async fn connect_online(config: ClientConfig) -> Result<Client, ClientError> {
        Client::start(config, false).await
    }

    async fn start(config: ClientConfig, offline: bool) -> Result<Client, ClientError> {
        let (session, offline_since) = match Session::connect(&config).await {
            Ok(s) => (Some(Arc::new(s)), None),
            Err(e @ ClientError::NoServer(_)) if !offline => return Err(e),
            Err(e @ ClientError::NoServer(_)) => {
                match cache::list(&config.trust, UnixTime::now()) {
                    Ok(borrowed) if !borrowed.is_empty() => {
                        tracing::warn!(
                            error = %e,
                            borrowed = borrowed.len(),
                            "no license server reachable; serving borrowed seats meanwhile"
                        );
                        (None, Some(std::time::Instant::now()))
                    }
                    _ => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        let inner = Arc::new(Inner {
            config,
            offline_since: Mutex::new(offline_since),
            session: tokio::sync::Mutex::new(session),
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
        self.checkout_inner(want).await
    }

    /// [`Client::checkout`], telling `on_queue` this client's position in the feature's
    /// queue (1 is next) whenever it changes while the checkout waits (`want.wait`).
    ///
    /// The position is polled every second by a future that runs side by side with the
    /// checkout. (Awaiting the status between polls of the checkout deadlocked: a
    /// checkout reconnecting after a failover holds the session lock that the status
    /// waits for, and is not polled again while the status waits.)
    pub async fn checkout_showing_queue(
        &self,
        want: &Want,
        mut on_queue: impl FnMut(u32),
    ) -> Result<LeaseHandle, ClientError> {
        let checkout = self.checkout_inner(want);
        if want.wait.is_zero() {
            return checkout.await;
        }
        let me = &self.inner.config.identity;
        let watch = async {
            let mut told = None;
            loop {
                tokio::time::sleep(QUEUE_POLL).await;
                let Ok(status) = self.status().await else {
                    continue;
                };
                let position = status
                    .features
                    .iter()
                    .find(|f| f.name == want.feature)
                    .and_then(|f| {
                        f.queue.iter().position(|q| {
                            q.client.pid == me.pid
                                && q.client.host == me.host
                                && q.client.user == me.user
                        })
                    });
                if let Some(p) = position {
                    let p = u32::try_from(p + 1).unwrap_or(u32::MAX);
                    if told != Some(p) {
                        told = Some(p);
                        on_queue(p);
                    }
                }
            }
        };
        tokio::select! {
            result = checkout => result,
            never = watch => never,
        }
    }

    async fn checkout_inner(&self, want: &Want) -> Result<LeaseHandle, ClientError> {
        if self.inner.recently_offline() {
            if let Some(handle) = self.offline_seat(want, None)? {
                return Ok(handle);
            }
        }
        let session = match self.inner.session().await {
            Ok(s) => s,
            Err(e @ ClientError::NoServer(_)) => {
                return match self.offline_seat(want, Some(&e))? {
                    Some(handle) => Ok(handle),
                    None => Err(e),
                };
            }
            Err(e) => return Err(e),
        };
        if let Some(handle) = self.borrowed_seat(&session, want).await? {
            return Ok(handle);
        }
        let request = want.request(Duration::ZERO);
        let waits_until = std::time::Instant::now() + want.wait;
        let mut answer = self.inner.checkout_on(&session, &request).await;
        let mut again = 0u32;
        let lease = loop {
            match answer {
                // The session died under us (a server that restarted a moment ago,
                // before the background task noticed): once more on a fresh connection.
                // A grant the dead connection may have carried reaches nobody and is
                // taken back by the server.
                Err(e @ ClientError::Connection { .. }) if again == 0 => {
                    tracing::debug!(error = %e, "checkout on a dead connection; once more");
                }
                // A checkout that waits in the queue waits on through a server restart
                // or a failover, for the rest of its wait: it asks again, every second,
                // whoever serves by then.
                Err(e)
                    if e.is_connection_loss()
                        && !want.wait.is_zero()
                        && std::time::Instant::now() + RETRY_PAUSE < waits_until =>
                {
                    tracing::debug!(error = %e, "waiting checkout lost its server; asking again");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                other => break other?,
            }
            again += 1;
            let left = waits_until.saturating_duration_since(std::time::Instant::now());
            let request = Want {
                wait: if want.wait.is_zero() {
                    want.wait
                } else {
                    left.max(Duration::from_secs(1))
                },
                ..want.clone()
            }
            .request(Duration::ZERO);
            answer = match self.inner.session().await {
                Ok(session) => self.inner.checkout_on(&session, &request).await,
                Err(e) => Err(e),
            };
        };
        let (tx, rx) = watch::channel(LeaseStatus::Active);
        self.inner.leases.lock().expect("leases lock").insert(
            lease.id(),
            Entry {
                lease_ref: lease.lease_ref(),
                status: tx,
                reacquire: want.reacquire.then(|| want.clone()),
            },
        );
        Ok(LeaseHandle {
            lease,
            status: rx,
            inner: Some(self.inner.clone()),
            _borrowed_seats: None,
        })
    }

    /// With no server reachable: a borrowed seat that serves `want`, if any. A borrowed
    /// seat that cannot serve it (count, version, dates, in use by another program) is
    /// an error naming why when `no_server` says no server answered; `None` otherwise.
    fn offline_seat(
        &self,
        want: &Want,
        no_server: Option<&ClientError>,
    ) -> Result<Option<LeaseHandle>, ClientError> {
        match cache::claim(&self.inner.config.trust, want, None, UnixTime::now()) {
            Ok(cache::Claim::Held(claimed)) => {
                tracing::info!(
                    lease = %claimed.borrowed.lease_ref.id,
                    feature = %want.feature,
                    "no license server reachable; using a borrowed seat"
                );
                Ok(Some(LeaseHandle::borrowed(claimed)))
            }
            Ok(cache::Claim::Refused(why)) => match no_server {
                Some(ClientError::NoServer(failures)) => {
                    let mut failures = failures.clone();
                    failures.push(format!("the borrowed seat cannot serve this run: {why}"));
                    Err(ClientError::NoServer(failures))
                }
                _ => Ok(None),
            },
            Ok(cache::Claim::NotBorrowed) => Ok(None),
            Err(e) => Err(ClientError::Config(e.to_string())),
        }
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
                UnixTime::now(),
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
            b.bundle.features.iter().any(|f| f.serves(&want.feature))
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
        cache::list(&self.inner.config.trust, UnixTime::now())
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
