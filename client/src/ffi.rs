//! The C ABI: `client/include/tally.h` (cbindgen writes it to the build's `OUT_DIR`; a
//! test checks that the committed copy is the same).
//!
//! Every function checks its pointers, catches panics (none may cross into C) and
//! reports failures through its return value plus [`tally_last_error`] and
//! [`tally_last_error_code`], which belong to the calling thread and are cleared by
//! every call that succeeds. A refused checkout also sets [`tally_last_denial`]: a
//! `TALLY_DENIED_*` code and the reason's fields. Handles are opaque; each `*_free`
//! accepts NULL.
//!
//! ```c
//! #include "vendor_key.h"   /* static const char VENDOR_KEY[] = "-----BEGIN TALLY PUBLIC KEY-----\n..."; */
//! tally_client *c = tally_connect_key(NULL, VENDOR_KEY);   /* NULL: servers from TALLY_SERVER */
//! if (!c) { fprintf(stderr, "%s\n", tally_last_error()); return 1; }
//! tally_lease *l = tally_checkout(c, "solver", 1, "2027.1");
//! if (!l) { fprintf(stderr, "%s\n", tally_last_error()); return tally_last_error_code(); }
//! ... work, checking tally_lease_status(l) now and then ...
//! tally_checkin(l);
//! tally_client_free(c);
//! ```
//!
//! Thread safety: a `tally_client` may be used by several threads at once (checkouts,
//! borrows and queries run concurrently). A `tally_lease` may be read
//! (`tally_lease_status`, `tally_lease_id`, ...) from any thread, but checked in or freed
//! by one thread, once, while no other thread uses it. Callbacks run on the library's
//! own thread; they must return quickly and must not call `tally_*` functions other
//! than `tally_lease_status`, `tally_lease_id` and `tally_lease_reason`.
//!
//! Ownership: the application owns every handle it is given and frees it exactly once
//! (`tally_checkin` or `tally_lease_free` for a lease, `tally_client_free` for a client,
//! `tally_config_free` for a config). A lease may outlive its client: once the client is
//! freed the lease reports `TALLY_STATUS_LOST` and must still be freed.
#![allow(unsafe_code)]

use crate::blocking;
use crate::{ClientConfig, ClientError, LeaseStatus, Trust, Want};
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;
use tally_protocol::keys::PublicKey;
use tally_protocol::time::UnixTime;
use tally_protocol::wire::{DenialReason, MAX_NAME_LEN};

/// The lease is held and heartbeating.
pub const TALLY_STATUS_ACTIVE: c_int = 0;
/// The connection was lost; the library is reconnecting and will re-attach.
pub const TALLY_STATUS_RECONNECTING: c_int = 1;
/// A borrowed lease, valid without a server.
pub const TALLY_STATUS_BORROWED: c_int = 2;
/// The seat is gone (removed by the administrator, expired, or the client was freed);
/// `tally_lease_reason` says why. Check out again for a new seat.
pub const TALLY_STATUS_LOST: c_int = 3;
/// `tally_lost_seat_terms`: the vendor lets a program without its seat go on, with a
/// warning.
pub const TALLY_ON_LOST_SEAT_WARN: c_int = 0;
/// `tally_lost_seat_terms`: the vendor wants a program without its seat stopped.
pub const TALLY_ON_LOST_SEAT_STOP: c_int = 1;
/// Error code: none (the last call on this thread succeeded).
pub const TALLY_OK: c_int = 0;
/// Error code: invalid argument (NULL, not UTF-8, `count` 0, a malformed key) or no
/// server given.
pub const TALLY_ERR_USAGE: c_int = 64;
/// Error code: no license server reachable.
pub const TALLY_ERR_UNAVAILABLE: c_int = 69;
/// Error code: internal failure (a caught panic).
pub const TALLY_ERR_SOFTWARE: c_int = 70;
/// Error code: the request was refused; `tally_last_denial` says why.
pub const TALLY_ERR_DENIED: c_int = 75;
/// Error code: protocol error.
pub const TALLY_ERR_PROTOCOL: c_int = 76;
/// Error code: the server is not vouched for by a trusted vendor key.
pub const TALLY_ERR_UNTRUSTED: c_int = 77;

/// Denial: the last error was not a denial.
pub const TALLY_DENIED_NONE: c_int = 0;
/// Denial: no bundle on the server licenses the feature.
pub const TALLY_DENIED_NOT_LICENSED: c_int = 1;
/// Denial: every seat is taken (`total`, `in_use`, `requested`; holders in `detail`).
pub const TALLY_DENIED_ALL_SEATS_IN_USE: c_int = 2;
/// Denial: the licence starts later (`date`).
pub const TALLY_DENIED_NOT_YET_VALID: c_int = 3;
/// Denial: the licence expired (`date`: the first instant no longer valid).
pub const TALLY_DENIED_EXPIRED: c_int = 4;
/// Denial: the version is above every licensed ceiling (the ceiling in `detail`).
pub const TALLY_DENIED_VERSION_ABOVE_CEILING: c_int = 5;
/// Denial: the build is newer than maintenance covers (`build_date`, `date`: the
/// maintenance end).
pub const TALLY_DENIED_MAINTENANCE_EXPIRED: c_int = 6;
/// Denial: the site's policy excludes this user or host (the rule in `detail`).
pub const TALLY_DENIED_EXCLUDED: c_int = 7;
/// Denial: the site's policy limits the feature to an include list.
pub const TALLY_DENIED_NOT_INCLUDED: c_int = 8;
/// Denial: a MAX rule of the site's policy (`limit`; whom it caps in `detail`).
pub const TALLY_DENIED_MAX_REACHED: c_int = 9;
/// Denial: the free seats are reserved for others (for whom in `detail`).
pub const TALLY_DENIED_RESERVED_FOR_OTHERS: c_int = 10;
/// Denial: the server's clock moved back (`date`: the latest time it has seen).
pub const TALLY_DENIED_CLOCK_MOVED_BACK: c_int = 11;
/// Denial: no seat became free within the wait (`seconds` waited).
pub const TALLY_DENIED_QUEUE_TIMEOUT: c_int = 12;
/// Denial: borrowing not allowed, or not that long (`seconds`: the longest allowed).
pub const TALLY_DENIED_BORROW_NOT_ALLOWED: c_int = 13;
/// Denial: the request was invalid (what in `detail`).
pub const TALLY_DENIED_INVALID_REQUEST: c_int = 14;
/// Denial: the server cannot record seats right now (what in `detail`); retry later.
pub const TALLY_DENIED_STORAGE_UNAVAILABLE: c_int = 15;
/// Denial: too many checkouts from this address (`retry_after_ms`); retry later.
pub const TALLY_DENIED_RATE_LIMITED: c_int = 16;
/// Denial: the administrator removed this user's seat on this host and the server's
/// hold-off has not ended (`date`: when it ends).
pub const TALLY_DENIED_REMOVED_BY_ADMINISTRATOR: c_int = 17;
/// Denial: more seats asked for than can ever be held at once (`total`: seats
/// licensed, `limit`: with the overdraft, `requested`); waiting cannot help.
pub const TALLY_DENIED_MORE_THAN_EXIST: c_int = 18;
/// Denial: a reason newer than this library; the message says what.
pub const TALLY_DENIED_OTHER: c_int = 99;

