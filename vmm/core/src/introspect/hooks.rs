//! What happens in the guest's kernel when a hook fires or a guarded page is written: attribution
//! of the call, the decision and its application to the vCPU's registers, the software
//! breakpoints, the pages to write-trap, and the events that report each of them.
//!
//! Owns: the trap path of a hook hit (attribute, decide, return `-EPERM` or resume, produce the
//! verdict, queue the event), the placement of the software breakpoints, the kernel objects
//! whose pages are write-trapped, the tamper report.
//! Must not: format or write an event on the trap path (the logger thread does), allocate beyond
//! what one decision needs, or read guest memory other than through the bounded `VirtReader`.

use std::time::Instant;

use crate::GuestMemoryMmap;
use kvm_bindings::{kvm_regs, kvm_sregs};
use trap_handler::attribution::{self, AttributionError, HookArgs, SocketOp};
use trap_handler::mem::{GuestPhys, PagingMode, VirtReader};
use trap_handler::policy::Verdict;
use vm_memory::{Bytes, GuestAddress};

use super::decide::{
    governed_family, hook_rules, hook_verdict, port_point, verdict_rules, CallRules,
};
use super::logger::{
    monotonic_ns, LogEntry, SocketEvent, SoftHooksEvent, TamperEvent, WriteTrapsEvent,
};
use super::ports::{self, Pending, PortPoint};
use super::Introspection;
use crate::guest_ram::GuestRam;
use crate::write_trap::{GuardedPage, PAGE_SIZE};

/// The one-byte breakpoint instruction (Intel SDM vol. 2, INT3).
const INT3: u8 = 0xcc;
/// `EPERM` (include/uapi/asm-generic/errno-base.h).
const EPERM: u64 = 1;

/// Kernel objects whose pages are write-trapped once the tenant has booted, and how many bytes
/// from the symbol are guarded: the hooked functions and their callers (the first bytes, where the
/// hooks and the call sites of interest are), the system-call entry and dispatch, the system call
/// table and the LSM hook lists.
const GUARDED_SYMBOLS: &[(&str, u64)] = &[
    ("security_socket_connect", 64),
    ("security_socket_bind", 64),
    ("security_socket_listen", 64),
    ("security_socket_sendmsg", 64),
    ("__sys_connect", 64),
    ("__sys_bind", 64),
    ("__sys_listen", 64),
    ("entry_SYSCALL_64", 256),
    ("do_syscall_64", 64),
    ("x64_sys_call", 64),
    ("sys_call_table", 8 * 512),
    ("security_hook_heads", 2048),
    // The `ret` a denial goes through when the guest's stack is unreadable.
    ("__x86_return_thunk", 8),
];

/// What the vCPU must do after a hook hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookOutcome {
    /// Resume past the breakpoint.
    Allow,
    /// Registers already rewritten to return -EPERM to the caller.
    Denied,
    /// The call is denied but no way to return -EPERM to its caller was found (its stack is
    /// unreadable and the kernel has no `ret` to send it through): the VM must stop rather than
    /// let the call proceed.
    Unanswerable,
}

/// Rewrites `regs` so the hooked function returns `-EPERM` to its caller: the return address
/// the call pushed (`ret`, read from the guest's stack at RSP) is popped into RIP.
#[inline]
fn return_eperm(regs: &mut kvm_regs, ret: u64) {
    regs.rax = EPERM.wrapping_neg();
    regs.rip = ret;
    // RSP is the guest's: at the top of the address space the pop wraps, as the CPU's does,
    // rather than overflow the VMM's arithmetic.
    regs.rsp = regs.rsp.wrapping_add(8);
}

/// Rewrites `regs` so the hooked function returns `-EPERM` through a `ret` instruction of the
/// kernel at `ret_insn` (the CPU itself pops the return address, which the VMM could not read).
#[inline]
fn return_eperm_through(regs: &mut kvm_regs, ret_insn: u64) {
    regs.rax = EPERM.wrapping_neg();
    regs.rip = ret_insn;
}

/// The `ret` opcode (Intel SDM vol. 2, RET near).
const RET: u8 = 0xc3;

