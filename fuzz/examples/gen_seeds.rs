//! Writes the seed corpora under `fuzz/seeds/<target>/` from real files and real
//! encodings: frames of every message, the demo bundle and a bundle issued from the
//! FlexLM sample, an activation request and return proof, a usage report, and the
//! packaged config, policy and license files.
//!
//! Deterministic (fixed keys and times, ed25519 signatures are deterministic), so running
//! it again changes no file unless an encoding changed:
//!
//! ```sh
//! cargo run --manifest-path fuzz/Cargo.toml --example gen_seeds
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tally_fuzz::{decode, raw, server_key};
use tally_protocol::activation::{self, ActivationRequest, ReturnProof};
use tally_protocol::armor::dearmor_limited;
use tally_protocol::bundle::{self, Binding, Bundle, Component, Customer, FeatureGrant, Seats};
use tally_protocol::frame;
use tally_protocol::keys::{demo, fingerprint_of};
use tally_protocol::lease::{LeaseId, LeaseRecord, LeaseSecret, StoredClock, StoredLease};
use tally_protocol::report::{
    self, JournalEntry, OpenLease, Report, ReportState, StoredJournal, StoredJournalChunk,
    StoredReportState, UsageEvent,
};
use tally_protocol::signed::{self, Signed};
use tally_protocol::time::{UnixTime, DAY};
use tally_protocol::wire::*;

const NOW: UnixTime = UnixTime(1_800_000_000);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = root().join("fuzz/seeds").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn copy(target: &str, name: &str, from: &str) {
    write(target, name, &std::fs::read(root().join(from)).unwrap());
}

fn host() -> String {
    fingerprint_of(b"tally-host/v1:4c4c4544003510508039b4c04f4d3732")
}

fn identity(user: &str, host: &str) -> ClientIdentity {
    ClientIdentity {
        user: user.into(),
        host: host.into(),
        pid: 4242,
        program: "solver".into(),
        display: Some(":0".into()),
    }
}

/// The bundle `tallyd demo` issues itself.
fn demo_bundle() -> Bundle {
    let server = server_key().public();
    let mut solver = FeatureGrant::counted("solver", 5);
    solver.borrow_limit_secs = 7 * DAY;
    let mut evaluation = FeatureGrant::counted("optimizer", 3);
    evaluation.evaluation = true;
    evaluation.expires = Some(NOW.plus_secs(30 * DAY));
    Bundle {
        id: format!("demo-{}", &server.to_hex()[..12]),
        issued_at: NOW,
        vendor: "tally demo vendor".into(),
        customer: Customer {
            id: "demo".into(),
            name: "Demo site".into(),
        },
        binding: vec![Binding {
            server_key: server,
            host_fingerprint: host(),
        }],
        supersedes: Vec::new(),
        valid_from: None,
        valid_until: None,
        features: vec![solver, FeatureGrant::counted("viewer", 20), evaluation],
    }
}

/// A bundle issued the vendor's way: FlexLM file, import, reviewed spec, signed.
fn imported_bundle(request: &ActivationRequest) -> Bundle {
    let text =
        std::fs::read_to_string(root().join("publisher/tests/data/acme-served.lic")).unwrap();
    let import = tally_publisher::flexlm::import("acme-served.lic", &text).unwrap();
    let filled = import
        .spec
        .replace("id = \"\"", "id = \"C-1001\"")
        .replace("name = \"\"", "name = \"Example Corp\"")
        .replace(
            "\n[customer]",
            "supersedes = [\"acme-2026-0042\"]\nvalid_until = \"2028-06-30\"\n\n[customer]",
        );
    let spec = tally_publisher::spec::Spec::parse(Path::new("acme.toml"), &filled).unwrap();
    let mut b = spec
        .to_bundle(
            Path::new("acme.toml"),
            request,
            "acme-2027-0001".into(),
            NOW,
        )
        .unwrap();
    b.features[0].maintenance_until = Some(NOW.plus_secs(365 * DAY));
    b.features[0].heartbeat_ttl_secs = Some(120);
    b.features[0].linger_secs = 300;
    b.features.push(FeatureGrant {
        seats: Seats::Uncounted,
        components: vec![Component::named("modeler"), Component::named("drafter")],
        attributes: BTreeMap::from([("edition".into(), "pro".into())]),
        ..FeatureGrant::counted("suite", 0)
    });
    b
}

