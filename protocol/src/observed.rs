//! What a client observes about where it runs: a virtual machine, a remote session.
//!
//! The vendor may refuse checkouts from either (FlexLM without `TS_OK`, RLM's VM
//! refusal); the client reports what it sees with every checkout
//! ([`crate::wire::Request::ObservedCheckout`]). These are facts the client reports: a
//! modified client can lie, as with FlexLM (SECURITY.md says so).
//!
//! The functions here are pure: they judge the texts the caller read (DMI strings,
//! `/proc/cpuinfo`, environment variables), so the daemon and the client name a
//! hypervisor the same way and tests can feed made-up inputs.

use serde::{Deserialize, Serialize};

/// Longest fact text accepted from a peer; a longer one is refused, not cut.
pub const MAX_FACT_LEN: usize = 256;

/// What the client observed; the variant is the format version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ClientFacts {
    /// Format version 1.
    V1 {
        /// The hypervisor the client runs under (`KVM/QEMU`, `VMware`...), or `None` on
        /// bare metal.
        virtual_machine: Option<String>,
        /// The remote session the client runs in (`SSH from 10.0.0.5`, `RDP`...), or
        /// `None` at a local console.
        remote_session: Option<String>,
    },
}

impl ClientFacts {
    /// Facts of version 1.
    pub fn new(virtual_machine: Option<String>, remote_session: Option<String>) -> ClientFacts {
        ClientFacts::V1 {
            virtual_machine,
            remote_session,
        }
    }

    /// The hypervisor, if the client runs in a virtual machine.
    pub fn virtual_machine(&self) -> Option<&str> {
        match self {
            ClientFacts::V1 {
                virtual_machine, ..
            } => virtual_machine.as_deref(),
        }
    }

    /// The remote session, if the client runs in one.
    pub fn remote_session(&self) -> Option<&str> {
        match self {
            ClientFacts::V1 { remote_session, .. } => remote_session.as_deref(),
        }
    }

    /// Checks what a peer sent: each text non-empty, at most [`MAX_FACT_LEN`] bytes, no
    /// control characters (they end up in logs, reports and denial messages).
    pub fn check(&self) -> Result<(), String> {
        for (what, text) in [
            ("virtual machine", self.virtual_machine()),
            ("remote session", self.remote_session()),
        ] {
            let Some(text) = text else { continue };
            if text.is_empty() || text.len() > MAX_FACT_LEN {
                return Err(format!(
                    "{what} must be 1 to {MAX_FACT_LEN} bytes, got {}",
                    text.len()
                ));
            }
            if text.chars().any(char::is_control) {
                return Err(format!("{what} holds a control character"));
            }
        }
        Ok(())
    }
}

/// The DMI strings and CPU flags a virtual machine shows (Linux:
/// `/sys/class/dmi/id/{sys_vendor,product_name,board_vendor}`, `/proc/cpuinfo`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineSigns<'a> {
    /// `sys_vendor`.
    pub sys_vendor: &'a str,
    /// `product_name`.
    pub product_name: &'a str,
    /// `board_vendor`.
    pub board_vendor: &'a str,
    /// The text of `/proc/cpuinfo` (only its `flags` lines are read).
    pub cpuinfo: &'a str,
}

/// The name of a hypervisor that only the CPU's `hypervisor` flag shows (no DMI
/// string names it: some micro-VMs and containers in VMs).
pub const UNNAMED_HYPERVISOR: &str = "unnamed hypervisor";