/// Denies a call at its hook: the hooked function returns `-EPERM` to its caller. Pops the
/// return address from the guest's stack; when the stack cannot be read, sends the vCPU through
/// a `ret` of the kernel's own (`ret_insn`), so the CPU pops it; with neither, the call is
/// unanswerable and the VM must stop. Never lets a denied call proceed. `error` gets what went
/// wrong, for the event.
fn deny_call<M: GuestPhys + ?Sized>(
    reader: &VirtReader<'_, M>,
    regs: &mut kvm_regs,
    ret_insn: impl FnOnce() -> Option<u64>,
    error: &mut Option<String>,
) -> HookOutcome {
    if let Ok(ret) = reader.read_u64(regs.rsp) {
        return_eperm(regs, ret);
        return HookOutcome::Denied;
    }
    let (outcome, what) = match ret_insn() {
        Some(ret_insn) => {
            return_eperm_through(regs, ret_insn);
            (
                HookOutcome::Denied,
                format!(
                    "the guest's stack at {:#x} is unreadable: denied through the kernel's `ret` \
                     at {ret_insn:#x}",
                    regs.rsp
                ),
            )
        }
        None => (
            HookOutcome::Unanswerable,
            format!(
                "the guest's stack at {:#x} is unreadable and the kernel has no `ret` to return \
                 -EPERM through: the VM stops",
                regs.rsp
            ),
        ),
    };
    *error = Some(match error.take() {
        Some(before) => format!("{before}; {what}"),
        None => what,
    });
    outcome
}

/// Where a bare `ret` of the running kernel is: `linked` (the link address of
/// `__x86_return_thunk`) plus the KASLR slide, if guest memory there really holds `ret`.
fn kernel_ret_insn<M: GuestPhys + ?Sized>(
    reader: &VirtReader<'_, M>,
    linked: Option<u64>,
    slide: u64,
) -> Option<u64> {
    let addr = linked?.wrapping_add(slide);
    let mut byte = [0u8; 1];
    reader.read_virt(addr, &mut byte).ok()?;
    (byte[0] == RET).then_some(addr)
}

/// Every page, page-aligned, of `extent` bytes from `addr`, up to the top of the address space
/// (`addr` follows the KASLR slide the guest's LSTAR gave: anything, so nothing here may wrap;
/// a wrapped end guarded no page at all).
fn pages_of(addr: u64, extent: u64) -> impl Iterator<Item = u64> {
    let first = addr & !(PAGE_SIZE - 1);
    let end = addr.saturating_add(extent);
    (0..)
        .map_while(move |i: u64| first.checked_add(i.checked_mul(PAGE_SIZE)?))
        .take_while(move |&page| page < end)
}

