//! A vCPU: an explicit state machine around one `match` on the KVM exit reason.
//!
//! States: `Running` (normal), `SteppingOver` (a breakpoint of ours is disabled for one guest
//! instruction, because this host ignores RFLAGS.RF), `Stopped`. Exits are routed to the device bus,
//! to the completion of instructions KVM could not emulate ([`crate::emulation`]), or to the
//! syscall fix below. A vCPU never panics on guest behaviour: whatever the guest does ends in a
//! [`StopReason`], and the VMM stays up.
//!
//! Owns: one vCPU's run loop and state machine, the KVM ioctls on its file descriptor, the
//! completion of what KVM left undone (emulation failures, the syscall fix, and, in `hooks`, hook
//! hits, port points and write-trap reports), and its counters. What an exit means is decided in
//! [`exit`] without KVM.
//! Must not: panic on guest behaviour, own devices (the bus does), or read the environment (its
//! knobs come in a [`DebugKnobs`]).

pub mod exit;
mod guest_debug;
mod hooks;
mod syscall_fix;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::GuestMemoryMmap;
use kvm_bindings::{kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::Serialize;
use thiserror::Error;

use crate::bus::Bus;
use crate::emulation::{self, Completion, GuestView};
use crate::host_kind::HostKind;
use crate::introspect::Introspection;
use crate::knobs::DebugKnobs;
use crate::run_control::RunControl;
use crate::snapshot::SnapshotError;
use crate::write_trap::WriteTraps;
use trap_handler::attribution::SocketOp;

use exit::BP_VECTOR;
pub use exit::{classify_debug, dispatch, DebugExit, ExitAction, VcpuExitView};
use guest_debug::guest_debug;
use syscall_fix::{finish_syscall, gate_handler, SyscallFix, SyscallMsrs};

/// MSRs of the `syscall` instruction (Intel SDM vol. 4, "Architectural MSRs").
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// The kernel's GS base while user mode runs (swapped in by `swapgs`).
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// Vector of #PF.
const PAGE_FAULT_VECTOR: u64 = 14;
/// How long a vCPU that arms the write traps waits for the others to park.
const STOP_OTHERS_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);
/// CR0.PG, EFER.LMA.
const CR0_PG: u64 = 1 << 31;
const EFER_LMA: u64 = 1 << 10;

/// What a vCPU could not do (it ends the VM as `StopReason::Crashed` with this text).
#[derive(Debug, Error)]
pub enum VcpuError {
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("MSR list: {0:?}")]
    MsrList(vmm_sys_util::fam::Error),
    #[error("KVM_GET_MSRS read {read} of {wanted} MSRs {indices}")]
    MsrsShort {
        read: usize,
        wanted: usize,
        indices: String,
    },
    #[error("a software hook without introspection")]
    SoftHookWithoutIntrospection,
    #[error(
        "a denied {0:?} could not be answered with -EPERM (the guest's stack is unreadable and \
         its kernel has no `ret` to return through): the VM stops rather than let it proceed"
    )]
    Unanswerable(SocketOp),
    #[error(
        "a call denied at the {0} port point could not be answered with -EPERM (the guest's \
         stack is unreadable and its kernel has no `ret` to return through): the VM stops"
    )]
    UnanswerablePort(&'static str),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { what, source }
}

/// Why a VM stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", content = "detail", rename_all = "snake_case")]
pub enum StopReason {
    /// The guest powered off (ACPI or KVM system event).
    Poweroff,
    /// The guest asked for a reset (i8042 reset line, triple fault, KVM system event).
    Reset,
    /// The micro-VM wrote its exit code to the exit port.
    ExitCode(u8),
    /// The guest halted with nothing to wake it.
    Halted,
    /// The VMM stopped it (timeout, API).
    Requested,
    /// Something the VMM could not continue from; the text says what.
    Crashed(String),
}

