//! Introspection wiring: hardware breakpoints on the guest kernel's socket LSM hooks, attribution
//! of each hit to a guest process (trap-handler), the tenant's policy, and the verdict applied
//! before the vCPU resumes.
//!
//! A denied call returns `-EPERM` from the hooked function to its caller (RAX set, the return
//! address popped), so the guest process sees "Operation not permitted". An allowed call resumes
//! past the breakpoint. Every decision is one JSON line on the VMM's stdout.

use std::io::Write;
use std::time::Instant;

use kvm_bindings::{kvm_regs, kvm_sregs};
use serde::Serialize;
use trap_handler::attribution::{self, Attribution, HookArgs, SocketOp};
use trap_handler::mem::{PagingMode, VirtReader};
use trap_handler::policy::{Policy, Verdict};
use trap_handler::profile::KernelProfile;
use vm_memory::GuestMemoryMmap;

use crate::guest_ram::GuestRam;

/// `EPERM` (include/uapi/asm-generic/errno-base.h).
const EPERM: u64 = 1;

/// Hooks of one VM: what to trap and how to decide.
pub struct Introspection {
    pub vm: String,
    pub profile: KernelProfile,
    pub policy: Policy,
    /// (operation, guest-virtual address of its LSM hook), at most three: DR1-DR3.
    pub hooks: Vec<(SocketOp, u64)>,
    started: Instant,
}

/// One decision, as logged.
#[derive(Serialize)]
struct Event<'a> {
    event: &'static str,
    vm: &'a str,
    vcpu: u8,
    t_us: u64,
    verdict: Verdict,
    #[serde(flatten)]
    attribution: Option<&'a Attribution>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    vmm_work_ns: u64,
}

/// What the vCPU must do after a hook hit.
pub enum HookOutcome {
    /// Resume past the breakpoint.
    Allow,
    /// Registers already rewritten to return -EPERM to the caller.
    Denied,
}

impl Introspection {
    /// Builds the hooks from the kernel the VM boots (link addresses: a PVH-booted kernel runs
    /// unrelocated, so no KASLR slide applies).
    pub fn new(vm: &str, profile: KernelProfile, policy: Policy) -> Result<Self, String> {
        let mut hooks = Vec::new();
        for op in [SocketOp::Connect, SocketOp::Bind, SocketOp::Listen] {
            let addr = *profile
                .symbols
                .get(op.hook_symbol())
                .ok_or_else(|| format!("the kernel has no {} symbol to hook", op.hook_symbol()))?;
            hooks.push((op, addr));
        }
        Ok(Introspection {
            vm: vm.to_string(),
            profile,
            policy,
            hooks,
            started: Instant::now(),
        })
    }

    pub fn hook_at(&self, pc: u64) -> Option<SocketOp> {
        self.hooks.iter().find(|(_, a)| *a == pc).map(|(op, _)| *op)
    }

    /// Attributes, decides and applies. Fails closed: an attribution error denies.
    pub fn on_hook(
        &self,
        vcpu: u8,
        op: SocketOp,
        mem: &GuestMemoryMmap,
        regs: &mut kvm_regs,
        sregs: &kvm_sregs,
    ) -> HookOutcome {
        let work = Instant::now();
        let ram = GuestRam(mem);
        let reader = VirtReader::new(&ram, sregs.cr3, PagingMode::from_cr4(sregs.cr4));
        let args = HookArgs {
            rdi: regs.rdi,
            rsi: regs.rsi,
            rdx: regs.rdx,
            gs_base: sregs.gs.base,
        };
        let attributed = attribution::attribute(&reader, &self.profile, op, args);
        let verdict = match &attributed {
            Ok(a) => self.policy.decide(a),
            Err(_) => Verdict::Deny,
        };
        let mut outcome = HookOutcome::Allow;
        if verdict == Verdict::Deny {
            // Return -EPERM to the caller: pop the return address the call pushed.
            match reader.read_u64(regs.rsp) {
                Ok(ret) => {
                    regs.rax = EPERM.wrapping_neg();
                    regs.rip = ret;
                    regs.rsp += 8;
                    outcome = HookOutcome::Denied;
                }
                Err(_) => {
                    // The guest's own stack is unreadable: let the call proceed rather than
                    // corrupt its state; the event says so.
                }
            }
        }
        let event = Event {
            event: "socket",
            vm: &self.vm,
            vcpu,
            t_us: self.started.elapsed().as_micros() as u64,
            verdict: match outcome {
                HookOutcome::Allow => Verdict::Allow,
                HookOutcome::Denied => Verdict::Deny,
            },
            attribution: attributed.as_ref().ok(),
            error: attributed.as_ref().err().map(|e| e.to_string()),
            vmm_work_ns: work.elapsed().as_nanos() as u64,
        };
        if let Ok(line) = serde_json::to_string(&event) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
        outcome
    }
}
