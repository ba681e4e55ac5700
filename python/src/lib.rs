//! The `tally` Python module: the blocking client ([`tally_client::blocking`]) for
//! Python programs.
//!
//! ```python
//! import tally
//! with tally.Client("lic1:27300", VENDOR_KEY) as c:
//!     with c.checkout("solver", version="2027.1") as lease:
//!         ...  # lease.valid, lease.status; heartbeats run in the library
//! ```
//!
//! Every call that talks to a server releases the GIL (`Python::detach`), so other
//! Python threads run while one waits for an answer or in a server's queue. The
//! library's own thread keeps the heartbeats and never needs the GIL, except to call a
//! queue callback given to `checkout`. Failures are `tally.Error` subclasses; a
//! refusal is `tally.Denied`, carrying the reason's code and fields as attributes.
//! The stubs in `tally.pyi` are the Python-side reference.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tally_client::blocking;
use tally_client::{ClientConfig, ClientError, DenialReason, LeaseStatus, Trust, UnixTime, Want};

create_exception!(
    tally,
    Error,
    PyException,
    "Every failure of the tally library; the subclasses say which kind."
);
create_exception!(
    tally,
    BadInput,
    Error,
    "A bad argument: an unusable vendor key, no server given, a count of 0."
);
create_exception!(
    tally,
    Unavailable,
    Error,
    "No license server could be reached, or it did not answer in time."
);
create_exception!(
    tally,
    Untrusted,
    Error,
    "The server is not vouched for by a trusted vendor key."
);
create_exception!(
    tally,
    Denied,
    Error,
    "The server refused: `reason` is the stable code (`all_seats_in_use`, ...), the \
     reason's fields are attributes (`feature`, `total`, `in_use`, ...) and in `fields`."
);
create_exception!(
    tally,
    ProtocolError,
    Error,
    "The server answered outside the protocol, or could not serve the request."
);

/// The message shown when a closed client is used.
const CLOSED: &str = "the client is closed";

/// Locks a mutex; a panic elsewhere while it was held leaves data that is still whole
/// (an `Option` of a handle), so a poisoned lock is used as it is.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A Python value from anything serde can write, through `json.loads` (the protocol's
/// types are serde types; this keeps their field names as the Python keys).
fn to_python<'py>(py: Python<'py>, value: &impl serde::Serialize) -> PyResult<Bound<'py, PyAny>> {
    let text = serde_json::to_string(value).map_err(|e| Error::new_err(e.to_string()))?;
    py.import("json")?.call_method1("loads", (text,))
}

/// The Python exception for a client error.
fn py_error(py: Python<'_>, e: &ClientError) -> PyErr {
    let message = e.to_string();
    match e {
        ClientError::Denied(denial) => denied(py, &denial.reason, message),
        ClientError::Untrusted(_) => Untrusted::new_err(message),
        ClientError::Config(_) => BadInput::new_err(message),
        ClientError::Protocol(_) | ClientError::Server(_) => ProtocolError::new_err(message),
        ClientError::SeatInUse(_) => Error::new_err(message),
        _ => Unavailable::new_err(message),
    }
}

/// A `tally.Denied` with the reason's code and fields set on it.
fn denied(py: Python<'_>, reason: &DenialReason, message: String) -> PyErr {
    let err = Denied::new_err(message);
    match set_reason(py, &err, reason) {
        Ok(()) => err,
        Err(e) => e,
    }
}

fn set_reason(py: Python<'_>, err: &PyErr, reason: &DenialReason) -> PyResult<()> {
    let value = err.value(py);
    value.setattr("reason", reason.code())?;
    // Every reason names its feature except a few (rate limited, invalid request):
    // `feature` is there on every Denied, None where the reason has none.
    value.setattr("feature", py.None())?;
    let fields = PyDict::new(py);
    // Serde writes a reason as {"Variant": {field: value, ...}}: the inner object's
    // fields are the reason's, under the names the protocol documents.
    if let Ok(serde_json::Value::Object(outer)) = serde_json::to_value(reason) {
        for inner in outer.values() {
            if let serde_json::Value::Object(map) = inner {
                for (name, field) in map {
                    let field = to_python(py, field)?;
                    value.setattr(name.as_str(), &field)?;
                    fields.set_item(name, field)?;
                }
            }
        }
    }
    value.setattr("fields", fields)?;
    Ok(())
}

