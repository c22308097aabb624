//! The host's errors: what went wrong, in the host's terms.
//!
//! Owns: [`HostError`] (an API action on the host failed) and [`StartError`] (the host could
//! not start). Must not: know about HTTP: which status a caller sees is the API crate's choice
//! (`vmm_api::status_of`), made from the variant.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use vmm_core::vm::VmError;

use crate::{VmState, MAX_TENANT_PORTS};

/// Why an action on the host failed. Each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// No VM with this id on the host.
    #[error("no VM with id {id:?} on this host (GET /api/v1/vm.list lists them)")]
    NotFound { id: String },
    /// The VM exists, but its state does not allow the action (`allowed` says which does).
    #[error("VM {id:?} is {state:?}; {allowed}")]
    WrongState {
        id: String,
        state: VmState,
        allowed: String,
    },
    /// Another VM on the host has this id.
    #[error("a VM with id {id:?} exists (vm.delete it first)")]
    IdTaken { id: String },
    /// Another VM on the host has this IP or MAC address.
    #[error("VM {other:?} already has ip {ip} or mac {mac}")]
    AddressTaken {
        other: String,
        ip: IpAddr,
        mac: String,
    },
    /// Another VM on the host has the same tenant number (a 32-bit hash of the id, which both
    /// tiers key verdicts, ports and flows by): sharing it would share them.
    #[error(
        "VM {other:?} has the same tenant number ({tenant:#010x}) as this id; choose another id"
    )]
    TenantNumberTaken { other: String, tenant: u32 },
    /// A field of a VM spec is not acceptable (the message names it).
    #[error("{0}")]
    InvalidSpec(String),
    /// A policy that does not compile.
    #[error("policy: {0}")]
    InvalidPolicy(String),
    /// The spec's kernel, initramfs or memory size cannot make a VM.
    #[error(transparent)]
    InvalidImage(VmError),
    /// A URL of the wrong form (`form` says which is expected).
    #[error("{url:?} is not a {form} URL")]
    InvalidUrl { url: String, form: &'static str },
    /// A path the caller named cannot be used (`what` names it and the action).
    #[error("{what}: {source}")]
    Path {
        what: String,
        #[source]
        source: io::Error,
    },
    /// A snapshot that cannot be restored (`what` names the file or the step).
    #[error("{what}: {reason}")]
    InvalidSnapshot { what: String, reason: String },
    /// Nothing listens at the migration target.
    #[error("cannot reach the target at {target}: {source} (did it run vm.receive-migration?)")]
    TargetUnreachable {
        target: String,
        #[source]
        source: io::Error,
    },
    /// The migration's peer failed authentication, or refused this host's; the VM runs on here.
    #[error("migration of {id:?} to {url} refused: authentication: {reason}; the VM runs on here")]
    MigrationAuth {
        id: String,
        url: String,
        reason: String,
    },
    /// Every switch port is held by a VM.
    #[error(
        "all {ports} switch ports are taken (delete a VM, or start the host with more --tenant-ports)"
    )]
    NoFreePort { ports: usize },
    /// `vmm.shutdown` ran.
    #[error("the host is shutting down")]
    ShuttingDown,
    /// The switch's verdict ring refused a reconfiguration.
    #[error("the switch's verdict ring refused the update: {0}")]
    SwitchRefused(String),
    /// The switch micro-VM did not take a reconfiguration in time.
    #[error(
        "the switch micro-VM did not take the update within {secs} s (is it running? see {})",
        .console.display()
    )]
    SwitchTimeout { secs: u64, console: PathBuf },
    /// A live migration failed before the target ran the VM; it runs on here.
    #[error("migration of {id:?} to {url}: {reason}; the VM runs on here")]
    MigrationFailed {
        id: String,
        url: String,
        reason: String,
    },
    /// Building a VM failed for a reason other than its spec.
    #[error(transparent)]
    Vm(VmError),
    /// Something failed inside the host (`what` says what it was doing).
    #[error("{what}: {source}")]
    Internal {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl HostError {
    pub(crate) fn not_found(id: &str) -> HostError {
        HostError::NotFound { id: id.into() }
    }

    pub(crate) fn internal(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> HostError {
        HostError::Internal {
            what: what.into(),
            source: source.into(),
        }
    }
}

/// Why a host could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("a host offers 1 to {MAX_TENANT_PORTS} tenant ports, not {0}")]
    TenantPorts(usize),
    #[error("cannot create the state directory {}: {source}", .path.display())]
    StateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the links of the switch ports: {0}")]
    SwitchLinks(#[source] io::Error),
    #[error("the switch micro-VM: {0}")]
    SwitchVm(#[source] VmError),
    #[error("the switch micro-VM has no verdict region")]
    NoVerdictRegion,
    #[error("cannot start the switch thread: {0}")]
    SwitchThread(#[source] io::Error),
    #[error(
        "the switch micro-VM did not come up within {secs} s (its console: {})",
        .console.display()
    )]
    SwitchNotReady { secs: u64, console: PathBuf },
    #[error("the verdict channel to the edge at {addr}: {source}")]
    EdgeChannel {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}