/// Per-vCPU counters, summed per VM.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VcpuStats {
    pub exits: u64,
    pub pio_exits: u64,
    pub mmio_exits: u64,
    pub debug_exits: u64,
    /// Instructions completed by the VMM, by name (int3, popcnt, wait, ...).
    pub emulation_completions: BTreeMap<String, u64>,
    /// `syscall`s from guest ring 3 finished by the VMM.
    pub syscalls_completed: u64,
    /// Page faults that passed the #PF breakpoint and were not broken syscalls.
    pub page_faults_passed: u64,
    /// Introspection hook hits, how many were denied, and the VMM-side time they took.
    pub hook_hits: u64,
    pub hook_denials: u64,
    pub hook_work_ns: u64,
    /// Guest writes to write-trapped pages, refused.
    pub tamper_writes: u64,
    /// Hook hits resumed with no work (`VIGIL_BARE_HOOKS`, benchmarks only).
    pub bare_hook_hits: u64,
    /// Software-hook hits that needed no decision (sendmsg on a connected socket).
    pub soft_hook_passes: u64,
    /// Port-point hits (see `introspect::ports`) and the VMM-side time they took.
    pub port_point_hits: u64,
    pub port_point_work_ns: u64,
}

impl VcpuStats {
    pub fn merge(&mut self, other: &VcpuStats) {
        self.exits += other.exits;
        self.pio_exits += other.pio_exits;
        self.mmio_exits += other.mmio_exits;
        self.debug_exits += other.debug_exits;
        self.syscalls_completed += other.syscalls_completed;
        self.page_faults_passed += other.page_faults_passed;
        self.hook_hits += other.hook_hits;
        self.hook_denials += other.hook_denials;
        self.hook_work_ns += other.hook_work_ns;
        self.tamper_writes += other.tamper_writes;
        self.bare_hook_hits += other.bare_hook_hits;
        self.soft_hook_passes += other.soft_hook_passes;
        self.port_point_hits += other.port_point_hits;
        self.port_point_work_ns += other.port_point_work_ns;
        for (name, count) in &other.emulation_completions {
            *self.emulation_completions.entry(name.clone()).or_default() += count;
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VcpuState {
    Running,
    /// Our breakpoint at `rip` is off while the guest executes one instruction.
    SteppingOver,
    /// Parked by a pause request (the API's `vm.pause`).
    Paused,
    Stopped,
}

/// What an exit asks the loop to do next.
enum Action {
    Continue,
    Stop(StopReason),
}

pub struct Vcpu {
    pub index: u8,
    fd: VcpuFd,
    memory: GuestMemoryMmap,
    bus: Arc<Bus>,
    host: HostKind,
    state: VcpuState,
    syscall_fix: SyscallFix,
    pub stats: VcpuStats,
    /// Guest RIPs seen at profiler kicks (`VIGIL_PROFILE`), to find where emulated ring 0 spends
    /// its time.
    pub rip_samples: Option<BTreeMap<u64, u64>>,
    /// Socket hooks and policy of this VM's tenant, if it has one.
    introspection: Option<Arc<Introspection>>,
    /// Read-only memslots over the hooked kernel pages (with `introspection`).
    write_traps: Option<Arc<WriteTraps>>,
    /// Whether this vCPU already tried to arm the write traps.
    write_traps_tried: bool,
    /// Bumped (by whichever vCPU does it, with the others parked) when the hooks move (a KASLR
    /// slide adopted) or software breakpoints are placed: every vCPU reprograms its debug state
    /// before it runs the guest again.
    debug_generation: Option<Arc<AtomicU64>>,
    /// The generation this vCPU's debug state was programmed for.
    debug_seen: u64,
    /// How many vCPUs the VM has (arming the write traps stops the others).
    vcpu_count: usize,
    /// The VM's run control, from [`Vcpu::run`] on.
    control: Option<Arc<RunControl>>,
    /// True while this vCPU's syscall fix is not armed yet (emulating hosts only): the VM kicks
    /// it out of KVM_RUN until it is, since a vCPU other than the first may make no exit of its
    /// own between loading its IDT and running user code.
    syscall_fix_pending: Option<Arc<AtomicBool>>,
    /// RIP of the last emulation failure handed back to KVM to run again
    /// ([`Completion::Retry`]), until any other exit: a second failure there in a row stops.
    last_retry: Option<u64>,
    /// `VIGIL_TRACE_EXITS`: log every completion and debug exit.
    trace: bool,
    /// No syscall fix: `VIGIL_NO_SYSCALL_FIX` (to measure what it costs), or a guest that is not
    /// Linux.
    no_syscall_fix: bool,
}

/// What a tenant under a policy adds to each of its vCPUs: its introspection and the write traps
/// over its hooked kernel pages.
pub struct TenantGuard {
    pub introspection: Arc<Introspection>,
    pub write_traps: Arc<WriteTraps>,
    /// Shared by the VM's vCPUs: see `Vcpu::debug_generation`.
    pub debug_generation: Arc<AtomicU64>,
}

impl Vcpu {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        index: u8,
        vcpu_count: usize,
        fd: VcpuFd,
        memory: GuestMemoryMmap,
        bus: Arc<Bus>,
        host: HostKind,
        guard: Option<TenantGuard>,
        knobs: &DebugKnobs,
        linux_guest: bool,
    ) -> Self {
        let (introspection, write_traps, debug_generation) = match guard {
            Some(g) => (
                Some(g.introspection),
                Some(g.write_traps),
                Some(g.debug_generation),
            ),
            None => (None, None, None),
        };
        // Only a Linux guest's user code makes `syscall`s: a micro-VM's needs no fix, and its
        // every port write (each console byte) would otherwise cost a KVM_GET_SREGS to look.
        let no_syscall_fix = knobs.no_syscall_fix || !linux_guest;
        let syscall_fix_pending = (host == HostKind::Emulating && !no_syscall_fix)
            .then(|| Arc::new(AtomicBool::new(true)));
        Vcpu {
            index,
            fd,
            memory,
            bus,
            host,
            state: VcpuState::Running,
            syscall_fix: SyscallFix::default(),
            stats: VcpuStats::default(),
            trace: knobs.trace_exits,
            no_syscall_fix,
            rip_samples: knobs.profile.as_ref().map(|_| BTreeMap::new()),
            introspection,
            write_traps,
            write_traps_tried: false,
            debug_seen: debug_generation
                .as_ref()
                .map_or(0, |g| g.load(Ordering::Acquire)),
            debug_generation,
            vcpu_count,
            control: None,
            syscall_fix_pending,
            last_retry: None,
        }
    }

    /// A flag that stays true until this vCPU's syscall fix is armed (None where no fix runs):
    /// while it is, the VM kicks this vCPU out of KVM_RUN now and then so that it looks.
    pub fn syscall_fix_pending(&self) -> Option<Arc<AtomicBool>> {
        self.syscall_fix_pending.clone()
    }

    /// Runs until the guest or the VMM stops this vCPU.
    pub fn run(&mut self, stop: &AtomicBool, control: &Arc<RunControl>) -> StopReason {
        self.control = Some(control.clone());
        if self.introspection.is_some() {
            if let Err(e) = self.program_debug(false) {
                return StopReason::Crashed(format!("cannot install the introspection hooks: {e}"));
            }
        }
        // A restored VM may already run user code: the syscall fix must be in place before its
        // first system call (a fresh boot is not in long mode yet, and this returns at once).
        self.maybe_arm_syscall_fix();
        loop {
            if stop.load(Ordering::Acquire) {
                self.state = VcpuState::Stopped;
                return StopReason::Requested;
            }
            // Between two exits, and never in the middle of stepping over a hook (its next exit
            // comes after one instruction): nothing is half handled.
            if control.must_park() && self.state == VcpuState::Running {
                self.state = VcpuState::Paused;
                let index = self.index;
                control.park(stop, index, || self.capture());
                self.state = VcpuState::Running;
                continue;
            }
            // Another vCPU moved the hooks or placed software breakpoints (while this one was
            // parked): take them on before running the guest again. Not while stepping over
            // one of ours (the step's end reprograms from the current hooks anyway).
            if let Some(generation) = &self.debug_generation {
                let now = generation.load(Ordering::Acquire);
                if now != self.debug_seen && self.state == VcpuState::Running {
                    self.debug_seen = now;
                    if let Err(e) = self.program_debug(false) {
                        self.state = VcpuState::Stopped;
                        return StopReason::Crashed(format!(
                            "cannot reprogram the introspection hooks on vCPU {}: {e}",
                            self.index
                        ));
                    }
                }
            }
            let exit = match self.run_once() {
                Ok(exit) => exit,
                Err(errno) if errno == libc::EINTR || errno == libc::EAGAIN => {
                    // A kick: a stop or pause request (checked above), a profiler sample, or the
                    // VM asking a vCPU whose syscall fix is not armed yet to look again.
                    if self
                        .syscall_fix_pending
                        .as_ref()
                        .is_some_and(|p| p.load(Ordering::Relaxed))
                    {
                        self.maybe_arm_syscall_fix();
                    }
                    if let Some(samples) = self.rip_samples.as_mut() {
                        if let Ok(regs) = self.fd.get_regs() {
                            *samples.entry(regs.rip).or_default() += 1;
                        }
                    }
                    continue;
                }
                Err(errno) => {
                    self.state = VcpuState::Stopped;
                    return StopReason::Crashed(format!(
                        "KVM_RUN failed on vCPU {}: {}",
                        self.index,
                        std::io::Error::from_raw_os_error(errno)
                    ));
                }
            };
            self.stats.exits += 1;
            if crate::failpoints::check_thread("vcpu.exit").is_some() {
                self.state = VcpuState::Stopped;
                return StopReason::Crashed(format!(
                    "failpoint vcpu.exit (error) on vCPU {}",
                    self.index
                ));
            }
            if exit != ExitAction::InternalError {
                self.last_retry = None;
            }
            let action = match exit {
                ExitAction::Handled => Action::Continue,
                ExitAction::PortWritten => {
                    self.maybe_arm_syscall_fix();
                    Action::Continue
                }
                ExitAction::Debug { pc, dr6, exception } => self.on_debug(pc, dr6, exception),
                ExitAction::InternalError => {
                    // SAFETY: KVM filled the `internal` member of the exit union for this exit
                    // reason, and nothing ran the vCPU since.
                    let suberror =
                        unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    self.on_internal_error(suberror)
                }
                ExitAction::Tamper { gpa, data, len } => self.on_tamper(gpa, &data[..len]),
                ExitAction::Stop(reason) => Action::Stop(reason),
            };
            if let Action::Stop(reason) = action {
                self.state = VcpuState::Stopped;
                return reason;
            }
        }
    }

    /// This vCPU's state, for a snapshot or a migration (on this vCPU's thread, out of KVM_RUN).
    fn capture(&mut self) -> Result<crate::snapshot::VcpuSnapshot, SnapshotError> {
        crate::snapshot::VcpuSnapshot::capture(self.index, &mut self.fd)
    }

    /// Loads a captured state before the first run (a restored or migrated VM).
    pub fn restore(
        &mut self,
        snapshot: &crate::snapshot::VcpuSnapshot,
    ) -> Result<Vec<u32>, SnapshotError> {
        snapshot.restore(&self.fd)
    }

    /// One KVM_RUN, with the exit dispatched (see [`exit::dispatch`]).
    fn run_once(&mut self) -> Result<ExitAction, i32> {
        let exit = self.fd.run().map_err(|e| e.errno())?;
        let view = match exit {
            VcpuExit::IoOut(port, data) => VcpuExitView::IoOut { port, data },
            VcpuExit::IoIn(port, data) => VcpuExitView::IoIn { port, data },
            VcpuExit::MmioRead(addr, data) => VcpuExitView::MmioRead { addr, data },
            VcpuExit::MmioWrite(addr, data) => VcpuExitView::MmioWrite { addr, data },
            VcpuExit::Debug(arch) => VcpuExitView::Debug {
                pc: arch.pc,
                dr6: arch.dr6,
                exception: arch.exception,
            },
            VcpuExit::Hlt => VcpuExitView::Hlt,
            VcpuExit::Shutdown => VcpuExitView::Shutdown,
            VcpuExit::SystemEvent(kind, _) => VcpuExitView::SystemEvent(kind),
            VcpuExit::InternalError => VcpuExitView::InternalError,
            VcpuExit::FailEntry(reason, cpu) => VcpuExitView::FailEntry { reason, cpu },
            VcpuExit::IrqWindowOpen | VcpuExit::Intr => VcpuExitView::Nothing,
            other => VcpuExitView::Unexpected(format!("{other:?}")),
        };
        let traps = &self.write_traps;
        let guarded = |addr| traps.as_ref().is_some_and(|t| t.guarded(addr).is_some());
        Ok(dispatch(
            view,
            &self.bus,
            guarded,
            &mut self.stats,
            self.index,
        ))
    }

    fn on_internal_error(&mut self, suberror: u32) -> Action {
        // KVM_INTERNAL_ERROR_EMULATION = 1: the instruction at RIP could not be emulated.
        if suberror != 1 {
            return Action::Stop(StopReason::Crashed(format!(
                "KVM internal error, suberror {suberror}"
            )));
        }
        let (mut regs, sregs) = match self.registers() {
            Ok(r) => r,
            Err(e) => return Action::Stop(StopReason::Crashed(e.to_string())),
        };
        // An int3 of ours (a software-breakpoint hook) on this host: KVM could not emulate it.
        if let Some((op, len)) = self
            .introspection
            .as_ref()
            .and_then(|i| i.soft_hook_at(regs.rip))
        {
            return match self.on_soft_hook(op, len, regs, sregs) {
                Ok(()) => Action::Continue,
                Err(e) => Action::Stop(StopReason::Crashed(e.to_string())),
            };
        }
        if let Some((point, len)) = self
            .introspection
            .as_ref()
            .and_then(|i| i.port_point_at(regs.rip))
        {
            return match self.on_port_point(point, len, regs, sregs) {
                Ok(()) => Action::Continue,
                Err(e) => Action::Stop(StopReason::Crashed(e.to_string())),
            };
        }
        let view = GuestView::new(&self.memory, &sregs);
        let rip = regs.rip;
        match emulation::complete(&view, &mut regs, &sregs) {
            Ok(completion) => {
                if let Completion::Retry(_) = completion {
                    if self.last_retry.replace(rip) == Some(rip) {
                        return Action::Stop(StopReason::Crashed(format!(
                            "vCPU {}: KVM failed twice in a row to emulate `{}` at {rip:#x} \
                             (not a site being patched): Vigil cannot complete it",
                            self.index,
                            completion.name()
                        )));
                    }
                } else {
                    self.last_retry = None;
                }
                if self.trace {
                    log::info!(
                        "vigil: vcpu{} completed {} at {rip:#x}",
                        self.index,
                        completion.name()
                    );
                }
                *self
                    .stats
                    .emulation_completions
                    .entry(completion.name())
                    .or_default() += 1;
                if let Err(e) = self.fd.set_regs(&regs) {
                    return Action::Stop(StopReason::Crashed(format!("KVM_SET_REGS: {e}")));
                }
                if completion == Completion::Int3Injected {
                    if let Err(e) = self.inject_exception(BP_VECTOR) {
                        return Action::Stop(StopReason::Crashed(e.to_string()));
                    }
                }
                Action::Continue
            }
            Err(e) => Action::Stop(StopReason::Crashed(e.to_string())),
        }
    }

    fn inject_exception(&self, vector: u8) -> Result<(), VcpuError> {
        let mut events = self
            .fd
            .get_vcpu_events()
            .map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
        events.exception.injected = 1;
        events.exception.nr = vector;
        events.exception.has_error_code = 0;
        events.exception.pending = 0;
        events.exception.error_code = 0;
        self.fd
            .set_vcpu_events(&events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))
    }

    fn registers(&self) -> Result<(kvm_regs, kvm_sregs), VcpuError> {
        let regs = self.fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
        let sregs = self.fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        Ok((regs, sregs))
    }

    /// On an emulating host, puts the breakpoint on the guest's #PF handler as soon as the guest
    /// runs in long mode with an IDT whose #PF gate points somewhere, and again whenever the guest
    /// loads a different IDT. Port I/O exits (the console, timers) are frequent enough during boot
    /// that the breakpoint is in place long before the first user process.
    fn maybe_arm_syscall_fix(&mut self) {
        if self.host != HostKind::Emulating || self.no_syscall_fix {
            return;
        }
        let Ok(sregs) = self.fd.get_sregs() else {
            return;
        };
        if sregs.cr0 & CR0_PG == 0 || sregs.efer & EFER_LMA == 0 {
            return;
        }
        if self.syscall_fix.idt_base_seen == Some(sregs.idt.base)
            && self.syscall_fix.pf_handler.is_some()
        {
            return;
        }
        self.syscall_fix.idt_base_seen = Some(sregs.idt.base);
        if u64::from(sregs.idt.limit) < PAGE_FAULT_VECTOR * 16 + 15 {
            return;
        }
        let view = GuestView::new(&self.memory, &sregs);
        let mut gate = [0u8; 16];
        if view
            .read(sregs.idt.base + PAGE_FAULT_VECTOR * 16, &mut gate)
            .is_err()
        {
            return;
        }
        let Some(handler) = gate_handler(&gate) else {
            return;
        };
        if self.syscall_fix.pf_handler != Some(handler) {
            let previous = self.syscall_fix.pf_handler.replace(handler);
            if self.program_debug(false).is_err() {
                self.syscall_fix.pf_handler = previous;
                return;
            }
            if let Some(pending) = &self.syscall_fix_pending {
                pending.store(false, Ordering::Relaxed);
            }
        }
    }

    /// Programs the vCPU's guest-debug state: DR0 on the guest's #PF handler (the syscall fix),
    /// DR1-DR3 on the introspection hooks; or, while stepping over one of them, no breakpoint and
    /// single stepping.
    fn program_debug(&self, single_step: bool) -> Result<(), VcpuError> {
        let hooks = self
            .introspection
            .as_ref()
            .map(|i| i.hook_addresses())
            .unwrap_or_default();
        // On hardware, int3 in the guest exits only when asked to; on an emulating host it
        // always exits (as an emulation failure).
        let soft_breakpoints = self.host == HostKind::Hardware
            && self
                .introspection
                .as_ref()
                .is_some_and(|i| i.soft_hooks_placed());
        let debug = guest_debug(
            single_step,
            self.syscall_fix.pf_handler,
            &hooks,
            soft_breakpoints,
        );
        self.fd
            .set_guest_debug(&debug)
            .map_err(kvm("KVM_SET_GUEST_DEBUG"))
    }

    fn on_debug(&mut self, pc: u64, dr6: u64, exception: u32) -> Action {
        self.stats.debug_exits += 1;
        let kind = classify_debug(
            pc,
            dr6,
            exception,
            self.state == VcpuState::SteppingOver,
            self.introspection.as_ref().and_then(|i| i.hook_at(pc)),
            self.syscall_fix.pf_handler,
        );
        if self.trace && kind != DebugExit::Breakpoint {
            log::info!(
                "vigil: vcpu{} debug exit at {pc:#x} dr6={dr6:#x}",
                self.index
            );
        }
        let done = match kind {
            // Ours, or the guest's own int3, which it gets back as the CPU would have
            // delivered it.
            DebugExit::Breakpoint => self.on_breakpoint(pc),
            DebugExit::SteppedOver => {
                self.state = VcpuState::Running;
                self.program_debug(false)
            }
            DebugExit::Hook(op) => self.on_hook(op, pc),
            DebugExit::PageFaultEntry => self.on_page_fault_entry(pc),
            DebugExit::Stale => self.step_over(pc),
        };
        match done {
            Ok(()) => Action::Continue,
            Err(e) => Action::Stop(StopReason::Crashed(e.to_string())),
        }
    }

    /// The guest is entering its #PF handler. If the fault is the half-done `syscall` (faulting RIP
    /// is LSTAR, CS is a user selector), finish the `syscall`; otherwise let the handler run.
    fn on_page_fault_entry(&mut self, pc: u64) -> Result<(), VcpuError> {
        let (mut regs, mut sregs) = self.registers()?;
        let view = GuestView::new(&self.memory, &sregs);
        // Exception frame with error code: [rsp] error, +8 RIP, +16 CS, +24 RFLAGS, +32 RSP, +40 SS.
        let frame_rip = view.read_u64(regs.rsp + 8);
        let frame_cs = view.read_u64(regs.rsp + 16);
        let frame_rflags = view.read_u64(regs.rsp + 24);
        let frame_rsp = view.read_u64(regs.rsp + 32);
        let (Ok(frame_rip), Ok(frame_cs), Ok(frame_rflags), Ok(frame_rsp)) =
            (frame_rip, frame_cs, frame_rflags, frame_rsp)
        else {
            // The guest's stack is not readable to us: let the guest deal with its own fault.
            return self.step_over(pc);
        };
        let msrs = self.syscall_msrs()?;
        if frame_rip != msrs.lstar || frame_cs & 3 != 3 {
            self.stats.page_faults_passed += 1;
            return self.step_over(pc);
        }
        finish_syscall(&mut regs, &mut sregs, &msrs, frame_rsp, frame_rflags);
        self.fd.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
        self.fd.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
        self.stats.syscalls_completed += 1;
        if !self.write_traps_tried && self.introspection.is_some() {
            // The first system call of the init process (pid 1) from user mode: the kernel has
            // finished booting (initcalls done, init memory freed, its text patched), so its
            // hooked pages can become read-only now. Earlier user-mode processes exist (usermode
            // helpers such as modprobe, run while initcalls still write kernel data), so the
            // first system call alone is too early. At syscall entry GS still holds the user's
            // base: the per-CPU area is in MSR_KERNEL_GS_BASE.
            let mut kernel = sregs;
            let init = match self.read_msrs([MSR_KERNEL_GS_BASE]) {
                Ok([base]) => {
                    kernel.gs.base = base;
                    self.introspection
                        .as_ref()
                        .is_some_and(|i| i.current_tgid(&self.memory, &kernel) == Some(1))
                }
                Err(_) => false,
            };
            if init {
                self.maybe_arm_write_traps(&kernel);
            }
        }
        Ok(())
    }

    /// Reads MSRs of this vCPU, in the order asked.
    fn read_msrs<const N: usize>(&self, indices: [u32; N]) -> Result<[u64; N], VcpuError> {
        let entries = indices.map(|index| kvm_msr_entry {
            index,
            ..Default::default()
        });
        let mut msrs = Msrs::from_entries(&entries).map_err(VcpuError::MsrList)?;
        let read = self.fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        if read != N {
            return Err(VcpuError::MsrsShort {
                read,
                wanted: N,
                indices: format!("{indices:x?}"),
            });
        }
        let mut values = [0u64; N];
        for (value, entry) in values.iter_mut().zip(msrs.as_slice()) {
            *value = entry.data;
        }
        Ok(values)
    }

    /// Resumes past our breakpoint at `pc` without RFLAGS.RF (ignored by this host's KVM): emulate
    /// the instruction when it has no effect beyond RIP (`endbr64`, NOPs), else single-step it
    /// with the breakpoint off.
    fn step_over(&mut self, pc: u64) -> Result<(), VcpuError> {
        let (regs, sregs) = self.registers()?;
        self.step_over_with(pc, regs, sregs)
    }

    /// [`Self::step_over`] with the registers read at this exit already (two ioctls fewer).
    pub(super) fn step_over_with(
        &mut self,
        pc: u64,
        mut regs: kvm_regs,
        sregs: kvm_sregs,
    ) -> Result<(), VcpuError> {
        let view = GuestView::new(&self.memory, &sregs);
        if let Ok(insn) = emulation::decode_at_rip(&view, &regs, &sregs) {
            if emulation::is_skippable_at_hook(&insn) && regs.rip == pc {
                regs.rip += insn.len() as u64;
                return self.fd.set_regs(&regs).map_err(kvm("KVM_SET_REGS"));
            }
        }
        self.state = VcpuState::SteppingOver;
        self.program_debug(true)
    }

    fn syscall_msrs(&self) -> Result<SyscallMsrs, VcpuError> {
        let [star, lstar, sfmask] = self.read_msrs([MSR_STAR, MSR_LSTAR, MSR_SYSCALL_MASK])?;
        Ok(SyscallMsrs {
            star,
            lstar,
            sfmask,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_merge_adds_every_counter() {
        let mut a = VcpuStats {
            exits: 1,
            pio_exits: 2,
            hook_hits: 3,
            ..Default::default()
        };
        a.emulation_completions.insert("int3".into(), 1);
        let mut b = VcpuStats {
            exits: 10,
            mmio_exits: 5,
            tamper_writes: 1,
            ..Default::default()
        };
        b.emulation_completions.insert("int3".into(), 2);
        b.emulation_completions.insert("popcnt".into(), 4);
        a.merge(&b);
        assert_eq!((a.exits, a.pio_exits, a.mmio_exits), (11, 2, 5));
        assert_eq!((a.hook_hits, a.tamper_writes), (3, 1));
        assert_eq!(a.emulation_completions["int3"], 3);
        assert_eq!(a.emulation_completions["popcnt"], 4);
    }

    #[test]
    fn stop_reasons_serialize_as_the_outcome_line_has_them() {
        let json = |r: StopReason| serde_json::to_string(&r).unwrap();
        assert_eq!(json(StopReason::Poweroff), r#"{"reason":"poweroff"}"#);
        assert_eq!(
            json(StopReason::ExitCode(3)),
            r#"{"reason":"exit_code","detail":3}"#
        );
        assert_eq!(
            json(StopReason::Crashed("x".into())),
            r#"{"reason":"crashed","detail":"x"}"#
        );
    }
}