impl Introspection {
    /// Attributes, decides and applies. Fails closed: an attribution error denies. An allowed
    /// call whose local port the kernel has not assigned yet waits for it at a port point (see
    /// [`super::ports`]); a `listen()` on a socket never bound is decided there too, with the
    /// port the kernel assigns. `t_ns`: when the hit's work began ([`monotonic_ns`], read by the
    /// caller, which times the whole hit from it: three clock reads per hit where there were five).
    pub fn on_hook(
        &self,
        vcpu: u8,
        op: SocketOp,
        mem: &GuestMemoryMmap,
        regs: &mut kvm_regs,
        sregs: &kvm_sregs,
        t_ns: u64,
    ) -> HookOutcome {
        let ram = GuestRam(mem);
        let reader = VirtReader::new(&ram, sregs.cr3, PagingMode::from_cr4(sregs.cr4));
        let args = HookArgs {
            rdi: regs.rdi,
            rsi: regs.rsi,
            rdx: regs.rdx,
            gs_base: sregs.gs.base,
            kaslr_slide: self.slide(),
        };
        let mut attributed = match &self.trap_symbols {
            Some(syms) => {
                attribution::attribute_with(&reader, &self.profile, syms, &self.roots, op, args)
            }
            None => Err(AttributionError::MissingSymbol("current_task")),
        };
        // The socket's own ends (IP sockets): its local port, if the kernel gave it one.
        let mut error = None;
        let mut sk = 0;
        let ends = match &attributed {
            Ok(a) if governed_family(a.family) && matches!(a.family, 2 | 10) => {
                match ports::sock_of(&reader, &self.profile, regs.rdi).and_then(|s| {
                    sk = s;
                    ports::read_ends(&reader, &self.profile, s)
                }) {
                    Ok(ends) => ends,
                    Err(e) => {
                        error = Some(format!("reading the socket's ends: {e}"));
                        None
                    }
                }
            }
            _ => None,
        };
        let wait = match &attributed {
            Ok(a) if error.is_none() && governed_family(a.family) => port_point(a, ends.as_ref()),
            _ => None,
        };
        // A listen on a socket never bound: the policy decides once the port is known (what the
        // hook asks is only whether any port could be allowed).
        let deferred = wait == Some(PortPoint::Listening);
        // The policy's epoch travels with the decision: a verdict is granted only under the
        // policy that allowed it.
        let mut epoch = self.policy_epoch();
        let verdict = match &mut attributed {
            _ if error.is_some() => Verdict::Deny,
            Ok(a) => {
                let (verdict, under) =
                    self.decide_under_policy(|policy| hook_verdict(policy, a, wait));
                epoch = under;
                verdict
            }
            Err(_) => Verdict::Deny,
        };
        let mut verdict_seq = None;
        let mut outcome = HookOutcome::Allow;
        if verdict == Verdict::Allow {
            match (&attributed, wait) {
                (Ok(a), Some(point)) => {
                    let now = Instant::now();
                    let call = Pending {
                        sk,
                        point,
                        attribution: a.clone(),
                        decided: !deferred,
                        epoch,
                        work_ns: monotonic_ns().saturating_sub(t_ns),
                        since: now,
                    };
                    let unfinished = {
                        let mut pending = self.pending();
                        pending.insert(call, now);
                        pending.take_unfinished()
                    };
                    self.log_unfinished_calls(vcpu, unfinished);
                    // The event is the port point's, with the verdict it issues.
                    return HookOutcome::Allow;
                }
                (Ok(a), None) => {
                    // The verdicts reach the tiers before the vCPU resumes, or the call is
                    // denied.
                    match self.produce_verdicts(&hook_rules(a, ends.as_ref()), epoch) {
                        Ok(seq) => verdict_seq = seq,
                        Err(undelivered) => {
                            error = Some(undelivered.to_string());
                            outcome = self.deny(&reader, regs, &mut error);
                        }
                    }
                }
                (Err(_), _) => {}
            }
        } else {
            outcome = self.deny(&reader, regs, &mut error);
        }
        let vmm_work_ns = monotonic_ns().saturating_sub(t_ns);
        self.log_call(
            vcpu,
            t_ns,
            outcome,
            attributed,
            error,
            verdict_seq,
            None,
            vmm_work_ns,
        );
        outcome
    }

    /// Logs the calls that left the waiting table without reaching their port point (`why`
    /// they left): each returned to the guest already, opened nothing (no verdict was issued
    /// for it), and still gets its one event. Nothing to do, no allocation, in the common case.
    fn log_unfinished_calls(&self, vcpu: u8, calls: Vec<(ports::Pending, ports::Left)>) {
        for (call, left) in calls {
            let point = call.point;
            self.log_call(
                vcpu,
                monotonic_ns(),
                HookOutcome::Allow,
                Ok(call.attribution),
                Some(format!(
                    "never reached its port point ({}): {}; no verdict was issued, nothing \
                     was opened",
                    point.name(),
                    left.why()
                )),
                None,
                Some(point),
                call.work_ns,
            );
        }
    }

    /// The VM stopped: the calls still waiting for their port get their events now.
    pub fn settle_waiting(&self) {
        let all = self.pending().take_all();
        self.log_unfinished_calls(0, all);
    }