fn bad_input(message: impl Into<String>) -> PyErr {
    BadInput::new_err(message.into())
}

/// A duration in seconds from Python (int or float, at least 0); `None` is zero.
fn seconds(value: Option<f64>, what: &str) -> PyResult<Duration> {
    match value {
        None => Ok(Duration::ZERO),
        Some(s) => Duration::try_from_secs_f64(s)
            .map_err(|_| bad_input(format!("{what} must be a number of seconds, 0 or more"))),
    }
}

/// The server list: a comma-separated string or a sequence of strings; `None` or
/// empty leaves it to `TALLY_SERVER`.
fn server_list(servers: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<String>> {
    let Some(servers) = servers else {
        return Ok(Vec::new());
    };
    let list: Vec<String> = if let Ok(s) = servers.cast::<PyString>() {
        s.extract::<String>()?
            .split(',')
            .map(String::from)
            .collect()
    } else {
        servers.extract().map_err(|_| {
            bad_input("servers must be a string (\"host:port,host:port\") or a list of strings")
        })?
    };
    Ok(list
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect())
}

/// The vendor key: the armoured text of the `.pub` file (str or bytes), or a path to
/// it (`os.PathLike`, or a str that is not armoured text).
fn vendor_key(key: &Bound<'_, PyAny>) -> PyResult<tally_client::PublicKey> {
    let (text, source) = if let Ok(b) = key.cast::<PyBytes>() {
        let text = String::from_utf8(b.as_bytes().to_vec())
            .map_err(|_| bad_input("the vendor key is not UTF-8 text"))?;
        (text, None)
    } else if let Some(text) = key
        .cast::<PyString>()
        .ok()
        .map(|s| s.extract::<String>())
        .transpose()?
        .filter(|t| t.trim_start().starts_with("-----BEGIN"))
    {
        (text, None)
    } else {
        let path: PathBuf = key.extract().map_err(|_| {
            bad_input("vendor_key must be the public key's text (str or bytes) or a path to the .pub file")
        })?;
        let text = std::fs::read_to_string(&path).map_err(|e| {
            bad_input(format!(
                "cannot read the vendor key file {}: {e}",
                path.display()
            ))
        })?;
        (text, Some(path))
    };
    tally_client::protocol::keys::public_key_from_armored(&text).map_err(|e| match source {
        Some(path) => bad_input(format!("{}: not a tally public key: {e}", path.display())),
        None => bad_input(format!("the vendor public key is not usable: {e}")),
    })
}

/// A connection to a tally license server.
///
/// `Client(servers, vendor_key)` connects to the first reachable server of `servers`
/// that proves it holds a licence signed by `vendor_key`. Use it as a context manager
/// (or call `close()`): closing checks in every lease still held. One client may be
/// used by several threads at once.
#[pyclass(module = "tally", frozen)]
struct Client {
    /// `None` once closed. Calls clone the `Arc` and let the lock go before they
    /// wait, so that threads checking out at once do not queue behind each other.
    inner: Mutex<Option<Arc<blocking::Client>>>,
}

impl Client {
    fn get(&self) -> PyResult<Arc<blocking::Client>> {
        lock(&self.inner)
            .clone()
            .ok_or_else(|| Error::new_err(CLOSED))
    }
}

#[pymethods]
impl Client {
    /// Connects. `servers`: "host:port,host:port" or a list (None: `TALLY_SERVER`).
    /// `vendor_key`: the vendor's public key (the `.pub` file's text, to be shipped in
    /// the product) or a path to the file. `demo=True` trusts `tallyd demo`'s public
    /// demo key instead (never ship that). `user`, `host`, `program` replace this
    /// process's identity (a service checking out for its users); the timeouts are in
    /// seconds (defaults 5 and 10).
    #[new]
    #[pyo3(signature = (servers=None, vendor_key=None, *, demo=false, user=None, host=None, program=None, connect_timeout=None, request_timeout=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        servers: Option<&Bound<'_, PyAny>>,
        vendor_key: Option<&Bound<'_, PyAny>>,
        demo: bool,
        user: Option<String>,
        host: Option<String>,
        program: Option<String>,
        connect_timeout: Option<f64>,
        request_timeout: Option<f64>,
    ) -> PyResult<Client> {
        let servers = server_list(servers)?;
        let trust =
            match (vendor_key.filter(|k| !k.is_none()), demo) {
                (Some(key), demo) => {
                    let mut keys = vec![self::vendor_key(key)?];
                    if demo {
                        keys.extend(Trust::Demo.keys());
                    }
                    Trust::Vendor(keys)
                }
                (None, true) => Trust::Demo,
                (None, false) => return Err(bad_input(
                    "give the vendor public key (vendor_key=...), or demo=True for a demo server",
                )),
            };
        let mut config = ClientConfig::new(servers, trust);
        for (value, slot, what) in [
            (user, &mut config.identity.user, "user"),
            (host, &mut config.identity.host, "host"),
            (program, &mut config.identity.program, "program"),
        ] {
            if let Some(v) = value {
                if v.is_empty() || v.len() > tally_client::protocol::wire::MAX_NAME_LEN {
                    return Err(bad_input(format!(
                        "{what} must be 1 to {} bytes",
                        tally_client::protocol::wire::MAX_NAME_LEN
                    )));
                }
                *slot = v;
            }
        }
        if let Some(t) = connect_timeout {
            config.connect_timeout = seconds(Some(t), "connect_timeout")?;
        }
        if let Some(t) = request_timeout {
            config.request_timeout = seconds(Some(t), "request_timeout")?;
        }
        // `TALLY_LOG=debug` shows the library's log on stderr, as for C programs.
        tally_client::logging::init_from_env();
        let client = py
            .detach(|| blocking::Client::connect(config))
            .map_err(|e| py_error(py, &e))?;
        Ok(Client {
            inner: Mutex::new(Some(Arc::new(client))),
        })
    }

    /// Checks out `count` seats of `feature` for application `version` (checked
    /// against the licence's version ceiling) and `build_date` (Unix seconds, checked
    /// against its maintenance end). With `wait` (seconds) the checkout waits in the
    /// server's queue when no seat is free, calling `on_queue(position)` (1 = next)
    /// whenever its place changes. Returns a `Lease`, which heartbeats in the
    /// background until checked in. Raises `Denied` when refused.
    #[pyo3(signature = (feature, version=None, count=1, wait=None, *, build_date=None, on_queue=None))]
    #[allow(clippy::too_many_arguments)]
    fn checkout(
        &self,
        py: Python<'_>,
        feature: String,
        version: Option<String>,
        count: u32,
        wait: Option<f64>,
        build_date: Option<i64>,
        on_queue: Option<Py<PyAny>>,
    ) -> PyResult<Lease> {
        let client = self.get()?;
        if count == 0 {
            return Err(bad_input("count is 0: ask for at least one seat"));
        }
        let mut want = Want::feature(&feature);
        want.count = count;
        want.version = version;
        want.wait = seconds(wait, "wait")?;
        want.build_date = match build_date {
            None => None,
            Some(d) if d >= 0 => Some(UnixTime(d.unsigned_abs())),
            Some(_) => return Err(bad_input("build_date is negative")),
        };
        // The callback's exception cannot stop the checkout midway: the first one is
        // kept and raised once the checkout returns (checking the seat in again).
        let callback_error: Mutex<Option<PyErr>> = Mutex::new(None);
        let result = py.detach(|| {
            client.checkout_queued(&want, |position| {
                if let Some(f) = &on_queue {
                    Python::attach(|py| {
                        if let Err(e) = f.call1(py, (position,)) {
                            lock(&callback_error).get_or_insert(e);
                        }
                    });
                }
            })
        });
        let lease = result.map_err(|e| py_error(py, &e))?;
        if let Some(e) = lock(&callback_error).take() {
            py.detach(|| drop(lease.checkin()));
            return Err(e);
        }
        let terms = py.detach(|| client.feature_info(&feature)).ok().flatten();
        Ok(Lease::new(lease, terms.and_then(|t| t.expires)))
    }

    /// Borrows `count` seats of `feature` for `period` seconds (a laptop going off
    /// line) into this user's cache, where the library honours them with no server
    /// until they end. Returns the end, Unix seconds. Raises `Denied`
    /// (`borrow_not_allowed`) where the vendor or the site forbids it.
    #[pyo3(signature = (feature, period, count=1, version=None))]
    fn borrow(
        &self,
        py: Python<'_>,
        feature: String,
        period: f64,
        count: u32,
        version: Option<String>,
    ) -> PyResult<u64> {
        let client = self.get()?;
        let period = seconds(Some(period), "period")?;
        if count == 0 || period.as_secs() == 0 {
            return Err(bad_input(
                "count and period must be above 0 (period: whole seconds)",
            ));
        }
        let mut want = Want::feature(&feature);
        want.count = count;
        want.version = version;
        let borrowed = py
            .detach(|| client.borrow(&want, period))
            .map_err(|e| py_error(py, &e))?;
        Ok(borrowed.until.0)
    }

    /// Returns this user's borrowed seats of `feature` to the server early; returns
    /// how many leases were returned.
    fn return_borrowed(&self, py: Python<'_>, feature: String) -> PyResult<usize> {
        let client = self.get()?;
        py.detach(|| client.return_borrowed(&feature))
            .map_err(|e| py_error(py, &e))
    }

    /// The server's status as a dict: `server_time`, `server_fingerprint` and
    /// `features` (a list of dicts with `name`, `total`, `in_use`, `expires`, ...).
    fn status<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let client = self.get()?;
        let status = py
            .detach(|| client.status())
            .map_err(|e| py_error(py, &e))?;
        to_python(py, &status)
    }

    /// The licence terms of `feature` from the vendor-signed bundles of the connected
    /// server, as a dict: `expires` and `maintenance_until` (Unix seconds, None for no
    /// end), `evaluation`, `version_ceiling`, `attributes` (the vendor's key-value
    /// pairs, like FlexLM's vendor string). None if the server does not license it.
    fn terms<'py>(&self, py: Python<'py>, feature: String) -> PyResult<Option<Bound<'py, PyDict>>> {
        let client = self.get()?;
        let Some(info) = py
            .detach(|| client.feature_info(&feature))
            .map_err(|e| py_error(py, &e))?
        else {
            return Ok(None);
        };
        let terms = PyDict::new(py);
        terms.set_item("expires", info.expires.map(|t| t.0))?;
        terms.set_item("evaluation", info.evaluation)?;
        terms.set_item("maintenance_until", info.maintenance_until.map(|t| t.0))?;
        terms.set_item("version_ceiling", info.version_ceiling)?;
        terms.set_item("attributes", info.attributes)?;
        Ok(Some(terms))
    }

    /// What the vendor wants of a program of `feature` that runs without its seat:
    /// `(grace_seconds, action)`, action "warn" or "stop" once the grace has run out.
    fn lost_seat_terms(&self, py: Python<'_>, feature: String) -> PyResult<(u64, &'static str)> {
        let client = self.get()?;
        let terms = py
            .detach(|| client.lost_seat_terms(&feature))
            .map_err(|e| py_error(py, &e))?;
        let action = match terms.action {
            tally_client::grace::OnLostSeat::Warn => "warn",
            tally_client::grace::OnLostSeat::Stop => "stop",
        };
        Ok((terms.grace_secs, action))
    }

    /// Checks every lease in and closes the connection; leases still held then report
    /// status "lost". Closing twice does nothing.
    fn close(&self, py: Python<'_>) {
        let client = lock(&self.inner).take();
        if let Some(client) = client {
            // Another thread in a call still holds its `Arc`: the client closes when
            // that call returns and drops it (blocking::Client's Drop closes it).
            if let Ok(client) = Arc::try_unwrap(client) {
                py.detach(|| client.close());
            }
        }
    }

    /// `with tally.Client(...) as c:` closes the client at the end of the block.
    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// Closes the client; exceptions from the block go on.
    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.close(py);
        false
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Closing waits for the server's answers: let other threads run meanwhile.
        let mut slot = lock(&self.inner).take();
        let _ = Python::try_attach(|py| {
            let client = slot.take();
            py.detach(move || drop(client));
        });
        drop(slot);
    }
}

