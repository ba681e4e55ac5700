//! Request and response messages, protocol versions 1 and 2.
//!
//! Each request travels on its own bidirectional QUIC stream as one [`crate::frame`],
//! answered by one response frame. New operations are added as new enum variants at the
//! end, so a newer daemon still decodes every request an older client sends; a request
//! the daemon does not know is answered with an error, never a dropped stream.
//!
//! Version 2 adds [`Response::Failed`] (a typed [`ErrorCode`] with the message) and the
//! denial reasons after [`DenialReason::RateLimited`]. The messages are the same types in
//! both versions; a daemon answers a version-1 request with [`Response::for_version`],
//! which turns what version 1 cannot decode into its version-1 equivalent.

use crate::lease::{LeaseId, LeaseSecret};
use crate::signed::Signed;
use crate::time::UnixTime;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The protocol version this crate speaks, carried in every frame header.
pub const PROTOCOL_VERSION: u16 = 2;

/// The TLS ALPN identifier of the tally protocol.
pub const ALPN: &[u8] = b"tally/1";

/// The default UDP port of `tallyd`.
pub const DEFAULT_PORT: u16 = 27300;

/// A request from a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Request {
    /// Introduces the client; must come before checkout on a connection.
    Hello(Hello),
    /// Asks for seats of a feature.
    Checkout(CheckoutRequest),
    /// Keeps leases alive; also re-attaches them to this connection.
    Heartbeat(HeartbeatRequest),
    /// Gives leases back.
    Checkin(CheckinRequest),
    /// Asks what is licensed and who holds what.
    Status(StatusRequest),
    /// An administrative operation; needs the admin token.
    Admin(AdminRequest),
    /// [`Request::Checkout`] with what the client observed about where it runs (a
    /// virtual machine, a remote session), for features whose vendor refuses those.
    /// A server older than this variant answers it [`ErrorCode::BadRequest`]
    /// (malformed): the client then sends [`Request::Checkout`].
    ObservedCheckout(ObservedCheckout),
}

/// A checkout with the client's observations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedCheckout {
    /// The checkout.
    pub request: CheckoutRequest,
    /// What the client observed.
    pub facts: crate::observed::ClientFacts,
}

/// A response from the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Response {
    /// Answer to [`Request::Hello`].
    Hello(HelloReply),
    /// Answer to [`Request::Checkout`].
    Checkout(CheckoutReply),
    /// Answer to [`Request::Heartbeat`].
    Heartbeat(HeartbeatReply),
    /// Answer to [`Request::Checkin`].
    Checkin(CheckinReply),
    /// Answer to [`Request::Status`].
    Status(StatusReply),
    /// Answer to [`Request::Admin`].
    Admin(AdminReply),
    /// The request could not be served at all (version 1: a message only).
    Error(ErrorReply),
    /// Answer to [`AdminOp::ReloadWithOutcome`]: what the reload loaded and refused.
    Reload(ReloadOutcome),
    /// The request could not be served at all: a code programs branch on, and the
    /// message for a person (protocol version 2).
    Failed(ServerError),
}

impl Response {
    /// This response as a client speaking protocol `version` can decode it: for
    /// version 1, [`Response::Failed`] becomes [`Response::Error`] with its message,
    /// and denial reasons added in version 2 become the version-1 reason that fits.
    pub fn for_version(self, version: u16) -> Response {
        if version >= 2 {
            return self;
        }
        match self {
            Response::Failed(e) => Response::Error(ErrorReply { message: e.message }),
            Response::Reload(outcome) => Response::Admin(AdminReply {
                message: outcome.summary,
                report: None,
            }),
            Response::Checkout(CheckoutReply::Denied(d)) => {
                Response::Checkout(CheckoutReply::Denied(Denial {
                    reason: d.reason.for_version_1(),
                }))
            }
            other => other,
        }
    }
}

/// Who is asking: shown to admins, used by policy, recorded in reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientIdentity {
    /// Login name.
    pub user: String,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// Program name.
    pub program: String,
    /// X display or terminal, if any.
    pub display: Option<String>,
}

impl fmt::Display for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.user, self.host)
    }
}

/// Longest string we accept in any identity field; longer values are refused, not cut.
pub const MAX_NAME_LEN: usize = 256;

/// The feature name under which denials of names no bundle licenses are counted and
/// journaled: a peer can make up any number of names, and none of them may grow the
/// daemon's counters, the vendor's report or its reconciliation by one row each.
pub const UNLICENSED_FEATURE: &str = "(unlicensed)";

/// The first character of `s` that must not appear in a name shown to people: control
/// characters (C0, DEL, C1: line breaks and terminal escape sequences forge log lines
/// and drive other users' terminals) and the Unicode bidirectional overrides and
/// isolates (they make a name read as something else).
pub fn unprintable(s: &str) -> Option<char> {
    s.chars().find(|&c| {
        c.is_control() || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    })
}

