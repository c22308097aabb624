//! Dirty-page logging for live migration's pre-copy: which guest pages changed since the last
//! look, from two sources that together cover every writer of a VM's RAM:
//!
//! - the guest's own writes: KVM's dirty log (`KVM_MEM_LOG_DIRTY_PAGES` on every writable
//!   memslot, read and cleared with `KVM_GET_DIRTY_LOG`);
//! - the VMM's writes (virtio devices, software breakpoints): the `AtomicBitmap`
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

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use kvm_bindings::{
    kvm_segment, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
};
use kvm_ioctls::{Kvm, VcpuExit, VmFd};
use thiserror::Error;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::write_trap::{RamSlot, PAGE_SIZE};
use crate::GuestMemoryMmap;

/// Why dirty logging is not available.
#[derive(Clone, Debug, Error)]
pub enum DirtyLogError {
    #[error("KVM: {0}")]
    Kvm(String),
    #[error("this VM's memory keeps no bitmap of the VMM's writes (a micro-VM's): its dirty pages cannot be known")]
    NoVmmBitmap,
    #[error("KVM's dirty log is wrong: wrote pages {wrote:?}, it logged {logged:?}")]
    Wrong { wrote: Vec<u64>, logged: Vec<u64> },
    #[error("the probe guest did not finish: {0}")]
    Guest(String),
    #[error(
        "KVM_SET_USER_MEMORY_REGION (slot {slot}, {start:#x}+{len:#x}, flags {flags:#x}): {source}"
    )]
    SetSlot {
        slot: u32,
        start: u64,
        len: u64,
        flags: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_GET_DIRTY_LOG (slot {slot}): {source}")]
    GetLog {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("dirty logging is not on")]
    NotLogging,
}

/// A VM's RAM memslots: their layout (one slot over all RAM until write traps split it) and
/// whether KVM logs their dirty pages. Every change of a slot goes through here, under one lock,
/// so that turning logging on and splitting a slot cannot race.
pub struct MemSlots {
    vm_fd: Arc<VmFd>,
    ram: RamSlot,
    state: Mutex<SlotState>,
}

struct SlotState {
    /// (start, length, read-only), slot `ram.slot + index`.
    layout: Vec<(u64, u64, bool)>,
    logging: bool,
    /// Bumped when the layout changes: a slot made afresh lost its log (everything counts as
    /// dirty at the next read).
    generation: u64,
    read_generation: u64,
}

/// The pages of RAM written since the previous read, as a bitmap (bit n = page n).
pub struct DirtyPages {
    pub bits: Vec<u64>,
    pub pages: u64,
}

impl DirtyPages {
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Page numbers, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        let pages = self.pages;
        set_pages(&self.bits)
            .into_iter()
            .filter(move |&p| p < pages)
    }
}

/// The bitmap of the VMM's writes to one region (vm-memory marks it on every write through its
/// accessors); `None` for memory built without one (a micro-VM's, which never migrates).
fn vmm_bitmap(region: &vm_memory::GuestRegionMmap<Option<AtomicBitmap>>) -> Option<&AtomicBitmap> {
    let mapping: &vm_memory::MmapRegion<Option<AtomicBitmap>> = region;
    mapping.bitmap().as_ref()
}

impl MemSlots {
    /// Registers RAM as one slot.
    pub fn new(vm_fd: Arc<VmFd>, ram: RamSlot) -> Result<MemSlots, DirtyLogError> {
        let slots = MemSlots {
            vm_fd,
            ram,
            state: Mutex::new(SlotState {
                layout: vec![(0, ram.size, false)],
                logging: false,
                generation: 0,
                read_generation: 0,
            }),
        };
        slots.set_slot(ram.slot, 0, ram.size, 0)?;
        Ok(slots)
    }

    pub fn ram(&self) -> RamSlot {
        self.ram
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_slot(&self, slot: u32, start: u64, len: u64, flags: u32) -> Result<(), DirtyLogError> {
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: start,
            memory_size: len,
            userspace_addr: self.ram.host_addr + start,
            flags,
        };
        // SAFETY: the host range lies inside the guest RAM mapping the VM owns for its lifetime
        // (start + len <= ram.size); a zero length deletes the slot.
        unsafe { self.vm_fd.set_user_memory_region(region) }.map_err(|source| {
            DirtyLogError::SetSlot {
                slot,
                start,
                len,
                flags,
                source,
            }
        })
    }