    /// Queues the event of one decided call.
    #[allow(clippy::too_many_arguments)]
    fn log_call(
        &self,
        vcpu: u8,
        t_ns: u64,
        outcome: HookOutcome,
        attributed: Result<attribution::Attribution, attribution::AttributionError>,
        mut error: Option<String>,
        verdict_seq: Option<u64>,
        port_point: Option<PortPoint>,
        vmm_work_ns: u64,
    ) {
        let attribution = match attributed {
            Ok(a) => Some(a),
            Err(e) => {
                error = Some(match error {
                    Some(more) => format!("{e}; {more}"),
                    None => e.to_string(),
                });
                None
            }
        };
        let _ = self.events.send(LogEntry::Socket(SocketEvent {
            vcpu,
            t_ns,
            verdict: match outcome {
                HookOutcome::Allow => Verdict::Allow,
                HookOutcome::Denied | HookOutcome::Unanswerable => Verdict::Deny,
            },
            attribution,
            error,
            verdict_seq,
            port_point: port_point.map(PortPoint::name),
            vmm_work_ns,
        }));
    }

    /// A port point was hit (`regs.rdi` is the `struct sock`): the call waiting on that socket,
    /// if any, gets its exact verdict now (a deferred `listen` its decision first), or the
    /// function returns -EPERM. Without a waiting call (any other socket: a connect decided with
    /// its port known, a kernel socket, a send on a bound socket) it passes untouched.
    pub fn on_port_point(
        &self,
        vcpu: u8,
        point: PortPoint,
        mem: &GuestMemoryMmap,
        regs: &mut kvm_regs,
        sregs: &kvm_sregs,
        t_ns: u64,
    ) -> HookOutcome {
        if self.pending().len() == 0 {
            return HookOutcome::Allow;
        }
        let ram = GuestRam(mem);
        let reader = VirtReader::new(&ram, sregs.cr3, PagingMode::from_cr4(sregs.cr4));
        reader.use_direct_map(self.roots.direct_map());
        let Some(tgid) = self.current_tgid_fast(&reader, sregs) else {
            return HookOutcome::Allow;
        };
        let sk = regs.rdi;
        if self
            .pending()
            .take_migrated(sk, point, tgid, Instant::now())
        {
            return self.deny_migrated_wait(vcpu, t_ns, point, &reader, regs);
        }
        let (taken, unfinished) = {
            let mut pending = self.pending();
            (pending.take(sk, point, tgid), pending.take_unfinished())
        };
        self.log_unfinished_calls(vcpu, unfinished);
        let Some(call) = taken else {
            log::debug!(
                "{}: {} of sock {sk:#x} (tgid {tgid}) with no call waiting on it",
                self.vm,
                point.name()
            );
            return HookOutcome::Allow;
        };
        let mut a = call.attribution;
        let mut error = None;
        let mut verdict = Verdict::Allow;
        let rules = match ports::read_ends(&reader, &self.profile, sk) {
            Ok(Some(ends)) => match point {
                PortPoint::TcpConnect
                    if ends.remote.map(ports::unmapped) != a.addr.map(ports::unmapped)
                        || Some(ends.remote_port) != a.port =>
                {
                    error = Some(format!(
                        "the socket connects to {:?}:{} at tcp_connect, not to the {:?}:{:?} \
                         decided",
                        ends.remote, ends.remote_port, a.addr, a.port
                    ));
                    CallRules::none()
                }
                PortPoint::Listening => {
                    a.port = Some(ends.local_port);
                    verdict_rules(&a, None)
                }
                PortPoint::TcpConnect | PortPoint::UdpSend => verdict_rules(&a, Some(&ends)),
            },
            Ok(None) => {
                error = Some("the socket is not an IP socket at its port point".into());
                CallRules::none()
            }
            Err(e) => {
                error = Some(format!("reading the socket's ends: {e}"));
                CallRules::none()
            }
        };
        let mut epoch = call.epoch;
        if !call.decided && error.is_none() {
            // A listen decided with the port the kernel assigned, or a call waiting while the
            // policy was replaced.
            (verdict, epoch) = self.decide_under_policy(|policy| policy.decide_noting(&mut a));
        }
        if rules.is_empty() && error.is_none() && verdict == Verdict::Allow {
            error = Some(format!("no local port at {}", point.name()));
        }
        let mut verdict_seq = None;
        let mut outcome = HookOutcome::Allow;
        if error.is_none() && verdict == Verdict::Allow {
            match self.produce_verdicts(&rules, epoch) {
                Ok(seq) => verdict_seq = seq,
                Err(undelivered) => error = Some(undelivered.to_string()),
            }
        }
        if error.is_some() || verdict != Verdict::Allow {
            outcome = self.deny(&reader, regs, &mut error);
        }
        let vmm_work_ns = call
            .work_ns
            .saturating_add(monotonic_ns().saturating_sub(t_ns));
        self.log_call(
            vcpu,
            t_ns,
            outcome,
            Ok(a),
            error,
            verdict_seq,
            Some(point),
            vmm_work_ns,
        );
        outcome
    }

