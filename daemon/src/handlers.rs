//! One handler per request type: each checks what the client sent, asks the ledger task
//! (or the reload and report paths), and turns the answer into a `Response`. Admin
//! authentication, input validation and lease token signing live here too; the ledger
//! task decides, nothing here does.

use crate::clock::now;
use crate::error::Error;
use crate::ledger::{ConnId, FreshLease, WaiterId};
use crate::reload::outcome_text;
use crate::shared::Shared;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tally_protocol::keys::SecretKey;
use tally_protocol::lease::{LeaseId, LeaseRecord, LeaseSecret};
use tally_protocol::observed::ClientFacts;
use tally_protocol::signed::{Domain, Signed};
use tally_protocol::wire::*;
use tracing::{info, warn};

/// Where a request came from: the connection and the peer's address.
pub(crate) type Origin = (ConnId, IpAddr);

/// A failure with its code; a version-1 client gets the message alone
pub(crate) fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Failed(ServerError::new(code, message))
}

/// What a handler gives: the answer, or the failure the client is told of by its code
/// ([`Error::to_wire`]: never the server's paths).
type Answered = Result<Response, Error>;

/// Checks that no identity field is empty, oversized or holds control characters:
/// these names go into the log, other users' terminals, the dashboard and the vendor's
/// report, and a line break or an escape sequence in them forges what people read.
fn check_identity(client: &ClientIdentity) -> Result<(), Error> {
    let fields = [
        ("user", client.user.as_str()),
        ("host", client.host.as_str()),
        ("program", client.program.as_str()),
        ("display", client.display.as_deref().unwrap_or("-")),
    ];
    for (name, value) in fields {
        check_name(name, value).map_err(Error::Hello)?;
    }
    Ok(())
}

/// Checks the names of a checkout (feature, version) like identity fields.
fn check_checkout(request: &CheckoutRequest) -> Result<(), Error> {
    check_name("feature name", &request.feature)?;
    if let Some(version) = &request.version {
        check_name("version", version)?;
    }
    Ok(())
}

/// What the stream does once the answer is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum After {
    /// Nothing more.
    Nothing,
    /// Stop the server (an admin shutdown), once the answer has left.
    Shutdown,
}

/// Answers one request. `send` is the request's stream: a checkout waiting in the
/// queue leaves it when the client stops the stream.
pub(crate) async fn dispatch(
    request: Request,
    origin: Origin,
    send: &quinn::SendStream,
    shared: &Arc<Shared>,
    identity: &Mutex<Option<ClientIdentity>>,
) -> (Response, After) {
    if let Request::Admin(AdminRequest {
        op: AdminOp::Shutdown,
        ..
    }) = &request
    {
        let response = answer(request, origin, send, shared, identity).await;
        let after = match &response {
            Response::Admin(_) => After::Shutdown,
            _ => After::Nothing,
        };
        return (response, after);
    }
    (
        answer(request, origin, send, shared, identity).await,
        After::Nothing,
    )
}

/// The answer to one request, by its type; a failure goes out as its code and a
/// message for people.
async fn answer(
    request: Request,
    origin: Origin,
    send: &quinn::SendStream,
    shared: &Arc<Shared>,
    identity: &Mutex<Option<ClientIdentity>>,
) -> Response {
    let answered = match request {
        Request::Hello(hello) => self::hello(hello, shared, identity),
        Request::Checkout(request) => {
            checkout((request, None), origin, send, shared, identity).await
        }
        Request::ObservedCheckout(observed) => {
            let facts = Some(observed.facts);
            checkout((observed.request, facts), origin, send, shared, identity).await
        }
        Request::Heartbeat(request) => heartbeat(request, origin.0, shared).await,
        Request::Checkin(request) => checkin(request, shared).await,
        Request::Status(status) => self::status(status, origin, shared).await,
        Request::Admin(admin) => self::admin(admin, origin, shared).await,
        _ => Err(Error::Unsupported(
            "this request is not supported by this tallyd",
        )),
    };
    answered.unwrap_or_else(|e| Response::Failed(e.to_wire()))
}

