//! Introspection wiring: hardware breakpoints on the guest kernel's socket LSM hooks, attribution
//! of each hit to a guest process (trap-handler), the tenant's policy, the verdict applied before
//! the vCPU resumes, and write traps on the kernel pages the hooks depend on.
//!
//! A denied call returns `-EPERM` from the hooked function to its caller (RAX set, the return
//! address popped), so the guest process sees "Operation not permitted". An allowed call resumes
//! past the breakpoint, after a verdict record (the shared wire format of `vigil-wire`) for the
//! firewall tiers was produced.
//!
//! Every decision is an event, one JSON line on the VMM's stdout. The vCPU only builds the event;
//! a logger thread serializes and writes it, so a slow terminal never stalls the guest (a full
//! queue does, by design: events are not dropped).
//!
//! By concern: [`hooks`] (the trap path of a hook hit, software breakpoints, guarded pages,
//! tamper reports), `decide` (the verdict rules an allowed call opens), [`state`] (the verdict
//! outbox and what a migration carries), `logger` (the events and the thread that writes them).
//!
//! Owns: one VM's [`Introspection`]: its hooks, its policy (replaceable while the VM runs), its
//! KASLR slide, where its verdicts go ([`VerdictSink`]), the tenant id verdicts carry.
//! Must not: trust guest memory or registers (every read goes through trap-handler's bounded
//! reader), stall a vCPU on output, or know about hosts and the API.

use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use thiserror::Error;
use trap_handler::attribution::{RootsCache, SocketOp, TrapSymbols};
use trap_handler::policy::{Policy, PolicyError, PolicySpec};
use trap_handler::profile::KernelProfile;
use vigil_wire::verdict::RECORD_LEN;

use crate::verdict_region::VerdictRegion;

mod decide;
pub mod hooks;
mod logger;
pub mod ports;
pub mod state;

pub use hooks::HookOutcome;
pub use logger::monotonic_ns;
pub use ports::PortPoint;
pub use state::{ImportError, IntrospectionState};

use logger::LogEntry;
use state::VerdictOutbox;