    /// A call that waited for its port on the source host of a migration reaches its port point
    /// here: its decision stayed there, so it fails closed (-EPERM), and the event says why.
    fn deny_migrated_wait(
        &self,
        vcpu: u8,
        t_ns: u64,
        point: PortPoint,
        reader: &VirtReader<'_, GuestRam<'_>>,
        regs: &mut kvm_regs,
    ) -> HookOutcome {
        let mut error = Some(
            "the call waited for its local port across a migration; its decision stayed on the              source host: denied (fail closed)"
                .to_string(),
        );
        let outcome = self.deny(reader, regs, &mut error);
        let _ = self.events.send(LogEntry::Socket(SocketEvent {
            vcpu,
            t_ns,
            verdict: Verdict::Deny,
            attribution: None,
            error,
            verdict_seq: None,
            port_point: Some(point.name()),
            vmm_work_ns: monotonic_ns().saturating_sub(t_ns),
        }));
        outcome
    }

    /// The thread-group id of the task running on this vCPU: two reads, for the port points.
    fn current_tgid_fast(
        &self,
        reader: &VirtReader<'_, GuestRam<'_>>,
        sregs: &kvm_sregs,
    ) -> Option<u32> {
        let current_task = self.trap_symbols?.current_task;
        let task = reader
            .read_u64(sregs.gs.base.wrapping_add(current_task))
            .ok()?;
        reader
            .read_field_u32(task, self.profile.task_struct.tgid.offset)
            .ok()
    }

    pub(super) fn pending(&self) -> std::sync::MutexGuard<'_, ports::PendingPorts> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Denies the call at the hook (see [`deny_call`]), through this kernel's `ret` when the
    /// guest's stack is unreadable.
    fn deny(
        &self,
        reader: &VirtReader<'_, GuestRam<'_>>,
        regs: &mut kvm_regs,
        error: &mut Option<String>,
    ) -> HookOutcome {
        let linked = self.profile.symbols.get("__x86_return_thunk").copied();
        deny_call(
            reader,
            regs,
            || kernel_ret_insn(reader, linked, self.slide()),
            error,
        )
    }

    /// Whether a hit of `op`'s hook needs a decision. A `sendmsg` without a destination of its
    /// own goes where its socket's `connect` (already decided) pointed it: it passes without
    /// an event, which keeps every TCP write from producing one. An unreadable message is decided
    /// (and then denied).
    pub fn needs_decision(
        &self,
        op: SocketOp,
        mem: &GuestMemoryMmap,
        regs: &kvm_regs,
        sregs: &kvm_sregs,
    ) -> bool {
        if op != SocketOp::Sendmsg {
            return true;
        }
        let ram = GuestRam(mem);
        let reader = VirtReader::new(&ram, sregs.cr3, PagingMode::from_cr4(sregs.cr4));
        !matches!(
            reader.read_field_u64(regs.rsi, self.profile.msghdr.msg_name.offset),
            Ok(0)
        )
    }