fn frames(bundles: Vec<Signed>, token: Signed) {
    let lease = LeaseRef {
        id: LeaseId(0x1f),
        secret: LeaseSecret([7; 16]),
    };
    let requests = [
        (
            "hello",
            Request::Hello(Hello {
                client: identity("ana", "ws-12"),
            }),
        ),
        (
            "checkout",
            Request::Checkout(CheckoutRequest {
                feature: "solver".into(),
                count: 2,
                version: Some("2027.1".into()),
                build_date: Some(NOW),
                wait_secs: 30,
                borrow_secs: 0,
            }),
        ),
        (
            "checkout-borrow",
            Request::Checkout(CheckoutRequest {
                feature: "solver".into(),
                count: 1,
                version: None,
                build_date: None,
                wait_secs: 0,
                borrow_secs: 3 * DAY,
            }),
        ),
        (
            "heartbeat",
            Request::Heartbeat(HeartbeatRequest {
                leases: vec![lease.clone(), lease.clone()],
            }),
        ),
        (
            "checkin",
            Request::Checkin(CheckinRequest {
                leases: vec![lease],
            }),
        ),
        (
            "status",
            Request::Status(StatusRequest { admin_token: None }),
        ),
        (
            "status-token",
            Request::Status(StatusRequest {
                admin_token: Some("0123456789abcdef".into()),
            }),
        ),
        (
            "admin-reload",
            Request::Admin(AdminRequest {
                token: "0123456789abcdef".into(),
                op: AdminOp::Reload,
            }),
        ),
        (
            "admin-remove",
            Request::Admin(AdminRequest {
                token: "0123456789abcdef".into(),
                op: AdminOp::Remove { lease: LeaseId(9) },
            }),
        ),
        (
            "admin-shutdown",
            Request::Admin(AdminRequest {
                token: "t".into(),
                op: AdminOp::Shutdown,
            }),
        ),
        (
            "admin-export",
            Request::Admin(AdminRequest {
                token: "t".into(),
                op: AdminOp::ExportReport,
            }),
        ),
    ];
    for (name, request) in requests {
        write(
            "frame",
            &format!("request-{name}"),
            &frame::encode_request(&request),
        );
    }
    let grant = LeaseGrant {
        id: LeaseId(0x1f),
        secret: LeaseSecret([7; 16]),
        feature: "solver".into(),
        count: 2,
        ttl_secs: 90,
        overdraft: false,
        borrowed_until: Some(NOW.plus_secs(DAY)),
        token,
    };
    let denials = [
        DenialReason::AllSeatsInUse {
            feature: "solver".into(),
            total: 5,
            in_use: 5,
            requested: 1,
            holders: vec!["ana@ws-12".into(), "bo@ws-3".into()],
        },
        DenialReason::Expired {
            feature: "optimizer".into(),
            expired: NOW,
        },
        DenialReason::MaintenanceExpired {
            feature: "solver".into(),
            build_date: NOW,
            maintenance_until: UnixTime(NOW.0 - DAY),
        },
        DenialReason::ReservedForOthers {
            feature: "solver".into(),
            reserved_for: vec!["group cfd".into()],
        },
        DenialReason::ClockMovedBack {
            feature: "solver".into(),
            now: NOW,
            high_water: NOW.plus_secs(3600),
        },
    ];
    let holder = HolderStatus {
        lease: LeaseId(0x1f),
        client: identity("ana", "ws-12"),
        count: 2,
        since: NOW,
        overdraft: false,
        borrowed_until: None,
    };
    let responses = [
        (
            "hello",
            Response::Hello(HelloReply {
                server_version: "0.1.0".into(),
                bundles,
                server_time: NOW,
                heartbeat_secs: 30,
                demo: true,
            }),
        ),
        ("granted", Response::Checkout(CheckoutReply::Granted(grant))),
        (
            "heartbeat",
            Response::Heartbeat(HeartbeatReply {
                leases: vec![LeaseState::Active, LeaseState::Unknown, LeaseState::Removed],
            }),
        ),
        (
            "checkin",
            Response::Checkin(CheckinReply {
                released: vec![true, false],
            }),
        ),
        (
            "status",
            Response::Status(StatusReply {
                server_time: NOW,
                server_fingerprint: server_key().public().fingerprint(),
                features: vec![FeatureStatus {
                    name: "solver".into(),
                    total: Some(5),
                    in_use: 2,
                    expires: Some(NOW.plus_secs(30 * DAY)),
                    evaluation: true,
                    overdraft_in_use: 0,
                    reserved: 1,
                    holders: vec![
                        holder.clone(),
                        HolderStatus {
                            borrowed_until: Some(NOW.plus_secs(DAY)),
                            overdraft: true,
                            ..holder
                        },
                    ],
                    queue: vec![QueueEntry {
                        client: identity("cy", "ws-4"),
                        count: 1,
                        since: NOW,
                    }],
                }],
            }),
        ),
        (
            "admin",
            Response::Admin(AdminReply {
                message: "report exported".into(),
                report: Some(
                    "-----BEGIN TALLY USAGE REPORT-----\n-----END TALLY USAGE REPORT-----\n".into(),
                ),
            }),
        ),
        (
            "error",
            Response::Error(ErrorReply {
                message: "say hello first".into(),
            }),
        ),
    ];
    for (name, response) in responses {
        write(
            "frame",
            &format!("response-{name}"),
            &frame::encode_response(&response),
        );
    }
    for (i, reason) in denials.into_iter().enumerate() {
        let response = Response::Checkout(CheckoutReply::Denied(Denial { reason }));
        write(
            "frame",
            &format!("response-denied-{i}"),
            &frame::encode_response(&response),
        );
    }
    write(
        "frame",
        "negotiation",
        &frame::encode_version_negotiation(7),
    );
}

