//! In-process hosts for the tests that drive `vmm_host::Host` directly (migration, the soak, the
//! cluster's migrations): each with its real switch micro-VM, an uplink to nowhere (no edge) and
//! two tenant ports.
//!
//! Owns: [`in_process_host`]. Must not: start an edge (the tests that need one run `vigil edge`).

use std::sync::Arc;

use vmm_host::{Host, HostConfig, MigrationKeys};

use crate::{fw_guest_elf, TempDir};

/// A host named `name` with its state under `dir`, migrating with `keys`.
pub fn in_process_host(name: &str, dir: &TempDir, keys: &MigrationKeys) -> Arc<Host> {
    Host::start(HostConfig {
        name: name.into(),
        switch_elf: fw_guest_elf(),
        uplink: "vxlan=127.0.0.1:9,local=127.0.0.1:0"
            .parse()
            .expect("uplink"),
        tenant_ports: 2,
        edge: None,
        state_dir: dir.join(name),
        console_stdout: false,
        debug: vmm_core::knobs::DebugKnobs::default(),
        migration_keys: keys.clone(),
    })
    .expect("the host starts")
}
