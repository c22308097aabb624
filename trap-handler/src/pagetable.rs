//! Page tables written into a [`PhysImage`]: what tests and offline tools lay out as a guest's.
//!
//! Owns: [`PageTableBuilder`] (4- and 5-level tables, 4 KiB, 2 MiB and 1 GiB pages, user pages in
//! the lower half as Linux maps them).
//! Must not: be used on a running guest's memory (it writes tables, it does not read them).

use crate::mem::{
    check_phys_range, GuestPhys, MemError, PagingMode, PhysImage, PAGE_1G, PAGE_2M, PAGE_4K,
    PHYS_ADDR_MASK, PTE_PRESENT, PTE_PS, PTE_USER,
};

/// Builds x86-64 page tables inside a [`PhysImage`], allocating table pages from a caller-given area.
/// Used by tests and by tools that lay out a guest image offline.
pub struct PageTableBuilder<'a> {
    img: &'a mut PhysImage,
    mode: PagingMode,
    root: u64,
    next_free: u64,
    area_end: u64,
}

impl<'a> PageTableBuilder<'a> {
    /// Page tables for `mode`, with table pages taken from `area_start..area_end` (4 KiB aligned).
    pub fn new(
        img: &'a mut PhysImage,
        mode: PagingMode,
        area_start: u64,
        area_end: u64,
    ) -> Result<Self, MemError> {
        let start = (area_start + PAGE_4K - 1) & !(PAGE_4K - 1);
        check_phys_range(start, area_end.saturating_sub(start), img.ram_size())?;
        let mut b = PageTableBuilder {
            img,
            mode,
            root: 0,
            next_free: start,
            area_end,
        };
        b.root = b.alloc()?;
        Ok(b)
    }

    /// CR3 value for these tables.
    pub fn root(&self) -> u64 {
        self.root
    }

    pub fn image(&mut self) -> &mut PhysImage {
        self.img
    }

    fn alloc(&mut self) -> Result<u64, MemError> {
        let p = self.next_free;
        if p + PAGE_4K > self.area_end {
            return Err(MemError::OutsideRam {
                gpa: p,
                len: PAGE_4K,
            });
        }
        self.next_free += PAGE_4K;
        self.img.write(p, &[0u8; PAGE_4K as usize])?;
        Ok(p)
    }

    /// Maps one page of `page_size` (4 KiB, 2 MiB or 1 GiB) at `gva` to `gpa` (present, writable,
    /// executable; user-accessible in the lower half of the address space, as Linux maps it).
    pub fn map(&mut self, gva: u64, gpa: u64, page_size: u64) -> Result<(), MemError> {
        let user = if (gva as i64) < 0 { 0 } else { PTE_USER };
        self.map_with(gva, gpa, page_size, 0x3 | user)
    }

    /// [`map`](Self::map) with the leaf entry's flag bits (present, writable, user, NX...) as
    /// given; the tables above it are present, writable and user-accessible where `flags` is.
    pub fn map_with(
        &mut self,
        gva: u64,
        gpa: u64,
        page_size: u64,
        flags: u64,
    ) -> Result<(), MemError> {
        let leaf_level = match page_size {
            PAGE_4K => 1,
            PAGE_2M => 2,
            PAGE_1G => 3,
            _ => {
                return Err(MemError::TooLong {
                    len: page_size,
                    limit: PAGE_1G,
                })
            }
        };
        let mut table = self.root;
        for level in (leaf_level + 1..=self.mode.levels()).rev() {
            let idx = (gva >> (12 + 9 * (level as u32 - 1))) & 0x1ff;
            let slot = table + idx * 8;
            let e = self.img.read_phys_u64(slot)?;
            table = if e & PTE_PRESENT != 0 {
                e & PHYS_ADDR_MASK
            } else {
                let t = self.alloc()?;
                self.img.write_u64(slot, t | 0x3 | (flags & PTE_USER))?;
                t
            };
        }
        let idx = (gva >> (12 + 9 * (leaf_level as u32 - 1))) & 0x1ff;
        let ps = if leaf_level > 1 { PTE_PS } else { 0 };
        self.img
            .write_u64(table + idx * 8, gpa | flags | PTE_PRESENT | ps)
    }

    /// Maps `len` bytes from `gva` to `gpa` with pages of `page_size`.
    pub fn map_range(
        &mut self,
        gva: u64,
        gpa: u64,
        len: u64,
        page_size: u64,
    ) -> Result<(), MemError> {
        let mut off = 0;
        while off < len {
            self.map(gva + off, gpa + off, page_size)?;
            off += page_size;
        }
        Ok(())
    }
}