fn report_seed() {
    let key = server_key();
    let granted = |seq: u64, lease: u64, user: &str| JournalEntry {
        seq,
        at: NOW.plus_secs(seq * 60),
        event: UsageEvent::Granted {
            lease: LeaseId(lease),
            feature: "solver".into(),
            count: 1,
            overdraft: lease == 3,
            user: user.into(),
            host: "ws-12".into(),
            borrowed_until: (lease == 2).then(|| NOW.plus_secs(DAY)),
        },
    };
    let events = vec![
        JournalEntry {
            seq: 11,
            at: NOW,
            event: UsageEvent::DaemonStarted {
                version: "0.1.0".into(),
            },
        },
        JournalEntry {
            seq: 12,
            at: NOW,
            event: UsageEvent::BundleLoaded {
                bundle: "acme-2027-0001".into(),
            },
        },
        granted(13, 2, "ana"),
        granted(14, 3, "bo"),
        JournalEntry {
            seq: 15,
            at: NOW.plus_secs(900),
            event: UsageEvent::Denied {
                feature: "solver".into(),
                reason: "all_seats_in_use".into(),
                user: "cy".into(),
                host: "ws-4".into(),
            },
        },
        JournalEntry {
            seq: 16,
            at: NOW.plus_secs(901),
            event: UsageEvent::Queued {
                feature: "solver".into(),
                user: "cy".into(),
                host: "ws-4".into(),
            },
        },
        JournalEntry {
            seq: 17,
            at: NOW.plus_secs(1800),
            event: UsageEvent::Released {
                lease: LeaseId(1),
                feature: "solver".into(),
                count: 1,
                why: "checkin".into(),
            },
        },
        JournalEntry {
            seq: 18,
            at: NOW.plus_secs(1700),
            event: UsageEvent::ClockMovedBack {
                clock: NOW.plus_secs(1700),
                high_water: NOW.plus_secs(1800),
            },
        },
        JournalEntry {
            seq: 19,
            at: NOW.plus_secs(3600),
            event: UsageEvent::DaemonStopped,
        },
    ];
    stored_seeds(&events);
    let open_at_start = vec![OpenLease {
        lease: LeaseId(1),
        feature: "solver".into(),
        count: 1,
        overdraft: false,
        user: "ana".into(),
        host: "ws-12".into(),
        since: UnixTime(NOW.0 - DAY),
    }];
    let period_to = NOW.plus_secs(3600);
    let summaries = report::summarize(&open_at_start, &events, NOW, period_to);
    let r = Report {
        report_seq: 2,
        server_key: key.public(),
        host_fingerprint: host(),
        customers: vec!["C-1001".into()],
        bundle_ids: vec!["acme-2027-0001".into()],
        period_from: NOW,
        period_to,
        first_event: 11,
        last_event: 19,
        previous_digest: [0x5a; 32],
        open_at_start,
        events,
        summaries,
        bundles_at_start: Some(vec![report::ServedBundle::of(&demo_bundle())]),
    };
    let (text, _) = report::sign(&r, &key);
    write("report", "report.txt", text.as_bytes());
    let bytes = dearmor_limited(report::REPORT_LABEL, &text, usize::MAX).unwrap();
    let signed: Signed = decode(&bytes).unwrap();
    write("report", "report-body.raw", &raw(&signed.body));
    let empty = Report {
        report_seq: 1,
        first_event: 1,
        last_event: 0,
        previous_digest: [0; 32],
        open_at_start: vec![],
        events: vec![],
        summaries: vec![],
        ..r
    };
    write(
        "report",
        "report-empty.txt",
        report::sign(&empty, &key).0.as_bytes(),
    );
}