    /// Places the software breakpoints (once per VM): an `int3` over the first byte of each hooked
    /// function, written through the VMM's mapping of guest RAM (so a write trap on that page
    /// does not stop it). Only where the first instruction has no effect but moving RIP (the
    /// `endbr64` of an IBT kernel, or the 5-byte NOP ftrace leaves where `call __fentry__` was):
    /// resuming skips it whole. A function starting otherwise is not hooked this way (the event
    /// says so). Returns how many were placed.
    pub fn place_soft_hooks(&self, mem: &GuestMemoryMmap, sregs: &kvm_sregs) -> usize {
        let placed = self.soft_placed.get_or_init(|| {
            let ram = GuestRam(mem);
            let reader = VirtReader::new(&ram, sregs.cr3, PagingMode::from_cr4(sregs.cr4));
            let slide = self.slide();
            let place = |linked: u64| -> Option<(u64, u64)> {
                let addr = linked.wrapping_add(slide);
                let t = reader.translate(addr).ok()?;
                let mut head = [0u8; 15];
                mem.read_slice(&mut head, GuestAddress(t.gpa)).ok()?;
                let insn = iced_x86::Decoder::with_ip(64, &head, addr, 0).decode();
                crate::emulation::is_skippable_at_hook(&insn).then_some(())?;
                mem.write_slice(&[INT3], GuestAddress(t.gpa)).ok()?;
                Some((addr, insn.len() as u64))
            };
            let mut placed = Vec::new();
            let mut skipped = Vec::new();
            let mut names = Vec::new();
            for &(op, linked) in &self.soft_hooks {
                match place(linked) {
                    Some((addr, len)) => {
                        placed.push((op, addr, len));
                        names.push((op.hook_symbol().to_string(), format!("{addr:#x}")));
                    }
                    None => skipped.push(op.hook_symbol().to_string()),
                }
            }
            // The port points: a point that could not be placed leaves its calls waiting for
            // nothing (their flows stay closed: fail closed), and the event says so.
            let mut points = Vec::new();
            for &(point, linked, name) in &self.port_hooks {
                match place(linked) {
                    Some((addr, len)) => {
                        points.push((point, addr, len));
                        names.push((name.to_string(), format!("{addr:#x}")));
                    }
                    None => skipped.push(name.to_string()),
                }
            }
            let _ = self.port_placed.set(points);
            let _ = self.events.send(LogEntry::SoftHooks(SoftHooksEvent {
                t_ns: monotonic_ns(),
                placed: names,
                skipped,
            }));
            placed
        });
        placed.len()
    }

    /// The thread-group id of the process running on a vCPU (kernel GS base in `sregs`).
    pub fn current_tgid(&self, mem: &GuestMemoryMmap, sregs: &kvm_sregs) -> Option<u32> {
        let ram = GuestRam(mem);
        let reader = VirtReader::new(&ram, sregs.cr3, PagingMode::from_cr4(sregs.cr4));
        attribution::current_process(&reader, &self.profile, sregs.gs.base)
            .ok()
            .map(|p| p.tgid)
    }

    /// The guest pages to write-trap, from the guest's own page tables (so a relocated or
    /// KASLR-placed kernel is found where it really is).
    pub fn guarded_pages(&self, mem: &GuestMemoryMmap, sregs: &kvm_sregs) -> Vec<GuardedPage> {
        let ram = GuestRam(mem);
        let reader = VirtReader::new(&ram, sregs.cr3, PagingMode::from_cr4(sregs.cr4));
        let mut pages = Vec::new();
        for &(symbol, extent) in GUARDED_SYMBOLS {
            let Some(&linked) = self.profile.symbols.get(symbol) else {
                continue;
            };
            let addr = linked.wrapping_add(self.slide());
            for page in pages_of(addr, extent) {
                if let Ok(t) = reader.translate(page) {
                    pages.push(GuardedPage {
                        gpa: t.gpa & !(PAGE_SIZE - 1),
                        label: symbol.to_string(),
                    });
                }
            }
        }
        pages
    }

    /// Logs the outcome of arming the write traps.
    pub fn write_traps_armed(&self, pages: &[GuardedPage], error: Option<String>) {
        let _ = self.events.send(LogEntry::WriteTraps(WriteTrapsEvent {
            t_ns: monotonic_ns(),
            kaslr_slide: format!("{:#x}", self.slide()),
            pages: pages
                .iter()
                .map(|p| (format!("{:#x}", p.gpa), p.label.clone()))
                .collect(),
            error,
        }));
    }

