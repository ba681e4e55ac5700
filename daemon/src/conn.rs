//! Connections and streams: one task per connection accepting its streams, one task per
//! stream (owned by its connection's task, in a `JoinSet`) reading one request frame, handing it to `handlers`, and writing the answer
//! back (a grant is checked to have reached the client).

use crate::admission::Permit;
use crate::handlers::{dispatch, error, After};
use crate::ledger::ConnId;
use crate::shared::Shared;
use std::future::IntoFuture;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tally_protocol::frame::{self, FrameError, HEADER_LEN, MAX_REQUEST_LEN};
use tally_protocol::wire::*;
use tokio::task::JoinSet;
use tracing::{debug, warn};

/// How long a client may take to send a request once it opened a stream; a stream left
/// open without a request must not hold daemon memory forever.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a grant's stream waits for the client to acknowledge the grant.
const GRANT_ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an admin shutdown waits for its answer to be acknowledged before the
/// server stops anyway.
const SHUTDOWN_ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// One client connection: accepts its request streams until it closes, then tells the
/// ledger so that its leases are reclaimed at once.
///
/// The task lives as long as the connection, so its size counts per idle client (see
/// BENCHMARKS.md, scale): the handshake and the final ledger message are boxed, so that
/// their state is freed when done instead of sizing the whole task for its lifetime.
pub(crate) async fn serve_connection(
    incoming: Box<quinn::Incoming>,
    conn_id: ConnId,
    shared: Arc<Shared>,
    mut permit: Permit,
) {
    let remote = incoming.remote_address();
    let handshake = Box::pin((*incoming).into_future()).await;
    permit.handshake_done();
    let connection = match handshake {
        Ok(c) => c,
        Err(e) => {
            debug!(%remote, error = %e, "handshake failed");
            return;
        }
    };
    if tally_cluster::net::tls::is_peer_connection(&connection) {
        // Another member of the cluster: Raft's RPCs, not a client.
        return serve_peer(connection, &shared).await;
    }
    debug!(%remote, conn = conn_id.0, "connected");
    let identity = Arc::new(Mutex::new(None::<ClientIdentity>));
    // A member that stops leading sends its clients away: they find the leader (their
    // hello here is refused and names it) and re-attach their leases there.
    let mut role = shared.role.clone();
    let led = *role.borrow() == crate::consensus::Role::Leading;
    // The stream tasks are this task's: it ends only after them, so the server's stop,
    // which waits for (or aborts) the connection tasks, waits for (or aborts) them too.
    let mut streams = JoinSet::new();
    let reason = loop {
        let accepted = tokio::select! {
            accepted = connection.accept_bi() => accepted,
            _ = role.wait_for(|r| *r != crate::consensus::Role::Leading), if led => {
                connection.close(NOT_LEADER_CLOSE.into(), b"this server no longer leads its cluster");
                continue;
            }
        };
        match accepted {
            Ok((send, recv)) => {
                // Ended streams are reaped as new ones come, so the set stays small.
                while let Some(ended) = streams.try_join_next() {
                    stream_ended(ended);
                }
                streams.spawn(serve_stream(
                    send,
                    recv,
                    (conn_id, remote.ip()),
                    shared.clone(),
                    identity.clone(),
                ));
            }
            Err(e) => break e,
        }
    };
    debug!(%remote, conn = conn_id.0, %reason, "connection closed");
    let timed_out = matches!(reason, quinn::ConnectionError::TimedOut);
    let _ = Box::pin(shared.ledger.closed(conn_id, timed_out)).await;
    // Streams still answering (bounded by their own timeouts: a closed connection
    // ends their reads and writes at once).
    Box::pin(async {
        while let Some(ended) = streams.join_next().await {
            stream_ended(ended);
        }
    })
    .await;
}

/// The QUIC application close code of a connection closed because this server stopped
/// leading its cluster.
pub(crate) const NOT_LEADER_CLOSE: u32 = 0x10;

/// A peer's connection: handed to the cluster's RPC server while a node runs.
async fn serve_peer(connection: quinn::Connection, shared: &Shared) {
    let Some((node, peers)) = shared.cluster_node() else {
        connection.close(0u32.into(), b"no Raft node runs here now");
        return;
    };
    if let Err(e) = tally_cluster::net::serve_peer(connection, node, peers).await {
        debug!(error = %e, "peer connection ended");
    }
}

/// A stream task ended; one that panicked is said (the connection goes on).
fn stream_ended(ended: Result<(), tokio::task::JoinError>) {
    if let Err(e) = ended {
        if e.is_panic() {
            warn!(error = %e, "a request stream's task panicked");
        }
    }
}

/// Why reading a request failed.
enum ReadFailure {
    /// A bad frame, with the protocol version its header named (answers go in it).
    Frame(FrameError, u16),
    Stream(String),
}

