//! Write traps: guest-physical pages the guest may read and execute but not write.
//!
//! Once a tenant has booted, the kernel pages that hold Vigil's hooks (and the system call and LSM
//! dispatch they depend on) become read-only KVM memslots (`KVM_MEM_READONLY`). A guest write to
//! such a page does not reach memory: KVM discards it and exits with `KVM_EXIT_MMIO` (is_write,
//! address, data), which the vCPU reports as a tamper event. The VMM's own accesses (virtio
//! devices, breakpoints) go through its mapping of guest RAM and are not affected: so the
//! devices ask [`DeviceWrites`] first, and never write a guarded page where the guest points them
//! (a receive buffer, a used ring).
//!
//! KVM cannot change a slot's flags or split it in place, so arming replaces the RAM slot by
//! several: the read-only pages and the read-write ranges between them. The guest must not run
//! while the slots are replaced (an access in between would find no memory): arming happens on a
//! vCPU thread between two `KVM_RUN`s, with every other vCPU parked
//! ([`RunControl::stop_others`](crate::run_control::RunControl::stop_others), whose guard `arm`
//! asks for).
//!
//! Owns: the VM's guarded pages, the memslot layout that protects them from the guest, and
//! [`DeviceWrites`], which keeps its devices off them.
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
    /// Page-aligned guest-physical address → label, set when armed (shared with the VM's
    /// devices' [`DeviceWrites`]).
    pages: Arc<GuardedPages>,
}

/// The guarded pages once armed: page-aligned guest-physical address → label.
type GuardedPages = OnceLock<BTreeMap<u64, String>>;

/// What guest RAM a VM's devices may write: all of it but the pages its write traps guard (none
/// before they are armed, and none for a VM without traps). The traps hold only the guest's own
/// stores (a read-only memslot); a device writes through the VMM's mapping, wherever the guest
/// points it. Without this check a root guest would post a receive buffer on its own hooked
/// kernel text and have the device write a frame of its choosing there (or place a used ring
/// there), past every tamper event: a DMA write into the pages Vigil's attribution trusts.
#[derive(Clone, Default)]
pub struct DeviceWrites(Option<Arc<GuardedPages>>);

impl std::fmt::Debug for DeviceWrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let guarded = self.0.as_ref().and_then(|p| p.get()).map_or(0, |p| p.len());
        write!(f, "DeviceWrites({guarded} guarded pages)")
    }
}

impl DeviceWrites {
    /// Whether a device may write the `len` bytes at guest-physical `gpa`: none of them lies
    /// on a guarded page. A range that wraps the address space is refused.
    #[inline]
    pub fn allows(&self, gpa: u64, len: usize) -> bool {
        let Some(pages) = self.0.as_ref().and_then(|p| p.get()) else {
            return true;
        };
        if len == 0 {
            return true;
        }
        let Some(last) = gpa.checked_add(len as u64 - 1) else {
            return false;
        };
        let page = |a: u64| a & !(PAGE_SIZE - 1);
        pages.range(page(gpa)..=page(last)).next().is_none()
    }

    /// Device writes kept off `pages` (page-aligned guest-physical addresses), for tests of the
    /// devices without KVM.
    #[cfg(test)]
    pub(crate) fn guarding(pages: &[u64]) -> DeviceWrites {
        let map = pages.iter().map(|&p| (p, "test".to_string())).collect();
        let lock = OnceLock::new();
        let _ = lock.set(map);
        DeviceWrites(Some(Arc::new(lock)))
    }
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
            pages: Arc::new(OnceLock::new()),
        }
    }

    /// The check the VM's devices make before they write guest RAM: it follows these traps
    /// (nothing is guarded before they are armed).
    pub fn device_writes(&self) -> DeviceWrites {
        DeviceWrites(Some(self.pages.clone()))
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
    fn devices_may_write_anything_but_a_guarded_page() {
        assert!(DeviceWrites::default().allows(0x3000, 4096), "no traps");
        let writes = DeviceWrites::guarding(&[0x3000, 0x8000]);
        assert!(writes.allows(0x2000, 4096), "the page below");
        assert!(writes.allows(0x4000, 0x4000), "between");
        assert!(!writes.allows(0x2fff, 2), "one byte on it");
        assert!(!writes.allows(0x3fff, 1), "its last byte");
        assert!(!writes.allows(0x0, 0x10_0000), "across it");
        assert!(writes.allows(0x3000, 0), "nothing written");
        assert!(!writes.allows(u64::MAX - 10, 100), "a range that wraps");
        // Before the traps are armed nothing is guarded.
        let unarmed = DeviceWrites(Some(Arc::new(OnceLock::new())));
        assert!(unarmed.allows(0x3000, 1));
    }

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