/// An opaque client handle.
pub struct TallyClient {
    client: blocking::Client,
}

/// An opaque lease handle.
pub struct TallyLease {
    lease: blocking::Lease,
}

/// An opaque connection configuration (`tally_config_new`), for what the short
/// `tally_connect_*` forms do not offer: several vendor keys, an identity for services,
/// timeouts.
pub struct TallyConfig {
    servers: Vec<String>,
    keys: Vec<PublicKey>,
    demo: bool,
    user: Option<String>,
    host: Option<String>,
    program: Option<String>,
    connect_timeout: Option<Duration>,
    request_timeout: Option<Duration>,
}

/// Why the last request on this thread was refused (`tally_last_denial`). Fields that
/// do not apply to `code` are 0 or "". The strings stay valid until the next `tally_*`
/// call on this thread.
#[repr(C)]
pub struct TallyDenial {
    /// A `TALLY_DENIED_*` value.
    pub code: c_int,
    /// The feature refused ("" if the reason names none).
    pub feature: *const c_char,
    /// The reason's text detail: holders, ceiling, rule, whom a cap or reservation
    /// concerns, what was invalid (see the `TALLY_DENIED_*` values).
    pub detail: *const c_char,
    /// Seats licensed (`ALL_SEATS_IN_USE`, `MORE_THAN_EXIST`).
    pub total: u32,
    /// Seats held (`ALL_SEATS_IN_USE`).
    pub in_use: u32,
    /// Seats asked for (`ALL_SEATS_IN_USE`, `MORE_THAN_EXIST`).
    pub requested: u32,
    /// The cap (`MAX_REACHED`); the seats licensed plus the overdraft
    /// (`ALL_SEATS_IN_USE` of a feature with overdraft seats, `MORE_THAN_EXIST`).
    pub limit: u32,
    /// When to retry, milliseconds (`RATE_LIMITED`).
    pub retry_after_ms: u32,
    /// Seconds waited (`QUEUE_TIMEOUT`) or the longest borrow (`BORROW_NOT_ALLOWED`).
    pub seconds: u64,
    /// A date, Unix seconds (see the `TALLY_DENIED_*` values).
    pub date: i64,
    /// The application's build date, Unix seconds (`MAINTENANCE_EXPIRED`).
    pub build_date: i64,
}

/// A feature's licence terms (`tally_feature_terms`), from the vendor-signed bundles of
/// the connected server.
#[repr(C)]
pub struct TallyTerms {
    /// The first instant (Unix seconds) the feature is no longer licensed; 0: permanent.
    pub expires: i64,
    /// Non-zero for an evaluation licence.
    pub evaluation: c_int,
    /// The latest build date (Unix seconds) maintenance covers; 0: no limit.
    pub maintenance_until: i64,
}

/// Called with a lease's new status (a `TALLY_STATUS_*` value) and the `user` pointer
/// given to `tally_lease_on_change`, on the library's thread.
pub type TallyStatusFn = Option<unsafe extern "C" fn(status: c_int, user: *mut c_void)>;

/// Called with this client's place in the queue (1 = next) whenever it changes while a
/// checkout waits, and the `user` pointer given to `tally_checkout_ex`, on the calling
/// thread.
pub type TallyQueueFn = Option<unsafe extern "C" fn(position: u32, user: *mut c_void)>;

/// The calling thread's last error.
#[derive(Default)]
struct LastError {
    code: c_int,
    message: CString,
    denial: Option<DenialReason>,
    /// The denial's strings, kept here so the pointers in `TallyDenial` stay valid.
    denial_feature: CString,
    denial_detail: CString,
}

thread_local! {
    static LAST_ERROR: RefCell<LastError> = RefCell::new(LastError::default());
}

fn c_string(text: &str) -> CString {
    CString::new(text.replace('\0', " ")).unwrap_or_default()
}

fn set_error(code: c_int, message: &str) {
    LAST_ERROR.with(|e| {
        *e.borrow_mut() = LastError {
            code,
            message: c_string(message),
            ..LastError::default()
        }
    });
}

fn clear_error() {
    LAST_ERROR.with(|e| *e.borrow_mut() = LastError::default());
}

fn client_error(e: &ClientError) {
    let code = match e {
        ClientError::Denied(_) | ClientError::SeatInUse(_) => TALLY_ERR_DENIED,
        ClientError::Untrusted(_) => TALLY_ERR_UNTRUSTED,
        ClientError::Config(_) => TALLY_ERR_USAGE,
        ClientError::Protocol(_) | ClientError::Server(_) => TALLY_ERR_PROTOCOL,
        _ => TALLY_ERR_UNAVAILABLE,
    };
    set_error(code, &e.to_string());
    if let ClientError::Denied(denial) = e {
        LAST_ERROR.with(|last| last.borrow_mut().denial = Some(denial.reason.clone()));
    }
}

/// The `TALLY_DENIED_*` value of a reason, by its stable code.
fn denial_code(reason: &DenialReason) -> c_int {
    match reason.code() {
        "not_licensed" => TALLY_DENIED_NOT_LICENSED,
        "all_seats_in_use" => TALLY_DENIED_ALL_SEATS_IN_USE,
        "not_yet_valid" => TALLY_DENIED_NOT_YET_VALID,
        "expired" => TALLY_DENIED_EXPIRED,
        "version_above_ceiling" => TALLY_DENIED_VERSION_ABOVE_CEILING,
        "maintenance_expired" => TALLY_DENIED_MAINTENANCE_EXPIRED,
        "excluded" => TALLY_DENIED_EXCLUDED,
        "not_included" => TALLY_DENIED_NOT_INCLUDED,
        "max_reached" => TALLY_DENIED_MAX_REACHED,
        "reserved_for_others" => TALLY_DENIED_RESERVED_FOR_OTHERS,
        "clock_moved_back" => TALLY_DENIED_CLOCK_MOVED_BACK,
        "queue_timeout" => TALLY_DENIED_QUEUE_TIMEOUT,
        "borrow_not_allowed" => TALLY_DENIED_BORROW_NOT_ALLOWED,
        "invalid_request" => TALLY_DENIED_INVALID_REQUEST,
        "storage_unavailable" => TALLY_DENIED_STORAGE_UNAVAILABLE,
        "rate_limited" => TALLY_DENIED_RATE_LIMITED,
        "removed_by_administrator" => TALLY_DENIED_REMOVED_BY_ADMINISTRATOR,
        "more_than_exist" => TALLY_DENIED_MORE_THAN_EXIST,
        _ => TALLY_DENIED_OTHER,
    }
}

