//! Write traps: guest-physical pages the guest may read and execute but not write.
//!
//! Once a tenant has booted, the kernel pages that hold Vigil's hooks (and the system call and LSM
//! dispatch they depend on) become read-only KVM memslots (`KVM_MEM_READONLY`). A guest write to
//! such a page does not reach memory: KVM discards it and exits with `KVM_EXIT_MMIO` (is_write,
//! address, data), which the vCPU reports as a tamper event. The VMM's own accesses (virtio
//! devices, breakpoints) go through its mapping of guest RAM and are not affected.
//!
//! KVM cannot change a slot's flags or split it in place, so arming replaces the RAM slot by
//! several: the read-only pages and the read-write ranges between them. The guest must not run
//! while the slots are replaced (an access in between would find no memory): arming happens on a
//! vCPU thread between two `KVM_RUN`s, with every other vCPU parked
//! ([`RunControl::stop_others`](crate::run_control::RunControl::stop_others), whose guard `arm`
//! asks for).
//!
//! Owns: the VM's guarded pages and the memslot layout that protects them.
//! Must not: change memslots while another vCPU can run, or guard anything outside guest RAM.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use kvm_bindings::KVM_MEM_READONLY;
use thiserror::Error;

use crate::dirty_log::{DirtyLogError, MemSlots};
use crate::run_control::OthersStopped;

pub const PAGE_SIZE: u64 = 0x1000;

/// The guest RAM layout the VM was created with: one slot, guest-physical 0 up to `size`.
#[derive(Clone, Copy, Debug)]
pub struct RamSlot {
    pub slot: u32,
    pub size: u64,
    pub host_addr: u64,
}

/// One guarded page and why it is guarded (the symbol whose code or data lies in it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardedPage {
    pub gpa: u64,
    pub label: String,
}

/// Why the write traps were not armed (the hooked pages then stay writable).
#[derive(Debug, Error)]
pub enum WriteTrapError {
    #[error("write traps are already armed")]
    AlreadyArmed,
    #[error("no page to guard lies in guest RAM")]
    NothingToGuard,
    #[error(
        "KVM_SET_USER_MEMORY_REGION (slot {slot}, {start:#x}+{len:#x}, read-only {read_only}): \
         {source}; the guest's memory may now be incomplete"
    )]
    SetSlot {
        slot: u32,
        start: u64,
        len: u64,
        read_only: bool,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("memslots: {0}")]
    Slots(String),
}

/// The write traps of one VM. Armed at most once.
pub struct WriteTraps {
    slots: Arc<MemSlots>,
    ram: RamSlot,
    /// Page-aligned guest-physical address → label, set when armed.
    pages: OnceLock<BTreeMap<u64, String>>,
}

/// Splits `[0, size)` into alternating read-write and read-only ranges around `pages`
/// (page-aligned, sorted, inside RAM): (start, length, read_only).
pub fn slot_layout(size: u64, pages: &[u64]) -> Vec<(u64, u64, bool)> {
    let mut layout: Vec<(u64, u64, bool)> = Vec::new();
    let mut cursor = 0u64;
    for &page in pages {
        if page < cursor || page + PAGE_SIZE > size {
            continue;
        }
        if page > cursor {
            layout.push((cursor, page - cursor, false));
        }
        match layout.last_mut() {
            // Adjacent guarded pages share one read-only slot.
            Some((start, len, true)) if *start + *len == page => *len += PAGE_SIZE,
            _ => layout.push((page, PAGE_SIZE, true)),
        }
        cursor = page + PAGE_SIZE;
    }
    if cursor < size {
        layout.push((cursor, size - cursor, false));
    }
    layout
}

impl WriteTraps {
    pub fn new(slots: Arc<MemSlots>) -> Self {
        WriteTraps {
            ram: slots.ram(),
            slots,
            pages: OnceLock::new(),
        }
    }

    pub fn is_armed(&self) -> bool {
        self.pages.get().is_some()
    }

    /// The label of the guarded page holding `gpa`, if any.
    pub fn guarded(&self, gpa: u64) -> Option<&str> {
        self.pages
            .get()?
            .get(&(gpa & !(PAGE_SIZE - 1)))
            .map(String::as_str)
    }

    /// Makes `pages` read-only to the guest. Call from a vCPU thread outside `KVM_RUN`, with the
    /// other vCPUs stopped (`_others`: no vCPU touches RAM while its slot is being replaced).
    /// Returns the pages now guarded.
    pub(crate) fn arm(
        &self,
        pages: &[GuardedPage],
        _others: &OthersStopped<'_>,
    ) -> Result<usize, WriteTrapError> {
        if self.is_armed() {
            return Err(WriteTrapError::AlreadyArmed);
        }
        let mut map = BTreeMap::new();
        for page in pages {
            let gpa = page.gpa & !(PAGE_SIZE - 1);
            if gpa + PAGE_SIZE <= self.ram.size {
                map.entry(gpa).or_insert_with(|| page.label.clone());
            }
        }
        if map.is_empty() {
            return Err(WriteTrapError::NothingToGuard);
        }
        let sorted: Vec<u64> = map.keys().copied().collect();
        let layout = slot_layout(self.ram.size, &sorted);
        self.slots.split(&layout).map_err(|e| match e {
            DirtyLogError::SetSlot {
                slot,
                start,
                len,
                flags,
                source,
            } => WriteTrapError::SetSlot {
                slot,
                start,
                len,
                read_only: flags & KVM_MEM_READONLY != 0,
                source,
            },
            // `split` only sets slots.
            other => WriteTrapError::Slots(other.to_string()),
        })?;
        let count = map.len();
        let _ = self.pages.set(map);
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_covers_ram_exactly_with_guarded_pages_read_only() {
        let size = 0x10_0000;
        let layout = slot_layout(size, &[0x3000, 0x4000, 0x8000]);
        assert_eq!(
            layout,
            vec![
                (0, 0x3000, false),
                (0x3000, 0x2000, true),
                (0x5000, 0x3000, false),
                (0x8000, 0x1000, true),
                (0x9000, size - 0x9000, false),
            ]
        );
        let total: u64 = layout.iter().map(|l| l.1).sum();
        assert_eq!(total, size);
    }

    #[test]
    fn layout_edges_first_and_last_page_and_outside_ram() {
        let size = 0x4000;
        assert_eq!(
            slot_layout(size, &[0, 0x3000, 0x9000]),
            vec![
                (0, 0x1000, true),
                (0x1000, 0x2000, false),
                (0x3000, 0x1000, true)
            ]
        );
        assert_eq!(slot_layout(size, &[]), vec![(0, size, false)]);
    }

    #[test]
    fn errors_keep_the_messages_the_write_traps_event_carried() {
        let e = WriteTrapError::SetSlot {
            slot: 1,
            start: 0x3000,
            len: 0x1000,
            read_only: true,
            source: kvm_ioctls::Error::new(libc::EINVAL),
        };
        assert!(e
            .to_string()
            .starts_with("KVM_SET_USER_MEMORY_REGION (slot 1, 0x3000+0x1000, read-only true): "));
        assert!(e
            .to_string()
            .ends_with("; the guest's memory may now be incomplete"));
        assert!(std::error::Error::source(&e).is_some());
    }
}