/// `s` with every character [`unprintable`] refuses written as a `\u{..}` escape: for
/// showing text that came from elsewhere (an older server, a report) on a terminal or
/// in a log. Backslashes stay as they are (`CORP\ana` is a real user name).
pub fn escape_unprintable(s: &str) -> std::borrow::Cow<'_, str> {
    if unprintable(s).is_none() {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unprintable(c.encode_utf8(&mut [0; 4])).is_some() {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Why a name a client sent was refused by [`check_name`]. The text names the field and
/// the offending character, never the value (it may hold terminal escapes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is empty.
    #[error("{field} is empty")]
    Empty {
        /// Which field (e.g. "user", "feature name").
        field: String,
    },
    /// The name is longer than [`MAX_NAME_LEN`] bytes.
    #[error("{field} is longer than {MAX_NAME_LEN} bytes")]
    TooLong {
        /// Which field.
        field: String,
    },
    /// The name holds a character [`unprintable`] refuses.
    #[error("{field} contains the control character U+{:04X}; names must be printable", *.character as u32)]
    Unprintable {
        /// Which field.
        field: String,
        /// The first offending character.
        character: char,
    },
}

/// Checks a name a client sends (identity field, feature, version): not empty, at most
/// [`MAX_NAME_LEN`] bytes, nothing [`unprintable`]. The error names the field and the
/// offending character, never echoes the value.
pub fn check_name(field: &str, value: &str) -> Result<(), NameError> {
    let field = || field.to_string();
    if value.is_empty() {
        return Err(NameError::Empty { field: field() });
    }
    if value.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong { field: field() });
    }
    if let Some(character) = unprintable(value) {
        return Err(NameError::Unprintable {
            field: field(),
            character,
        });
    }
    Ok(())
}

/// The client's introduction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Who the client is.
    pub client: ClientIdentity,
}

/// The daemon's introduction: enough for the client to check the trust chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    /// `tallyd` version string, for support.
    pub server_version: String,
    /// The bundles being served, exactly as the vendor signed them.
    pub bundles: Vec<Signed>,
    /// The server's wall clock, so clients can warn about skew.
    pub server_time: UnixTime,
    /// How often the client should heartbeat, in seconds.
    pub heartbeat_secs: u64,
    /// True when the daemon runs in demo mode with the built-in demo vendor key.
    pub demo: bool,
}

/// A request for seats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckoutRequest {
    /// The feature name.
    pub feature: String,
    /// How many seats, at least 1.
    pub count: u32,
    /// The application's version, for version ceilings.
    pub version: Option<String>,
    /// The application's build date, for maintenance (updates-until) dates.
    pub build_date: Option<UnixTime>,
    /// Seconds to wait in the feature's queue when no seat is free; 0 answers at once.
    pub wait_secs: u32,
    /// Borrow for this many seconds (a laptop going offline); 0 for a normal lease.
    pub borrow_secs: u64,
}

/// The answer to a checkout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckoutReply {
    /// Seats granted.
    Granted(LeaseGrant),
    /// Seats refused, with a reason the user can act on.
    Denied(Denial),
}

/// A granted lease as the client receives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseGrant {
    /// The lease id.
    pub id: LeaseId,
    /// The secret that re-attaches the lease from a new connection.
    pub secret: LeaseSecret,
    /// The feature.
    pub feature: String,
    /// Seats held.
    pub count: u32,
    /// Seconds without a heartbeat after which the seat is reclaimed.
    pub ttl_secs: u64,
    /// True if the seats are beyond the licensed count (overdraft, reported as such).
    pub overdraft: bool,
    /// For a borrowed lease: when it ends; it needs no heartbeats until then.
    pub borrowed_until: Option<UnixTime>,
    /// The lease token signed by the server key; verifiable without the server.
    pub token: Signed,
}

/// The signed body of a lease token; the variant is the format version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum LeaseToken {
    /// Format version 1.
    V1 {
        /// The lease id.
        id: LeaseId,
        /// The feature.
        feature: String,
        /// Seats held.
        count: u32,
        /// The holder, `user@host`.
        holder: String,
        /// When it was granted.
        issued_at: UnixTime,
        /// For a borrowed lease, when it ends.
        expires_at: Option<UnixTime>,
    },
}

impl LeaseToken {
    /// Encodes for signing.
    pub fn encode(&self) -> Vec<u8> {
        crate::encode(self)
    }

    /// Decodes a token body, bounded.
    pub fn decode(bytes: &[u8]) -> Result<LeaseToken, crate::DecodeError> {
        crate::decode::<LeaseToken, 4096>(bytes)
    }
}

/// A refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Denial {
    /// Why, in a form programs can branch on; its Display is the message for users.
    pub reason: DenialReason,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.reason.fmt(f)
    }
}

