//! The daemon's one error type, and the one place where an error becomes what a client
//! is told: [`Error::code`] (the wire's [`ErrorCode`]) and [`Error::client_message`]
//! (never the server's paths or the storage engine's text; the log has those).
//!
//! The module errors keep their own types (they name the file, the store, the URL);
//! [`Error`] wraps them, and names the failures that belong to no module (the server
//! is shutting down, a request that is not well formed, an export that stopped).

use crate::bundles::BundleFileError;
use crate::disk::DiskError;
use crate::identity::IdentityError;
use crate::store::StoreError;
use crate::tls::TlsError;
use crate::upload::UploadError;
use std::net::SocketAddr;
use std::path::PathBuf;
use tally_config::ConfigError;
use tally_protocol::lease::LeaseId;
use tally_protocol::wire::{ErrorCode, NameError, ServerError};

/// Why the daemon could not do something. Module errors are wrapped as they are (their
/// text names files and the store's path: for the log and the operator's terminal);
/// what a client sees is [`Error::to_wire`].
// Module errors hold their cause in the message (no `source` chain), so a chain printer
// (`{:#}`) says each cause once; the wrappers here are transparent for the same reason.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The seat store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// This server is a cluster member that does not lead: clients go to the leader.
    #[error("this server does not lead its cluster")]
    NotLeader {
        /// The leader's client address, if known.
        leader: Option<String>,
    },
    /// The store as the ledger task holds it refused a write or a flush.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// A bundle file is not served.
    #[error(transparent)]
    BundleFile(#[from] BundleFileError),
    /// The server key or the admin token file.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The certificate or the TLS settings made from the server key.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The report uploader.
    #[error(transparent)]
    Upload(#[from] UploadError),
    /// The configuration file.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A name a client sent (feature, version) is refused.
    #[error(transparent)]
    Name(#[from] NameError),
    /// An identity field of a client's hello is refused.
    #[error("hello: {0}")]
    Hello(NameError),
    /// A request that is not well formed or comes out of order.
    #[error("{0}")]
    BadRequest(&'static str),
    /// The admin token was needed and missing or wrong (the text says which).
    #[error("{0}")]
    Unauthorized(&'static str),
    /// Admin operations are disabled: no admin token is configured.
    #[error("admin operations are disabled: this server has no admin token")]
    AdminDisabled,
    /// No lease with this id is held.
    #[error("no lease {0} is held on this server")]
    UnknownLease(LeaseId),
    /// A request or an admin operation this build does not serve (the text says which).
    #[error("{0}")]
    Unsupported(&'static str),
    /// A reload refused bundles or the policy (the text is the reload's outcome).
    #[error("{0}")]
    ReloadFailed(String),
    /// The system gave no randomness for a lease id and secret.
    #[error("no randomness for a lease secret: {0}")]
    NoRandomness(getrandom::Error),
    /// The ledger task has stopped: the server is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The report export's blocking task did not finish (it panicked).
    #[error("the report export stopped: {0}")]
    ExportStopped(String),
    /// A report could not be written into the spool; it is kept and written later.
    #[error("{}: {cause} (kept in memory, retried at the next export)", .path.display())]
    Spool {
        /// The report file.
        path: PathBuf,
        /// The IO error.
        cause: std::io::Error,
    },
    /// A socket could not be bound or set up (`what`: "UDP", "the HTTP endpoint on").
    #[error("binding {what} {addr}: {cause}")]
    Bind {
        /// Which socket.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The IO error.
        cause: std::io::Error,
    },
    /// QUIC could not start on the bound socket.
    #[error("starting QUIC on {addr}: {cause}")]
    Quic {
        /// The address.
        addr: SocketAddr,
        /// The IO error.
        cause: std::io::Error,
    },
    /// Another IO failure of the server itself (`what` says doing what).
    #[error("{what}: {cause}")]
    Io {
        /// What the server was doing.
        what: String,
        /// The IO error.
        cause: std::io::Error,
    },
}

impl Error {
    /// The wire code of this error: the one mapping from the daemon's failures to what
    /// clients (and `tally`'s exit codes) act on.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::NotLeader { .. } => ErrorCode::NotLeader,
            Error::Store(_) | Error::Disk(_) | Error::Spool { .. } => ErrorCode::StorageUnavailable,
            Error::Name(_) | Error::Hello(_) | Error::BadRequest(_) => ErrorCode::BadRequest,
            Error::Unauthorized(_) => ErrorCode::Unauthorized,
            Error::AdminDisabled => ErrorCode::AdminDisabled,
            Error::UnknownLease(_) => ErrorCode::UnknownLease,
            Error::Unsupported(_) => ErrorCode::Unsupported,
            Error::ReloadFailed(_) => ErrorCode::ReloadFailed,
            Error::ShuttingDown => ErrorCode::ShuttingDown,
            Error::BundleFile(_)
            | Error::Identity(_)
            | Error::Tls(_)
            | Error::Upload(_)
            | Error::Config(_)
            | Error::NoRandomness(_)
            | Error::ExportStopped(_)
            | Error::Bind { .. }
            | Error::Quic { .. }
            | Error::Io { .. } => ErrorCode::Internal,
        }
    }

    /// What a client is told: a storage fault by its kind (never the store's path or
    /// sled's text), a failure inside the server without its files, the rest as said.
    pub fn client_message(&self) -> String {
        match self.code() {
            ErrorCode::StorageUnavailable => storage_fault(&self.to_string()),
            ErrorCode::Internal => match self {
                Error::NoRandomness(_) | Error::ExportStopped(_) => self.to_string(),
                _ => "something failed inside the server (the server's log says why)".into(),
            },
            _ => self.to_string(),
        }
    }

    /// The failure as it goes on the wire.
    pub fn to_wire(&self) -> ServerError {
        if let Error::NotLeader { leader } = self {
            return ServerError::not_leader(leader.as_deref());
        }
        ServerError::new(self.code(), self.client_message())
    }
}

impl From<crate::ledger_task::NoAnswer> for Error {
    /// No answer from the ledger task: it has stopped, the server is shutting down.
    fn from(_: crate::ledger_task::NoAnswer) -> Error {
        Error::ShuttingDown
    }
}

/// What a client is told about a storage fault (`what` is the store's error text, for
/// the log): the kind of fault, if it is one people can act on, never the store's paths
/// or the storage engine's error text.
pub(crate) fn storage_fault(what: &str) -> String {
    // Matched in the text: sled re-creates some IO errors from their text, so the OS
    // error number is not always there to look at.
    const KNOWN: [&str; 8] = [
        "No space left on device",
        "Read-only file system",
        "Disk quota exceeded",
        "Input/output error",
        "Permission denied",
        "Too many open files",
        "files are missing",
        "closed",
    ];
    match KNOWN.iter().find(|k| what.contains(*k)) {
        Some(kind) => format!("the seat store: {kind}; held seats are kept"),
        None => "the seat store cannot be written (the server's log says why); held seats are kept"
            .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Issue 20, scenario 8: storage denials carried the store's path and sled's Debug
    /// text to every client.
    #[test]
    fn storage_faults_reach_clients_without_paths_or_debug_text() {
        let raw = "seat store /var/lib/tally/store: Io(Custom { kind: StorageFull, error: \"No space left on device (os error 28)\" })";
        let shown = storage_fault(raw);
        assert_eq!(
            shown,
            "the seat store: No space left on device; held seats are kept"
        );
        let shown = storage_fault(
            "opening the seat store: Read corrupted data at file offset None backtrace ()",
        );
        assert!(!shown.contains("offset") && !shown.contains('/'), "{shown}");
        assert!(shown.contains("the server's log says why"), "{shown}");
    }

    /// A storage failure reaches the client as `StorageUnavailable` with the kind of
    /// fault and without the data directory's path, while the log's text keeps the path.
    #[test]
    fn a_storage_failure_reaches_the_wire_as_a_code_without_the_data_dir() {
        let data_dir = "/srv/site-secret/tally";
        let full = Error::from(DiskError::Store(Arc::new(StoreError::Io {
            path: PathBuf::from(data_dir).join("store"),
            cause: std::io::Error::from_raw_os_error(28),
        })));
        assert!(
            full.to_string().contains(data_dir),
            "the log keeps the path"
        );
        let wire = full.to_wire();
        assert_eq!(wire.code, ErrorCode::StorageUnavailable);
        assert_eq!(
            wire.message,
            "the seat store: No space left on device; held seats are kept"
        );
        let missing = Error::from(StoreError::Missing {
            path: PathBuf::from(data_dir).join("store"),
        })
        .to_wire();
        assert_eq!(missing.code, ErrorCode::StorageUnavailable);
        assert!(!missing.message.contains(data_dir), "{}", missing.message);
        let spool = Error::Spool {
            path: PathBuf::from(data_dir).join("spool/tally-report-00000001.report"),
            cause: std::io::Error::from_raw_os_error(13),
        }
        .to_wire();
        assert_eq!(spool.code, ErrorCode::StorageUnavailable);
        assert!(!spool.message.contains(data_dir), "{}", spool.message);
    }

    /// Each kind of failure has its code, and failures inside the server that name
    /// files (the key, the certificate) reach clients without them.
    #[test]
    fn every_failure_has_its_code_and_internal_ones_hide_their_files() {
        let cases = [
            (Error::ShuttingDown, ErrorCode::ShuttingDown),
            (
                Error::BadRequest("send hello before checkout"),
                ErrorCode::BadRequest,
            ),
            (
                Error::Hello(NameError::Empty {
                    field: "user".into(),
                }),
                ErrorCode::BadRequest,
            ),
            (
                Error::Unauthorized("admin token is wrong"),
                ErrorCode::Unauthorized,
            ),
            (Error::AdminDisabled, ErrorCode::AdminDisabled),
            (Error::UnknownLease(LeaseId(7)), ErrorCode::UnknownLease),
            (Error::Unsupported("no"), ErrorCode::Unsupported),
            (
                Error::ReloadFailed("refused".into()),
                ErrorCode::ReloadFailed,
            ),
        ];
        for (error, code) in cases {
            assert_eq!(error.code(), code, "{error}");
            assert_eq!(error.to_wire().message, error.to_string());
        }
        assert_eq!(
            Error::Hello(NameError::Empty {
                field: "user".into()
            })
            .to_string(),
            "hello: user is empty"
        );
        let io = Error::Io {
            what: "reading /etc/tally/secret".into(),
            cause: std::io::Error::from_raw_os_error(13),
        };
        assert_eq!(io.code(), ErrorCode::Internal);
        assert!(
            !io.client_message().contains("/etc/tally"),
            "{}",
            io.client_message()
        );
    }
}