/// Hello: the client's identity is checked and kept for the connection; the answer
/// carries the bundles served.
fn hello(hello: Hello, shared: &Shared, identity: &Mutex<Option<ClientIdentity>>) -> Answered {
    check_identity(&hello.client)?;
    // Only the cluster's leader grants, and its ledger is the one that counts: a
    // member that does not lead sends the client there (status reads too, so that
    // what a client reads is the leader's, not a follower's older copy).
    if let crate::consensus::Role::Following { leader } = &*shared.role.borrow() {
        return Err(Error::NotLeader {
            leader: leader.clone(),
        });
    }
    *identity.lock().expect("identity lock") = Some(hello.client);
    let bundles = shared
        .bundles
        .read()
        .expect("bundles lock")
        .iter()
        .map(|b| b.signed.clone())
        .collect();
    Ok(Response::Hello(HelloReply {
        server_version: env!("CARGO_PKG_VERSION").to_string(),
        bundles,
        server_time: now().wall,
        heartbeat_secs: shared.heartbeat_secs,
        demo: shared.demo,
    }))
}

/// Checkout: names checked, the rate limit applied, then the ledger task decides; the
/// grant is signed here, on the connection's task. `facts`: what the client reported
/// about where it runs, `None` from a client that sent a plain checkout.
async fn checkout(
    (request, facts): (CheckoutRequest, Option<ClientFacts>),
    (conn, remote): Origin,
    send: &quinn::SendStream,
    shared: &Shared,
    identity: &Mutex<Option<ClientIdentity>>,
) -> Answered {
    let Some(holder) = identity.lock().expect("identity lock").clone() else {
        return Err(Error::BadRequest("send hello before checkout"));
    };
    let checked = check_checkout(&request)
        .map_err(|e| e.to_string())
        .and_then(|()| facts.as_ref().map_or(Ok(()), ClientFacts::check));
    if let Err(what) = checked {
        // A name refused is a denial the client shows, not a failure of the request.
        return Ok(Response::Checkout(CheckoutReply::Denied(Denial {
            reason: DenialReason::InvalidRequest {
                what: what.to_string(),
            },
        })));
    }
    if let Err(wait) = shared.admission.checkout(remote, std::time::Instant::now()) {
        let reason = DenialReason::RateLimited {
            retry_after_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX).max(1),
        };
        shared
            .metrics
            .denied(now().wall, &request.feature, &holder, &reason);
        return Ok(Response::Checkout(CheckoutReply::Denied(Denial { reason })));
    }
    let fresh = fresh_lease().map_err(Error::NoRandomness)?;
    let waiter = WaiterId(shared.next_waiter.fetch_add(1, Ordering::Relaxed));
    let answer = shared
        .ledger
        .checkout(
            (conn, holder.clone()),
            (request, facts),
            (fresh, waiter),
            // Stopped by a client that gave up waiting (its request future dropped)
            // while keeping the connection.
            async {
                let _ = send.stopped().await;
            },
        )
        .await?;
    Ok(match answer {
        Ok(record) => {
            Response::Checkout(CheckoutReply::Granted(grant(&record, &holder, &shared.key)))
        }
        Err(reason) => Response::Checkout(CheckoutReply::Denied(Denial {
            reason: shared.client_view(reason),
        })),
    })
}

/// Heartbeat: the ledger task answers for each lease; the time it took is counted.
async fn heartbeat(request: HeartbeatRequest, conn: ConnId, shared: &Shared) -> Answered {
    let started = std::time::Instant::now();
    let leases = shared.ledger.heartbeat(conn, request.leases).await?;
    shared.metrics.heartbeat_latency.observe(started.elapsed());
    Ok(Response::Heartbeat(HeartbeatReply { leases }))
}

/// Checkin: the leases named are released.
async fn checkin(request: CheckinRequest, shared: &Shared) -> Answered {
    let released = shared.ledger.checkin(request.leases).await?;
    Ok(Response::Checkin(CheckinReply { released }))
}

/// Status: the ledger's features, behind the admin token with `status_needs_token`.
async fn status(status: StatusRequest, (conn, remote): Origin, shared: &Shared) -> Answered {
    if shared.status_needs_token && !shared.is_admin(status.admin_token.as_deref()) {
        let why = if status.admin_token.is_some() {
            "a wrong admin token"
        } else {
            "no admin token"
        };
        warn!(%remote, conn = conn.0, "status request refused over QUIC: {why}");
        return Err(Error::Unauthorized(
            "this server shows its status only with the admin token",
        ));
    }
    let features = shared.ledger.status().await?;
    Ok(Response::Status(StatusReply {
        server_time: now().wall,
        server_fingerprint: shared.key.public().fingerprint(),
        features,
    }))
}

