//! The host's configuration and the tenant VM spec the API takes.
//!
//! Owns: [`HostConfig`], [`EdgeLinkConfig`], [`VmSpec`] with its defaults and the rules for a VM
//! id. Must not: touch VMs, the switch or the edge (checking a spec against the host's state is
//! `lifecycle`'s).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use trap_handler::policy::PolicySpec;
use vmm_core::net_config::NetConfig;

/// Most tenant ports a switch offers (the micro-VM serves 8 ports, one is the uplink).
pub const MAX_TENANT_PORTS: usize = 7;
/// Longest VM id (it names files and appears in every event).
pub(crate) const MAX_ID_LEN: usize = 32;

/// Where a host sends the verdicts of its tenants for the edge, and how it signs them.
#[derive(Clone)]
pub struct EdgeLinkConfig {
    /// The edge's verdict channel (UDP).
    pub control: SocketAddr,
    pub key: Vec<u8>,
    /// Which key `key` is: 0 for the edge's shared key (`--edge-key-file`), 1 and up for this
    /// host's own keys from the cluster (the edge holds them by the same ids).
    pub key_id: u16,
    /// This host's sender id on the channel (distinct per host).
    pub sender: u32,
}

#[derive(Clone)]
pub struct HostConfig {
    /// Names the host in events.
    pub name: String,
    /// The fw-guest ELF booted as the switch tier.
    pub switch_elf: PathBuf,
    /// The switch's uplink (a TAP, or VXLAN to the edge).
    pub uplink: NetConfig,
    pub tenant_ports: usize,
    pub edge: Option<EdgeLinkConfig>,
    /// Where the host keeps per-tenant files (policies, console logs).
    pub state_dir: PathBuf,
    /// Copy tenant consoles to stdout.
    pub console_stdout: bool,
    /// Debug knobs (read once by the CLI), carried into every VM this host creates.
    pub debug: vmm_core::knobs::DebugKnobs,
    /// The keys of the hosts this one migrates with, its own included (none: migration is
    /// refused both ways).
    pub migration_keys: crate::MigrationKeys,
}

/// A tenant VM as the API creates it (`PUT /api/v1/vm.create`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Unique on the host: letters, digits, `-`, `_`, `.`; at most 32.
    pub id: String,
    /// bzImage or vmlinux of the tenant kernel.
    pub kernel: PathBuf,
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// The NIC's MAC address (unicast).
    pub mac: String,
    /// The tenant's IP address (the edge finds the tenant of a flow by it).
    pub ip: IpAddr,
    /// The tenant's application policy.
    pub policy: PolicySpec,
}

fn default_cmdline() -> String {
    "console=ttyS0 reboot=k panic=-1".into()
}
fn default_memory() -> u64 {
    256
}
fn default_vcpus() -> u8 {
    1
}

pub(crate) fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !id.starts_with('.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_file_and_log_safe() {
        for good in ["web1", "a", "tenant-7.prod_x"] {
            assert!(valid_id(good), "{good}");
        }
        for bad in ["", ".hidden", "a/b", "x y", &"z".repeat(33), "é"] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn specs_reject_unknown_fields_and_fill_defaults() {
        let spec: VmSpec = serde_json::from_str(
            r#"{"id":"w","kernel":"/k","mac":"52:54:00:00:00:02","ip":"10.0.0.2","policy":{"allow":[]}}"#,
        )
        .unwrap();
        assert_eq!((spec.memory_mib, spec.vcpus), (256, 1));
        let err = serde_json::from_str::<VmSpec>(
            r#"{"id":"w","kernel":"/k","mac":"52:54:00:00:00:02","ip":"10.0.0.2","policy":{"allow":[]},"gpu":true}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `gpu`"), "{err}");
    }
}