/// Why seats were refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum DenialReason {
    /// No bundle on this server licenses the feature.
    NotLicensed {
        /// The feature asked for.
        feature: String,
    },
    /// Every seat is taken.
    AllSeatsInUse {
        /// The feature asked for.
        feature: String,
        /// Seats licensed.
        total: u32,
        /// Seats held now.
        in_use: u32,
        /// Seats asked for.
        requested: u32,
        /// Who holds them, `user@host`, at most a few.
        holders: Vec<String>,
    },
    /// The licence starts later.
    NotYetValid {
        /// The feature.
        feature: String,
        /// When it starts.
        starts: UnixTime,
    },
    /// The licence has expired.
    Expired {
        /// The feature.
        feature: String,
        /// When it expired.
        expired: UnixTime,
    },
    /// The application's version is above every licensed ceiling.
    VersionAboveCeiling {
        /// The feature.
        feature: String,
        /// The version asked for.
        requested: String,
        /// The highest ceiling licensed.
        ceiling: String,
    },
    /// The application was built after maintenance (the right to updates) ended.
    MaintenanceExpired {
        /// The feature.
        feature: String,
        /// The application's build date.
        build_date: UnixTime,
        /// The latest maintenance date licensed.
        maintenance_until: UnixTime,
    },
    /// The policy file excludes this user or host.
    Excluded {
        /// The feature.
        feature: String,
        /// The rule, e.g. `user mallory`.
        rule: String,
    },
    /// The policy file limits the feature to an INCLUDE list this client is not on.
    NotIncluded {
        /// The feature.
        feature: String,
    },
    /// A MAX rule of the policy caps this user or group.
    MaxReached {
        /// The feature.
        feature: String,
        /// The cap.
        limit: u32,
        /// Whom it caps, e.g. `group cfd`.
        who: String,
    },
    /// The free seats are reserved for others.
    ReservedForOthers {
        /// The feature.
        feature: String,
        /// For whom, e.g. `group cfd`.
        reserved_for: Vec<String>,
    },
    /// The system clock is behind the latest time the server has seen, so time-limited
    /// licences are not served until it is fixed.
    ClockMovedBack {
        /// The feature.
        feature: String,
        /// The clock now.
        now: UnixTime,
        /// The latest time seen.
        high_water: UnixTime,
    },
    /// The wait in the queue ran out.
    QueueTimeout {
        /// The feature.
        feature: String,
        /// Seconds waited.
        waited_secs: u32,
    },
    /// Borrowing is not allowed, or not for that long.
    BorrowNotAllowed {
        /// The feature.
        feature: String,
        /// The longest borrow allowed, seconds; 0 for none.
        limit_secs: u64,
    },
    /// The request itself was invalid.
    InvalidRequest {
        /// What was wrong.
        what: String,
    },
    /// The server could not record the grant durably, so it did not grant it.
    StorageUnavailable {
        /// What failed.
        what: String,
    },
    /// This address asked for more checkouts than the server's rate limit allows.
    RateLimited {
        /// When a checkout would be accepted again.
        retry_after_ms: u32,
    },
    /// The administrator removed this user's seat on this host (`tally admin remove`),
    /// and the server's hold-off keeps it from taking a seat of the feature again at
    /// once, so that the seat goes to someone else. Protocol version 2; version 1 sees
    /// [`DenialReason::InvalidRequest`].
    RemovedByAdministrator {
        /// The feature.
        feature: String,
        /// When the hold-off ends (server wall clock).
        until: UnixTime,
    },
    /// More seats were asked for than the server can ever grant at once (the seats
    /// licensed now plus the overdraft): waiting cannot help, so it is never queued.
    /// Protocol version 2; version 1 sees [`DenialReason::InvalidRequest`].
    MoreThanExist {
        /// The feature.
        feature: String,
        /// Seats asked for.
        requested: u32,
        /// Seats licensed now.
        total: u32,
        /// Overdraft seats the licence allows on top.
        overdraft: u32,
    },
    /// Every seat is taken, or too few are free, with the overdraft counted: the
    /// denial of a feature that has overdraft seats says so. Protocol version 2;
    /// version 1 sees [`DenialReason::AllSeatsInUse`].
    OverdraftInUse {
        /// The feature asked for.
        feature: String,
        /// Seats licensed.
        total: u32,
        /// Overdraft seats the licence allows on top.
        overdraft: u32,
        /// Seats held now, overdraft included.
        in_use: u32,
        /// Seats asked for.
        requested: u32,
        /// Who holds them, `user@host`, at most a few.
        holders: Vec<String>,
    },
    /// The vendor refuses checkouts of this feature from remote sessions, and the
    /// client reported one. Only answered to a [`Request::ObservedCheckout`], whose
    /// senders know it; version 1 sees [`DenialReason::InvalidRequest`].
    RemoteSessionRefused {
        /// The feature.
        feature: String,
        /// The session the client reported (`SSH from 10.0.0.5`).
        session: String,
    },
    /// The vendor refuses checkouts of this feature from virtual machines, and the
    /// client reported one. Only answered to a [`Request::ObservedCheckout`];
    /// version 1 sees [`DenialReason::InvalidRequest`].
    VirtualMachineRefused {
        /// The feature.
        feature: String,
        /// The hypervisor the client reported (`KVM/QEMU`).
        hypervisor: String,
    },
}

