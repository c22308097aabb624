//! A vCPU's introspection exits: the socket hooks (hardware breakpoints and software int3
//! hooks), the port points that learn a socket's exact ports, and the write traps over the hooked
//! kernel pages (arming them and reporting a tamper).
//!
//! Owns: what this vCPU does on a hook hit, a port-point hit or a guarded-page write: complete the
//! guest instruction, ask [`Introspection`] for the decision and apply it to the guest's
//! registers. Must not: decide (the policy and attribution live in [`crate::introspect`]), or
//! touch another vCPU's state except through the shared pause and debug generation.

use std::sync::atomic::Ordering;

use kvm_bindings::{kvm_regs, kvm_sregs};
use trap_handler::attribution::SocketOp;

use super::exit::BP_VECTOR;
use super::{kvm, Action, StopReason, Vcpu, VcpuError, STOP_OTHERS_LIMIT};
use crate::host_kind::HostKind;
use crate::introspect::{monotonic_ns, HookOutcome, Introspection, PortPoint};

impl Vcpu {
    /// A #BP exit on a hardware host: a software-breakpoint hook of ours, or the guest's own.
    pub(super) fn on_breakpoint(&mut self, pc: u64) -> Result<(), VcpuError> {
        let (mut regs, sregs) = self.registers()?;
        if let Some((op, len)) = self.introspection.as_ref().and_then(|i| i.soft_hook_at(pc)) {
            return self.on_soft_hook(op, len, regs, sregs);
        }
        if let Some((point, len)) = self
            .introspection
            .as_ref()
            .and_then(|i| i.port_point_at(pc))
        {
            return self.on_port_point(point, len, regs, sregs);
        }
        regs.rip = pc.wrapping_add(1);
        self.fd.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
        self.inject_exception(BP_VECTOR)
    }