fn secs(t: UnixTime) -> i64 {
    i64::try_from(t.0).unwrap_or(i64::MAX)
}

/// Reads a C string argument; NULL is `None`.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string valid for the call.
unsafe fn opt_str<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>, ()> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller promises a NUL-terminated string (documented in tally.h).
    match unsafe { CStr::from_ptr(p) }.to_str() {
        Ok(s) => Ok(Some(s)),
        Err(_) => {
            set_error(TALLY_ERR_USAGE, &format!("{what} is not UTF-8"));
            Err(())
        }
    }
}

/// Reads a C string argument that must be given.
///
/// # Safety
/// As [`opt_str`].
unsafe fn req_str<'a>(p: *const c_char, what: &str) -> Result<&'a str, ()> {
    // SAFETY: forwarded from this function's contract.
    match unsafe { opt_str(p, what) }? {
        Some(s) => Ok(s),
        None => {
            set_error(TALLY_ERR_USAGE, &format!("{what} is NULL"));
            Err(())
        }
    }
}

/// Runs `f` with the last error cleared, turning a panic into `TALLY_ERR_SOFTWARE`.
fn guard<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    clear_error();
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(_) => {
            set_error(
                TALLY_ERR_SOFTWARE,
                "internal error in the tally client library",
            );
            fallback
        }
    }
}

/// Copies `text` into the caller's buffer like `snprintf`: at most `len - 1` bytes and
/// a NUL; returns the full length (so a caller can size a buffer with `len` 0).
///
/// # Safety
/// `buf` is NULL (then `len` must be 0) or writable for `len` bytes.
unsafe fn copy_out(text: &str, buf: *mut c_char, len: usize) -> c_int {
    if !buf.is_null() && len > 0 {
        let n = text.len().min(len - 1);
        // SAFETY: the caller promises `len` writable bytes at `buf`; we write n + 1 <= len.
        unsafe {
            std::ptr::copy_nonoverlapping(text.as_ptr().cast::<c_char>(), buf, n);
            *buf.add(n) = 0;
        }
    }
    c_int::try_from(text.len()).unwrap_or(c_int::MAX)
}

/// Splits a comma-separated server list; NULL or blank gives an empty list, which
/// `ClientConfig::new` fills from `TALLY_SERVER`.
fn server_list(servers: Option<&str>) -> Vec<String> {
    servers
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

fn connect(config: ClientConfig) -> *mut TallyClient {
    // A C program has no tracing subscriber of its own: `TALLY_LOG` gets it one.
    crate::logging::init_from_env();
    match blocking::Client::connect(config) {
        Ok(client) => Box::into_raw(Box::new(TallyClient { client })),
        Err(e) => {
            client_error(&e);
            std::ptr::null_mut()
        }
    }
}

fn parse_key(armored: &str) -> Result<PublicKey, ()> {
    tally_protocol::keys::public_key_from_armored(armored).map_err(|e| {
        set_error(
            TALLY_ERR_USAGE,
            &format!("the vendor public key is not usable: {e}"),
        )
    })
}

/// The library's version, e.g. "0.1.0" (static; never freed).
#[no_mangle]
pub extern "C" fn tally_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Connects to the first reachable, trusted server of `servers` (comma-separated
/// `host:port` list; NULL or "" reads `TALLY_SERVER`), trusting only the vendor public
/// key `vendor_key`: the armoured text of the `.pub` file from `tally-publisher
/// keygen`, compiled into the product. Returns NULL on failure; see `tally_last_error`.
///
/// # Safety
/// `servers` is NULL or a NUL-terminated string; `vendor_key` a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tally_connect_key(
    servers: *const c_char,
    vendor_key: *const c_char,
) -> *mut TallyClient {
    guard(std::ptr::null_mut(), || {
        // SAFETY: forwarded from this function's contract.
        let Ok(servers) = (unsafe { opt_str(servers, "servers") }) else {
            return std::ptr::null_mut();
        };
        // SAFETY: forwarded from this function's contract.
        let Ok(armored) = (unsafe { req_str(vendor_key, "vendor_key") }) else {
            return std::ptr::null_mut();
        };
        let Ok(key) = parse_key(armored) else {
            return std::ptr::null_mut();
        };
        connect(ClientConfig::new(
            server_list(servers),
            Trust::Vendor(vec![key]),
        ))
    })
}

/// Connects to a `tallyd demo` server (trusting the public demo vendor key, which
/// anyone can sign with: never ship this). `servers` as for `tally_connect_key`.
///
/// # Safety
/// `servers` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tally_connect_demo(servers: *const c_char) -> *mut TallyClient {
    guard(std::ptr::null_mut(), || {
        // SAFETY: forwarded from this function's contract.
        let Ok(servers) = (unsafe { opt_str(servers, "servers") }) else {
            return std::ptr::null_mut();
        };
        connect(ClientConfig::new(server_list(servers), Trust::Demo))
    })
}

/// For development only; ship `tally_connect_key`. Reads the vendor public key from the
/// file `vendor_key_file` at run time, which a customer can replace with a key of their
/// own (and then run their own server with free seats); or, when `demo` is non-zero and
/// `vendor_key_file` is NULL, trusts the demo key. `servers` as for `tally_connect_key`.
///
/// # Safety
/// `servers` and `vendor_key_file` are NULL or NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn tally_connect(
    servers: *const c_char,
    vendor_key_file: *const c_char,
    demo: c_int,
) -> *mut TallyClient {
    guard(std::ptr::null_mut(), || {
        // SAFETY: forwarded from this function's contract.
        let Ok(servers) = (unsafe { opt_str(servers, "servers") }) else {
            return std::ptr::null_mut();
        };
        // SAFETY: forwarded from this function's contract.
        let Ok(key_file) = (unsafe { opt_str(vendor_key_file, "vendor_key_file") }) else {
            return std::ptr::null_mut();
        };
        let trust = match (key_file, demo != 0) {
            (Some(path), _) => {
                let key = std::fs::read_to_string(path)
                    .map_err(|e| e.to_string())
                    .and_then(|t| {
                        tally_protocol::keys::public_key_from_armored(&t).map_err(|e| e.to_string())
                    });
                match key {
                    Ok(k) => Trust::Vendor(vec![k]),
                    Err(e) => {
                        set_error(TALLY_ERR_USAGE, &format!("{path}: {e}"));
                        return std::ptr::null_mut();
                    }
                }
            }
            (None, true) => Trust::Demo,
            (None, false) => {
                set_error(
                    TALLY_ERR_USAGE,
                    "give a vendor key file, or demo = 1 for a demo server",
                );
                return std::ptr::null_mut();
            }
        };
        connect(ClientConfig::new(server_list(servers), trust))
    })
}