/// DMI substrings and the hypervisor they name, most specific first (a KVM guest on a
/// cloud says the cloud's name, which is what a vendor's records want).
const HYPERVISORS: &[(&str, &str)] = &[
    ("Amazon EC2", "Amazon EC2"),
    ("Google", "Google Compute Engine"),
    ("Alibaba Cloud", "Alibaba Cloud"),
    ("OpenStack", "OpenStack"),
    ("DigitalOcean", "DigitalOcean"),
    ("Hetzner", "Hetzner Cloud"),
    ("VMware", "VMware"),
    ("VirtualBox", "VirtualBox"),
    ("innotek", "VirtualBox"),
    ("Parallels", "Parallels"),
    ("Xen", "Xen"),
    ("Virtual Machine", "Hyper-V"),
    ("Microsoft Corporation", "Hyper-V"),
    ("QEMU", "KVM/QEMU"),
    ("KVM", "KVM/QEMU"),
    ("Bochs", "Bochs"),
    ("bhyve", "bhyve"),
];

/// The hypervisor these signs name, [`UNNAMED_HYPERVISOR`] when only the CPU's
/// `hypervisor` flag says so, `None` on bare metal. A Microsoft-made machine counts as Hyper-V only
/// with a `Virtual Machine` product or the `hypervisor` flag (Surface laptops are
/// Microsoft's too).
pub fn virtual_machine(signs: &MachineSigns<'_>) -> Option<String> {
    let flagged = signs
        .cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "hypervisor"));
    let dmi = [signs.sys_vendor, signs.product_name, signs.board_vendor];
    for (needle, name) in HYPERVISORS {
        if !dmi.iter().any(|s| s.contains(needle)) {
            continue;
        }
        if *needle == "Microsoft Corporation" && !flagged {
            continue;
        }
        return Some((*name).to_string());
    }
    flagged.then(|| UNNAMED_HYPERVISOR.to_string())
}

/// The remote session the environment `var` shows, `None` for a local one: SSH
/// (`SSH_CONNECTION`'s client address, `SSH_CLIENT`, `SSH_TTY`), xrdp (`XRDP_SESSION`),
/// a Citrix or Windows terminal session (`CITRIX_SESSION_ID`, `SESSIONNAME=RDP-...`),
/// and an X `DISPLAY` on another host (`host:0`; `:0`, `unix:0` and `localhost:10`
/// forwarded by SSH count as SSH when SSH says so, else local).
pub fn remote_session(var: impl Fn(&str) -> Option<String>) -> Option<String> {
    let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
    if let Some(conn) = var("SSH_CONNECTION") {
        return Some(match conn.split_whitespace().next() {
            Some(addr) => format!("SSH from {}", clean(addr)),
            None => "SSH".to_string(),
        });
    }
    if let Some(client) = var("SSH_CLIENT") {
        return Some(match client.split_whitespace().next() {
            Some(addr) => format!("SSH from {}", clean(addr)),
            None => "SSH".to_string(),
        });
    }
    if var("SSH_TTY").is_some() {
        return Some("SSH".to_string());
    }
    if var("XRDP_SESSION").is_some() {
        return Some("RDP (xrdp)".to_string());
    }
    if var("CITRIX_SESSION_ID").is_some() || var("CTX_SESSION_ID").is_some() {
        return Some("Citrix".to_string());
    }
    if let Some(name) = var("SESSIONNAME") {
        if name.to_ascii_uppercase().starts_with("RDP-") {
            return Some("RDP".to_string());
        }
    }
    if let Some(display) = var("DISPLAY") {
        if let Some(host) = remote_display_host(&display) {
            return Some(format!("X display on {}", clean(host)));
        }
    }
    None
}

/// The host of an X display naming another machine (`ws7:0.0`), `None` for a local one.
fn remote_display_host(display: &str) -> Option<&str> {
    let (host, _) = display.rsplit_once(':')?;
    // `host::0` is DECnet; the host is what comes before.
    let host = host.trim_end_matches(':');
    // macOS's launchd socket path is local.
    if host.starts_with('/') {
        return None;
    }
    match host {
        "" | "unix" | "localhost" | "127.0.0.1" | "::1" | "[::1]" => None,
        h => Some(h),
    }
}

