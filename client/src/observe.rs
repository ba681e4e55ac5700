//! What this process observes about where it runs, reported with every checkout: a
//! virtual machine (Linux: `/sys/class/dmi/id/{sys_vendor,product_name,board_vendor}`
//! and the `hypervisor` CPU flag in `/proc/cpuinfo`) and a remote session (`SSH_*`,
//! `XRDP_SESSION`, a `DISPLAY` on another host...). The judging is
//! [`tally_protocol::observed`]'s pure functions, which the daemon's activation facts
//! use too; this module only reads the machine and the environment.
//!
//! The vendor decides what a feature allows; the server decides. These are facts this
//! client reports: a modified client can lie (SECURITY.md).

use std::sync::OnceLock;
use tally_protocol::observed::{self, ClientFacts, MachineSigns};

/// The facts of this process, read once (the machine and the process's environment do
/// not change while it runs).
pub fn facts() -> ClientFacts {
    static FACTS: OnceLock<ClientFacts> = OnceLock::new();
    FACTS
        .get_or_init(|| ClientFacts::new(virtual_machine(), remote_session()))
        .clone()
}

/// The hypervisor this machine runs under, `None` on bare metal (or where the signs
/// cannot be read: other systems than Linux report none).
pub fn virtual_machine() -> Option<String> {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let (sys_vendor, product_name, board_vendor) = (
        read("/sys/class/dmi/id/sys_vendor"),
        read("/sys/class/dmi/id/product_name"),
        read("/sys/class/dmi/id/board_vendor"),
    );
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    observed::virtual_machine(&MachineSigns {
        sys_vendor: &sys_vendor,
        product_name: &product_name,
        board_vendor: &board_vendor,
        cpuinfo: &cpuinfo,
    })
}

/// The remote session this process runs in, from its environment; `None` for a
/// local one.
pub fn remote_session() -> Option<String> {
    observed::remote_session(|name| std::env::var(name).ok())
}
