//! Bounded access to hostile guest memory.
//!
//! Everything the introspection code reads from a guest goes through [`GuestPhys`] (guest-physical reads
//! that cannot leave guest RAM) and [`VirtReader`] (guest-virtual reads through the guest's own page
//! tables). The guest controls every byte read here: page tables may point outside RAM or at themselves,
//! strings may have no terminator, lists may cycle. Every walk is bounded (fixed page-walk depth, a
//! maximum read length, a step limit and cycle detection on lists) and every failure is a typed
//! [`MemError`].
//!
//! A [`VirtReader`] is meant to live for one trap: its small translation cache is only valid while the
//! guest's vCPUs are stopped, so make a new reader (or call [`VirtReader::flush`]) after each resume.

use std::cell::RefCell;
use std::collections::HashSet;
use std::ops::ControlFlow;

pub use crate::pagetable::PageTableBuilder;

/// CR4.LA57 (bit 12): 5-level paging is active (Intel SDM vol. 3A, 2.5 "Control Registers").
pub const CR4_LA57: u64 = 1 << 12;
/// Physical-address bits of CR3 and of paging-structure entries: bits 51:12 (Intel SDM vol. 3A, 4.5,
/// tables 4-14 ... 4-20; MAXPHYADDR is at most 52). The low 12 bits of CR3 hold the PCID or PWT/PCD and
/// bit 63 of a MOV to CR3 is the no-flush hint; none of them are address bits.
pub const PHYS_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Present bit of a paging-structure entry (SDM 4.5).
pub(crate) const PTE_PRESENT: u64 = 1 << 0;
/// Page-size bit: the PDPTE maps a 1 GiB page, the PDE a 2 MiB page (SDM 4.5). Reserved in PML4E/PML5E.
pub(crate) const PTE_PS: u64 = 1 << 7;
/// Base-address masks of 1 GiB and 2 MiB pages: bits 51:30 and 51:21 (SDM 4.5 tables 4-16, 4-18).
const PAGE_1G_MASK: u64 = 0x000f_ffff_c000_0000;
const PAGE_2M_MASK: u64 = 0x000f_ffff_ffe0_0000;

pub const PAGE_4K: u64 = 1 << 12;
pub const PAGE_2M: u64 = 1 << 21;
pub const PAGE_1G: u64 = 1 << 30;

/// Default upper bound on one virtual read. Kernel objects we read are at most a few KiB (`task_struct`
/// is 9.5 KiB on Debian 6.1); 1 MiB leaves room for table scans while keeping a hostile length harmless.
pub const DEFAULT_MAX_READ: usize = 1 << 20;
/// Default step limit of [`VirtReader::walk_list`]: above any sane task or mount count of a tenant VM.
pub const DEFAULT_LIST_LIMIT: usize = 1 << 16;

/// Errors of guest memory access. Each names the address it failed on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemError {
    #[error("guest-physical range {gpa:#x}+{len:#x} is outside guest RAM")]
    OutsideRam { gpa: u64, len: u64 },
    #[error("virtual address {gva:#x} is not canonical for {levels}-level paging")]
    NonCanonical { gva: u64, levels: u8 },
    #[error("virtual address {gva:#x} not mapped: level-{level} entry {entry:#x} at {entry_gpa:#x} not present")]
    NotPresent {
        gva: u64,
        level: u8,
        entry: u64,
        entry_gpa: u64,
    },
    #[error("virtual address {gva:#x}: level-{level} entry {entry:#x} sets the reserved PS bit")]
    ReservedBit { gva: u64, level: u8, entry: u64 },
    #[error("read of {len:#x} bytes exceeds the limit of {limit:#x}")]
    TooLong { len: u64, limit: u64 },
    #[error("address range {addr:#x}+{len:#x} wraps around")]
    Overflow { addr: u64, len: u64 },
    #[error("no NUL terminator within {max_len} bytes at {gva:#x}")]
    Unterminated { gva: u64, max_len: usize },
    #[error("null pointer in {what} at {at:#x}")]
    NullPointer { what: &'static str, at: u64 },
    #[error("list at {head:#x} loops: node {node:#x} seen again after {steps} steps")]
    Loop { head: u64, node: u64, steps: usize },
    #[error("list at {head:#x} is longer than the limit of {limit} entries")]
    ListTooLong { head: u64, limit: usize },
    #[error("guest memory backend failed at {gpa:#x}: {reason}")]
    Backend { gpa: u64, reason: String },
}

/// Guest-physical memory, as the VMM sees it. Implementations must refuse any byte that is not guest
/// RAM (MMIO holes included) with [`MemError::OutsideRam`] and must never block on the guest.
pub trait GuestPhys {
    /// One past the highest guest-physical address that may be RAM. Holes below it are still refused by
    /// `read_phys`.
    fn ram_size(&self) -> u64;

    /// Reads `buf.len()` bytes at `gpa`. Fails without partial results if any byte is outside RAM.
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError>;