    /// A software-breakpoint hook was hit (RIP at our int3, over the first byte of an instruction
    /// of `len` bytes with no effect): decide as for a debug-register hook, then resume after it.
    pub(super) fn on_soft_hook(
        &mut self,
        op: SocketOp,
        len: u64,
        mut regs: kvm_regs,
        sregs: kvm_sregs,
    ) -> Result<(), VcpuError> {
        let Some(introspection) = self.introspection.clone() else {
            return Err(VcpuError::SoftHookWithoutIntrospection);
        };
        let entry = regs.rip;
        let outcome = if introspection.bare.contains(&op) {
            self.stats.bare_hook_hits += 1;
            HookOutcome::Allow
        } else if !introspection.needs_decision(op, &self.memory, &regs, &sregs) {
            self.stats.soft_hook_passes += 1;
            HookOutcome::Allow
        } else {
            self.decide(&introspection, op, &mut regs, &sregs)
        };
        match outcome {
            HookOutcome::Allow => regs.rip = entry + len,
            HookOutcome::Denied => {}
            HookOutcome::Unanswerable => return Err(VcpuError::Unanswerable(op)),
        }
        self.fd.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))
    }

    /// A port point was hit (RIP at our int3 over an instruction of `len` bytes with no effect):
    /// the call waiting there gets its exact verdict, or the function returns -EPERM (see
    /// [`crate::introspect::ports`]); then resume after the instruction.
    pub(super) fn on_port_point(
        &mut self,
        point: PortPoint,
        len: u64,
        mut regs: kvm_regs,
        sregs: kvm_sregs,
    ) -> Result<(), VcpuError> {
        let Some(introspection) = self.introspection.clone() else {
            return Err(VcpuError::SoftHookWithoutIntrospection);
        };
        let entry = regs.rip;
        let started = monotonic_ns();
        let outcome = introspection.on_port_point(
            self.index,
            point,
            &self.memory,
            &mut regs,
            &sregs,
            started,
        );
        self.stats.port_point_hits += 1;
        self.stats.port_point_work_ns += monotonic_ns().saturating_sub(started);
        match outcome {
            HookOutcome::Allow => regs.rip = entry + len,
            HookOutcome::Denied => self.stats.hook_denials += 1,
            HookOutcome::Unanswerable => return Err(VcpuError::UnanswerablePort(point.name())),
        }
        self.fd.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))
    }

    /// A socket LSM hook was hit: attribute, decide, apply (see [`crate::introspect`]).
    pub(super) fn on_hook(&mut self, op: SocketOp, pc: u64) -> Result<(), VcpuError> {
        let Some(introspection) = self.introspection.clone() else {
            return self.step_over(pc);
        };
        if introspection.bare.contains(&op) {
            self.stats.bare_hook_hits += 1;
            return self.step_over(pc);
        }
        let (mut regs, sregs) = self.registers()?;
        if self.host == HostKind::Hardware {
            // No syscall fix runs on hardware to tell when init starts: the first hook hit
            // (normally from a process init started) arms the write traps.
            self.maybe_arm_write_traps(&sregs);
        }
        match self.decide(&introspection, op, &mut regs, &sregs) {
            HookOutcome::Denied => self.fd.set_regs(&regs).map_err(kvm("KVM_SET_REGS")),
            // An allowed call's registers are as the exit left them.
            HookOutcome::Allow => self.step_over_with(pc, regs, sregs),
            HookOutcome::Unanswerable => Err(VcpuError::Unanswerable(op)),
        }
    }

    /// Attributes and decides one hook hit (either kind of hook), counting it and the VMM-side
    /// time it took; a denial has already rewritten `regs` to return -EPERM.
    fn decide(
        &mut self,
        introspection: &Introspection,
        op: SocketOp,
        regs: &mut kvm_regs,
        sregs: &kvm_sregs,
    ) -> HookOutcome {
        let started = monotonic_ns();
        let outcome = introspection.on_hook(self.index, op, &self.memory, regs, sregs, started);
        self.stats.hook_hits += 1;
        self.stats.hook_work_ns += monotonic_ns().saturating_sub(started);
        if let HookOutcome::Denied = outcome {
            self.stats.hook_denials += 1;
        }
        outcome
    }

    /// Arms the VM's write traps once the tenant has booted (first user-mode system call or first
    /// hook hit, whichever this vCPU sees first). A failure is logged; the hooks keep working.
    pub(super) fn maybe_arm_write_traps(&mut self, sregs: &kvm_sregs) {
        if self.write_traps_tried {
            return;
        }
        self.write_traps_tried = true;
        let (Some(traps), Some(introspection)) = (&self.write_traps, &self.introspection) else {
            return;
        };
        if traps.is_armed() {
            return;
        }
        let (traps, introspection) = (traps.clone(), introspection.clone());
        // The memory slots change and the hooks may move or become int3s: no other vCPU may run
        // a guest instruction meanwhile. They park at the top of their loops and, when they run
        // again, reprogram their debug state for the new generation first.
        let control = self.control.clone().unwrap_or_default();
        let stopped = match control.stop_others(self.vcpu_count, STOP_OTHERS_LIMIT) {
            Ok(stopped) => stopped,
            Err(crate::run_control::RunControlError::Busy) => {
                // Another vCPU is arming them right now.
                return;
            }
            Err(e) => {
                introspection
                    .write_traps_armed(&[], Some(format!("could not stop the other vCPUs: {e}")));
                return;
            }
        };
        if traps.is_armed() {
            return;
        }
        // Where the kernel really is: a slide other than 0 moves every hook (a kernel that ran
        // the bzImage decompressor with KASLR; a PVH-booted vmlinux runs where it was linked).
        let slide_error = match self.syscall_msrs() {
            Ok(msrs) => match introspection.adopt_slide(msrs.lstar) {
                Ok(0) => None,
                Ok(_) => self.program_debug(false).err().map(|e| e.to_string()),
                Err(e) => Some(e.to_string()),
            },
            Err(e) => Some(e.to_string()),
        };
        if let Some(e) = slide_error {
            introspection.write_traps_armed(&[], Some(format!("KASLR check: {e}")));
        }
        // Software breakpoints first: they are written through the VMM's own mapping anyway, but
        // the guest must not see a page half-guarded.
        introspection.place_soft_hooks(&self.memory, sregs);
        if self.host == HostKind::Hardware && introspection.soft_hooks_placed() {
            // Ask KVM to exit on #BP on this vCPU (the others do when they see the generation).
            let _ = self.program_debug(false);
        }
        // Every other vCPU takes on the moved hooks and #BP interception before it runs again.
        if let Some(generation) = &self.debug_generation {
            generation.fetch_add(1, Ordering::AcqRel);
        }
        let pages = introspection.guarded_pages(&self.memory, sregs);
        match traps.arm(&pages, &stopped) {
            Ok(_) => introspection.write_traps_armed(&pages, None),
            Err(e) => introspection.write_traps_armed(&[], Some(e.to_string())),
        }
        drop(stopped);
    }

    /// A guest write to a guarded page: KVM already discarded it (read-only memslot); the guest
    /// continues after the instruction. Report the writer.
    pub(super) fn on_tamper(&mut self, gpa: u64, data: &[u8]) -> Action {
        self.stats.tamper_writes += 1;
        let (Some(traps), Some(introspection)) = (&self.write_traps, &self.introspection) else {
            return Action::Continue;
        };
        let guarded = traps.guarded(gpa).unwrap_or("?").to_string();
        match self.registers() {
            Ok((regs, sregs)) => {
                introspection.on_tamper(
                    self.index,
                    gpa,
                    &guarded,
                    data,
                    &self.memory,
                    &regs,
                    &sregs,
                );
                Action::Continue
            }
            Err(e) => Action::Stop(StopReason::Crashed(e.to_string())),
        }
    }
}