impl DenialReason {
    /// A short, stable code for reports and metrics (`all_seats_in_use`, ...).
    pub fn code(&self) -> &'static str {
        match self {
            DenialReason::NotLicensed { .. } => "not_licensed",
            DenialReason::AllSeatsInUse { .. } => "all_seats_in_use",
            DenialReason::NotYetValid { .. } => "not_yet_valid",
            DenialReason::Expired { .. } => "expired",
            DenialReason::VersionAboveCeiling { .. } => "version_above_ceiling",
            DenialReason::MaintenanceExpired { .. } => "maintenance_expired",
            DenialReason::Excluded { .. } => "excluded",
            DenialReason::NotIncluded { .. } => "not_included",
            DenialReason::MaxReached { .. } => "max_reached",
            DenialReason::ReservedForOthers { .. } => "reserved_for_others",
            DenialReason::ClockMovedBack { .. } => "clock_moved_back",
            DenialReason::QueueTimeout { .. } => "queue_timeout",
            DenialReason::BorrowNotAllowed { .. } => "borrow_not_allowed",
            DenialReason::InvalidRequest { .. } => "invalid_request",
            DenialReason::StorageUnavailable { .. } => "storage_unavailable",
            DenialReason::RateLimited { .. } => "rate_limited",
            DenialReason::RemovedByAdministrator { .. } => "removed_by_administrator",
            DenialReason::MoreThanExist { .. } => "more_than_exist",
            // The same kind as for a feature without overdraft: reports, metrics and
            // the C ABI count "no seat free" one way.
            DenialReason::OverdraftInUse { .. } => "all_seats_in_use",
            DenialReason::RemoteSessionRefused { .. } => "remote_session_refused",
            DenialReason::VirtualMachineRefused { .. } => "virtual_machine_refused",
        }
    }

    /// This reason as a protocol-version-1 client can decode it: reasons added in
    /// version 2 become the version-1 reason that fits, with the same message where
    /// the fields allow.
    pub fn for_version_1(self) -> DenialReason {
        match self {
            r @ (DenialReason::MoreThanExist { .. }
            | DenialReason::RemovedByAdministrator { .. }
            | DenialReason::RemoteSessionRefused { .. }
            | DenialReason::VirtualMachineRefused { .. }) => DenialReason::InvalidRequest {
                what: r.to_string(),
            },
            DenialReason::OverdraftInUse {
                feature,
                total,
                in_use,
                requested,
                holders,
                ..
            } => DenialReason::AllSeatsInUse {
                feature,
                total,
                in_use,
                requested,
                holders,
            },
            other => other,
        }
    }
}