    /// Reads a little-endian u64 at `gpa`.
    fn read_phys_u64(&self, gpa: u64) -> Result<u64, MemError> {
        let mut b = [0u8; 8];
        self.read_phys(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

impl<T: GuestPhys + ?Sized> GuestPhys for &T {
    fn ram_size(&self) -> u64 {
        (**self).ram_size()
    }
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        (**self).read_phys(gpa, buf)
    }
    fn read_phys_u64(&self, gpa: u64) -> Result<u64, MemError> {
        (**self).read_phys_u64(gpa)
    }
}

/// Checks that `gpa..gpa+len` lies inside `0..ram_size`; the helper every implementation can share.
pub fn check_phys_range(gpa: u64, len: u64, ram_size: u64) -> Result<(), MemError> {
    let end = gpa
        .checked_add(len)
        .ok_or(MemError::Overflow { addr: gpa, len })?;
    if end > ram_size {
        return Err(MemError::OutsideRam { gpa, len });
    }
    Ok(())
}

/// Guest RAM as one contiguous byte image starting at guest-physical 0: used by tests and by offline
/// analysis of memory dumps.
#[derive(Clone)]
pub struct PhysImage {
    bytes: Vec<u8>,
}

impl std::fmt::Debug for PhysImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PhysImage({:#x} bytes)", self.bytes.len())
    }
}

impl PhysImage {
    /// Zero-filled RAM of `size` bytes.
    pub fn new(size: usize) -> Self {
        PhysImage {
            bytes: vec![0; size],
        }
    }

    /// RAM whose content is `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        PhysImage { bytes }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Writes `data` at `gpa` (the VMM or a test playing the guest).
    pub fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        check_phys_range(gpa, data.len() as u64, self.bytes.len() as u64)?;
        self.bytes[gpa as usize..gpa as usize + data.len()].copy_from_slice(data);
        Ok(())
    }

    pub fn write_u64(&mut self, gpa: u64, v: u64) -> Result<(), MemError> {
        self.write(gpa, &v.to_le_bytes())
    }
}

impl GuestPhys for PhysImage {
    fn ram_size(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        check_phys_range(gpa, buf.len() as u64, self.bytes.len() as u64)?;
        buf.copy_from_slice(&self.bytes[gpa as usize..gpa as usize + buf.len()]);
        Ok(())
    }
}

/// Paging depth, chosen by CR4.LA57.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagingMode {
    /// 4-level paging, 48-bit virtual addresses.
    Level4,
    /// 5-level paging, 57-bit virtual addresses.
    Level5,
}

impl PagingMode {
    /// The mode in force for a given CR4 value (long mode assumed).
    pub fn from_cr4(cr4: u64) -> Self {
        if cr4 & CR4_LA57 != 0 {
            PagingMode::Level5
        } else {
            PagingMode::Level4
        }
    }

    pub fn levels(self) -> u8 {
        match self {
            PagingMode::Level4 => 4,
            PagingMode::Level5 => 5,
        }
    }

    /// Whether `gva` is canonical: bits 63..(N-1) all equal, N = 48 or 57 (SDM vol. 1, 3.3.7.1).
    pub fn is_canonical(self, gva: u64) -> bool {
        let bits = 9 * self.levels() as u32 + 12;
        let top = (gva as i64) >> (bits - 1);
        top == 0 || top == -1
    }
}

/// Result of translating one virtual address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// Guest-physical address of the translated byte.
    pub gpa: u64,
    /// Size of the page that maps it (4 KiB, 2 MiB or 1 GiB).
    pub page_size: u64,
}

impl Translation {
    /// Bytes from the translated address to the end of its page.
    pub fn bytes_left_in_page(&self) -> u64 {
        self.page_size - (self.gpa & (self.page_size - 1))
    }
}

/// Walks the guest's paging structures for `gva`. The walk has a fixed depth (4 or 5 reads), so page
/// tables that point at themselves cannot make it loop; entries that point outside RAM fail the read.
pub fn translate<M: GuestPhys + ?Sized>(
    mem: &M,
    cr3: u64,
    mode: PagingMode,
    gva: u64,
) -> Result<Translation, MemError> {
    Ok(walk(mem, cr3, mode, gva)?.0)
}

/// User/supervisor bit of a paging-structure entry: user mode may access the region only if every
/// level sets it (SDM 4.6.1).
pub(crate) const PTE_USER: u64 = 1 << 2;
/// Execute-disable bit (with IA32_EFER.NXE, which Linux always sets): no instruction fetch from the
/// region if any level sets it (SDM 4.6.1).
const PTE_NX: u64 = 1 << 63;

/// What the paging structures let user mode do with a page, as the CPU combines them over every
/// level of the walk (SDM 4.6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// Every level sets U/S: user mode may access it.
    pub user: bool,
    /// No level sets XD: instructions may be fetched from it.
    pub exec: bool,
}

/// [`translate`], with the access the entries grant.
pub fn walk<M: GuestPhys + ?Sized>(
    mem: &M,
    cr3: u64,
    mode: PagingMode,
    gva: u64,
) -> Result<(Translation, Access), MemError> {
    let levels = mode.levels();
    if !mode.is_canonical(gva) {
        return Err(MemError::NonCanonical { gva, levels });
    }
    walk_levels(mem, cr3 & PHYS_ADDR_MASK, levels, gva, &mut None)
}