/// A new connection configuration for `servers` (as for `tally_connect_key`), trusting
/// nothing yet: add the vendor key with `tally_config_trust_key`. Free it with
/// `tally_config_free`. Returns NULL on failure.
///
/// # Safety
/// `servers` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tally_config_new(servers: *const c_char) -> *mut TallyConfig {
    guard(std::ptr::null_mut(), || {
        // SAFETY: forwarded from this function's contract.
        let Ok(servers) = (unsafe { opt_str(servers, "servers") }) else {
            return std::ptr::null_mut();
        };
        Box::into_raw(Box::new(TallyConfig {
            servers: server_list(servers),
            keys: Vec::new(),
            demo: false,
            user: None,
            host: None,
            program: None,
            connect_timeout: None,
            request_timeout: None,
        }))
    })
}

/// Runs `f` on a live config; -1 with `TALLY_ERR_USAGE` for NULL.
///
/// # Safety
/// `config` is NULL or a live handle from `tally_config_new`.
unsafe fn with_config(
    config: *mut TallyConfig,
    f: impl FnOnce(&mut TallyConfig) -> c_int,
) -> c_int {
    guard(-1, || {
        // SAFETY: the caller passes NULL or a live pointer from tally_config_new.
        match unsafe { config.as_mut() } {
            Some(c) => f(c),
            None => {
                set_error(TALLY_ERR_USAGE, "config is NULL");
                -1
            }
        }
    })
}

/// Adds a trusted vendor public key (armoured text, as for `tally_connect_key`); call
/// again for a second key (a key rotation). Returns 0, or -1 with `TALLY_ERR_USAGE`.
///
/// # Safety
/// `config` is NULL or a live handle; `vendor_key` a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tally_config_trust_key(
    config: *mut TallyConfig,
    vendor_key: *const c_char,
) -> c_int {
    // SAFETY: forwarded from this function's contract.
    unsafe {
        with_config(config, |c| {
            let Ok(armored) = req_str(vendor_key, "vendor_key") else {
                return -1;
            };
            match parse_key(armored) {
                Ok(key) => {
                    c.keys.push(key);
                    0
                }
                Err(()) => -1,
            }
        })
    }
}

/// Trusts the public demo vendor key too (for `tallyd demo`; never ship this).
///
/// # Safety
/// `config` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn tally_config_trust_demo(config: *mut TallyConfig) -> c_int {
    // SAFETY: forwarded from this function's contract.
    unsafe {
        with_config(config, |c| {
            c.demo = true;
            0
        })
    }
}

/// Sets who this client says it is, for a service that checks out for its users (the
/// server shows, counts and applies its policy to this identity). NULL keeps this
/// process's value (login name, host name, program name). Returns 0, or -1 with
/// `TALLY_ERR_USAGE` for an empty or overlong (over 256 bytes) value.
///
/// # Safety
/// `config` is NULL or a live handle; the others NULL or NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn tally_config_identity(
    config: *mut TallyConfig,
    user: *const c_char,
    host: *const c_char,
    program: *const c_char,
) -> c_int {
    // SAFETY: forwarded from this function's contract.
    unsafe {
        with_config(config, |c| {
            let mut values = [None, None, None];
            for (slot, (p, what)) in
                values
                    .iter_mut()
                    .zip([(user, "user"), (host, "host"), (program, "program")])
            {
                let Ok(v) = opt_str(p, what) else { return -1 };
                if let Some(v) = v {
                    if v.is_empty() || v.len() > MAX_NAME_LEN {
                        set_error(
                            TALLY_ERR_USAGE,
                            &format!("{what} must be 1 to {MAX_NAME_LEN} bytes"),
                        );
                        return -1;
                    }
                    *slot = Some(v.to_string());
                }
            }
            let [u, h, p] = values;
            c.user = u.or(c.user.take());
            c.host = h.or(c.host.take());
            c.program = p.or(c.program.take());
            0
        })
    }
}

/// Sets the time allowed to connect to one server and for one request, milliseconds
/// (0 keeps the default: 5000 and 10000).
///
/// # Safety
/// `config` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn tally_config_timeouts(
    config: *mut TallyConfig,
    connect_ms: u32,
    request_ms: u32,
) -> c_int {
    // SAFETY: forwarded from this function's contract.
    unsafe {
        with_config(config, |c| {
            let ms = |v: u32| (v > 0).then(|| Duration::from_millis(v.into()));
            c.connect_timeout = ms(connect_ms);
            c.request_timeout = ms(request_ms);
            0
        })
    }
}

/// Connects with `config` (which stays the caller's to free). Returns NULL on failure;
/// `TALLY_ERR_USAGE` if no key is trusted.
///
/// # Safety
/// `config` is NULL or a live handle from `tally_config_new`.
#[no_mangle]
pub unsafe extern "C" fn tally_connect_config(config: *const TallyConfig) -> *mut TallyClient {
    guard(std::ptr::null_mut(), || {
        // SAFETY: the caller passes NULL or a live pointer from tally_config_new.
        let Some(c) = (unsafe { config.as_ref() }) else {
            set_error(TALLY_ERR_USAGE, "config is NULL");
            return std::ptr::null_mut();
        };
        let trust = match (c.keys.is_empty(), c.demo) {
            (true, false) => {
                set_error(
                    TALLY_ERR_USAGE,
                    "no vendor key trusted: call tally_config_trust_key first",
                );
                return std::ptr::null_mut();
            }
            (true, true) => Trust::Demo,
            (false, demo) => {
                let mut keys = c.keys.clone();
                if demo {
                    keys.extend(Trust::Demo.keys());
                }
                Trust::Vendor(keys)
            }
        };
        let mut config = ClientConfig::new(c.servers.clone(), trust);
        if let Some(u) = &c.user {
            config.identity.user = u.clone();
        }
        if let Some(h) = &c.host {
            config.identity.host = h.clone();
        }
        if let Some(p) = &c.program {
            config.identity.program = p.clone();
        }
        if let Some(t) = c.connect_timeout {
            config.connect_timeout = t;
        }
        if let Some(t) = c.request_timeout {
            config.request_timeout = t;
        }
        connect(config)
    })
}

/// Frees a config. NULL is ignored.
///
/// # Safety
/// `config` is NULL or a live handle from `tally_config_new`; invalid afterwards.
#[no_mangle]
pub unsafe extern "C" fn tally_config_free(config: *mut TallyConfig) {
    guard((), || {
        if !config.is_null() {
            // SAFETY: from Box::into_raw in tally_config_new; dropped exactly once here.
            drop(unsafe { Box::from_raw(config) });
        }
    })
}