impl fmt::Display for DenialReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DenialReason::NotLicensed { feature } => {
                write!(f, "feature '{feature}' is not licensed on this server")
            }
            DenialReason::AllSeatsInUse {
                feature,
                total,
                in_use,
                requested,
                holders,
            } => {
                if *total == 1 {
                    write!(f, "the one seat of '{feature}' is in use ({in_use} held")?;
                } else {
                    write!(f, "all {total} seats of '{feature}' are in use ({in_use} held")?;
                }
                if !holders.is_empty() {
                    write!(f, " by {}", holders.join(", "))?;
                }
                write!(f, "); {requested} requested")
            }
            DenialReason::NotYetValid { feature, starts } => {
                write!(f, "the licence for '{feature}' starts on {}", starts.date())
            }
            DenialReason::Expired { feature, expired } => {
                write!(
                    f,
                    "the licence for '{feature}' expired at the end of {}",
                    expired.last_day()
                )
            }
            DenialReason::VersionAboveCeiling {
                feature,
                requested,
                ceiling,
            } => write!(
                f,
                "version {requested} of '{feature}' is above the licensed version {ceiling}"
            ),
            DenialReason::MaintenanceExpired {
                feature,
                build_date,
                maintenance_until,
            } => write!(
                f,
                "maintenance expired: this build of '{feature}' is from {}, updates are licensed until {}; \
                 an older build still runs",
                build_date.date(),
                maintenance_until.date()
            ),
            DenialReason::Excluded { feature, rule } => {
                write!(f, "'{feature}' is not available to {rule} (excluded by the site's policy)")
            }
            DenialReason::NotIncluded { feature } => write!(
                f,
                "'{feature}' is limited by the site's policy to an include list you are not on"
            ),
            DenialReason::MaxReached {
                feature,
                limit,
                who,
            } => write!(
                f,
                "the site's policy allows {who} at most {} of '{feature}'",
                plural(*limit, "seat", "seats")
            ),
            DenialReason::ReservedForOthers {
                feature,
                reserved_for,
            } => write!(
                f,
                "the free seats of '{feature}' are reserved for {}",
                reserved_for.join(", ")
            ),
            DenialReason::ClockMovedBack {
                feature,
                now,
                high_water,
            } => write!(
                f,
                "system clock moved back: the server's clock says {now} but it has seen {high_water}; \
                 time-limited licences such as '{feature}' are refused until the clock is fixed"
            ),
            DenialReason::QueueTimeout {
                feature,
                waited_secs,
            } => write!(f, "no seat of '{feature}' became free within {waited_secs} s"),
            DenialReason::BorrowNotAllowed {
                feature,
                limit_secs,
            } => {
                if *limit_secs == 0 {
                    write!(f, "'{feature}' may not be borrowed")
                } else {
                    write!(
                        f,
                        "'{feature}' may be borrowed for at most {}",
                        plural(limit_secs / 3600, "hour", "hours")
                    )
                }
            }
            DenialReason::InvalidRequest { what } => write!(f, "invalid request: {what}"),
            DenialReason::StorageUnavailable { what } => {
                write!(f, "the server cannot record new seats right now: {what}")
            }
            DenialReason::RateLimited { retry_after_ms } => write!(
                f,
                "too many checkouts from this address; retry in {retry_after_ms} ms"
            ),
            DenialReason::RemovedByAdministrator { feature, until } => write!(
                f,
                "your seat of '{feature}' was removed by the administrator; \
                 no seat of '{feature}' for you on this host until {until}"
            ),
            DenialReason::MoreThanExist {
                feature,
                requested,
                total,
                overdraft,
            } => {
                let most = total.saturating_add(*overdraft);
                if *overdraft == 0 {
                    write!(f, "only {} of '{feature}' exist", plural(*total, "seat", "seats"))?;
                } else {
                    write!(
                        f,
                        "only {} of '{feature}' can ever be held at once ({} licensed + {} overdraft)",
                        plural(most, "seat", "seats"),
                        total,
                        overdraft
                    )?;
                }
                write!(f, "; {requested} requested, so waiting cannot help")
            }
            DenialReason::OverdraftInUse {
                feature,
                total,
                overdraft,
                in_use,
                requested,
                holders,
            } => {
                let most = total.saturating_add(*overdraft);
                let free = most.saturating_sub(*in_use);
                write!(
                    f,
                    "'{feature}' is in overdraft: {} licensed + {overdraft} overdraft, {in_use} held",
                    plural(*total, "seat", "seats")
                )?;
                if !holders.is_empty() {
                    write!(f, " by {}", holders.join(", "))?;
                }
                if free == 0 {
                    write!(f, ", none free; {requested} requested")
                } else {
                    write!(f, ", only {free} free; {requested} requested")
                }
            }
            DenialReason::RemoteSessionRefused { feature, session } => write!(
                f,
                "'{feature}' may not be used from a remote session ({session}); \
                 the vendor's licence allows it only at the machine's own console"
            ),
            DenialReason::VirtualMachineRefused {
                feature,
                hypervisor,
            } => write!(
                f,
                "'{feature}' may not be used from a virtual machine ({hypervisor}); \
                 the vendor's licence allows it only on physical machines"
            ),
        }
    }
}

/// Keeps leases alive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    /// The leases, each with its secret (which also proves the right to re-attach).
    pub leases: Vec<LeaseRef>,
}

/// A lease named by id and proven by its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRef {
    /// The lease id.
    pub id: LeaseId,
    /// The lease secret.
    pub secret: LeaseSecret,
}

/// Per-lease answers, in request order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// One status per requested lease.
    pub leases: Vec<LeaseState>,
}

/// A lease's state as the daemon sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum LeaseState {
    /// Held; the heartbeat extended it.
    Active,
    /// Unknown to the daemon (expired, or never granted) or the secret was wrong.
    Unknown,
    /// An administrator removed the lease.
    Removed,
}

/// Gives leases back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckinRequest {
    /// The leases to release.
    pub leases: Vec<LeaseRef>,
}

/// The answer to a checkin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckinReply {
    /// For each requested lease, whether it was held and is now released.
    pub released: Vec<bool>,
}

/// Asks for the server's state.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRequest {
    /// The admin token, needed when the server is configured to require it.
    pub admin_token: Option<String>,
}

impl fmt::Debug for StatusRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StatusRequest")
            .field("admin_token", &self.admin_token.as_ref().map(|_| ".."))
            .finish()
    }
}