    fn flags(read_only: bool, logging: bool) -> u32 {
        if read_only {
            KVM_MEM_READONLY
        } else if logging {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        }
    }

    /// Replaces the one RAM slot by `layout`'s pieces (write traps). The guest must not run
    /// meanwhile (the caller holds the other vCPUs).
    pub(crate) fn split(&self, layout: &[(u64, u64, bool)]) -> Result<(), DirtyLogError> {
        let mut state = self.lock();
        // Delete the RAM slot, then add its pieces (KVM rejects overlapping slots).
        self.set_slot(self.ram.slot, 0, 0, 0)?;
        state.generation += 1;
        state.layout = layout.to_vec();
        for (i, &(start, len, read_only)) in layout.iter().enumerate() {
            self.set_slot(
                self.ram.slot + i as u32,
                start,
                len,
                Self::flags(read_only, state.logging),
            )?;
        }
        Ok(())
    }

    /// Starts logging: KVM logs the guest's writes to every writable slot from here, and the
    /// VMM's bitmap of `memory` is cleared (its writes count from here too).
    pub fn start_logging(&self, memory: &GuestMemoryMmap) -> Result<(), DirtyLogError> {
        // Without the VMM's half of the log, what it reports would miss pages: refuse.
        if memory.iter().any(|region| vmm_bitmap(region).is_none()) {
            return Err(DirtyLogError::NoVmmBitmap);
        }
        let mut state = self.lock();
        for (i, &(start, len, read_only)) in state.layout.iter().enumerate() {
            if !read_only {
                self.set_slot(
                    self.ram.slot + i as u32,
                    start,
                    len,
                    Self::flags(false, true),
                )?;
            }
        }
        state.logging = true;
        state.read_generation = state.generation;
        for bitmap in memory.iter().filter_map(vmm_bitmap) {
            bitmap.reset();
        }
        Ok(())
    }

    /// Stops logging (slots as before). Errors are logged: the VM runs on either way.
    pub fn stop_logging(&self) {
        let mut state = self.lock();
        if !state.logging {
            return;
        }
        for (i, &(start, len, read_only)) in state.layout.iter().enumerate() {
            if !read_only {
                if let Err(e) = self.set_slot(self.ram.slot + i as u32, start, len, 0) {
                    log::warn!("dirty log: {e}");
                }
            }
        }
        state.logging = false;
    }

    /// Pages written since logging started or since the previous call, by the guest (KVM's
    /// log, read and cleared) or by the VMM (vm-memory's bitmap, read and cleared). After the
    /// slots were split under logging, every page counts as dirty once.
    pub fn take_dirty(&self, memory: &GuestMemoryMmap) -> Result<DirtyPages, DirtyLogError> {
        let mut state = self.lock();
        if !state.logging {
            return Err(DirtyLogError::NotLogging);
        }
        let pages = self.ram.size / PAGE_SIZE;
        let mut bits = vec![0u64; pages.div_ceil(64) as usize];
        let mark = |bits: &mut Vec<u64>, page: u64| {
            if page < pages {
                bits[(page / 64) as usize] |= 1 << (page % 64);
            }
        };
        for (i, &(start, len, read_only)) in state.layout.iter().enumerate() {
            if read_only {
                continue;
            }
            let slot = self.ram.slot + i as u32;
            let log = self
                .vm_fd
                .get_dirty_log(slot, len as usize)
                .map_err(|source| DirtyLogError::GetLog { slot, source })?;
            let first = start / PAGE_SIZE;
            for page in set_pages(&log) {
                mark(&mut bits, first + page);
            }
        }
        for region in memory.iter() {
            let first = region.start_addr().0 / PAGE_SIZE;
            // Every region has one: `start_logging` refused memory without.
            let words = vmm_bitmap(region)
                .map(AtomicBitmap::get_and_reset)
                .unwrap_or_default();
            for page in set_pages(&words) {
                mark(&mut bits, first + page);
            }
        }
        if state.read_generation != state.generation {
            state.read_generation = state.generation;
            bits.iter_mut().for_each(|w| *w = u64::MAX);
        }
        Ok(DirtyPages { bits, pages })
    }
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
            std::ptr::copy_nonoverlapping(code.as_ptr(), host.cast::<u8>().add(0x1000), code.len())
        };
        let mut vcpu = vm
            .create_vcpu(0)
            .map_err(|e| kvm_err("KVM_CREATE_VCPU", e))?;
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
        vcpu.set_regs(&regs)
            .map_err(|e| kvm_err("KVM_SET_REGS", e))?;
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