/// Why a VM's introspection could not be set up, or a measurement not adopted.
#[derive(Debug, Error)]
pub enum IntrospectError {
    #[error("policy: {0}")]
    Policy(#[source] PolicyError),
    #[error("the kernel has no {0} symbol to hook")]
    NoHookSymbol(&'static str),
    #[error("VIGIL_BARE_HOOKS: unknown operation {name:?}")]
    UnknownBareHook {
        name: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot start the event logger: {0}")]
    Logger(#[source] std::io::Error),
    #[error("the profile has no entry_SYSCALL_64")]
    NoSyscallEntry,
    #[error("MSR_LSTAR {lstar:#x} is not entry_SYSCALL_64 ({linked:#x}) moved by a KASLR slide")]
    NotASlide { lstar: u64, linked: u64 },
}

/// Hooks of one VM: what to trap and how to decide.
pub struct Introspection {
    pub vm: String,
    /// The tenant id verdict records carry.
    pub tenant: u32,
    /// Shared by every VM of the same kernel in this process (see `vm::builder`).
    pub profile: Arc<KernelProfile>,
    /// The symbols every trap needs, resolved once (None: the profile lacks `current_task`, and
    /// every hooked call fails attribution, denied).
    trap_symbols: Option<TrapSymbols>,
    /// The kernel's roots the identity checks need, read once (see [`RootsCache`]).
    roots: RootsCache,
    /// The policy in force and the spec it was compiled from (replaceable while the VM runs).
    policy: RwLock<(PolicySpec, Policy)>,
    /// How many times the policy was replaced: the policy a call was decided under. Moved
    /// under the policy's write lock and the outbox's lock; a verdict decided under an older
    /// policy is not granted (see [`Self::decide_under_policy`]).
    policy_epoch: std::sync::atomic::AtomicU64,
    /// (operation, guest-virtual address of its LSM hook), at most three: DR1-DR3.
    pub hooks: Vec<(SocketOp, u64)>,
    /// Hooks by software breakpoint (an `int3` Vigil writes over the function's `endbr64`), for
    /// more hooks than debug registers: (operation, guest-virtual address). Placed once the
    /// tenant has booted; visible to a guest that reads its own text.
    pub soft_hooks: Vec<(SocketOp, u64)>,
    /// The software breakpoints actually placed: (operation, address, length of the instruction
    /// the int3 replaced the first byte of; resuming skips it).
    soft_placed: OnceLock<Vec<(SocketOp, u64, u64)>>,
    /// Port points (see [`ports`]): (point, link address, symbol), placed with the software
    /// hooks.
    pub port_hooks: Vec<(PortPoint, u64, &'static str)>,
    /// The port points placed: (point, address, length of the instruction covered).
    port_placed: OnceLock<Vec<(PortPoint, u64, u64)>>,
    /// Calls waiting for their local port.
    pending: Mutex<ports::PendingPorts>,
    /// KASLR slide, measured once the kernel runs (see `adopt_slide`).
    slide: std::sync::atomic::AtomicU64,
    /// Benchmark knob `VIGIL_BARE_HOOKS=bind,...`: these hooks trap and resume with no work (the
    /// bare trap round trip `scripts/bench` compares the full path with). Never for production:
    /// a bare hook decides nothing.
    pub bare: Vec<SocketOp>,
    events: SyncSender<LogEntry>,
    verdicts: Mutex<VerdictOutbox>,
    /// Allowed calls denied because their verdicts did not reach the tiers.
    undelivered: std::sync::atomic::AtomicU64,
    /// The firewall tiers, given when the VM is built: allowed calls' verdicts go there before
    /// the vCPU resumes.
    tiers: Option<Arc<dyn VerdictSink>>,
}

/// Where a tenant's verdict records go: the switch-tier micro-VM's ring, and on a cloud host
/// the edge as well.
pub trait VerdictSink: Send + Sync {
    /// Delivers one call's records in order, all or none, and says whether they are in the
    /// tiers' tables (see [`Delivery`]). Never returns `Taken` for a record a tier refused.
    fn deliver(&self, records: &[[u8; RECORD_LEN]]) -> Delivery;
}

/// What became of a call's verdict records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// In the tiers' tables: the call may proceed.
    Taken,
    /// Not taken now and nothing of them applied (`ring_full`, `edge_window_full`): another
    /// try within the bound may succeed.
    Busy(&'static str),
    /// Refused for good, and anything of them that was applied taken back: the call is denied.
    /// The reason names why (`over_quota`, `table_full`, `switch_timeout`, `switch_restarting`…).
    Refused(&'static str),
}

impl VerdictSink for VerdictRegion {
    fn deliver(&self, records: &[[u8; RECORD_LEN]]) -> Delivery {
        use crate::verdict_region::{Delivered, MAX_DELIVERY};
        match VerdictRegion::deliver(self, records) {
            Delivered::Applied(_) | Delivered::Certain => Delivery::Taken,
            Delivered::Full => Delivery::Busy("ring_full"),
            Delivered::Refused { reason, added } => {
                if !self.revoke(records, &added) {
                    log::error!("verdict ring full: a refused call's other verdicts stay");
                }
                Delivery::Refused(reason)
            }
            Delivered::Unconfirmed(reason) => {
                if !self.revoke(records, &[true; MAX_DELIVERY]) {
                    log::error!("verdict ring full: an unconfirmed call's verdicts stay");
                }
                Delivery::Refused(reason)
            }
        }
    }
}

/// A stable tenant id from a VM name (FNV-1a, 32 bits): the same VM gets the same id on every
/// host, which a migrated tenant's verdicts rely on.
pub fn tenant_id(name: &str) -> u32 {
    let hash = name.bytes().fold(0x811c_9dc5u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    });
    // 0 is the uplink's id and u32::MAX an unassigned port's (vigil-wire boot information).
    match hash {
        0 | u32::MAX => 1,
        other => other,
    }
}

/// The operations named in a `VIGIL_BARE_HOOKS` list (comma-separated, as `SocketOp` is spelled
/// in JSON).
fn parse_bare_hooks(list: &str) -> Result<Vec<SocketOp>, IntrospectError> {
    list.split(',')
        .filter(|s| !s.is_empty())
        .map(|name| {
            serde_json::from_value(serde_json::Value::String(name.trim().into())).map_err(
                |source| IntrospectError::UnknownBareHook {
                    name: name.to_string(),
                    source,
                },
            )
        })
        .collect()
}

impl Introspection {
    /// Builds the hooks from the kernel the VM boots (link addresses: a PVH-booted kernel runs
    /// unrelocated, so no KASLR slide applies) and starts the VM's event logger. `bare_hooks`:
    /// the `VIGIL_BARE_HOOKS` list, from [`crate::knobs::DebugKnobs::bare_hooks`]. `tiers`: where
    /// allowed calls' verdicts go (None: they wait in the outbox for [`Self::take_verdicts`]).
    pub fn new(
        vm: &str,
        profile: impl Into<Arc<KernelProfile>>,
        spec: PolicySpec,
        tiers: Option<Arc<dyn VerdictSink>>,
        bare_hooks: Option<&str>,
    ) -> Result<Self, IntrospectError> {
        let profile: Arc<KernelProfile> = profile.into();
        let policy = Policy::compile(&spec).map_err(IntrospectError::Policy)?;
        let mut hooks = Vec::new();
        for op in [SocketOp::Connect, SocketOp::Bind, SocketOp::Listen] {
            let addr = *profile
                .symbols
                .get(op.hook_symbol())
                .ok_or(IntrospectError::NoHookSymbol(op.hook_symbol()))?;
            hooks.push((op, addr));
        }
        let soft_hooks = [SocketOp::Sendmsg]
            .into_iter()
            .filter_map(|op| profile.symbols.get(op.hook_symbol()).map(|&a| (op, a)))
            .collect();
        let port_hooks = PortPoint::SYMBOLS
            .into_iter()
            .filter_map(|(point, name)| profile.symbols.get(name).map(|&a| (point, a, name)))
            .collect();
        let bare = match bare_hooks {
            Some(list) => parse_bare_hooks(list)?,
            None => Vec::new(),
        };
        let (events, rx) = mpsc::sync_channel(logger::EVENT_QUEUE);
        std::thread::Builder::new()
            .name(format!("{vm}-events"))
            .spawn({
                let vm = vm.to_string();
                let tenant = tenant_id(&vm);
                move || logger::run_logger(vm, tenant, rx)
            })
            .map_err(IntrospectError::Logger)?;
        Ok(Introspection {
            vm: vm.to_string(),
            tenant: tenant_id(vm),
            trap_symbols: TrapSymbols::of(&profile).ok(),
            roots: RootsCache::default(),
            profile,
            policy: RwLock::new((spec, policy)),
            policy_epoch: std::sync::atomic::AtomicU64::new(0),
            hooks,
            slide: std::sync::atomic::AtomicU64::new(0),
            soft_hooks,
            soft_placed: OnceLock::new(),
            port_hooks,
            port_placed: OnceLock::new(),
            pending: Mutex::new(ports::PendingPorts::default()),
            bare,
            events,
            tiers,
            verdicts: Mutex::new(VerdictOutbox::new()),
            undelivered: std::sync::atomic::AtomicU64::new(0),
        })
    }

    pub fn hook_at(&self, pc: u64) -> Option<SocketOp> {
        let slide = self.slide();
        self.hooks
            .iter()
            .find(|(_, a)| a.wrapping_add(slide) == pc)
            .map(|(op, _)| *op)
    }

    /// The KASLR slide found at run time (0 until measured, and for a kernel that runs where it
    /// was linked, as a PVH-booted vmlinux does).
    pub fn slide(&self) -> u64 {
        self.slide.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Where the debug-register hooks are in this boot (link address + slide).
    pub fn hook_addresses(&self) -> Vec<u64> {
        let slide = self.slide();
        self.hooks
            .iter()
            .map(|(_, a)| a.wrapping_add(slide))
            .collect()
    }

    /// Measures the KASLR slide from the guest's syscall entry (MSR_LSTAR against the linked
    /// `entry_SYSCALL_64`) and adopts it. Returns it, or an error for a value no KASLR produces
    /// (not a multiple of 2 MiB): the hooks then stay where they were.
    pub fn adopt_slide(&self, lstar: u64) -> Result<u64, IntrospectError> {
        let linked = *self
            .profile
            .symbols
            .get("entry_SYSCALL_64")
            .ok_or(IntrospectError::NoSyscallEntry)?;
        let slide = lstar.wrapping_sub(linked);
        if slide % (2 << 20) != 0 {
            return Err(IntrospectError::NotASlide { lstar, linked });
        }
        self.slide
            .store(slide, std::sync::atomic::Ordering::Release);
        Ok(slide)
    }

    /// The software-breakpoint hook at `pc`, if one is placed there, and the length of the
    /// instruction it covers.
    pub fn soft_hook_at(&self, pc: u64) -> Option<(SocketOp, u64)> {
        self.soft_placed
            .get()?
            .iter()
            .find(|(_, a, _)| *a == pc)
            .map(|&(op, _, len)| (op, len))
    }

    /// The port point placed at `pc`, and the length of the instruction it covers.
    pub fn port_point_at(&self, pc: u64) -> Option<(PortPoint, u64)> {
        self.port_placed
            .get()?
            .iter()
            .find(|(_, a, _)| *a == pc)
            .map(|&(point, _, len)| (point, len))
    }

    pub fn soft_hooks_placed(&self) -> bool {
        self.soft_placed.get().is_some_and(|p| !p.is_empty())
    }

    /// Waits until every event queued so far is written (or `limit` passes).
    pub fn flush_events(&self, limit: Duration) {
        let (done, wait) = mpsc::channel();
        if self.events.send(LogEntry::Barrier(done)).is_ok() {
            let _ = wait.recv_timeout(limit);
        }
    }

    /// Decides with the policy in force (`decide`), and says which policy that was: the epoch
    /// [`Self::produce_verdicts`] is given, which grants nothing decided under a policy since
    /// replaced. Without it, a call decided just before a `PUT vm.policy` had its verdict
    /// granted just after the replacement revoked everything and the host flushed the tiers: a
    /// flow the new policy denies stayed open, for as long as it carried traffic.
    pub(super) fn decide_under_policy<R>(&self, decide: impl FnOnce(&Policy) -> R) -> (R, u64) {
        let in_force = self.policy.read().unwrap_or_else(|p| p.into_inner());
        let epoch = self.policy_epoch.load(std::sync::atomic::Ordering::Acquire);
        (decide(&in_force.1), epoch)
    }

    /// The epoch of the policy in force (see [`Self::decide_under_policy`]).
    pub(super) fn policy_epoch(&self) -> u64 {
        self.policy_epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The policy spec in force.
    pub fn policy_spec(&self) -> PolicySpec {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// Replaces the policy: every later call is decided by `spec`, and what the old policy
    /// granted is forgotten here (no later migration re-issues it, no tier that asks later gets
    /// it). The caller revokes the same verdicts on the tiers (a flush of the tenant).
    pub fn replace_policy(&self, spec: PolicySpec) -> Result<(), PolicyError> {
        let policy = Policy::compile(&spec)?;
        // Hold the outbox while the policy changes: no verdict of the old policy is granted
        // after the revocation.
        let mut outbox = self.verdicts.lock().unwrap_or_else(|p| p.into_inner());
        {
            let mut in_force = self.policy.write().unwrap_or_else(|p| p.into_inner());
            *in_force = (spec, policy);
            // A call decided under the old policy and not granted yet is granted never.
            self.policy_epoch
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        outbox.revoke_all();
        // Calls the old policy let through to a port point are decided there by the new one.
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .undecide_all();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids_are_stable_and_distinct() {
        assert_eq!(tenant_id("tenant"), tenant_id("tenant"));
        assert_ne!(tenant_id("tenant"), tenant_id("tenant2"));
        // FNV-1a of the empty string is its offset basis.
        assert_eq!(tenant_id(""), 0x811c_9dc5);
    }

    #[test]
    fn bare_hook_lists_name_operations_and_refuse_unknown_ones() {
        assert_eq!(
            parse_bare_hooks("bind,connect,").unwrap(),
            vec![SocketOp::Bind, SocketOp::Connect]
        );
        assert!(parse_bare_hooks("").unwrap().is_empty());
        let e = parse_bare_hooks("bind,frobnicate").unwrap_err();
        assert_eq!(
            e.to_string(),
            "VIGIL_BARE_HOOKS: unknown operation \"frobnicate\""
        );
    }

    #[test]
    fn setup_errors_keep_their_messages() {
        assert_eq!(
            IntrospectError::NotASlide {
                lstar: 0xffff_ffff_8160_0040,
                linked: 0xffff_ffff_8160_0000
            }
            .to_string(),
            "MSR_LSTAR 0xffffffff81600040 is not entry_SYSCALL_64 (0xffffffff81600000) moved \
             by a KASLR slide"
        );
        assert_eq!(
            IntrospectError::NoHookSymbol("security_socket_bind").to_string(),
            "the kernel has no security_socket_bind symbol to hook"
        );
    }
}