/// Seats held from a tally server; the library heartbeats them in the background.
///
/// Use it as a context manager or call `checkin()`: the seats go back at the end of
/// the `with` block, also when it raises. `status` and `valid` say whether the seat is
/// still held (check now and then in a long job).
#[pyclass(module = "tally", frozen)]
struct Lease {
    /// `None` once checked in.
    inner: Mutex<Option<blocking::Lease>>,
    /// `L` and 16 hex digits, as `tally status` and the dashboard show it.
    #[pyo3(get)]
    id: String,
    /// The feature.
    #[pyo3(get)]
    feature: String,
    /// Seats held.
    #[pyo3(get)]
    count: u32,
    /// Seconds without a heartbeat after which the server takes the seat back.
    #[pyo3(get)]
    ttl: u64,
    /// True if the seats are beyond the licensed count (overdraft).
    #[pyo3(get)]
    overdraft: bool,
    /// When the licence of the feature ends (Unix seconds), None if permanent or unknown.
    #[pyo3(get)]
    expires: Option<u64>,
}

impl Lease {
    fn new(lease: blocking::Lease, expires: Option<UnixTime>) -> Lease {
        let grant = lease.grant().cloned();
        Lease {
            id: lease.id().map(|id| id.to_string()).unwrap_or_default(),
            feature: grant
                .as_ref()
                .map(|g| g.feature.clone())
                .unwrap_or_default(),
            count: grant.as_ref().map_or(0, |g| g.count),
            ttl: grant.as_ref().map_or(0, |g| g.ttl_secs),
            overdraft: grant.as_ref().is_some_and(|g| g.overdraft),
            expires: expires.map(|t| t.0),
            inner: Mutex::new(Some(lease)),
        }
    }