/// A fact cut to what a report and a message can carry: printable, bounded.
fn clean(text: &str) -> String {
    text.chars()
        .filter(|c| !c.is_control())
        .take(MAX_FACT_LEN / 2)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn vm(vendor: &str, product: &str, board: &str, cpu: &str) -> Option<String> {
        virtual_machine(&MachineSigns {
            sys_vendor: vendor,
            product_name: product,
            board_vendor: board,
            cpuinfo: cpu,
        })
    }

    const FLAGGED: &str = "processor\t: 0\nflags\t\t: fpu vme de pse hypervisor lahf_lm\n";
    const BARE: &str = "processor\t: 0\nflags\t\t: fpu vme de pse lahf_lm\n";

    #[test]
    fn hypervisors_are_named_from_dmi() {
        assert_eq!(
            vm("QEMU", "Standard PC (Q35 + ICH9, 2009)", "", FLAGGED).as_deref(),
            Some("KVM/QEMU")
        );
        assert_eq!(
            vm("VMware, Inc.", "VMware Virtual Platform", "", FLAGGED).as_deref(),
            Some("VMware")
        );
        assert_eq!(
            vm("innotek GmbH", "VirtualBox", "Oracle Corporation", BARE).as_deref(),
            Some("VirtualBox")
        );
        assert_eq!(
            vm("Microsoft Corporation", "Virtual Machine", "", BARE).as_deref(),
            Some("Hyper-V")
        );
        assert_eq!(vm("Xen", "HVM domU", "", FLAGGED).as_deref(), Some("Xen"));
        assert_eq!(
            vm("Amazon EC2", "m5.large", "Amazon EC2", FLAGGED).as_deref(),
            Some("Amazon EC2")
        );
        assert_eq!(
            vm("Google", "Google Compute Engine", "Google", FLAGGED).as_deref(),
            Some("Google Compute Engine")
        );
        // A KVM guest whose DMI says only the board vendor.
        assert_eq!(vm("", "", "Red Hat KVM", BARE).as_deref(), Some("KVM/QEMU"));
    }

    #[test]
    fn the_hypervisor_flag_alone_is_an_unnamed_vm() {
        assert_eq!(vm("", "", "", FLAGGED).as_deref(), Some(UNNAMED_HYPERVISOR));
        assert_eq!(
            vm("Dell Inc.", "PowerEdge R740", "Dell Inc.", FLAGGED).as_deref(),
            Some(UNNAMED_HYPERVISOR)
        );
    }

    #[test]
    fn bare_metal_is_none() {
        assert_eq!(vm("Dell Inc.", "PowerEdge R740", "Dell Inc.", BARE), None);
        assert_eq!(vm("", "", "", ""), None);
        // A Surface laptop is made by Microsoft and is no Hyper-V guest.
        assert_eq!(
            vm(
                "Microsoft Corporation",
                "Surface Laptop 5",
                "Microsoft Corporation",
                BARE
            ),
            None
        );
    }

    #[test]
    fn ssh_sessions_name_the_client_address() {
        let ssh = env(&[("SSH_CONNECTION", "10.0.0.5 51234 10.0.0.9 22")]);
        assert_eq!(remote_session(ssh).as_deref(), Some("SSH from 10.0.0.5"));
        let old = env(&[("SSH_CLIENT", "fe80::1 51234 22")]);
        assert_eq!(remote_session(old).as_deref(), Some("SSH from fe80::1"));
        let tty = env(&[("SSH_TTY", "/dev/pts/3")]);
        assert_eq!(remote_session(tty).as_deref(), Some("SSH"));
        // SSH wins over the display it forwards.
        let x = env(&[
            ("SSH_CONNECTION", "10.0.0.5 1 10.0.0.9 22"),
            ("DISPLAY", "localhost:10.0"),
        ]);
        assert_eq!(remote_session(x).as_deref(), Some("SSH from 10.0.0.5"));
    }

    #[test]
    fn terminal_servers_and_remote_displays() {
        assert_eq!(
            remote_session(env(&[("XRDP_SESSION", "1")])).as_deref(),
            Some("RDP (xrdp)")
        );
        assert_eq!(
            remote_session(env(&[("SESSIONNAME", "RDP-Tcp#3")])).as_deref(),
            Some("RDP")
        );
        assert_eq!(
            remote_session(env(&[("CITRIX_SESSION_ID", "7")])).as_deref(),
            Some("Citrix")
        );
        assert_eq!(
            remote_session(env(&[("DISPLAY", "ws7.example.com:0.0")])).as_deref(),
            Some("X display on ws7.example.com")
        );
    }

    #[test]
    fn local_sessions_are_none() {
        for display in [
            ":0",
            ":1.0",
            "unix:0",
            "localhost:10.0",
            "/private/tmp/launch-x/org.xquartz:0",
        ] {
            assert_eq!(
                remote_session(env(&[("DISPLAY", display)])),
                None,
                "{display}"
            );
        }
        assert_eq!(remote_session(env(&[("SESSIONNAME", "Console")])), None);
        assert_eq!(remote_session(env(&[("SSH_CONNECTION", "  ")])), None);
        assert_eq!(remote_session(env(&[])), None);
    }

    #[test]
    fn facts_from_a_peer_are_checked() {
        assert!(ClientFacts::new(Some("KVM/QEMU".into()), None)
            .check()
            .is_ok());
        assert!(ClientFacts::new(Some(String::new()), None).check().is_err());
        assert!(ClientFacts::new(None, Some("x".repeat(MAX_FACT_LEN + 1)))
            .check()
            .is_err());
        assert!(ClientFacts::new(None, Some("SSH\n".into()))
            .check()
            .is_err());
    }

    /// The requests of a server older than [`crate::wire::Request::ObservedCheckout`].
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    enum OlderRequest {
        Hello(crate::wire::Hello),
        Checkout(crate::wire::CheckoutRequest),
        Heartbeat(crate::wire::HeartbeatRequest),
        Checkin(crate::wire::CheckinRequest),
        Status(crate::wire::StatusRequest),
        Admin(crate::wire::AdminRequest),
    }

    fn checkout() -> crate::wire::CheckoutRequest {
        crate::wire::CheckoutRequest {
            feature: "solver".into(),
            count: 1,
            version: Some("2024.1".into()),
            build_date: None,
            wait_secs: 0,
            borrow_secs: 0,
        }
    }

    #[test]
    fn both_directions_of_the_wire_stay_compatible() {
        use crate::wire::{ObservedCheckout, Request};
        // An older client's plain checkout decodes here as it always did.
        let plain = crate::encode(&Request::Checkout(checkout()));
        let decoded = crate::frame::decode_request(2, &plain).unwrap();
        assert_eq!(decoded, Request::Checkout(checkout()));
        let older = crate::decode::<OlderRequest, 4096>(&plain).unwrap();
        assert!(matches!(older, OlderRequest::Checkout(_)));
        // An observed checkout decodes here...
        let observed = Request::ObservedCheckout(ObservedCheckout {
            request: checkout(),
            facts: ClientFacts::new(Some("KVM/QEMU".into()), Some("SSH from 10.0.0.5".into())),
        });
        let bytes = crate::encode(&observed);
        assert_eq!(crate::frame::decode_request(2, &bytes).unwrap(), observed);
        // ...and an older server refuses it as malformed, the answer on which the client
        // sends a plain checkout instead (`Session::checkout_with`).
        let err = crate::decode::<OlderRequest, 4096>(&bytes).unwrap_err();
        let answer = crate::frame::FrameError::Malformed(err.to_string()).to_string();
        assert!(answer.starts_with("malformed message"), "{answer}");
    }

    #[test]
    fn the_new_denials_reach_version_1_clients_as_invalid_requests() {
        use crate::wire::DenialReason;
        let refused = DenialReason::VirtualMachineRefused {
            feature: "mesher".into(),
            hypervisor: "VMware".into(),
        };
        let text = refused.to_string();
        assert_eq!(
            refused.for_version_1(),
            DenialReason::InvalidRequest { what: text }
        );
    }
}