/// What the server serves and who holds what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReply {
    /// The server's wall clock.
    pub server_time: UnixTime,
    /// The server key's fingerprint.
    pub server_fingerprint: String,
    /// One entry per feature, sorted by name.
    pub features: Vec<FeatureStatus>,
}

/// One feature's seats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureStatus {
    /// Feature name.
    pub name: String,
    /// Seats licensed now; `None` for an uncounted site licence.
    pub total: Option<u32>,
    /// Seats held now.
    pub in_use: u32,
    /// Earliest expiry among the grants that count now; `None` if permanent.
    pub expires: Option<UnixTime>,
    /// True if any counting grant is an evaluation.
    pub evaluation: bool,
    /// Seats in use beyond the licensed count.
    pub overdraft_in_use: u32,
    /// Seats the site's policy reserves for someone.
    pub reserved: u32,
    /// Current holders.
    pub holders: Vec<HolderStatus>,
    /// Clients waiting for a seat, first in line first.
    pub queue: Vec<QueueEntry>,
}

/// A client waiting in a feature's queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueEntry {
    /// Who waits.
    pub client: ClientIdentity,
    /// Seats wanted.
    pub count: u32,
    /// Since when.
    pub since: UnixTime,
}

/// One lease as shown in status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderStatus {
    /// The lease id.
    pub lease: LeaseId,
    /// Who holds it.
    pub client: ClientIdentity,
    /// Seats held.
    pub count: u32,
    /// Since when.
    pub since: UnixTime,
    /// Overdraft seats.
    pub overdraft: bool,
    /// For a borrowed lease, when it ends.
    pub borrowed_until: Option<UnixTime>,
}

/// An administrative request. Its `Debug` output hides the token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminRequest {
    /// The admin token from the server's `admin.token` file.
    pub token: String,
    /// What to do.
    pub op: AdminOp,
}

impl fmt::Debug for AdminRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminRequest")
            .field("token", &"..")
            .field("op", &self.op)
            .finish()
    }
}

/// Administrative operations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AdminOp {
    /// Re-read bundles and the policy without dropping any lease.
    Reload,
    /// Remove a lease; its holder learns on its next heartbeat.
    Remove {
        /// The lease.
        lease: LeaseId,
    },
    /// Stop the server gracefully (leases are kept in the store).
    Shutdown,
    /// Export a usage report of everything not yet exported.
    ExportReport,
    /// [`AdminOp::Reload`], answered with [`Response::Reload`]: every bundle file loaded
    /// and refused, and a broken policy named as such. (`Reload` keeps its
    /// [`AdminReply`] for older clients; a reload that refused anything answers it with
    /// [`Response::Error`] listing the refusals.)
    ReloadWithOutcome,
    /// Show the cluster as its leader sees it: members, roles, replication lag.
    ClusterShow,
    /// Add a server to the cluster (on its leader): the `[[cluster]]` member of the
    /// leader's config whose key fingerprint starts with `member` (at least 16 hex
    /// digits: a node id). It joins as a learner, catches up, then votes.
    ClusterAdd {
        /// The new member's key fingerprint, or its first 16 hex digits (its node id).
        member: String,
    },
    /// Remove a server from the cluster (on its leader): the member whose key
    /// fingerprint starts with `member` (a node id, as the cluster view shows it).
    ClusterRemove {
        /// The member's node id (16 hex digits) or key fingerprint.
        member: String,
    },
}

/// The answer to an admin request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminReply {
    /// What was done, for a person.
    pub message: String,
    /// For [`AdminOp::ExportReport`]: the armoured report.
    pub report: Option<String>,
}

/// A bundle file (or the policy file) that a load refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    /// The file, as the server names it (its path).
    pub source: String,
    /// Why, in one line.
    pub reason: String,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.source, self.reason)
    }
}

/// What a reload did. It is `ok` only when every bundle file loaded and the policy
/// read; refused files do not stop the others from being served, a broken policy or a
/// reload that could not run changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadOutcome {
    /// Ids of the bundles served after the reload (unchanged when nothing was reloaded).
    pub loaded: Vec<String>,
    /// Bundle files refused, each with its reason.
    pub refused: Vec<Refused>,
    /// The policy file, when it could not be read or parsed: then nothing was reloaded.
    pub policy_error: Option<Refused>,
    /// Why the reload could not run at all (no bundle directory, a reload still stuck on
    /// a file that never answers, the server shutting down); nothing was reloaded.
    pub error: Option<String>,
    /// One line for a person.
    pub summary: String,
}

impl ReloadOutcome {
    /// True when everything was loaded: no refusal, no policy error, no failure.
    pub fn ok(&self) -> bool {
        self.refused.is_empty() && self.policy_error.is_none() && self.error.is_none()
    }
}

/// A request that could not be served at all (protocol version 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// What went wrong, for a person.
    pub message: String,
}