/// The walk from the table at `table`, a level-`top` table, down: `walk` from the root, or from
/// a page directory a reader cached. Notes in `dir` the page directory (level-2 table) it went
/// through, if any. The access is the one the levels walked grant.
fn walk_levels<M: GuestPhys + ?Sized>(
    mem: &M,
    mut table: u64,
    top: u8,
    gva: u64,
    dir: &mut Option<u64>,
) -> Result<(Translation, Access), MemError> {
    let (mut user, mut nx) = (PTE_USER, 0u64);
    for level in (1..=top).rev() {
        if level == 2 {
            *dir = Some(table);
        }
        let shift = 12 + 9 * (level as u32 - 1);
        let index = (gva >> shift) & 0x1ff;
        let entry_gpa = table + index * 8;
        let entry = mem.read_phys_u64(entry_gpa)?;
        if entry & PTE_PRESENT == 0 {
            return Err(MemError::NotPresent {
                gva,
                level,
                entry,
                entry_gpa,
            });
        }
        user &= entry;
        nx |= entry & PTE_NX;
        let access = || Access {
            user: user != 0,
            exec: nx == 0,
        };
        if entry & PTE_PS != 0 {
            let (mask, size) = match level {
                3 => (PAGE_1G_MASK, PAGE_1G),
                2 => (PAGE_2M_MASK, PAGE_2M),
                // In a PTE bit 7 is PAT, not PS: handled below as a 4 KiB mapping.
                1 => (PHYS_ADDR_MASK, PAGE_4K),
                _ => return Err(MemError::ReservedBit { gva, level, entry }),
            };
            let t = Translation {
                gpa: (entry & mask) | (gva & (size - 1)),
                page_size: size,
            };
            return Ok((t, access()));
        }
        if level == 1 {
            let t = Translation {
                gpa: (entry & PHYS_ADDR_MASK) | (gva & (PAGE_4K - 1)),
                page_size: PAGE_4K,
            };
            return Ok((t, access()));
        }
        table = entry & PHYS_ADDR_MASK;
    }
    Err(MemError::ReservedBit {
        gva,
        level: 0,
        entry: 0,
    })
}

/// Reads `buf.len()` bytes at `gva` through the page tables rooted at `cr3` (uncached, one-shot).
pub fn read_virt<M: GuestPhys + ?Sized>(
    mem: &M,
    cr3: u64,
    mode: PagingMode,
    gva: u64,
    buf: &mut [u8],
) -> Result<(), MemError> {
    VirtReader::new(mem, cr3, mode).read_virt(gva, buf)
}

/// Entries of the per-reader translation cache, each direct-mapped by its own page number: 4 KiB
/// pages (vmalloc'd stacks, user pages), 2 MiB pages (the kernel's direct map, its text,
/// vmemmap) and 1 GiB pages (a direct map with gbpages). One trap reads two or three dozen kernel
/// objects, most in distinct huge pages of the direct map.
const TLB_SMALL: usize = 32;
const TLB_LARGE: usize = 32;
const TLB_GIANT: usize = 8;
/// Page directories (level-2 tables) cached, by the 1 GiB region they map: a walk for a page
/// in a region walked before reads one entry (2 MiB) or two (4 KiB) instead of four or five.
const TLB_DIRS: usize = 8;

/// A cached page: its virtual base (aligned to its size) and physical base. [`TlbEntry::EMPTY`]'s
/// base is not aligned to any page, so it never matches.
#[derive(Clone, Copy)]
struct TlbEntry {
    va: u64,
    gpa: u64,
}

impl TlbEntry {
    const EMPTY: TlbEntry = TlbEntry { va: 1, gpa: 0 };
}

/// The translations (and page directories) one reader has walked.
#[derive(Clone, Copy)]
struct Tlb {
    small: [TlbEntry; TLB_SMALL],
    large: [TlbEntry; TLB_LARGE],
    giant: [TlbEntry; TLB_GIANT],
    dirs: [TlbEntry; TLB_DIRS],
}

/// The slot of `gva` in a direct-mapped table of `n` entries of pages of `size`.
#[inline]
fn slot(gva: u64, size: u64, n: usize) -> usize {
    ((gva / size) % n as u64) as usize
}

impl Tlb {
    const EMPTY: Tlb = Tlb {
        small: [TlbEntry::EMPTY; TLB_SMALL],
        large: [TlbEntry::EMPTY; TLB_LARGE],
        giant: [TlbEntry::EMPTY; TLB_GIANT],
        dirs: [TlbEntry::EMPTY; TLB_DIRS],
    };

    #[inline]
    fn lookup(&self, gva: u64) -> Option<Translation> {
        let hit = |e: &TlbEntry, size: u64| {
            (gva & !(size - 1) == e.va).then(|| Translation {
                gpa: e.gpa + (gva - e.va),
                page_size: size,
            })
        };
        hit(&self.large[slot(gva, PAGE_2M, TLB_LARGE)], PAGE_2M)
            .or_else(|| hit(&self.small[slot(gva, PAGE_4K, TLB_SMALL)], PAGE_4K))
            .or_else(|| hit(&self.giant[slot(gva, PAGE_1G, TLB_GIANT)], PAGE_1G))
    }

    fn insert(&mut self, gva: u64, t: Translation) {
        let page_off = gva & (t.page_size - 1);
        let e = TlbEntry {
            va: gva - page_off,
            gpa: t.gpa - page_off,
        };
        match t.page_size {
            PAGE_4K => self.small[slot(gva, PAGE_4K, TLB_SMALL)] = e,
            PAGE_2M => self.large[slot(gva, PAGE_2M, TLB_LARGE)] = e,
            _ => self.giant[slot(gva, PAGE_1G, TLB_GIANT)] = e,
        }
    }