    /// A guest write to a guarded page was refused (KVM discarded it): report who tried.
    #[allow(clippy::too_many_arguments)]
    pub fn on_tamper(
        &self,
        vcpu: u8,
        gpa: u64,
        guarded: &str,
        data: &[u8],
        mem: &GuestMemoryMmap,
        regs: &kvm_regs,
        sregs: &kvm_sregs,
    ) {
        let ram = GuestRam(mem);
        let reader = VirtReader::new(&ram, sregs.cr3, PagingMode::from_cr4(sregs.cr4));
        let process = attribution::current_process(&reader, &self.profile, sregs.gs.base);
        let (process, error) = match process {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(e.to_string())),
        };
        let _ = self.events.send(LogEntry::Tamper(TamperEvent {
            vcpu,
            t_ns: monotonic_ns(),
            gpa: format!("{gpa:#x}"),
            guarded: guarded.to_string(),
            len: data.len(),
            data: hex::encode(data),
            rip: format!("{:#x}", regs.rip),
            process,
            error,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_denied_call_returns_eperm_to_its_caller() {
        let mut regs = kvm_regs {
            rip: 0xffff_ffff_8100_0000,
            rsp: 0xffff_c900_0000_0ff0,
            rax: 0,
            ..Default::default()
        };
        return_eperm(&mut regs, 0xffff_ffff_8123_4567);
        assert_eq!(regs.rax as i64, -1, "-EPERM");
        assert_eq!(regs.rip, 0xffff_ffff_8123_4567);
        assert_eq!(
            regs.rsp, 0xffff_c900_0000_0ff8,
            "the return address is popped"
        ); // A guest RSP at the top of the address space: the pop wraps, as the CPU's does.
        regs.rsp = u64::MAX - 7;
        return_eperm(&mut regs, 0xffff_ffff_8123_4567);
        assert_eq!(regs.rsp, 0);
    }

    /// A kernel address space: `text` (one page, a `ret` at its start) and `stack` (one page)
    /// mapped, nothing else.
    fn kernel_space(text: u64, stack: u64) -> (trap_handler::mem::PhysImage, u64) {
        use trap_handler::mem::{PageTableBuilder, PhysImage};
        let mut img = PhysImage::new(1 << 20);
        let mut pt =
            PageTableBuilder::new(&mut img, PagingMode::Level4, 0x10_000, 0x40_000).unwrap();
        pt.map(text, 0x80_000, 4096).unwrap();
        pt.map(stack, 0x90_000, 4096).unwrap();
        let cr3 = pt.root();
        img.write(0x80_000, &[RET, 0xcc]).unwrap();
        img.write(0x90_ff8, &0xffff_ffff_8123_4567u64.to_le_bytes())
            .unwrap();
        (img, cr3)
    }

    const TEXT: u64 = 0xffff_ffff_8100_0000;
    const STACK: u64 = 0xffff_c900_0000_0000;

    #[test]
    fn a_denied_call_pops_its_return_address_when_the_stack_is_readable() {
        let (img, cr3) = kernel_space(TEXT, STACK);
        let reader = VirtReader::new(&img, cr3, PagingMode::Level4);
        let mut regs = kvm_regs {
            rip: TEXT + 0x100,
            rsp: STACK + 0xff8,
            ..Default::default()
        };
        let mut error = None;
        let outcome = deny_call(&reader, &mut regs, || panic!("not needed"), &mut error);
        assert_eq!(outcome, HookOutcome::Denied);
        assert_eq!(
            (regs.rip, regs.rsp),
            (0xffff_ffff_8123_4567, STACK + 0x1000)
        );
        assert_eq!(regs.rax as i64, -1);
        assert_eq!(error, None);
    }

    #[test]
    fn a_denied_call_stays_denied_when_the_stack_is_unreadable() {
        let (img, cr3) = kernel_space(TEXT, STACK);
        let reader = VirtReader::new(&img, cr3, PagingMode::Level4);
        // RSP points at an unmapped page (a hostile kernel can arrange that).
        let unmapped = STACK + 0x10_0000;
        let mut regs = kvm_regs {
            rip: TEXT + 0x100,
            rsp: unmapped,
            ..Default::default()
        };
        let mut error = Some("earlier".to_string());
        let ret = || kernel_ret_insn(&reader, Some(TEXT), 0);
        assert_eq!(
            deny_call(&reader, &mut regs, ret, &mut error),
            HookOutcome::Denied
        );
        assert_eq!(regs.rip, TEXT, "through the kernel's own ret");
        assert_eq!(
            regs.rsp, unmapped,
            "the CPU pops the return address, not the VMM"
        );
        assert_eq!(regs.rax as i64, -1, "-EPERM");
        let error = error.unwrap();
        assert!(
            error.starts_with("earlier; ") && error.contains("unreadable"),
            "{error}"
        );
    }

    #[test]
    fn without_a_verified_ret_an_unreadable_stack_stops_the_vm() {
        let (img, cr3) = kernel_space(TEXT, STACK);
        let reader = VirtReader::new(&img, cr3, PagingMode::Level4);
        let mut regs = kvm_regs {
            rip: TEXT + 0x100,
            rsp: STACK + 0x10_0000,
            ..Default::default()
        };
        let before = regs;
        // No such symbol; a symbol whose byte is not `ret` (the int3 after it); one unmapped.
        for linked in [None, Some(TEXT + 1), Some(TEXT + 0x20_0000)] {
            let mut error = None;
            let ret = || kernel_ret_insn(&reader, linked, 0);
            assert_eq!(
                deny_call(&reader, &mut regs, ret, &mut error),
                HookOutcome::Unanswerable,
                "{linked:x?}"
            );
            assert!(error.unwrap().contains("the VM stops"));
            assert_eq!(
                (regs.rip, regs.rsp, regs.rax),
                (before.rip, before.rsp, before.rax)
            );
        }
    }

    #[test]
    fn the_kernel_ret_follows_the_kaslr_slide() {
        let slide = 0x2000_0000;
        let (img, cr3) = kernel_space(TEXT + slide, STACK);
        let reader = VirtReader::new(&img, cr3, PagingMode::Level4);
        assert_eq!(
            kernel_ret_insn(&reader, Some(TEXT), slide),
            Some(TEXT + slide)
        );
        assert_eq!(kernel_ret_insn(&reader, Some(TEXT), 0), None);
    }

    #[test]
    fn guarded_extents_cover_every_page_they_touch() {
        assert_eq!(pages_of(0x1000, 64).collect::<Vec<_>>(), vec![0x1000]);
        // 64 bytes from 0x1fe0 straddle two pages.
        assert_eq!(
            pages_of(0x1fe0, 64).collect::<Vec<_>>(),
            vec![0x1000, 0x2000]
        );
        // The system call table: 4 KiB from an unaligned start is two pages.
        assert_eq!(pages_of(0x5008, 8 * 512).count(), 2);
        assert_eq!(pages_of(0x5000, 8 * 512).count(), 1); // At the top of the address space (a slide the guest's LSTAR chose): the pages up to the
                                                          // top, never a wrapped end that guards nothing.
        let top = u64::MAX - PAGE_SIZE + 1;
        assert_eq!(pages_of(top + 0x800, 0x1000).collect::<Vec<_>>(), vec![top]);
        assert_eq!(
            pages_of(top - 8, 64).collect::<Vec<_>>(),
            vec![top - PAGE_SIZE, top]
        );
        assert_eq!(pages_of(u64::MAX, u64::MAX).collect::<Vec<_>>(), vec![top]);
    }

    #[test]
    fn every_hooked_function_is_guarded() {
        for op in [
            SocketOp::Connect,
            SocketOp::Bind,
            SocketOp::Listen,
            SocketOp::Sendmsg,
        ] {
            assert!(
                GUARDED_SYMBOLS.iter().any(|&(s, _)| s == op.hook_symbol()),
                "{}",
                op.hook_symbol()
            );
        }
    }
}