/// Reads one request; returns it with the protocol version the client spoke.
async fn read_request(recv: &mut quinn::RecvStream) -> Result<(u16, Request), ReadFailure> {
    let mut header = [0u8; HEADER_LEN];
    recv.read_exact(&mut header)
        .await
        .map_err(|e| ReadFailure::Stream(e.to_string()))?;
    let version = u16::from_be_bytes([header[4], header[5]]);
    let fail = |e| ReadFailure::Frame(e, version);
    let header = frame::parse_header(&header, MAX_REQUEST_LEN).map_err(fail)?;
    frame::check_request_version(header.version).map_err(fail)?;
    // Bounded by MAX_REQUEST_LEN, checked above before anything was allocated.
    let mut payload = vec![0u8; header.payload_len];
    recv.read_exact(&mut payload)
        .await
        .map_err(|e| ReadFailure::Stream(e.to_string()))?;
    let request = frame::decode_request(header.version, &payload).map_err(fail)?;
    Ok((version, request))
}

/// One request stream: reads the request (bounded in size and time), answers it, and
/// takes a grant back if the client did not receive it.
async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    (conn, remote): (ConnId, std::net::IpAddr),
    shared: Arc<Shared>,
    identity: Arc<Mutex<Option<ClientIdentity>>>,
) {
    // Counted from a complete request to its answer's end, so that a stop lets answers
    // out before it closes the connections.
    let mut _answering = None;
    let bytes = match tokio::time::timeout(REQUEST_READ_TIMEOUT, read_request(&mut recv)).await {
        // The client's version is unknown: version 1, which every client reads.
        Err(_) => frame::encode_response_for(
            frame::MIN_SUPPORTED_VERSION,
            error(
                ErrorCode::BadRequest,
                format!(
                    "no complete request within {} s",
                    REQUEST_READ_TIMEOUT.as_secs()
                ),
            ),
        ),
        Ok(Err(ReadFailure::Frame(FrameError::UnsupportedVersion { got, .. }, _))) => {
            frame::encode_version_negotiation(got)
        }
        Ok(Err(ReadFailure::Frame(e, version))) => {
            frame::encode_response_for(version, error(ErrorCode::BadRequest, e.to_string()))
        }
        Ok(Err(ReadFailure::Stream(e))) => {
            debug!(conn = conn.0, error = %e, "stream ended before a request");
            return;
        }
        Ok(Ok((version, request))) => {
            _answering = Some(Answering::new(shared.clone()));
            let (response, after) =
                dispatch(request, (conn, remote), &send, &shared, &identity).await;
            let granted = match &response {
                Response::Checkout(CheckoutReply::Granted(g)) => Some(g.id),
                _ => None,
            };
            let bytes = frame::encode_response_for(version, response);
            if let Some(lease) = granted {
                if !delivered(&mut send, &bytes).await {
                    // The client stopped the stream before the grant reached it (it gave
                    // up waiting in the same instant the seat was granted): nobody holds
                    // the secret, so the seat goes back at once.
                    debug!(conn = conn.0, %lease, "grant not received; taking it back");
                    let _ = shared.ledger.unclaimed(lease).await;
                }
                return;
            }
            if after == After::Shutdown {
                // Stop once the answer has left (the admin's QUIC stack acknowledged
                // it, bounded), so the admin hears it: no fixed delay.
                if send.write_all(&bytes).await.is_ok() && send.finish().is_ok() {
                    let _ = tokio::time::timeout(SHUTDOWN_ACK_TIMEOUT, send.stopped()).await;
                }
                shared.shutdown.notify_one();
                return;
            }
            bytes
        }
    };
    if send.write_all(&bytes).await.is_ok() {
        let _ = send.finish();
    }
}

/// One request being answered (see `Shared::answering`).
struct Answering(Arc<Shared>);

impl Answering {
    fn new(shared: Arc<Shared>) -> Answering {
        shared.answering.fetch_add(1, Ordering::AcqRel);
        Answering(shared)
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.answering.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sends a grant and waits (bounded) until the client's QUIC stack acknowledged all of
/// it; false if the client stopped the stream first or the connection went away. A
/// client whose stack acknowledged the grant and whose application then dropped it
/// before reading remains: its seat comes back with its connection or TTL.
async fn delivered(send: &mut quinn::SendStream, bytes: &[u8]) -> bool {
    if send.write_all(bytes).await.is_err() || send.finish().is_err() {
        return false;
    }
    match tokio::time::timeout(GRANT_ACK_TIMEOUT, send.stopped()).await {
        // Abandoned by a client that says so (a dropped stream stops with code 0, also
        // after reading the answer, so only this code means "not received").
        Ok(Ok(Some(code))) => code != quinn::VarInt::from_u32(frame::STOP_ABANDONED),
        Ok(Ok(None)) => true,
        // No word either way (the connection went, or no answer in time): the
        // connection's own fate decides, as for any lease.
        Ok(Err(_)) | Err(_) => true,
    }
}