/// Admin: the token checked (the source logged on a refusal, never the token), then
/// the operation.
async fn admin(admin: AdminRequest, (conn, remote): Origin, shared: &Arc<Shared>) -> Answered {
    if shared.admin_token.is_none() {
        warn!(%remote, conn = conn.0, "admin request refused over QUIC: admin operations are disabled");
        return Err(Error::AdminDisabled);
    }
    if !shared.is_admin(Some(&admin.token)) {
        // The source, never the token: a refusal is what an attack looks like.
        warn!(%remote, conn = conn.0, "admin request refused over QUIC: wrong admin token");
        return Err(Error::Unauthorized("admin token is wrong"));
    }
    Ok(match admin.op {
        AdminOp::Reload => {
            // Older clients read an `AdminReply` and print it with exit 0: a
            // reload that refused anything must reach them as an error.
            let outcome = shared.reload().await;
            if outcome.ok() {
                Response::Admin(AdminReply {
                    message: outcome.summary,
                    report: None,
                })
            } else {
                return Err(Error::ReloadFailed(outcome_text(&outcome)));
            }
        }
        AdminOp::ReloadWithOutcome => Response::Reload(shared.reload().await),
        AdminOp::Remove { lease } => admin_remove(lease, shared).await?,
        // The stream stops the server once this answer has left (`After::Shutdown`).
        AdminOp::Shutdown => Response::Admin(AdminReply {
            message: "shutting down; leases are kept".into(),
            report: None,
        }),
        AdminOp::ExportReport => admin_export(shared).await?,
        AdminOp::ClusterShow => admin_cluster(shared, None).await,
        AdminOp::ClusterAdd { member } => admin_cluster(shared, Some((true, &member))).await,
        AdminOp::ClusterRemove { member } => admin_cluster(shared, Some((false, &member))).await,
        _ => {
            return Err(Error::Unsupported(
                "this admin operation is not supported by this tallyd",
            ))
        }
    })
}

/// How long `tally admin cluster add` and `remove` wait for the change (below the
/// client's 10 s request timeout, so the admin hears how it ended). A new member that
/// needs longer to catch up stays a learner; the same command finishes the addition.
const CLUSTER_CHANGE_WAIT: Duration = Duration::from_secs(8);

/// `tally admin cluster [add|remove MEMBER]` on the leader (admin requests reach only
/// the leader: a member that does not lead refuses the session and names it). `change`:
/// whether to add (`true`) or remove, and whom; `None` shows the cluster.
async fn admin_cluster(shared: &Shared, change: Option<(bool, &str)>) -> Response {
    let Some((node, _)) = shared.cluster_node() else {
        return error(
            ErrorCode::Unsupported,
            "this server is a single server, not a member of a cluster",
        );
    };
    let Some((add, member)) = change else {
        let metrics = node.metrics().borrow().clone();
        return Response::Admin(AdminReply {
            message: tally_cluster::ops::ClusterView::from_metrics(&metrics).to_string(),
            report: None,
        });
    };
    let Some(prefix) = member_prefix(member) else {
        return error(
            ErrorCode::BadRequest,
            format!(
                "'{member}' names no member: give its key fingerprint or its node id (16 \
                 hex digits or more)"
            ),
        );
    };
    let deadline = tokio::time::Instant::now() + CLUSTER_CHANGE_WAIT;
    let (id, done) = if add {
        let configured = shared.members.read().expect("members lock").clone();
        let found: Vec<_> = configured
            .into_iter()
            .filter(|m| member_prefix(&m.key.fingerprint()).is_some_and(|f| f.starts_with(&prefix)))
            .collect();
        let [peer] = found.as_slice() else {
            return error(
                ErrorCode::BadRequest,
                format!(
                    "no [[cluster]] member of this server's config has the key {member}: add \
                     the new member's [[cluster]] table, and install the vendor's bundle \
                     binding its key, on every member, reload them, then add it"
                ),
            );
        };
        let id = peer.key.node_id();
        let done = tally_cluster::ops::add_node(&node, id, peer.clone(), deadline).await;
        (id, done)
    } else {
        let metrics = node.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let found: Vec<u64> = membership
            .nodes()
            .filter(|(id, n)| {
                format!("{id:016x}").starts_with(&prefix)
                    || member_prefix(&n.key.fingerprint()).is_some_and(|f| f.starts_with(&prefix))
            })
            .map(|(id, _)| *id)
            .collect();
        let [id] = found.as_slice() else {
            return error(
                ErrorCode::BadRequest,
                format!("no member of the cluster has the node id or key {member}"),
            );
        };
        (
            *id,
            tally_cluster::ops::remove_node(&node, *id, deadline).await,
        )
    };
    match done {
        Ok(()) => {
            let verb = if add { "added" } else { "removed" };
            info!(node = %format_args!("{id:016x}"), "cluster member {verb} by the administrator");
            let metrics = node.metrics().borrow().clone();
            let voters = metrics.membership_config.membership().voter_ids().count();
            Response::Admin(AdminReply {
                message: format!(
                    "{verb} node {id:016x}; the cluster has {}",
                    plural(voters as u64, "voter", "voters")
                ),
                report: None,
            })
        }
        Err(e) => {
            use tally_cluster::ops::OpsError;
            warn!(node = %format_args!("{id:016x}"), error = %e, "cluster membership change failed");
            let code = match &e {
                OpsError::NotLeader { .. } => ErrorCode::NotLeader,
                OpsError::UnknownNode(_) | OpsError::Conflict { .. } | OpsError::LastVoter(_) => {
                    ErrorCode::BadRequest
                }
                _ => ErrorCode::ClusterChange,
            };
            error(code, e.to_string())
        }
    }
}