/// Checks out `count` seats of `feature` for application version `version` (may be
/// NULL). The lease heartbeats in the background. Returns NULL on failure (a denial is
/// `TALLY_ERR_DENIED`, with the reason in `tally_last_denial`; `count` 0 is
/// `TALLY_ERR_USAGE`).
///
/// # Safety
/// `client` is NULL or a live handle from `tally_connect*`; `feature` and `version` are
/// NULL or NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn tally_checkout(
    client: *mut TallyClient,
    feature: *const c_char,
    count: u32,
    version: *const c_char,
) -> *mut TallyLease {
    // SAFETY: forwarded from this function's contract.
    unsafe {
        tally_checkout_ex(
            client,
            feature,
            count,
            version,
            0,
            0,
            None,
            std::ptr::null_mut(),
        )
    }
}

/// `tally_checkout` with the application's build date (`build_date`, Unix seconds, 0
/// for none; a build newer than the licence's maintenance end is refused with
/// `TALLY_DENIED_MAINTENANCE_EXPIRED`) and a wait: with `wait_secs` above 0 the checkout
/// waits in the server's queue for up to that long when no seat is free (then
/// `TALLY_DENIED_QUEUE_TIMEOUT`), calling `on_queue` (may be NULL) with the client's
/// place in the queue whenever it changes.
///
/// # Safety
/// As `tally_checkout`; `on_queue` is NULL or a function that may be called with `user`
/// on this thread during the call.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn tally_checkout_ex(
    client: *mut TallyClient,
    feature: *const c_char,
    count: u32,
    version: *const c_char,
    build_date: i64,
    wait_secs: u32,
    on_queue: TallyQueueFn,
    user: *mut c_void,
) -> *mut TallyLease {
    guard(std::ptr::null_mut(), || {
        // SAFETY: the caller passes NULL or a pointer from tally_connect, not yet freed.
        let Some(client) = (unsafe { client.as_ref() }) else {
            set_error(TALLY_ERR_USAGE, "client is NULL");
            return std::ptr::null_mut();
        };
        // SAFETY: forwarded from this function's contract.
        let Ok(feature) = (unsafe { req_str(feature, "feature") }) else {
            return std::ptr::null_mut();
        };
        // SAFETY: forwarded from this function's contract.
        let Ok(version) = (unsafe { opt_str(version, "version") }) else {
            return std::ptr::null_mut();
        };
        if count == 0 {
            set_error(TALLY_ERR_USAGE, "count is 0: ask for at least one seat");
            return std::ptr::null_mut();
        }
        if build_date < 0 {
            set_error(TALLY_ERR_USAGE, "build_date is negative");
            return std::ptr::null_mut();
        }
        let mut want = Want::feature(feature);
        want.count = count;
        want.version = version.map(String::from);
        want.build_date = (build_date > 0).then(|| UnixTime(build_date.unsigned_abs()));
        want.wait = Duration::from_secs(wait_secs.into());
        let tell = |position: u32| {
            if let Some(f) = on_queue {
                // SAFETY: the caller gave a callable function for `user` (see above).
                unsafe { f(position, user) }
            }
        };
        match client.client.checkout_queued(&want, tell) {
            Ok(lease) => Box::into_raw(Box::new(TallyLease { lease })),
            Err(e) => {
                client_error(&e);
                std::ptr::null_mut()
            }
        }
    })
}

/// The vendor's terms for a program of `feature` that runs without its seat (its lease
/// `TALLY_STATUS_RECONNECTING` or `TALLY_STATUS_LOST`): writes the grace in seconds to
/// `*grace_secs` and returns `TALLY_ON_LOST_SEAT_WARN` or `TALLY_ON_LOST_SEAT_STOP`, what
/// the program should do once the grace has run out; -1 with `tally_last_error` set on
/// failure. The library only reports the terms; the application keeps the clock.
///
/// # Safety
/// `client` is NULL or a live handle from `tally_connect*`; `feature` is NULL or a
/// NUL-terminated string; `grace_secs` is NULL or points to a writable `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn tally_lost_seat_terms(
    client: *const TallyClient,
    feature: *const c_char,
    grace_secs: *mut u64,
) -> c_int {
    guard(-1, || {
        // SAFETY: the caller passes NULL or a pointer from tally_connect, not yet freed.
        let Some(client) = (unsafe { client.as_ref() }) else {
            set_error(TALLY_ERR_USAGE, "client is NULL");
            return -1;
        };
        // SAFETY: forwarded from this function's contract.
        let Ok(feature) = (unsafe { req_str(feature, "feature") }) else {
            return -1;
        };
        // SAFETY: the caller passes NULL or a writable, aligned uint64_t.
        let Some(out) = (unsafe { grace_secs.as_mut() }) else {
            set_error(TALLY_ERR_USAGE, "grace_secs is NULL");
            return -1;
        };
        match client.client.lost_seat_terms(feature) {
            Ok(terms) => {
                *out = terms.grace_secs;
                match terms.action {
                    crate::grace::OnLostSeat::Warn => TALLY_ON_LOST_SEAT_WARN,
                    crate::grace::OnLostSeat::Stop => TALLY_ON_LOST_SEAT_STOP,
                }
            }
            Err(e) => {
                client_error(&e);
                -1
            }
        }
    })
}

/// The licence terms of a feature, or `TALLY_ERR_DENIED` with
/// `TALLY_DENIED_NOT_LICENSED` when the server does not license it.
fn feature_info(client: &TallyClient, feature: &str) -> Option<crate::FeatureInfo> {
    match client.client.feature_info(feature) {
        Ok(Some(info)) => Some(info),
        Ok(None) => {
            client_error(&ClientError::Denied(tally_protocol::wire::Denial {
                reason: DenialReason::NotLicensed {
                    feature: feature.to_string(),
                },
            }));
            None
        }
        Err(e) => {
            client_error(&e);
            None
        }
    }
}

/// Writes the licence terms of `feature` (expiry, evaluation, maintenance end) to
/// `*info`. Returns 0, or -1 (`TALLY_ERR_DENIED` with `TALLY_DENIED_NOT_LICENSED` when
/// the server does not license it).
///
/// # Safety
/// `client` is NULL or a live handle; `feature` a NUL-terminated string; `info` NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn tally_feature_terms(
    client: *const TallyClient,
    feature: *const c_char,
    info: *mut TallyTerms,
) -> c_int {
    guard(-1, || {
        // SAFETY: the caller passes NULL or a pointer from tally_connect, not yet freed.
        let Some(client) = (unsafe { client.as_ref() }) else {
            set_error(TALLY_ERR_USAGE, "client is NULL");
            return -1;
        };
        // SAFETY: forwarded from this function's contract.
        let Ok(feature) = (unsafe { req_str(feature, "feature") }) else {
            return -1;
        };
        // SAFETY: the caller passes NULL or a writable struct.
        let Some(out) = (unsafe { info.as_mut() }) else {
            set_error(TALLY_ERR_USAGE, "info is NULL");
            return -1;
        };
        let Some(terms) = feature_info(client, feature) else {
            return -1;
        };
        *out = TallyTerms {
            expires: terms.expires.map_or(0, secs),
            evaluation: terms.evaluation.into(),
            maintenance_until: terms.maintenance_until.map_or(0, secs),
        };
        0
    })
}

