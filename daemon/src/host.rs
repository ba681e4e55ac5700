//! What the server can tell about the machine it runs on: the host fingerprint a bundle
//! is bound to, and the facts an activation request reports.

use tally_protocol::keys::fingerprint_of;
use tally_protocol::observed::{self, MachineSigns};

/// The host fingerprint: a hash of the machine id (systemd's `/etc/machine-id`, stable
/// across reboots and unique per installation), or of the host name where there is none.
/// `TALLY_HOST_ID` overrides the source, for hosts whose machine id is regenerated at
/// every boot (some container platforms).
pub fn fingerprint() -> String {
    let id = std::env::var("TALLY_HOST_ID")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .or_else(|| read_trimmed("/etc/machine-id"))
        .or_else(|| read_trimmed("/var/lib/dbus/machine-id"))
        .unwrap_or_else(|| format!("hostname:{}", hostname()));
    fingerprint_of(format!("tally-host/v1:{id}").as_bytes())
}

/// The host name.
pub fn hostname() -> String {
    read_trimmed("/proc/sys/kernel/hostname").unwrap_or_else(|| "unknown".into())
}

/// Operating system, distribution and architecture.
pub fn os() -> String {
    let pretty = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_else(|| std::env::consts::OS.to_string());
    format!("{pretty} ({})", std::env::consts::ARCH)
}

/// A hint whether this is a virtual machine or a container, for the vendor's records
/// (a vendor may price or bind such hosts differently).
pub fn virtualization() -> Option<String> {
    if std::path::Path::new("/.dockerenv").exists()
        || std::path::Path::new("/run/.containerenv").exists()
    {
        return Some("container".into());
    }
    // Named the way clients name it in their checkouts (`tally_protocol::observed`).
    let read = |path: &str| read_trimmed(path).unwrap_or_default();
    let (sys_vendor, product_name, board_vendor) = (
        read("/sys/class/dmi/id/sys_vendor"),
        read("/sys/class/dmi/id/product_name"),
        read("/sys/class/dmi/id/board_vendor"),
    );
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let signs = MachineSigns {
        sys_vendor: &sys_vendor,
        product_name: &product_name,
        board_vendor: &board_vendor,
        cpuinfo: &cpuinfo,
    };
    observed::virtual_machine(&signs).map(|name| match name.as_str() {
        observed::UNNAMED_HYPERVISOR => "vm".to_string(),
        _ => format!("vm ({name})"),
    })
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}