/// A member named by an admin as lower-case hex without the fingerprint's colons; `None`
/// unless it is 16 hex digits (a node id) or more.
fn member_prefix(named: &str) -> Option<String> {
    let hex: String = named
        .trim()
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    (hex.len() >= 16 && hex.chars().all(|c| c.is_ascii_hexdigit())).then_some(hex)
}

/// `tally admin remove`: the lease goes, its holder is held off.
async fn admin_remove(lease: LeaseId, shared: &Shared) -> Answered {
    if !shared.ledger.remove(lease).await? {
        return Err(Error::UnknownLease(lease));
    }
    info!(%lease, "lease removed by the administrator");
    Ok(Response::Admin(AdminReply {
        message: removed_message(lease, shared.remove_holdoff),
        report: None,
    }))
}

/// `tally admin export-report`: the next report, with a copy in the spool.
async fn admin_export(shared: &Shared) -> Answered {
    let exported = match shared.request_export().await {
        Ok(exported) => exported,
        Err(Error::ShuttingDown) => return Err(Error::ShuttingDown),
        Err(e) => {
            // The store's error text names paths: the log has it, the client gets
            // the kind of fault (`Error::to_wire`).
            warn!(error = %e, "report export failed");
            let wire = e.to_wire();
            return Ok(error(wire.code, format!("export failed: {}", wire.message)));
        }
    };
    info!(
        report = exported.report_seq,
        events = exported.events,
        "usage report exported"
    );
    shared.reports.spool_copy(&exported).await;
    Ok(Response::Admin(AdminReply {
        message: format!(
            "report {} with {}",
            exported.report_seq,
            plural(exported.events as u64, "event", "events")
        ),
        report: Some(exported.text),
    }))
}

/// What `tally admin remove` is told.
fn removed_message(lease: LeaseId, holdoff: Duration) -> String {
    if holdoff.is_zero() {
        format!("lease {lease} removed; its holder learns on its next heartbeat")
    } else {
        format!(
            "lease {lease} removed; its holder learns on its next heartbeat and gets no seat \
             of the feature on that host for {} s",
            holdoff.as_secs()
        )
    }
}

/// A fresh lease id and secret, drawn from the system's randomness.
fn fresh_lease() -> Result<FreshLease, getrandom::Error> {
    let mut bytes = [0u8; 24];
    getrandom::getrandom(&mut bytes)?;
    let mut id = [0u8; 8];
    id.copy_from_slice(&bytes[..8]);
    let mut secret = [0u8; 16];
    secret.copy_from_slice(&bytes[8..]);
    Ok(FreshLease {
        id: LeaseId(u64::from_be_bytes(id)),
        secret: LeaseSecret(secret),
    })
}

/// The grant message with its signed token. Signing happens here, on the connection's
/// task, not in the ledger task, so that both cores share the signing work.
fn grant(record: &LeaseRecord, holder: &ClientIdentity, key: &SecretKey) -> LeaseGrant {
    let token = LeaseToken::V1 {
        id: record.id,
        feature: record.feature.clone(),
        count: record.count,
        holder: holder.to_string(),
        issued_at: record.granted_at,
        expires_at: record.borrowed_until,
    };
    LeaseGrant {
        id: record.id,
        secret: record.secret.clone(),
        feature: record.feature.clone(),
        count: record.count,
        ttl_secs: record.ttl_secs,
        overdraft: record.overdraft,
        borrowed_until: record.borrowed_until,
        token: Signed::sign(Domain::Lease, token.encode(), key),
    }
}