/// The vendor's attribute `key` of `feature` (like FlexLM's `lc_auth_data`: `edition`,
/// `max_cores`), copied into `buf` (`len` bytes, NUL-terminated, cut to fit) from the
/// vendor-signed bundles. Returns the value's full length (call with `len` 0 to size a
/// buffer), or -1: not licensed (`TALLY_ERR_DENIED`) or no such attribute
/// (`TALLY_ERR_USAGE`).
///
/// # Safety
/// `client` is NULL or a live handle; `feature` and `key` NUL-terminated strings; `buf`
/// NULL (with `len` 0) or writable for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn tally_attribute(
    client: *const TallyClient,
    feature: *const c_char,
    key: *const c_char,
    buf: *mut c_char,
    len: usize,
) -> c_int {
    guard(-1, || {
        // SAFETY: the caller passes NULL or a pointer from tally_connect, not yet freed.
        let Some(client) = (unsafe { client.as_ref() }) else {
            set_error(TALLY_ERR_USAGE, "client is NULL");
            return -1;
        };
        // SAFETY: forwarded from this function's contract.
        let (Ok(feature), Ok(key)) =
            (unsafe { (req_str(feature, "feature"), req_str(key, "key")) })
        else {
            return -1;
        };
        let Some(terms) = feature_info(client, feature) else {
            return -1;
        };
        match terms.attributes.get(key) {
            // SAFETY: forwarded from this function's contract.
            Some(value) => unsafe { copy_out(value, buf, len) },
            None => {
                set_error(
                    TALLY_ERR_USAGE,
                    &format!("'{feature}' has no attribute '{key}'"),
                );
                -1
            }
        }
    })
}

/// Borrows `count` seats of `feature` for `period_secs` (a laptop going off line) into
/// the per-user cache, where the library and `tally run` honour them with no server
/// until they end; writes the end (Unix seconds) to `*until` (may be NULL). Returns 0,
/// or -1 (`TALLY_DENIED_BORROW_NOT_ALLOWED` when the vendor or site forbids it).
///
/// # Safety
/// `client` is NULL or a live handle; `feature` a NUL-terminated string, `version` NULL
/// or one; `until` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tally_borrow(
    client: *const TallyClient,
    feature: *const c_char,
    count: u32,
    version: *const c_char,
    period_secs: u64,
    until: *mut i64,
) -> c_int {
    guard(-1, || {
        // SAFETY: the caller passes NULL or a pointer from tally_connect, not yet freed.
        let Some(client) = (unsafe { client.as_ref() }) else {
            set_error(TALLY_ERR_USAGE, "client is NULL");
            return -1;
        };
        // SAFETY: forwarded from this function's contract.
        let Ok(feature) = (unsafe { req_str(feature, "feature") }) else {
            return -1;
        };
        // SAFETY: forwarded from this function's contract.
        let Ok(version) = (unsafe { opt_str(version, "version") }) else {
            return -1;
        };
        if count == 0 || period_secs == 0 {
            set_error(TALLY_ERR_USAGE, "count and period_secs must be above 0");
            return -1;
        }
        let mut want = Want::feature(feature);
        want.count = count;
        want.version = version.map(String::from);
        match client
            .client
            .borrow(&want, Duration::from_secs(period_secs))
        {
            Ok(borrowed) => {
                // SAFETY: the caller passes NULL or a writable int64_t.
                if let Some(out) = unsafe { until.as_mut() } {
                    *out = secs(borrowed.until);
                }
                0
            }
            Err(e) => {
                client_error(&e);
                -1
            }
        }
    })
}

/// Returns this user's borrowed seats of `feature` from the connected server early.
/// Returns how many leases were returned, or -1.
///
/// # Safety
/// `client` is NULL or a live handle; `feature` a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tally_return(client: *const TallyClient, feature: *const c_char) -> c_int {
    guard(-1, || {
        // SAFETY: the caller passes NULL or a pointer from tally_connect, not yet freed.
        let Some(client) = (unsafe { client.as_ref() }) else {
            set_error(TALLY_ERR_USAGE, "client is NULL");
            return -1;
        };
        // SAFETY: forwarded from this function's contract.
        let Ok(feature) = (unsafe { req_str(feature, "feature") }) else {
            return -1;
        };
        match client.client.return_borrowed(feature) {
            Ok(n) => c_int::try_from(n).unwrap_or(c_int::MAX),
            Err(e) => {
                client_error(&e);
                -1
            }
        }
    })
}

/// Reads a live lease; NULL sets `TALLY_ERR_USAGE`.
///
/// # Safety
/// `lease` is NULL or a live handle from `tally_checkout*`.
unsafe fn lease_ref<'a>(lease: *const TallyLease) -> Option<&'a TallyLease> {
    // SAFETY: forwarded from this function's contract.
    let lease = unsafe { lease.as_ref() };
    if lease.is_none() {
        set_error(TALLY_ERR_USAGE, "lease is NULL");
    }
    lease
}

fn status_code(status: &LeaseStatus) -> c_int {
    match status {
        LeaseStatus::Active => TALLY_STATUS_ACTIVE,
        LeaseStatus::Reconnecting => TALLY_STATUS_RECONNECTING,
        LeaseStatus::Borrowed { .. } => TALLY_STATUS_BORROWED,
        LeaseStatus::Lost(_) => TALLY_STATUS_LOST,
    }
}

/// The lease's status: one of the `TALLY_STATUS_*` values (a lost lease is a status, not
/// an error: `tally_lease_reason` says why), or -1 for a NULL lease.
///
/// # Safety
/// `lease` is NULL or a live handle from `tally_checkout*`.
#[no_mangle]
pub unsafe extern "C" fn tally_lease_status(lease: *const TallyLease) -> c_int {
    guard(-1, || {
        // SAFETY: forwarded from this function's contract.
        match unsafe { lease_ref(lease) } {
            Some(l) => status_code(&l.lease.status()),
            None => -1,
        }
    })
}

/// Why a lost lease was lost ("removed by the administrator", ...), copied into `buf`
/// like `tally_attribute`; "" (length 0) while the lease is not lost. -1 for NULL.
///
/// # Safety
/// `lease` is NULL or a live handle; `buf` NULL (with `len` 0) or writable for `len`.
#[no_mangle]
pub unsafe extern "C" fn tally_lease_reason(
    lease: *const TallyLease,
    buf: *mut c_char,
    len: usize,
) -> c_int {
    guard(-1, || {
        // SAFETY: forwarded from this function's contract.
        let Some(l) = (unsafe { lease_ref(lease) }) else {
            return -1;
        };
        let why = match l.lease.status() {
            LeaseStatus::Lost(why) => why,
            _ => String::new(),
        };
        // SAFETY: forwarded from this function's contract.
        unsafe { copy_out(&why, buf, len) }
    })
}