    /// The page directory of `gva`'s 1 GiB region, if one was walked.
    fn dir(&self, gva: u64) -> Option<u64> {
        let e = &self.dirs[slot(gva, PAGE_1G, TLB_DIRS)];
        (gva & !(PAGE_1G - 1) == e.va).then_some(e.gpa)
    }

    fn insert_dir(&mut self, gva: u64, table: u64) {
        self.dirs[slot(gva, PAGE_1G, TLB_DIRS)] = TlbEntry {
            va: gva & !(PAGE_1G - 1),
            gpa: table,
        };
    }
}

/// The kernel's direct map of physical memory: guest-physical `p` at virtual `base + p`, for `p`
/// below `size` (`page_offset_base`, randomized with KASLR; x86-64 `__va`/`__pa`). The kernel
/// itself converts between the two by this arithmetic, never through its page tables, so a
/// kernel object in the direct map (every slab object: tasks, files, dentries, mounts, sockets)
/// is at `gva - base` for the kernel as for us. Found once per VM and checked against the guest's
/// page tables (see `exec::direct_map`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectMap {
    pub base: u64,
    pub size: u64,
}

impl DirectMap {
    /// The guest-physical address of `gva`, if it lies in the direct map.
    #[inline]
    pub fn gpa(&self, gva: u64) -> Option<u64> {
        let offset = gva.wrapping_sub(self.base);
        (offset < self.size).then_some(offset)
    }
}

/// Virtual-address reader for one address space (one CR3) during one trap.
pub struct VirtReader<'m, M: GuestPhys + ?Sized> {
    mem: &'m M,
    cr3: u64,
    mode: PagingMode,
    max_read: usize,
    tlb: RefCell<Tlb>,
    /// Where set, addresses in the kernel's direct map translate by arithmetic, without a walk:
    /// a walk's page-directory reads were a cache miss each, a dozen or more a trap.
    direct: std::cell::Cell<Option<DirectMap>>,
}

impl<'m, M: GuestPhys + ?Sized> VirtReader<'m, M> {
    /// A reader for the address space whose top-level table is at `cr3` (PCID bits are ignored).
    pub fn new(mem: &'m M, cr3: u64, mode: PagingMode) -> Self {
        VirtReader {
            mem,
            cr3,
            mode,
            max_read: DEFAULT_MAX_READ,
            tlb: RefCell::new(Tlb::EMPTY),
            direct: std::cell::Cell::new(None),
        }
    }

    /// Translates addresses in `direct` by arithmetic from now on (see [`DirectMap`]); `None`
    /// walks every address again.
    pub fn use_direct_map(&self, direct: Option<DirectMap>) {
        self.direct.set(direct);
    }

    /// Changes the bound on one read (default [`DEFAULT_MAX_READ`]).
    pub fn with_max_read(mut self, max_read: usize) -> Self {
        self.max_read = max_read;
        self
    }