/// The records of a store, with the byte the `stored` target reads first.
fn stored_seeds(events: &[JournalEntry]) {
    let tagged = |kind: u8, bytes: Vec<u8>| [vec![kind], bytes].concat();
    let record = LeaseRecord {
        id: LeaseId(0x1f),
        secret: LeaseSecret([7; 16]),
        feature: "solver".into(),
        count: 2,
        holder: identity("ana", "ws-12"),
        granted_at: NOW,
        ttl_secs: 120,
        version: Some("2027.1".into()),
        linger_secs: 0,
        overdraft: false,
        borrowed_until: Some(NOW.plus_secs(DAY)),
    };
    write(
        "stored",
        "lease",
        &tagged(0, StoredLease::V1(record).encode()),
    );
    write(
        "stored",
        "journal-entry",
        &tagged(1, StoredJournal::V1(events[0].clone()).encode()),
    );
    write(
        "stored",
        "journal-chunk",
        &tagged(2, StoredJournalChunk::V1(events.to_vec()).encode()),
    );
    let state = ReportState {
        report_seq: 3,
        last_event: 19,
        digest: [0x5a; 32],
        period_end: Some(NOW),
        ..ReportState::default()
    };
    write(
        "stored",
        "report-state",
        &tagged(3, StoredReportState::V2(state).encode()),
    );
    write("stored", "clock", &tagged(4, StoredClock::V1(NOW).encode()));
}