/// The lease id (what `tally status` and the server's dashboard show as `L` and 16 hex
/// digits), or 0 for NULL.
///
/// # Safety
/// `lease` is NULL or a live handle from `tally_checkout*`.
#[no_mangle]
pub unsafe extern "C" fn tally_lease_id(lease: *const TallyLease) -> u64 {
    guard(0, || {
        // SAFETY: forwarded from this function's contract.
        unsafe { lease_ref(lease) }
            .and_then(|l| l.lease.id())
            .map_or(0, |id| id.0)
    })
}

/// Calls `callback(status, user)` on the library's thread whenever the lease's status
/// changes (reconnecting, active again, lost; also lost when its client is freed).
/// Replaces an earlier callback; NULL removes it. No call happens after
/// `tally_checkin` or `tally_lease_free` has returned. Returns 0, or -1 for NULL.
///
/// # Safety
/// `lease` is NULL or a live handle that no other thread checks in or frees during the
/// call; `callback` is NULL or a function that may be called with `user` from another
/// thread until the lease is freed.
#[no_mangle]
pub unsafe extern "C" fn tally_lease_on_change(
    lease: *mut TallyLease,
    callback: TallyStatusFn,
    user: *mut c_void,
) -> c_int {
    /// The application's pointer, handed to its callback on the library's thread (which
    /// the application allowed by passing it).
    struct UserData(*mut c_void);
    // SAFETY: the caller promises `user` may be used from the library's thread.
    unsafe impl Send for UserData {}
    guard(-1, || {
        // SAFETY: the caller passes NULL or a live pointer, used by this thread alone.
        let Some(l) = (unsafe { lease.as_mut() }) else {
            set_error(TALLY_ERR_USAGE, "lease is NULL");
            return -1;
        };
        match callback {
            Some(f) => {
                let user = UserData(user);
                l.lease.on_change(move |status| {
                    let user = &user;
                    // SAFETY: the caller gave a function callable with `user` from this
                    // thread; a panic cannot come out of C code.
                    unsafe { f(status_code(status), user.0) }
                });
            }
            None => l.lease.on_change(|_| {}),
        }
        0
    })
}

/// Checks the lease in, waits for the server's answer, and frees the handle (also on
/// failure). Returns 0, or -1 with `tally_last_error` set.
///
/// # Safety
/// `lease` is NULL or a live handle from `tally_checkout*`; it is invalid afterwards.
#[no_mangle]
pub unsafe extern "C" fn tally_checkin(lease: *mut TallyLease) -> c_int {
    guard(-1, || {
        if lease.is_null() {
            set_error(TALLY_ERR_USAGE, "lease is NULL");
            return -1;
        }
        // SAFETY: non-NULL and from Box::into_raw in tally_checkout; ownership returns here.
        let lease = unsafe { Box::from_raw(lease) };
        match lease.lease.checkin() {
            Ok(()) => 0,
            Err(e) => {
                client_error(&e);
                -1
            }
        }
    })
}

/// Frees a lease handle, checking the lease in. NULL is ignored.
///
/// # Safety
/// `lease` is NULL or a live handle from `tally_checkout*`; it is invalid afterwards.
#[no_mangle]
pub unsafe extern "C" fn tally_lease_free(lease: *mut TallyLease) {
    guard((), || {
        if !lease.is_null() {
            // SAFETY: from Box::into_raw in tally_checkout; dropped exactly once here.
            drop(unsafe { Box::from_raw(lease) });
        }
    })
}

/// Closes the client (checking in its leases) and frees it. NULL is ignored. Its lease
/// handles stay valid (reporting `TALLY_STATUS_LOST`) until freed.
///
/// # Safety
/// `client` is NULL or a live handle from `tally_connect*`, which no other thread uses;
/// it is invalid afterwards.
#[no_mangle]
pub unsafe extern "C" fn tally_client_free(client: *mut TallyClient) {
    guard((), || {
        if !client.is_null() {
            // SAFETY: from Box::into_raw in tally_connect; dropped exactly once here.
            let client = unsafe { Box::from_raw(client) };
            client.client.close();
        }
    })
}

/// The last error message of the calling thread ("" if the last call succeeded). The
/// pointer stays valid until the next tally call on this thread.
#[no_mangle]
pub extern "C" fn tally_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().message.as_ptr())
}

/// The last error code of the calling thread (a `TALLY_ERR_*` value; `TALLY_OK` if the
/// last call succeeded).
#[no_mangle]
pub extern "C" fn tally_last_error_code() -> c_int {
    LAST_ERROR.with(|e| e.borrow().code)
}

/// The `TALLY_DENIED_*` code of the last error of the calling thread
/// (`TALLY_DENIED_NONE` if it was not a denial).
#[no_mangle]
pub extern "C" fn tally_last_denial_code() -> c_int {
    LAST_ERROR.with(|e| {
        e.borrow()
            .denial
            .as_ref()
            .map_or(TALLY_DENIED_NONE, denial_code)
    })
}

/// Fills `*out` with the reason of the calling thread's last denial. Returns 0, or -1
/// when the last error was not a denial (or `out` is NULL). Does not change the last
/// error.
///
/// # Safety
/// `out` is NULL or points to a writable `tally_denial`.
#[no_mangle]
pub unsafe extern "C" fn tally_last_denial(out: *mut TallyDenial) -> c_int {
    // SAFETY: the caller passes NULL or a writable struct.
    let Some(out) = (unsafe { out.as_mut() }) else {
        return -1;
    };
    LAST_ERROR.with(|e| {
        let mut e = e.borrow_mut();
        let Some(reason) = e.denial.clone() else {
            return -1;
        };
        let mut d = TallyDenial {
            code: denial_code(&reason),
            feature: std::ptr::null(),
            detail: std::ptr::null(),
            total: 0,
            in_use: 0,
            requested: 0,
            limit: 0,
            retry_after_ms: 0,
            seconds: 0,
            date: 0,
            build_date: 0,
        };
        let (feature, detail): (String, String) = match reason {
            DenialReason::NotLicensed { feature } | DenialReason::NotIncluded { feature } => {
                (feature, String::new())
            }
            DenialReason::AllSeatsInUse {
                feature,
                total,
                in_use,
                requested,
                holders,
            } => {
                (d.total, d.in_use, d.requested) = (total, in_use, requested);
                (feature, holders.join(", "))
            }
            // All seats in use, the overdraft counted: `limit` is licensed + overdraft.
            DenialReason::OverdraftInUse {
                feature,
                total,
                overdraft,
                in_use,
                requested,
                holders,
            } => {
                (d.total, d.in_use, d.requested) = (total, in_use, requested);
                d.limit = total.saturating_add(overdraft);
                (feature, holders.join(", "))
            }
            DenialReason::MoreThanExist {
                feature,
                requested,
                total,
                overdraft,
            } => {
                (d.total, d.requested) = (total, requested);
                d.limit = total.saturating_add(overdraft);
                (feature, String::new())
            }
            DenialReason::NotYetValid { feature, starts } => {
                d.date = secs(starts);
                (feature, String::new())
            }
            DenialReason::Expired { feature, expired } => {
                d.date = secs(expired);
                (feature, String::new())
            }
            DenialReason::VersionAboveCeiling {
                feature, ceiling, ..
            } => (feature, ceiling),
            DenialReason::MaintenanceExpired {
                feature,
                build_date,
                maintenance_until,
            } => {
                d.date = secs(maintenance_until);
                d.build_date = secs(build_date);
                (feature, String::new())
            }
            DenialReason::Excluded { feature, rule } => (feature, rule),
            DenialReason::MaxReached {
                feature,
                limit,
                who,
            } => {
                d.limit = limit;
                (feature, who)
            }
            DenialReason::ReservedForOthers {
                feature,
                reserved_for,
            } => (feature, reserved_for.join(", ")),
            DenialReason::ClockMovedBack {
                feature,
                high_water,
                ..
            } => {
                d.date = secs(high_water);
                (feature, String::new())
            }
            DenialReason::QueueTimeout {
                feature,
                waited_secs,
            } => {
                d.seconds = waited_secs.into();
                (feature, String::new())
            }
            DenialReason::BorrowNotAllowed {
                feature,
                limit_secs,
            } => {
                d.seconds = limit_secs;
                (feature, String::new())
            }
            DenialReason::InvalidRequest { what } | DenialReason::StorageUnavailable { what } => {
                (String::new(), what)
            }
            DenialReason::RateLimited { retry_after_ms } => {
                d.retry_after_ms = retry_after_ms;
                (String::new(), String::new())
            }
            DenialReason::RemovedByAdministrator { feature, until } => {
                d.date = secs(until);
                (feature, String::new())
            }
            other => (String::new(), other.to_string()),
        };
        e.denial_feature = c_string(&feature);
        e.denial_detail = c_string(&detail);
        d.feature = e.denial_feature.as_ptr();
        d.detail = e.denial_detail.as_ptr();
        *out = d;
        0
    })
}