    pub fn mem(&self) -> &'m M {
        self.mem
    }
    pub fn cr3(&self) -> u64 {
        self.cr3
    }
    pub fn mode(&self) -> PagingMode {
        self.mode
    }

    /// Forgets cached translations (the guest may have changed its page tables).
    pub fn flush(&self) {
        *self.tlb.borrow_mut() = Tlb::EMPTY;
    }

    /// Translates one virtual address, using the direct map where one is set, else the cache.
    pub fn translate(&self, gva: u64) -> Result<Translation, MemError> {
        if let Some(gpa) = self.direct.get().and_then(|d| d.gpa(gva)) {
            // A read stops at each 1 GiB boundary of the physical range and translates again;
            // the physical read itself refuses what is not RAM.
            return Ok(Translation {
                gpa,
                page_size: PAGE_1G,
            });
        }
        let mut tlb = self.tlb.borrow_mut();
        if let Some(t) = tlb.lookup(gva) {
            return Ok(t);
        }
        // A region walked before: from its page directory (its upper levels read then; the
        // address shares its canonical high bits).
        let t = match tlb.dir(gva) {
            Some(dir) => walk_levels(self.mem, dir, 2, gva, &mut None)?.0,
            None => {
                let levels = self.mode.levels();
                if !self.mode.is_canonical(gva) {
                    return Err(MemError::NonCanonical { gva, levels });
                }
                let mut dir = None;
                let (t, _) =
                    walk_levels(self.mem, self.cr3 & PHYS_ADDR_MASK, levels, gva, &mut dir)?;
                if let Some(dir) = dir {
                    tlb.insert_dir(gva, dir);
                }
                t
            }
        };
        tlb.insert(gva, t);
        Ok(t)
    }

    /// Translates a user-mode address with the access the page tables grant it, walking them
    /// afresh (never from the cache, which keeps no access bits): for the code under a user RIP.
    pub fn translate_user(&self, gva: u64) -> Result<(Translation, Access), MemError> {
        walk(self.mem, self.cr3, self.mode, gva)
    }

    /// Reads `buf.len()` bytes at `gva`; the range may cross any number of pages of any size.
    pub fn read_virt(&self, gva: u64, buf: &mut [u8]) -> Result<(), MemError> {
        if buf.len() > self.max_read {
            return Err(MemError::TooLong {
                len: buf.len() as u64,
                limit: self.max_read as u64,
            });
        }
        // The end may be exactly 2^64 (a read ending at the last byte), so check with u128.
        if gva as u128 + buf.len() as u128 > 1u128 << 64 {
            return Err(MemError::Overflow {
                addr: gva,
                len: buf.len() as u64,
            });
        }
        let mut done = 0usize;
        while done < buf.len() {
            let va = gva.wrapping_add(done as u64);
            let t = self.translate(va)?;
            let n = (t.bytes_left_in_page().min((buf.len() - done) as u64)) as usize;
            self.mem.read_phys(t.gpa, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Reads the bytes `lo..hi` of the object at `base` in one pass (one translation per page,
    /// one copy) into `buf` (the caller's stack buffer, as long as the longest span it reads):
    /// the fields of one kernel object, see [`Span`].
    pub fn read_span<'b>(
        &self,
        base: u64,
        lo: u64,
        hi: u64,
        buf: &'b mut [u8],
    ) -> Result<Span<'b>, MemError> {
        let len = hi.saturating_sub(lo);
        if len > buf.len() as u64 {
            return Err(MemError::TooLong {
                len,
                limit: buf.len() as u64,
            });
        }
        let bytes = &mut buf[..len as usize];
        self.read_virt(field_addr(base, lo)?, bytes)?;
        Ok(Span { lo, bytes })
    }

    /// Reads `len` bytes into a new vector.
    pub fn read_bytes(&self, gva: u64, len: usize) -> Result<Vec<u8>, MemError> {
        if len > self.max_read {
            return Err(MemError::TooLong {
                len: len as u64,
                limit: self.max_read as u64,
            });
        }
        let mut v = vec![0; len];
        self.read_virt(gva, &mut v)?;
        Ok(v)
    }

    pub fn read_array<const N: usize>(&self, gva: u64) -> Result<[u8; N], MemError> {
        let mut b = [0u8; N];
        self.read_virt(gva, &mut b)?;
        Ok(b)
    }

    pub fn read_u8(&self, gva: u64) -> Result<u8, MemError> {
        Ok(self.read_array::<1>(gva)?[0])
    }
    pub fn read_u16(&self, gva: u64) -> Result<u16, MemError> {
        Ok(u16::from_le_bytes(self.read_array(gva)?))
    }
    pub fn read_u32(&self, gva: u64) -> Result<u32, MemError> {
        Ok(u32::from_le_bytes(self.read_array(gva)?))
    }
    pub fn read_u64(&self, gva: u64) -> Result<u64, MemError> {
        Ok(u64::from_le_bytes(self.read_array(gva)?))
    }

    /// Reads the field at `base + offset` (a struct member located with BTF), as `N` raw bytes.
    pub fn read_field<const N: usize>(&self, base: u64, offset: u64) -> Result<[u8; N], MemError> {
        self.read_array(field_addr(base, offset)?)
    }
    pub fn read_field_u16(&self, base: u64, offset: u64) -> Result<u16, MemError> {
        self.read_u16(field_addr(base, offset)?)
    }
    pub fn read_field_u32(&self, base: u64, offset: u64) -> Result<u32, MemError> {
        self.read_u32(field_addr(base, offset)?)
    }
    pub fn read_field_u64(&self, base: u64, offset: u64) -> Result<u64, MemError> {
        self.read_u64(field_addr(base, offset)?)
    }

    /// Reads a NUL-terminated string of at most `max_len` bytes (terminator excluded). Reads page by
    /// page, so a short string just before an unmapped page is fine; no terminator within `max_len` is
    /// [`MemError::Unterminated`].
    pub fn read_cstr(&self, gva: u64, max_len: usize) -> Result<Vec<u8>, MemError> {
        if max_len > self.max_read {
            return Err(MemError::TooLong {
                len: max_len as u64,
                limit: self.max_read as u64,
            });
        }
        let mut out = Vec::new();
        // Scan max_len + 1 bytes: a string of exactly max_len bytes still needs its terminator.
        let mut left = max_len + 1;
        let mut va = gva;
        let mut chunk = [0u8; 256];
        while left > 0 {
            let t = self.translate(va)?;
            let n = (t
                .bytes_left_in_page()
                .min(left as u64)
                .min(chunk.len() as u64)) as usize;
            self.mem.read_phys(t.gpa, &mut chunk[..n])?;
            if let Some(z) = chunk[..n].iter().position(|&c| c == 0) {
                out.extend_from_slice(&chunk[..z]);
                return Ok(out);
            }
            out.extend_from_slice(&chunk[..n]);
            left -= n;
            va = va.checked_add(n as u64).ok_or(MemError::Overflow {
                addr: gva,
                len: max_len as u64,
            })?;
        }
        Err(MemError::Unterminated { gva, max_len })
    }

    /// Walks a kernel `struct list_head` ring starting at `head` (the head itself is not an entry) and
    /// calls `visit` with the address of each node's `list_head` (subtract the member offset, see
    /// [`container_of`], to get the containing object). Stops at `max_steps` nodes
    /// ([`MemError::ListTooLong`]), at a node seen before that is not the head ([`MemError::Loop`]), at
    /// a null `next` or unreadable node, or when `visit` breaks. Returns the number of nodes visited.
    pub fn walk_list<F>(&self, head: u64, max_steps: usize, mut visit: F) -> Result<usize, MemError>
    where
        F: FnMut(u64) -> ControlFlow<()>,
    {
        // list_head.next is the first member (include/linux/types.h).
        let mut seen: HashSet<u64> = HashSet::new();
        let mut prev = head;
        let mut node = self.read_u64(head)?;
        let mut steps = 0usize;
        loop {
            if node == head {
                return Ok(steps);
            }
            if node == 0 {
                return Err(MemError::NullPointer {
                    what: "list_head.next",
                    at: prev,
                });
            }
            if !seen.insert(node) {
                return Err(MemError::Loop { head, node, steps });
            }
            if steps == max_steps {
                return Err(MemError::ListTooLong {
                    head,
                    limit: max_steps,
                });
            }
            steps += 1;
            if visit(node).is_break() {
                return Ok(steps);
            }
            prev = node;
            node = self.read_u64(node)?;
        }
    }
}

/// `base + offset` with overflow as a typed error.
pub fn field_addr(base: u64, offset: u64) -> Result<u64, MemError> {
    base.checked_add(offset).ok_or(MemError::Overflow {
        addr: base,
        len: offset,
    })
}

/// Bytes `lo..lo + len` of one kernel object, read at once by [`VirtReader::read_span`] into the
/// caller's buffer; fields are taken out by their offsets in the object (from the profile).
pub struct Span<'b> {
    lo: u64,
    bytes: &'b [u8],
}

