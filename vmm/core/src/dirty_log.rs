//! Dirty-page logging for live migration's pre-copy: which guest pages changed since the last
//! look, from two sources that together cover every writer of a VM's RAM:
//!
//! - the guest's own writes: KVM's dirty log (`KVM_MEM_LOG_DIRTY_PAGES` on every writable
//!   memslot, read and cleared with `KVM_GET_DIRTY_LOG`);
//! - the VMM's writes (virtio devices, breakpoints, completed instructions): the `AtomicBitmap`
//!   that vm-memory keeps for guest RAM (every write through its accessors marks it; the one raw
//!   writer, the in-process link, marks it itself).
//!
//! Whether KVM's dirty log works is probed once per process on a throw-away VM ([`probe`]): a
//! KVM that does not log (or logs wrongly) is reported, and migration falls back to
//! stop-and-copy.
//!
//! Owns: the probe, the memslot flag while logging, and merging both sources into one bitmap.
//! Must not: decide when a migration stops iterating (the host does) or touch memslots outside
//! the [`crate::write_trap::MemSlots`] lock.

use std::sync::OnceLock;

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VcpuExit};
use thiserror::Error;

/// Why dirty logging is not available.
#[derive(Clone, Debug, Error)]
pub enum DirtyLogError {
    #[error("KVM: {0}")]
    Kvm(String),
    #[error("KVM's dirty log is wrong: wrote pages {wrote:?}, it logged {logged:?}")]
    Wrong { wrote: Vec<u64>, logged: Vec<u64> },
    #[error("the probe guest did not finish: {0}")]
    Guest(String),
}

/// Set bits of a `KVM_GET_DIRTY_LOG` bitmap as page numbers.
pub fn set_pages(bitmap: &[u64]) -> Vec<u64> {
    let mut pages = Vec::new();
    for (word, &bits) in bitmap.iter().enumerate() {
        let mut bits = bits;
        while bits != 0 {
            let bit = bits.trailing_zeros() as u64;
            pages.push(word as u64 * 64 + bit);
            bits &= bits - 1;
        }
    }
    pages
}

/// Whether this host's KVM logs dirty pages correctly (probed once, then remembered).
pub fn supported() -> Result<(), DirtyLogError> {
    static PROBED: OnceLock<Result<(), DirtyLogError>> = OnceLock::new();
    PROBED.get_or_init(probe).clone()
}

/// Runs a 16-page guest with `KVM_MEM_LOG_DIRTY_PAGES` that writes two pages in 32-bit
/// protected mode (KVM runs it in ring 0: on an emulating KVM through its emulator); the log
/// must name exactly those two, then, read again, nothing.
pub fn probe() -> Result<(), DirtyLogError> {
    const RAM: usize = 16 * 4096;
    let kvm_err = |what: &str, e: kvm_ioctls::Error| DirtyLogError::Kvm(format!("{what}: {e}"));
    let kvm = Kvm::new().map_err(|e| kvm_err("/dev/kvm", e))?;
    let vm = kvm.create_vm().map_err(|e| kvm_err("KVM_CREATE_VM", e))?;
    // SAFETY: an anonymous private mapping of RAM bytes, unmapped below after the VM is gone.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            RAM,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if host == libc::MAP_FAILED {
        return Err(DirtyLogError::Kvm("mmap".into()));
    }
    let result = (|| {
        // SAFETY: the mapping lives until after `vm` is dropped (the closure's end).
        unsafe {
            vm.set_user_memory_region(kvm_userspace_memory_region {
                slot: 0,
                guest_phys_addr: 0,
                memory_size: RAM as u64,
                userspace_addr: host as u64,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
            })
        }
        .map_err(|e| kvm_err("KVM_SET_USER_MEMORY_REGION (dirty log)", e))?;
        // mov dword [0x3000], 1; mov dword [0x9004], 2; out 0x80, al; hlt
        let code: [u8; 23] = [
            0xc7, 0x05, 0x00, 0x30, 0, 0, 1, 0, 0, 0, 0xc7, 0x05, 0x04, 0x90, 0, 0, 2, 0, 0, 0,
            0xe6, 0x80, 0xf4,
        ];
        // SAFETY: 23 bytes at offset 0x1000 of the RAM-byte mapping above.
        unsafe {
            std::ptr::copy_nonoverlapping(
                code.as_ptr(),
                host.cast::<u8>().add(0x1000),
                code.len(),
            )
        };
        let mut vcpu = vm.create_vcpu(0).map_err(|e| kvm_err("KVM_CREATE_VCPU", e))?;
        let mut sregs = vcpu.get_sregs().map_err(|e| kvm_err("KVM_GET_SREGS", e))?;
        let cs = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x8,
            type_: 0xb,
            present: 1,
            db: 1,
            s: 1,
            g: 1,
            ..Default::default()
        };
        let ds = kvm_segment {
            selector: 0x10,
            type_: 0x3,
            ..cs
        };
        (sregs.cs, sregs.ds, sregs.es, sregs.ss) = (cs, ds, ds, ds);
        sregs.cr0 = 0x11;
        vcpu.set_sregs(&sregs)
            .map_err(|e| kvm_err("KVM_SET_SREGS", e))?;
        let mut regs = vcpu.get_regs().map_err(|e| kvm_err("KVM_GET_REGS", e))?;
        regs.rip = 0x1000;
        regs.rflags = 2;
        vcpu.set_regs(&regs).map_err(|e| kvm_err("KVM_SET_REGS", e))?;
        match vcpu.run() {
            Ok(VcpuExit::IoOut(0x80, _)) => {}
            Ok(other) => return Err(DirtyLogError::Guest(format!("{other:?}"))),
            Err(e) => return Err(kvm_err("KVM_RUN", e)),
        }
        let logged = set_pages(
            &vm.get_dirty_log(0, RAM)
                .map_err(|e| kvm_err("KVM_GET_DIRTY_LOG", e))?,
        );
        if logged != [3, 9] {
            return Err(DirtyLogError::Wrong {
                wrote: vec![3, 9],
                logged,
            });
        }
        // Reading cleared it.
        let again = set_pages(
            &vm.get_dirty_log(0, RAM)
                .map_err(|e| kvm_err("KVM_GET_DIRTY_LOG", e))?,
        );
        if !again.is_empty() {
            return Err(DirtyLogError::Wrong {
                wrote: vec![],
                logged: again,
            });
        }
        Ok(())
    })();
    drop(vm);
    // SAFETY: the mapping made above; the VM that used it is gone.
    unsafe { libc::munmap(host, RAM) };
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_pages_lists_bits_in_order() {
        assert_eq!(set_pages(&[0b1010, 1 << 63, 0, 1]), vec![1, 3, 127, 192]);
        assert!(set_pages(&[0, 0]).is_empty());
    }

    /// Reports what this host's KVM does; where it logs, the log is exact (the probe checks).
    #[test]
    fn probe_reports_this_kvm() {
        if Kvm::new().is_err() {
            eprintln!("no /dev/kvm: skipped");
            return;
        }
        match probe() {
            Ok(()) => eprintln!("dirty logging works on this KVM"),
            Err(e) => {
                eprintln!("dirty logging unavailable: {e}");
                // Only "not available" is acceptable, never a wrong log.
                assert!(!matches!(e, DirtyLogError::Wrong { .. }), "{e}");
            }
        }
    }
}