/// A request that could not be served at all (protocol version 2): programs branch on
/// the code, people read the message. Its `Display` is the message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerError {
    /// What kind of failure.
    pub code: ErrorCode,
    /// What went wrong, for a person; never the server's paths or internal error text.
    pub message: String,
}

impl ServerError {
    /// A failure of kind `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ServerError {
        ServerError {
            code,
            message: message.into(),
        }
    }
}

/// What a [`ErrorCode::NotLeader`] message says before the leader's address.
const LEADER_AT: &str = "; the leader is at ";

impl ServerError {
    /// "Not the leader", naming the leader's client address when known.
    pub fn not_leader(leader: Option<&str>) -> ServerError {
        let mut message = "this server does not lead its cluster".to_string();
        if let Some(addr) = leader {
            message.push_str(LEADER_AT);
            message.push_str(addr);
        }
        ServerError::new(ErrorCode::NotLeader, message)
    }

    /// The leader's address a [`ErrorCode::NotLeader`] answer names, if any.
    pub fn leader_hint(&self) -> Option<&str> {
        if self.code != ErrorCode::NotLeader {
            return None;
        }
        let (_, addr) = self.message.rsplit_once(LEADER_AT)?;
        Some(addr.trim()).filter(|a| !a.is_empty())
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Why a request could not be served. Travels as a number (fixed per code, never
/// reused), so that a code newer than the client decodes as [`ErrorCode::Unknown`]
/// instead of failing the whole answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "u16", into = "u16")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The request was malformed, incomplete, or came before `hello`.
    BadRequest,
    /// The admin token was missing or wrong.
    Unauthorized,
    /// Admin operations are disabled: the server has no admin token.
    AdminDisabled,
    /// No lease with that id is held.
    UnknownLease,
    /// The server's store cannot be read or written right now.
    StorageUnavailable,
    /// The server is stopping.
    ShuttingDown,
    /// The request or admin operation is not supported by this server.
    Unsupported,
    /// A reload could not read the bundles or the policy; the previous ones stay.
    ReloadFailed,
    /// Something failed inside the server.
    Internal,
    /// The server is a member of a cluster that another member leads: only the leader
    /// grants. The message names the leader's address when known
    /// ([`ServerError::leader_hint`]); a client connects there.
    NotLeader,
    /// A cluster membership change was refused or did not finish (another change in
    /// progress, the new member not caught up in time): what was done stays done, and
    /// the same command can be run again.
    ClusterChange,
    /// A code newer than this build knows.
    Unknown(u16),
}

impl ErrorCode {
    /// A short, stable name (`unknown_lease`, ...), for scripts and logs.
    pub fn name(&self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::AdminDisabled => "admin_disabled",
            ErrorCode::UnknownLease => "unknown_lease",
            ErrorCode::StorageUnavailable => "storage_unavailable",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::ReloadFailed => "reload_failed",
            ErrorCode::Internal => "internal",
            ErrorCode::NotLeader => "not_leader",
            ErrorCode::ClusterChange => "cluster_change",
            ErrorCode::Unknown(_) => "unknown",
        }
    }
}

impl From<u16> for ErrorCode {
    fn from(n: u16) -> ErrorCode {
        match n {
            1 => ErrorCode::BadRequest,
            2 => ErrorCode::Unauthorized,
            3 => ErrorCode::AdminDisabled,
            4 => ErrorCode::UnknownLease,
            5 => ErrorCode::StorageUnavailable,
            6 => ErrorCode::ShuttingDown,
            7 => ErrorCode::Unsupported,
            8 => ErrorCode::ReloadFailed,
            9 => ErrorCode::Internal,
            10 => ErrorCode::NotLeader,
            11 => ErrorCode::ClusterChange,
            n => ErrorCode::Unknown(n),
        }
    }
}

impl From<ErrorCode> for u16 {
    fn from(c: ErrorCode) -> u16 {
        match c {
            ErrorCode::BadRequest => 1,
            ErrorCode::Unauthorized => 2,
            ErrorCode::AdminDisabled => 3,
            ErrorCode::UnknownLease => 4,
            ErrorCode::StorageUnavailable => 5,
            ErrorCode::ShuttingDown => 6,
            ErrorCode::Unsupported => 7,
            ErrorCode::ReloadFailed => 8,
            ErrorCode::Internal => 9,
            ErrorCode::NotLeader => 10,
            ErrorCode::ClusterChange => 11,
            ErrorCode::Unknown(n) => n,
        }
    }
}

/// `n` with its noun, singular or plural: "1 seat", "2 seats".
pub fn plural(n: impl Into<u64>, one: &str, many: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { one } else { many })
}