/// The stable name of a `TALLY_DENIED_*` code ("all_seats_in_use", as in the server's
/// reports and metrics); "unknown" for other values. Static; never freed.
#[no_mangle]
pub extern "C" fn tally_denial_name(code: c_int) -> *const c_char {
    let name: &'static str = match code {
        TALLY_DENIED_NONE => "none\0",
        TALLY_DENIED_NOT_LICENSED => "not_licensed\0",
        TALLY_DENIED_ALL_SEATS_IN_USE => "all_seats_in_use\0",
        TALLY_DENIED_NOT_YET_VALID => "not_yet_valid\0",
        TALLY_DENIED_EXPIRED => "expired\0",
        TALLY_DENIED_VERSION_ABOVE_CEILING => "version_above_ceiling\0",
        TALLY_DENIED_MAINTENANCE_EXPIRED => "maintenance_expired\0",
        TALLY_DENIED_EXCLUDED => "excluded\0",
        TALLY_DENIED_NOT_INCLUDED => "not_included\0",
        TALLY_DENIED_MAX_REACHED => "max_reached\0",
        TALLY_DENIED_RESERVED_FOR_OTHERS => "reserved_for_others\0",
        TALLY_DENIED_CLOCK_MOVED_BACK => "clock_moved_back\0",
        TALLY_DENIED_QUEUE_TIMEOUT => "queue_timeout\0",
        TALLY_DENIED_BORROW_NOT_ALLOWED => "borrow_not_allowed\0",
        TALLY_DENIED_INVALID_REQUEST => "invalid_request\0",
        TALLY_DENIED_STORAGE_UNAVAILABLE => "storage_unavailable\0",
        TALLY_DENIED_RATE_LIMITED => "rate_limited\0",
        TALLY_DENIED_REMOVED_BY_ADMINISTRATOR => "removed_by_administrator\0",
        TALLY_DENIED_MORE_THAN_EXIST => "more_than_exist\0",
        TALLY_DENIED_OTHER => "other\0",
        _ => "unknown\0",
    };
    name.as_ptr().cast()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_header_is_the_generated_one() {
        let generated = include_str!(concat!(env!("OUT_DIR"), "/tally.h"));
        let committed = include_str!("../include/tally.h");
        assert!(
            generated == committed,
            "client/include/tally.h is stale: copy {}/tally.h over it",
            env!("OUT_DIR")
        );
    }

    #[test]
    fn every_denial_code_has_its_own_constant_and_name() {
        let reasons = [
            "not_licensed",
            "all_seats_in_use",
            "not_yet_valid",
            "expired",
            "version_above_ceiling",
            "maintenance_expired",
            "excluded",
            "not_included",
            "max_reached",
            "reserved_for_others",
            "clock_moved_back",
            "queue_timeout",
            "borrow_not_allowed",
            "invalid_request",
            "storage_unavailable",
            "rate_limited",
            "removed_by_administrator",
        ];
        let mut seen = std::collections::BTreeSet::new();
        for code in 1..=17 {
            // SAFETY: tally_denial_name returns a static NUL-terminated string.
            let name = unsafe { CStr::from_ptr(tally_denial_name(code)) }
                .to_str()
                .unwrap();
            assert_eq!(name, reasons[(code - 1) as usize]);
            assert!(seen.insert(name));
        }
        let rate = DenialReason::RateLimited { retry_after_ms: 5 };
        assert_eq!(denial_code(&rate), TALLY_DENIED_RATE_LIMITED);
        let removed = DenialReason::RemovedByAdministrator {
            feature: "f".into(),
            until: UnixTime(1),
        };
        assert_eq!(denial_code(&removed), TALLY_DENIED_REMOVED_BY_ADMINISTRATOR);
        let busy = DenialReason::AllSeatsInUse {
            feature: "f".into(),
            total: 1,
            in_use: 1,
            requested: 1,
            holders: vec![],
        };
        assert_eq!(denial_code(&busy), TALLY_DENIED_ALL_SEATS_IN_USE);
    }

    #[test]
    fn a_failure_sets_the_error_and_the_next_success_clears_it() {
        // (`count = 0` against a real server is in tests/tests/c_api.rs.)
        let feature = CString::new("solver").unwrap();
        // SAFETY: valid C strings; NULL client is allowed.
        let lease =
            unsafe { tally_checkout(std::ptr::null_mut(), feature.as_ptr(), 0, std::ptr::null()) };
        assert!(lease.is_null());
        assert_eq!(tally_last_error_code(), TALLY_ERR_USAGE);
        // A call that succeeds clears it.
        // SAFETY: NULL is accepted.
        unsafe { tally_lease_free(std::ptr::null_mut()) };
        assert_eq!(tally_last_error_code(), TALLY_OK);
        // SAFETY: static string.
        assert_eq!(
            unsafe { CStr::from_ptr(tally_last_error()) }.to_bytes(),
            b""
        );
    }
}