fn main() {
    let key = server_key();
    let request = ActivationRequest {
        server_key: key.public(),
        host_fingerprint: host(),
        hostname: "lic1.example.com".into(),
        os: "linux debian 12 x86_64".into(),
        virtualization: Some("vm (QEMU)".into()),
        customer_reference: Some("PO-4471".into()),
        created_at: NOW,
    };
    let request_text = activation::request_to_armored(&request, &key);
    write("activation", "request.txt", request_text.as_bytes());
    let body = signed::from_armored(activation::REQUEST_LABEL, &request_text)
        .unwrap()
        .body;
    write(
        "activation",
        "request-body.raw",
        &[&raw(&[0]), &body[..]].concat(),
    );
    let proof = ReturnProof {
        bundle_id: "acme-2027-0001".into(),
        server_key: key.public(),
        host_fingerprint: host(),
        returned_at: NOW.plus_secs(90 * DAY),
        leases_outstanding: 2,
        released: Some(activation::Released {
            retired: vec!["acme-2026-0001".into()],
            stopped_serving: vec![activation::ReleasedGrant {
                bundle: "acme-2027-0001".into(),
                description: "solver: 10 seats, permanent".into(),
                feature: "solver".into(),
                seats: bundle::Seats::Counted(10),
            }],
        }),
    };
    let proof_text = activation::return_to_armored(&proof, &key);
    write("activation", "return.txt", proof_text.as_bytes());
    let body = signed::from_armored(activation::RETURN_LABEL, &proof_text)
        .unwrap()
        .body;
    write(
        "activation",
        "return-body.raw",
        &[&raw(&[1]), &body[..]].concat(),
    );

    let vendor = demo::vendor_secret();
    let demo_signed = bundle::sign(&demo_bundle(), &vendor);
    let imported_signed = bundle::sign(&imported_bundle(&request), &vendor);
    for (name, signed) in [("demo", &demo_signed), ("imported", &imported_signed)] {
        let text = bundle::to_armored(signed);
        write("bundle", &format!("{name}.bundle"), text.as_bytes());
        write("bundle", &format!("{name}-body.raw"), &raw(&signed.body));
    }
    let mut unbound = demo_bundle();
    unbound.binding.clear();
    let text = bundle::to_armored(&bundle::sign(&unbound, &vendor));
    write(
        "bundle",
        "unbound.bundle",
        format!("Hello,\n\nyour bundle:\n\n{text}\nregards\n").as_bytes(),
    );

    let token = Signed::sign(
        tally_protocol::signed::Domain::Lease,
        LeaseToken::V1 {
            id: LeaseId(0x1f),
            feature: "solver".into(),
            count: 2,
            holder: "ana@ws-12".into(),
            issued_at: NOW,
            expires_at: None,
        }
        .encode(),
        &key,
    );
    frames(vec![demo_signed], token);
    report_seed();

    // Key files as tallyd init and tally-publisher keygen write them (the fixed fuzz
    // server key: a seed, not a secret). The certificate seed `openssl-ed25519.der` was
    // made once with `openssl req -x509 -newkey ed25519` and is kept as it is.
    write("keys", "server.key", key.to_armored().as_bytes());
    write(
        "keys",
        "vendor.pub",
        tally_protocol::keys::public_key_to_armored(&key.public()).as_bytes(),
    );
    copy("config", "tallyd.toml", "packaging/tallyd.toml");
    write(
        "config",
        "everything.toml",
        br#"listen = "[::]:27300"
data_dir = "/srv/tally"
bundle_dir = "/srv/tally/bundles"
vendor_keys = ["/etc/tally/acme.pub", "/etc/tally/acme-2.pub"]
lease_ttl_secs = 120
heartbeat_secs = 20
idle_timeout_secs = 10
policy = "/etc/tally/policy.toml"
status_needs_token = true
report_dir = "/var/lib/tally/reports"
report_interval_secs = 3600
journal_retention_days = 90
report_upload_url = "https://licensing.example.com/reports"
report_upload_ca = "/etc/tally/upload-ca.pem"
http = true
http_listen = "127.0.0.1:27301"
"#,
    );
    copy(
        "policy",
        "policy.example.toml",
        "packaging/policy.example.toml",
    );
    for lic in ["acme-served", "old-style", "suite-package", "broken"] {
        copy(
            "flexlm",
            &format!("{lic}.lic"),
            &format!("publisher/tests/data/{lic}.lic"),
        );
    }
    copy("rlm", "rlm-served.lic", "publisher/tests/data/rlm-served.lic");
    write(
        "options",
        "cfd.opt",
        br#"# Options for the CFD department (IT ticket 4711)
GROUPCASEINSENSITIVE ON
TIMEOUTALL 3600
GROUP cfd ana \
      bo
group cfd cy
GROUP interns eve
HOST_GROUP farm rf-01 rf-02
RESERVE 2 solver GROUP cfd
reserve 1 "viewer" HOST_GROUP farm
MAX 1 viewer GROUP interns
MAX 0 viewer USER guest
EXCLUDE viewer USER mallory   # left in 2019
INCLUDE_BORROW solver GROUP cfd
Exclude_Borrow solver USER bo
INCLUDEALL GROUP cfd
EXCLUDEALL HOST kiosk
MAX_BORROW_HOURS solver 48
BORROW_LOWWATER solver 1
LINGER viewer 120
TIMEOUT solver 7200
INCLUDE solver INTERNET 10.1.2.*
MAX 2 solver:VERSION=2.0 USER ana
INCLUDE mesher DISPLAY :0
REPORTLOG +/var/log/lmgrd/report.log
NOLOG IN
"#,
    );
    println!(
        "seeds written to {}",
        root().join("fuzz/seeds").canonicalize().unwrap().display()
    );
}
