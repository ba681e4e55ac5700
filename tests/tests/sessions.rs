//! Remote sessions and virtual machines through real checkouts: a vendor-signed bundle
//! whose `solver` refuses remote sessions and whose `mesher` refuses virtual machines,
//! served by a real `tallyd` to real `tally run`s; an older client (a plain checkout
//! without facts, sent with the library's raw request); the vendor's reconciliation
//! counting the grants from VMs and remote sessions.

use std::process::{Command, Output};
use tally_client::{ClientConfig, Session};
use tally_protocol::wire::{CheckoutReply, DenialReason, Request, Response};
use tally_tests::{one_seat, reconciled_total, VendorSite};

const SPEC: &str = r#"
id = "sessions-1"
vendor = "Acme Simulation"
[customer]
id = "C-1001"
name = "Example Corp"

[[feature]]
name = "solver"
seats = 5
remote_sessions = "deny"

[[feature]]
name = "mesher"
seats = 5
virtual_machines = "deny"

[[feature]]
name = "viewer"
seats = 5
"#;

/// Every variable the client reads for a remote session, removed so that the test's own
/// session (a developer's SSH login, a CI runner's) does not count.
const SESSION_VARS: &[&str] = &[
    "SSH_CONNECTION",
    "SSH_CLIENT",
    "SSH_TTY",
    "XRDP_SESSION",
    "CITRIX_SESSION_ID",
    "CTX_SESSION_ID",
    "SESSIONNAME",
    "DISPLAY",
];

/// `tally run FEATURE -- true` with only `env` of the session variables set.
fn run(tally: Command, feature: &str, env: &[(&str, &str)]) -> Output {
    let mut c = tally;
    for v in SESSION_VARS {
        c.env_remove(v);
    }
    c.envs(env.iter().copied())
        .args(["run", feature, "--", "true"])
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Whether this machine is a virtual machine, read here from the same places the
/// client reads and judged on its own: the DMI strings hypervisors set, or the CPU's
/// `hypervisor` flag. With the hypervisor's name as the denial must show it, where the
/// DMI strings say it plainly.
fn this_machine_is_a_vm() -> (bool, Option<&'static str>) {
    let dmi: String = ["sys_vendor", "product_name", "board_vendor"]
        .iter()
        .map(|f| std::fs::read_to_string(format!("/sys/class/dmi/id/{f}")).unwrap_or_default())
        .collect::<Vec<_>>()
        .join(" ");
    let flag = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor"));
    let named = [
        ("VMware", "VMware"),
        ("VirtualBox", "VirtualBox"),
        ("QEMU", "KVM/QEMU"),
        ("Amazon EC2", "Amazon EC2"),
        ("Google", "Google Compute Engine"),
        ("Xen", "Xen"),
    ]
    .iter()
    .find(|(needle, _)| dmi.contains(needle))
    .map(|(_, name)| *name);
    (flag || named.is_some(), named)
}

#[test]
fn remote_sessions_and_virtual_machines_are_refused_where_the_vendor_says() {
    let site = VendorSite::new();
    site.issue_spec("sessions-1", SPEC);
    let daemon = site.daemon();

    // From an SSH session: solver refused naming the session, exit 75.
    let ssh = [("SSH_CONNECTION", "10.0.0.5 51234 10.0.0.9 22")];
    let out = run(daemon.tally(), "solver", &ssh);
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("'solver' may not be used from a remote session (SSH from 10.0.0.5)"),
        "{}",
        stderr(&out)
    );
    // An X display on another host is a remote session too.
    let out = run(
        daemon.tally(),
        "solver",
        &[("DISPLAY", "ws7.example.com:0")],
    );
    assert!(
        stderr(&out).contains("remote session (X display on ws7.example.com)"),
        "{}",
        stderr(&out)
    );
    // Without one: granted. A feature without the rule serves the SSH session.
    let out = run(daemon.tally(), "solver", &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = run(daemon.tally(), "viewer", &ssh);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = run(daemon.tally(), "viewer", &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // Virtual machines: the outcome this machine calls for.
    let (vm, name) = this_machine_is_a_vm();
    let out = run(daemon.tally(), "mesher", &[]);
    if vm {
        assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
        let said = stderr(&out);
        assert!(
            said.contains("'mesher' may not be used from a virtual machine ("),
            "{said}"
        );
        if let Some(name) = name {
            assert!(
                said.contains(&format!("virtual machine ({name})")),
                "{said}"
            );
        }
    } else {
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }

    // An older client sends a plain checkout, without facts: told to upgrade where the
    // vendor asks, served as before elsewhere.
    let key = tally_protocol::keys::public_key_from_armored(
        &std::fs::read_to_string(site.path("vendor.pub")).unwrap(),
    )
    .unwrap();
    let config = ClientConfig::new(
        vec![daemon.addr.to_string()],
        tally_client::trust::Trust::Vendor(vec![key]),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let session = Session::connect(&config).await.unwrap();
        for feature in ["solver", "mesher"] {
            let answer = session
                .request(Request::Checkout(one_seat(feature)))
                .await
                .unwrap();
            let Response::Checkout(CheckoutReply::Denied(d)) = answer else {
                panic!("{feature}: {answer:?}")
            };
            let DenialReason::InvalidRequest { what } = &d.reason else {
                panic!("{feature}: {d:?}")
            };
            assert!(what.contains("upgrade"), "{what}");
        }
        let answer = session
            .request(Request::Checkout(one_seat("viewer")))
            .await
            .unwrap();
        assert!(
            matches!(answer, Response::Checkout(CheckoutReply::Granted(_))),
            "{answer:?}"
        );
        session.close().await;
    });

    // The vendor's reconciliation: viewer's three grants, one from the SSH session, the
    // two by `tally` from this machine's VM if it is one (the older client said nothing).
    let doc = site.report_reconciled(&daemon, "sessions-1");
    let row = |name: &str| -> (u64, u64, u64) {
        let t = reconciled_total(&doc, name);
        (
            t["grants"].as_u64().unwrap(),
            t["grants_from_virtual_machines"].as_u64().unwrap(),
            t["grants_from_remote_sessions"].as_u64().unwrap(),
        )
    };
    let vms = u64::from(vm);
    assert_eq!(row("viewer"), (3, 2 * vms, 1));
    assert_eq!(row("solver"), (1, vms, 0));
    assert_eq!(row("mesher"), (1 - vms, 0, 0));
}
