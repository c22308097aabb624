//! The guest-debug state a vCPU programs into KVM: hardware breakpoints on the guest's #PF
//! handler (the syscall fix) and on the introspection hooks, single stepping while it steps over
//! one of them, and #BP interception for software hooks on hardware hosts.
//!
//! Owns: the layout of that state (which debug register holds what, DR7's enable bits).
//! Must not: issue the ioctl (the vCPU does) or decide where hooks are.

use kvm_bindings::{
    kvm_guest_debug, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP,
    KVM_GUESTDBG_USE_SW_BP,
};

/// DR7: local enable of breakpoint 0 (execute, length 1 — RW0 = LEN0 = 0).
const DR7_L0: u64 = 1 << 0;

/// The state for `KVM_SET_GUEST_DEBUG`: while stepping over one of our breakpoints, no
/// breakpoint and single stepping; otherwise DR0 on the guest's #PF handler (`pf_handler`),
/// DR1-DR3 on the first three `hooks` (execute, one byte each), and #BP interception when
/// `soft_breakpoints`.
pub(crate) fn guest_debug(
    single_step: bool,
    pf_handler: Option<u64>,
    hooks: &[u64],
    soft_breakpoints: bool,
) -> kvm_guest_debug {
    let mut debug = kvm_guest_debug {
        control: KVM_GUESTDBG_ENABLE,
        ..Default::default()
    };
    if single_step {
        debug.control |= KVM_GUESTDBG_SINGLESTEP;
        return debug;
    }
    let slots = std::iter::once(pf_handler)
        .chain(hooks.iter().map(|addr| Some(*addr)))
        .take(4);
    for (slot, addr) in slots.enumerate() {
        if let Some(addr) = addr {
            debug.arch.debugreg[slot] = addr;
            // Ln enable; RWn = LENn = 0: execute, one byte.
            debug.arch.debugreg[7] |= DR7_L0 << (2 * slot);
        }
    }
    if debug.arch.debugreg[7] != 0 {
        debug.control |= KVM_GUESTDBG_USE_HW_BP;
    }
    if soft_breakpoints {
        debug.control |= KVM_GUESTDBG_USE_SW_BP;
    }
    debug
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_step_sets_no_breakpoint() {
        let d = guest_debug(true, Some(0x1000), &[0x2000], true);
        assert_eq!(d.control, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP);
        assert_eq!(d.arch.debugreg, [0; 8]);
    }

    #[test]
    fn pf_handler_in_dr0_hooks_after_it_at_most_four() {
        let d = guest_debug(
            false,
            Some(0x1000),
            &[0x2000, 0x3000, 0x4000, 0x5000],
            false,
        );
        assert_eq!(&d.arch.debugreg[..4], &[0x1000, 0x2000, 0x3000, 0x4000]);
        assert_eq!(d.arch.debugreg[7], 0b0101_0101, "L0-L3, execute, one byte");
        assert_eq!(d.control, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP);
    }

    #[test]
    fn without_the_syscall_fix_dr0_stays_free() {
        let d = guest_debug(false, None, &[0x2000], true);
        assert_eq!(&d.arch.debugreg[..2], &[0, 0x2000]);
        assert_eq!(d.arch.debugreg[7], 0b0100);
        assert_eq!(
            d.control,
            KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP | KVM_GUESTDBG_USE_SW_BP
        );
        let nothing = guest_debug(false, None, &[], false);
        assert_eq!(
            nothing.control, KVM_GUESTDBG_ENABLE,
            "no hardware breakpoint"
        );
    }
}