impl StatusReply {
    /// The status as JSON, one schema for `tally status --json` and the daemon's
    /// `/api/status`: times as ISO 8601, lease ids as shown to admins, expiry both as the
    /// last valid day and in days from the server's clock.
    pub fn to_json(&self, demo: bool) -> serde_json::Value {
        use serde_json::json;
        let now = self.server_time.0 as i64;
        let features: Vec<serde_json::Value> = self
            .features
            .iter()
            .map(|f| {
                json!({
                    "name": f.name,
                    "total": f.total,
                    "in_use": f.in_use,
                    "overdraft_in_use": f.overdraft_in_use,
                    "reserved": f.reserved,
                    "evaluation": f.evaluation,
                    "expires": f.expires.map(|e| e.last_day()),
                    "expires_in_days": f.expires.map(|e| (e.0 as i64 - now).max(0) / 86_400),
                    // Nothing of it is in force any more: `expires` is when it ended.
                    "expired": f.expires.is_some_and(|e| e <= self.server_time),
                    "holders": f.holders.iter().map(|h| json!({
                        "lease": h.lease.to_string(),
                        "user": h.client.user,
                        "host": h.client.host,
                        "pid": h.client.pid,
                        "program": h.client.program,
                        "count": h.count,
                        "since": h.since.to_string(),
                        "overdraft": h.overdraft,
                        "borrowed_until": h.borrowed_until.map(|u| u.to_string()),
                    })).collect::<Vec<_>>(),
                    "queue": f.queue.iter().map(|q| json!({
                        "user": q.client.user,
                        "host": q.client.host,
                        "pid": q.client.pid,
                        "program": q.client.program,
                        "count": q.count,
                        "since": q.since.to_string(),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        json!({
            "server_key": self.server_fingerprint,
            "server_time": self.server_time.to_string(),
            "demo": demo,
            "features": features,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_travel_as_numbers_and_unknown_ones_survive() {
        for n in 0..20u16 {
            let code = ErrorCode::from(n);
            assert_eq!(u16::from(code), n);
        }
        let reply = Response::Failed(ServerError::new(ErrorCode::UnknownLease, "no lease L1"));
        let bytes = crate::encode(&reply);
        assert_eq!(crate::decode::<Response, 4096>(&bytes).unwrap(), reply);
        // A code from a newer daemon decodes, as Unknown, with its message.
        let newer = Response::Failed(ServerError::new(ErrorCode::Unknown(400), "newer"));
        let back = crate::decode::<Response, 4096>(&crate::encode(&newer)).unwrap();
        assert_eq!(back, newer);
        // A version-1 client gets the message alone, and the version-1 denial.
        assert_eq!(
            reply.for_version(1),
            Response::Error(ErrorReply {
                message: "no lease L1".into()
            })
        );
        let more = DenialReason::MoreThanExist {
            feature: "solver".into(),
            requested: 6,
            total: 5,
            overdraft: 0,
        };
        assert_eq!(
            more.to_string(),
            "only 5 seats of 'solver' exist; 6 requested, so waiting cannot help"
        );
        match more.clone().for_version_1() {
            DenialReason::InvalidRequest { what } => assert_eq!(what, more.to_string()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn plurals_are_right() {
        assert_eq!(plural(1u32, "seat", "seats"), "1 seat");
        assert_eq!(plural(2u32, "seat", "seats"), "2 seats");
        assert_eq!(plural(0u32, "seat", "seats"), "0 seats");
        let one = DenialReason::AllSeatsInUse {
            feature: "cad".into(),
            total: 1,
            in_use: 1,
            requested: 1,
            holders: vec![],
        };
        assert_eq!(
            one.to_string(),
            "the one seat of 'cad' is in use (1 held); 1 requested"
        );
        let max = DenialReason::MaxReached {
            feature: "cad".into(),
            limit: 1,
            who: "user ana".into(),
        };
        assert_eq!(
            max.to_string(),
            "the site's policy allows user ana at most 1 seat of 'cad'"
        );
    }

    #[test]
    fn names_with_control_characters_are_refused_and_escaped() {
        assert!(check_name("user", "ana").is_ok());
        assert!(check_name("user", "CORP\\ana").is_ok());
        assert!(check_name("user", "jos\u{e9}").is_ok());
        for bad in [
            "a\nb",
            "a\rb",
            "\u{1b}[31m",
            "a\u{7}",
            "a\u{7f}",
            "a\u{9b}",
            "a\u{202e}b",
        ] {
            let e = check_name("user", bad).unwrap_err().to_string();
            assert!(
                e.starts_with("user contains the control character U+"),
                "{e}"
            );
        }
        assert_eq!(
            check_name("feature", "").unwrap_err().to_string(),
            "feature is empty"
        );
        assert_eq!(escape_unprintable("ok"), "ok");
        assert_eq!(
            escape_unprintable("m\u{1b}]0;t\u{7}\nx"),
            "m\\u{1b}]0;t\\u{7}\\u{a}x"
        );
    }
}
