//! The VMM's guest memory as trap-handler's bounded [`GuestPhys`], so the introspection code and
//! the VMM's own instruction completion read hostile guest memory through one accessor.
//!
//! Owns: the adapter from `GuestMemoryMmap` to `GuestPhys` (a read within one region is one
//! bounds check and one copy: the trap path makes dozens).
//! Must not: read outside guest RAM or hand out references into it (bytes are copied).

use crate::GuestMemoryMmap;
use trap_handler::mem::{GuestPhys, MemError};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// A borrowed view of a VM's RAM.
pub struct GuestRam<'a>(pub &'a GuestMemoryMmap);

impl GuestPhys for GuestRam<'_> {
    fn ram_size(&self) -> u64 {
        self.0
            .iter()
            .map(|region| region.start_addr().0 + region.len())
            .max()
            .unwrap_or(0)
    }

    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let len = buf.len() as u64;
        let end = gpa
            .checked_add(len)
            .ok_or(MemError::Overflow { addr: gpa, len })?;
        // The trap path reads many small fields: one region lookup and one copy, without
        // vm-memory's per-access machinery (it copies the same way for reads over 8 bytes).
        for region in self.0.iter() {
            let start = region.start_addr().0;
            if gpa >= start && end <= start + region.len() {
                // SAFETY: `gpa..end` lies inside this region (checked above), whose mapping
                // lives as long as the borrowed `GuestMemoryMmap`; `buf` is ours and cannot
                // overlap guest RAM. Other vCPUs may write the bytes meanwhile: the copy may see
                // a torn value, as vm-memory's copies may, and everything read here is
                // untrusted anyway.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        region.as_ptr().add((gpa - start) as usize),
                        buf.as_mut_ptr(),
                        buf.len(),
                    );
                }
                return Ok(());
            }
        }
        if end > self.ram_size() {
            return Err(MemError::OutsideRam { gpa, len });
        }
        self.0
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| MemError::Backend {
                gpa,
                reason: e.to_string(),
            })
    }

    fn read_phys_u64(&self, gpa: u64) -> Result<u64, MemError> {
        // Page-table walks read one entry per level: one load, without a call to memcpy.
        for region in self.0.iter() {
            let start = region.start_addr().0;
            if gpa >= start
                && gpa
                    .checked_add(8)
                    .is_some_and(|end| end <= start + region.len())
            {
                // SAFETY: `gpa..gpa + 8` lies inside this region (checked above), whose mapping
                // lives as long as the borrowed `GuestMemoryMmap`; an unaligned read of plain
                // bytes. Another vCPU may write them meanwhile: the value may be torn, as any
                // read of untrusted guest memory may be.
                let raw = unsafe {
                    std::ptr::read_unaligned(
                        region
                            .as_ptr()
                            .add((gpa - start) as usize)
                            .cast::<[u8; 8]>(),
                    )
                };
                return Ok(u64::from_le_bytes(raw));
            }
        }
        let mut b = [0u8; 8];
        self.read_phys(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

/// KiB of a VM's RAM resident in host memory (`mincore` over each region's mapping): the guest
/// pages the guest or the VMM touched, without the VMM's own memory. 0 when it cannot be read.
pub fn resident_kib(mem: &GuestMemoryMmap) -> u64 {
    resident_map_kib(mem, u64::MAX)
        .iter()
        .map(|&(_, kib)| kib)
        .sum()
}

/// Resident KiB of a VM's RAM per `chunk` bytes of guest-physical address space, as
/// (chunk's first address, KiB) for each chunk with resident pages: where the guest's memory goes.
pub fn resident_map_kib(mem: &GuestMemoryMmap, chunk: u64) -> Vec<(u64, u64)> {
    let page = 4096usize;
    let mut map: Vec<(u64, u64)> = Vec::new();
    let mut vec = Vec::new();
    for region in mem.iter() {
        let len = region.len() as usize;
        let Ok(host) = mem.get_host_address(region.start_addr()) else {
            continue;
        };
        vec.clear();
        vec.resize(len.div_ceil(page), 0u8);
        // SAFETY: the region's mapping starts at `host` (page aligned: mmap) and spans `len`
        // bytes; `vec` has one byte per page of it.
        let rc = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
        if rc != 0 {
            continue;
        }
        let start = region.start_addr().0;
        for (i, _) in vec.iter().enumerate().filter(|&(_, &b)| b & 1 != 0) {
            let gpa = start + (i * page) as u64;
            let first = if chunk == u64::MAX {
                0
            } else {
                gpa - gpa % chunk
            };
            match map.last_mut() {
                Some((at, kib)) if *at == first => *kib += page as u64 / 1024,
                _ => map.push((first, page as u64 / 1024)),
            }
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_pages_are_the_touched_ones() {
        let mem = crate::anonymous_memory(64 << 20, true).unwrap();
        let before = resident_kib(&mem);
        for page in 0..256u64 {
            mem.write_obj(1u8, GuestAddress(page * 4096)).unwrap();
        }
        let after = resident_kib(&mem);
        assert!(
            before < 1024,
            "an untouched mapping is not resident ({before} KiB)"
        );
        assert!(
            after >= before + 1024,
            "256 touched pages: {before} -> {after} KiB"
        );
    }

    #[test]
    fn the_vmm_writes_are_marked_only_where_tracked() {
        use vm_memory::bitmap::Bitmap;
        for track in [true, false] {
            let mem = crate::anonymous_memory(1 << 20, track).unwrap();
            mem.write_obj(7u8, GuestAddress(3 * 4096)).unwrap();
            let region = mem.iter().next().unwrap();
            let mapping: &vm_memory::MmapRegion<_> = region;
            assert_eq!(mapping.bitmap().dirty_at(3 * 4096), track);
            assert!(!mapping.bitmap().dirty_at(4 * 4096));
            assert_eq!(mem.read_obj::<u8>(GuestAddress(3 * 4096)).unwrap(), 7);
        }
    }

    #[test]
    fn reads_are_bounded_to_ram() {
        let mem = crate::anonymous_memory(0x10000, true).unwrap();
        mem.write_obj(0x1122_3344u32, GuestAddress(0xfffc)).unwrap();
        let ram = GuestRam(&mem);
        assert_eq!(ram.ram_size(), 0x10000);
        let mut four = [0u8; 4];
        ram.read_phys(0xfffc, &mut four).unwrap();
        assert_eq!(u32::from_le_bytes(four), 0x1122_3344);
        let mut eight = [0u8; 8];
        assert!(matches!(
            ram.read_phys(0xfffc, &mut eight),
            Err(MemError::OutsideRam { .. })
        ));
        assert!(matches!(
            ram.read_phys(u64::MAX - 2, &mut four),
            Err(MemError::Overflow { .. })
        ));
    }

    #[test]
    fn a_table_entry_read_is_the_bytes_read_and_bounded_the_same() {
        let mem = crate::anonymous_memory(0x10000, true).unwrap();
        mem.write_obj(0x8877_6655_4433_2211u64, GuestAddress(0x1003))
            .unwrap();
        let ram = GuestRam(&mem);
        assert_eq!(ram.read_phys_u64(0x1003).unwrap(), 0x8877_6655_4433_2211);
        assert_eq!(ram.read_phys_u64(0xfff8).unwrap(), 0);
        for gpa in [0xfff9, 0x10000, u64::MAX - 3] {
            let mut eight = [0u8; 8];
            let slow = ram.read_phys(gpa, &mut eight).map(|_| ());
            let fast = ram.read_phys_u64(gpa).map(|_| ());
            assert!(fast.is_err(), "{gpa:#x} is not 8 bytes of RAM");
            assert_eq!(format!("{fast:?}"), format!("{slow:?}"));
        }
    }
}