impl Span<'_> {
    /// The `n` bytes at `offset` in the object. Panics if the span was not read to hold them
    /// (offsets come from the profile, never from the guest: a bug, not bad input).
    pub fn bytes(&self, offset: u64, n: usize) -> &[u8] {
        let at = offset
            .checked_sub(self.lo)
            .map(|a| a as usize)
            .filter(|a| a + n <= self.bytes.len())
            .unwrap_or_else(|| panic!("field {offset}+{n} outside the span read"));
        &self.bytes[at..at + n]
    }
    pub fn u16(&self, offset: u64) -> u16 {
        u16::from_le_bytes(self.bytes(offset, 2).try_into().unwrap())
    }
    pub fn u32(&self, offset: u64) -> u32 {
        u32::from_le_bytes(self.bytes(offset, 4).try_into().unwrap())
    }
    pub fn u64(&self, offset: u64) -> u64 {
        u64::from_le_bytes(self.bytes(offset, 8).try_into().unwrap())
    }
}

/// The kernel's `container_of`: the object holding the member at `member_offset` whose address is
/// `member_addr`. `None` if that would wrap (a forged pointer).
pub fn container_of(member_addr: u64, member_offset: u64) -> Option<u64> {
    member_addr.checked_sub(member_offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn setup(mode: PagingMode) -> (PhysImage, u64) {
        let mut img = PhysImage::new(8 * MIB as usize);
        let root = {
            let mut b = PageTableBuilder::new(&mut img, mode, 0x10_0000, 0x20_0000).unwrap();
            b.map(0xffff_8880_0000_0000, 0x40_0000, PAGE_4K).unwrap();
            b.map(0xffff_8880_0000_1000, 0x30_0000, PAGE_4K).unwrap();
            b.map(0xffff_ffff_8120_0000, 0x20_0000, PAGE_2M).unwrap();
            b.root()
        };
        (img, root)
    }

    #[test]
    fn four_and_five_level_walks_with_huge_pages() {
        for mode in [PagingMode::Level4, PagingMode::Level5] {
            let (mut img, cr3) = setup(mode);
            img.write(0x40_0ff8, b"ABCDEFGH").unwrap();
            img.write(0x30_0000, b"IJKL").unwrap();
            img.write(0x20_0000 + 0x1234, &0xdead_beef_u32.to_le_bytes())
                .unwrap();
            let r = VirtReader::new(&img, cr3 | 0x5 /* PCID bits ignored */, mode);
            // A read crossing two 4 KiB pages that are not physically adjacent.
            let mut b = [0u8; 12];
            r.read_virt(0xffff_8880_0000_0ff8, &mut b).unwrap();
            assert_eq!(&b, b"ABCDEFGHIJKL");
            assert_eq!(r.read_u32(0xffff_ffff_8120_1234).unwrap(), 0xdead_beef);
            let t = r.translate(0xffff_ffff_8120_1234).unwrap();
            assert_eq!((t.gpa, t.page_size), (0x20_1234, PAGE_2M));
            // Cached translation gives the same answer.
            assert_eq!(r.translate(0xffff_ffff_8120_1234).unwrap(), t);
        }
    }

    #[test]
    fn the_direct_map_translates_by_arithmetic_and_stays_in_ram() {
        const BASE: u64 = 0xffff_9a00_0000_0000;
        // No page table maps anything: only the direct map can read these addresses.
        let mut img = PhysImage::new(4 * MIB as usize);
        img.write(0x20_0ff8, b"ABCDEFGHIJKL").unwrap();
        let r = VirtReader::new(&img, 0x1000, PagingMode::Level4);
        assert!(matches!(
            r.read_u64(BASE + 0x20_0ff8),
            Err(MemError::NotPresent { .. })
        ));
        let direct = DirectMap {
            base: BASE,
            size: img.ram_size(),
        };
        r.use_direct_map(Some(direct));
        let mut b = [0u8; 12];
        r.read_virt(BASE + 0x20_0ff8, &mut b).unwrap();
        assert_eq!(&b, b"ABCDEFGHIJKL");
        // Past RAM's end, below the base, and wrapping around: not the direct map's to read.
        assert!(matches!(
            r.read_u64(BASE + img.ram_size() - 4),
            Err(MemError::OutsideRam { .. })
        ));
        assert_eq!(direct.gpa(BASE + img.ram_size()), None);
        assert_eq!(direct.gpa(BASE - 8), None);
        assert_eq!(direct.gpa(BASE.wrapping_add(u64::MAX)), None);
        assert!(r.read_u64(BASE - 8).is_err());
        // Taken away again: walked, and not mapped.
        r.use_direct_map(None);
        assert!(r.read_u64(BASE + 0x20_0ff8).is_err());
    }

    #[test]
    fn one_gib_page() {
        let mut img = PhysImage::new(4 * MIB as usize);
        let cr3 = {
            let mut b =
                PageTableBuilder::new(&mut img, PagingMode::Level4, 0x1000, 0x10_0000).unwrap();
            b.map(0xffff_8880_0000_0000, 0, PAGE_1G).unwrap();
            b.root()
        };
        img.write(0x30_0010, &42u64.to_le_bytes()).unwrap();
        let r = VirtReader::new(&img, cr3, PagingMode::Level4);
        assert_eq!(r.read_u64(0xffff_8880_0030_0010).unwrap(), 42);
        assert_eq!(
            r.translate(0xffff_8880_0030_0010).unwrap().page_size,
            PAGE_1G
        );
        // Mapped by the 1 GiB page but beyond guest RAM: the physical read refuses it.
        assert!(matches!(
            r.read_u64(0xffff_8880_3000_0000),
            Err(MemError::OutsideRam { .. })
        ));
    }

    #[test]
    fn five_level_is_not_four_level() {
        // A 5-level image read as 4-level walks the PML5 as a PML4: the address must not resolve.
        let (img, cr3) = setup(PagingMode::Level5);
        assert_eq!(PagingMode::from_cr4(CR4_LA57), PagingMode::Level5);
        let r4 = VirtReader::new(&img, cr3, PagingMode::from_cr4(0));
        assert!(r4.read_u8(0xffff_8880_0000_0000).is_err());
        // 57-bit canonical but not 48-bit canonical.
        let gva = 0xff00_0000_0000_0000;
        assert_eq!(
            r4.translate(gva).unwrap_err(),
            MemError::NonCanonical { gva, levels: 4 }
        );
    }

    #[test]
    fn not_present_and_reserved_bits() {
        let (mut img, cr3) = setup(PagingMode::Level4);
        let r = VirtReader::new(&img, cr3, PagingMode::Level4);
        assert!(matches!(
            r.read_u8(0x1000),
            Err(MemError::NotPresent { level: 4, .. })
        ));
        // PS in a PML4 entry is reserved.
        img.write_u64(cr3 + 8, 0x3 | PTE_PS).unwrap();
        let r = VirtReader::new(&img, cr3, PagingMode::Level4);
        assert!(matches!(
            r.read_u8(1 << 39),
            Err(MemError::ReservedBit { level: 4, .. })
        ));
    }

    #[test]
    fn hostile_tables_self_reference_and_outside_ram() {
        let mut img = PhysImage::new(MIB as usize);
        let cr3 = 0x1000;
        // Every PML4 slot points back at the PML4 itself: the walk is still exactly 4 reads deep and
        // ends by reading the table page as data (that is what hardware would do, too).
        for i in 0..512 {
            img.write_u64(cr3 + i * 8, cr3 | 0x3).unwrap();
        }
        let r = VirtReader::new(&img, cr3, PagingMode::Level4);
        assert_eq!(r.read_u64(0x0).unwrap(), cr3 | 0x3);
        assert_eq!(r.translate(0x7fff_ffff_f000).unwrap().gpa, cr3);
        // A table pointer beyond RAM, and a leaf beyond RAM.
        img.write_u64(cr3, 0xf_ffff_f000 | 0x3).unwrap();
        img.write_u64(cr3 + 8, 0x2000 | 0x3).unwrap();
        img.write_u64(0x2000, 0x4000_0000 | 0x83).unwrap(); // 1 GiB page at 1 GiB
        let r = VirtReader::new(&img, cr3, PagingMode::Level4);
        assert!(matches!(
            r.read_u8(0x10),
            Err(MemError::OutsideRam {
                gpa: 0xf_ffff_f000,
                ..
            })
        ));
        assert!(matches!(
            r.read_u8(1 << 39),
            Err(MemError::OutsideRam { .. })
        ));
        // A CR3 outside RAM.
        let r = VirtReader::new(&img, 0x7000_0000, PagingMode::Level4);
        assert!(matches!(r.read_u8(0), Err(MemError::OutsideRam { .. })));
    }

    #[test]
    fn length_limits_and_wraparound() {
        let (img, cr3) = setup(PagingMode::Level4);
        let r = VirtReader::new(&img, cr3, PagingMode::Level4).with_max_read(64);
        assert!(matches!(
            r.read_bytes(0xffff_8880_0000_0000, 65),
            Err(MemError::TooLong { .. })
        ));
        let mut b = [0u8; 16];
        assert!(matches!(
            r.read_virt(u64::MAX - 3, &mut b),
            Err(MemError::Overflow { .. })
        ));
        assert_eq!(
            PhysImage::new(16).read_phys_u64(u64::MAX - 3),
            Err(MemError::Overflow {
                addr: u64::MAX - 3,
                len: 8
            })
        );
    }

    #[test]
    fn cstr_terminated_unterminated_and_at_page_edge() {
        let (mut img, cr3) = setup(PagingMode::Level4);
        img.write(0x40_0000, b"swapper/0\0").unwrap();
        // A 5-byte string ending 1 byte before an unmapped page.
        img.write(0x30_0ffa, b"edge!\0").unwrap();
        // Fill a whole page with non-NUL bytes.
        img.write(0x40_0100, &[b'A'; 0xf00]).unwrap();
        let r = VirtReader::new(&img, cr3, PagingMode::Level4);
        assert_eq!(
            r.read_cstr(0xffff_8880_0000_0000, 16).unwrap(),
            b"swapper/0"
        );
        assert_eq!(r.read_cstr(0xffff_8880_0000_1ffa, 4096).unwrap(), b"edge!");
        assert_eq!(
            r.read_cstr(0xffff_8880_0000_0100, 100).unwrap_err(),
            MemError::Unterminated {
                gva: 0xffff_8880_0000_0100,
                max_len: 100
            }
        );
        // Exactly max_len bytes plus terminator is accepted.
        assert_eq!(r.read_cstr(0xffff_8880_0000_0000, 9).unwrap(), b"swapper/0");
        assert!(r.read_cstr(0xffff_8880_0000_0000, 8).is_err());
        // Crossing into the next mapped page (which starts with a NUL) is fine.
        assert_eq!(
            r.read_cstr(0xffff_8880_0000_0100, 0x2000).unwrap(),
            vec![b'A'; 0xf00]
        );
        // Unterminated up to an unmapped page: the page fault is the answer.
        img.write(0x30_0000, &[b'B'; 0x1000]).unwrap();
        let r = VirtReader::new(&img, cr3, PagingMode::Level4);
        assert!(matches!(
            r.read_cstr(0xffff_8880_0000_1000, 0x2000),
            Err(MemError::NotPresent {
                gva: 0xffff_8880_0000_2000,
                ..
            })
        ));
    }

    /// Builds a list ring in the 4 KiB page at gva 0xffff_8880_0000_0000 (gpa 0x40_0000):
    /// head at +0, nodes at +0x100 * (i + 1), linked as `links` says (index into nodes, or None = head).
    fn list_image(links: &[Option<usize>], head_next: usize) -> (PhysImage, u64) {
        let (mut img, cr3) = setup(PagingMode::Level4);
        let base = 0xffff_8880_0000_0000u64;
        let node = |i: usize| base + 0x100 * (i as u64 + 1);
        img.write_u64(0x40_0000, node(head_next)).unwrap();
        for (i, l) in links.iter().enumerate() {
            let next = l.map(node).unwrap_or(base);
            img.write_u64(0x40_0000 + 0x100 * (i as u64 + 1), next)
                .unwrap();
        }
        (img, cr3)
    }

    #[test]
    fn list_walk_terminates_on_ring_cycle_null_and_limit() {
        let head = 0xffff_8880_0000_0000u64;
        // A proper ring of three nodes.
        let (img, cr3) = list_image(&[Some(1), Some(2), None], 0);
        let r = VirtReader::new(&img, cr3, PagingMode::Level4);
        let mut got = Vec::new();
        let n = r
            .walk_list(head, 100, |a| {
                got.push(a);
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(n, 3);
        assert_eq!(got, vec![head + 0x100, head + 0x200, head + 0x300]);
        assert_eq!(container_of(got[1], 0x100), Some(head + 0x100));
        // The step limit.
        assert_eq!(
            r.walk_list(head, 2, |_| ControlFlow::Continue(())),
            Err(MemError::ListTooLong { head, limit: 2 })
        );
        // Early stop by the visitor.
        assert_eq!(r.walk_list(head, 100, |_| ControlFlow::Break(())), Ok(1));

        // A cycle that never returns to the head: 0 -> 1 -> 2 -> 1.
        let (img, cr3) = list_image(&[Some(1), Some(2), Some(1)], 0);
        let r = VirtReader::new(&img, cr3, PagingMode::Level4);
        assert_eq!(
            r.walk_list(head, 1000, |_| ControlFlow::Continue(())),
            Err(MemError::Loop {
                head,
                node: head + 0x200,
                steps: 3
            })
        );
        // A self-loop on one node.
        let (img, cr3) = list_image(&[Some(0)], 0);
        let r = VirtReader::new(&img, cr3, PagingMode::Level4);
        assert!(matches!(
            r.walk_list(head, 1000, |_| ControlFlow::Continue(())),
            Err(MemError::Loop { steps: 1, .. })
        ));
        // An empty list (head points to itself) has no entries.
        let (mut img, cr3) = list_image(&[], 0);
        img.write_u64(0x40_0000, head).unwrap();
        let r = VirtReader::new(&img, cr3, PagingMode::Level4);
        assert_eq!(r.walk_list(head, 10, |_| ControlFlow::Continue(())), Ok(0));
        // A node whose next is null, and one whose next is unmapped.
        let (mut img, cr3) = list_image(&[None], 0);
        img.write_u64(0x40_0100, 0).unwrap();
        let r = VirtReader::new(&img, cr3, PagingMode::Level4);
        assert!(matches!(
            r.walk_list(head, 10, |_| ControlFlow::Continue(())),
            Err(MemError::NullPointer { .. })
        ));
        img.write_u64(0x40_0100, 0xffff_8880_dead_0000).unwrap();
        let r = VirtReader::new(&img, cr3, PagingMode::Level4);
        assert!(matches!(
            r.walk_list(head, 10, |_| ControlFlow::Continue(())),
            Err(MemError::NotPresent { .. })
        ));
    }
}