    fn current(&self) -> LeaseStatus {
        lock(&self.inner)
            .as_ref()
            .map(|l| l.status())
            .unwrap_or_else(|| LeaseStatus::Lost("checked in".into()))
    }
}

#[pymethods]
impl Lease {
    /// "active" (held, heartbeating), "reconnecting" (the server is out of reach; the
    /// library re-attaches the lease), "borrowed" (valid with no server) or "lost"
    /// (the seat is gone: `lost_reason` says why; check out again).
    #[getter]
    fn status(&self) -> &'static str {
        match self.current() {
            LeaseStatus::Active => "active",
            LeaseStatus::Reconnecting => "reconnecting",
            LeaseStatus::Borrowed { .. } => "borrowed",
            LeaseStatus::Lost(_) => "lost",
        }
    }

    /// True while the seat is held (active, reconnecting or borrowed).
    #[getter]
    fn valid(&self) -> bool {
        !matches!(self.current(), LeaseStatus::Lost(_))
    }

    /// Why the lease was lost ("removed by the administrator", "checked in", ...);
    /// None while it is held.
    #[getter]
    fn lost_reason(&self) -> Option<String> {
        match self.current() {
            LeaseStatus::Lost(why) => Some(why),
            _ => None,
        }
    }

    /// Checks the seats in and waits for the server's answer. A second call does
    /// nothing.
    fn checkin(&self, py: Python<'_>) -> PyResult<()> {
        let lease = lock(&self.inner).take();
        match lease {
            Some(l) => py.detach(|| l.checkin()).map_err(|e| py_error(py, &e)),
            None => Ok(()),
        }
    }

    /// `with c.checkout(...) as lease:` checks the lease in at the end of the block.
    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// Checks the lease in. When the block raised, its exception goes on and a failed
    /// checkin is not raised over it (the server takes the seat back after `ttl`).
    #[pyo3(signature = (exc_type, _exc_value, _traceback))]
    fn __exit__(
        &self,
        py: Python<'_>,
        exc_type: &Bound<'_, PyAny>,
        _exc_value: &Bound<'_, PyAny>,
        _traceback: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        let checked_in = self.checkin(py);
        if exc_type.is_none() {
            checked_in?;
        }
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!(
            "<tally.Lease {} {} x{} {}>",
            self.id,
            self.feature,
            self.count,
            self.status()
        )
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // A lease collected while held is checked in; that waits for the server, so
        // other threads run meanwhile. While the interpreter shuts down it cannot be
        // detached from, and the checkin runs with it held.
        let mut slot = lock(&self.inner).take();
        let _ = Python::try_attach(|py| {
            let lease = slot.take();
            py.detach(move || drop(lease));
        });
        drop(slot);
    }
}

/// The module: `Client`, `Lease`, the exceptions, and `__version__`.
#[pymodule]
fn tally(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Client>()?;
    m.add_class::<Lease>()?;
    m.add("Error", py.get_type::<Error>())?;
    m.add("BadInput", py.get_type::<BadInput>())?;
    m.add("Unavailable", py.get_type::<Unavailable>())?;
    m.add("Untrusted", py.get_type::<Untrusted>())?;
    m.add("Denied", py.get_type::<Denied>())?;
    m.add("ProtocolError", py.get_type::<ProtocolError>())?;
    Ok(())
}
