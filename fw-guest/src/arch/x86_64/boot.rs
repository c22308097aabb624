//! Ring 0's only use of the boot information: copy the bounded raw bytes ring 3 needs out of low
//! memory (which ring 3 cannot read) into [`BootCapture`]. Parsing beyond the few fields needed to
//! find those bytes happens in ring 3 (vigil_wire::boot parsers): less emulated ring-0 work, and
//! the parser of VMM-supplied bytes runs deprivileged.

use vigil_wire::boot::{
    HvmModule, HvmStartInfo, StartInfoError, BOOT_INFO_LEN, HVM_MEMMAP_ENTRY_LEN,
    HVM_MODLIST_ENTRY_LEN, HVM_START_INFO_V1_LEN,
};

use super::entry;

/// Memory-map entries kept (the Vigil VMM writes 3, QEMU a handful); the rest are ignored.
pub const MAX_MEMMAP_ENTRIES: usize = 32;
/// Longest command line kept, NUL excluded (Linux's x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX: usize = 2048;
/// Boot data must lie in [BOOT_DATA_START, BOOT_DATA_END): not the null page, and below the APIC
/// range (0xfec0_0000), where reads have side effects; the identity map covers all of it.
const BOOT_DATA_START: u64 = 0x1000;
const BOOT_DATA_END: u64 = 0xfec0_0000;

/// Raw boot data handed from ring 0 to ring 3 (it lives in user-readable memory).
pub struct BootCapture {
    /// Address the PVH entry got in EBX.
    pub start_info_paddr: u64,
    pub start_info: HvmStartInfo,
    memmap: [u8; MAX_MEMMAP_ENTRIES * HVM_MEMMAP_ENTRY_LEN],
    memmap_len: usize,
    cmdline: [u8; CMDLINE_MAX],
    cmdline_len: usize,
    /// The first bytes of the first PVH module (Vigil's boot info block when the VMM is Vigil).
    module0: [u8; BOOT_INFO_LEN],
    module0_len: usize,
    /// First byte after the loaded image (ring 3's free memory starts here).
    pub image_end: u64,
}

impl BootCapture {
    pub const EMPTY: BootCapture = BootCapture {
        start_info_paddr: 0,
        start_info: HvmStartInfo {
            version: 0,
            flags: 0,
            nr_modules: 0,
            modlist_paddr: 0,
            cmdline_paddr: 0,
            rsdp_paddr: 0,
            memmap_paddr: 0,
            memmap_entries: 0,
        },
        memmap: [0; MAX_MEMMAP_ENTRIES * HVM_MEMMAP_ENTRY_LEN],
        memmap_len: 0,
        cmdline: [0; CMDLINE_MAX],
        cmdline_len: 0,
        module0: [0; BOOT_INFO_LEN],
        module0_len: 0,
        image_end: 0,
    };

    /// Packed `hvm_memmap_table_entry` records (at most [`MAX_MEMMAP_ENTRIES`]).
    pub fn memmap(&self) -> &[u8] {
        &self.memmap[..self.memmap_len.min(self.memmap.len())]
    }

    /// The command line without its NUL.
    pub fn cmdline(&self) -> &[u8] {
        &self.cmdline[..self.cmdline_len.min(self.cmdline.len())]
    }

    /// Up to [`BOOT_INFO_LEN`] leading bytes of module 0; empty without modules.
    pub fn module0(&self) -> &[u8] {
        &self.module0[..self.module0_len.min(self.module0.len())]
    }
}

/// Why the boot information could not be captured.
#[derive(Clone, Copy, Debug)]
pub enum CaptureError {
    /// A structure's address range is outside the readable boot-data window or overlaps the image.
    BadRange {
        what: &'static str,
        paddr: u64,
        len: u64,
    },
    StartInfo(StartInfoError),
}

impl core::fmt::Display for CaptureError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            CaptureError::BadRange { what, paddr, len } => {
                write!(f, "{what} at {paddr:#x} (+{len:#x}) is outside boot memory")
            }
            CaptureError::StartInfo(e) => write!(f, "{e}"),
        }
    }
}

/// The part of `[paddr, paddr + len)` that may be read, or an error if it is not all readable.
fn check_range(what: &'static str, paddr: u64, len: u64) -> Result<(), CaptureError> {
    let error = CaptureError::BadRange { what, paddr, len };
    let end = paddr.checked_add(len).ok_or(error)?;
    let image_start = entry::__image_start.as_ptr() as u64;
    let image_end = entry::__image_end.as_ptr() as u64;
    if paddr < BOOT_DATA_START || end > BOOT_DATA_END || (paddr < image_end && end > image_start) {
        return Err(error);
    }
    Ok(())
}

/// Copies `dst.len()` bytes of guest-physical memory at `paddr` after checking the range.
///
/// # Safety
/// Paging must identity-map [BOOT_DATA_START, BOOT_DATA_END) for ring 0 (the boot tables do).
unsafe fn copy_phys(what: &'static str, paddr: u64, dst: &mut [u8]) -> Result<(), CaptureError> {
    check_range(what, paddr, dst.len() as u64)?;
    // SAFETY: the range is mapped (caller) and disjoint from the image, so from `dst`.
    unsafe { core::ptr::copy_nonoverlapping(paddr as *const u8, dst.as_mut_ptr(), dst.len()) };
    Ok(())
}

/// Captures the boot data the PVH entry was handed.
///
/// # Safety
/// Ring 0 with the boot page tables; `out` is not otherwise accessed meanwhile.
pub unsafe fn capture(start_info_paddr: u64, out: &mut BootCapture) -> Result<(), CaptureError> {
    // .bss is zero when the loader honours the ELF (QEMU, linux-loader on fresh guest memory);
    // the lengths are reset anyway so nothing stale can ever be handed to ring 3.
    out.memmap_len = 0;
    out.cmdline_len = 0;
    out.module0_len = 0;
    out.start_info_paddr = start_info_paddr;
    out.image_end = entry::__image_end.as_ptr() as u64;

    let mut raw = [0u8; HVM_START_INFO_V1_LEN];
    // SAFETY: (all copies) the boot tables identity-map the boot-data window.
    unsafe { copy_phys("hvm_start_info", start_info_paddr, &mut raw)? };
    let info = HvmStartInfo::parse(&raw).map_err(CaptureError::StartInfo)?;
    out.start_info = info;

    let entries = (info.memmap_entries as usize).min(MAX_MEMMAP_ENTRIES);
    if entries > 0 && info.memmap_paddr != 0 {
        let len = entries * HVM_MEMMAP_ENTRY_LEN;
        // SAFETY: the boot page tables identity-map the boot data window (copy_phys checks
        // the range lies in it).
        unsafe { copy_phys("memory map", info.memmap_paddr, &mut out.memmap[..len])? };
        out.memmap_len = len;
    }

    if info.cmdline_paddr != 0 {
        // Length unknown until the NUL: check the first byte, then stop at whichever comes
        // first of the window's end and the image.
        check_range("command line", info.cmdline_paddr, 1)?;
        let image_start = entry::__image_start.as_ptr() as u64;
        let limit = if info.cmdline_paddr < image_start {
            image_start
        } else {
            BOOT_DATA_END
        };
        let max = (CMDLINE_MAX as u64).min(limit - info.cmdline_paddr) as usize;
        let src = info.cmdline_paddr as *const u8;
        let mut len = 0;
        while len < max {
            // SAFETY: [src, src + max) lies in the mapped window and outside the image (the
            // first byte passed check_range; max stops at the image or the window's end).
            let byte = unsafe { src.add(len).read_volatile() };
            if byte == 0 {
                break;
            }
            out.cmdline[len] = byte;
            len += 1;
        }
        out.cmdline_len = len;
    }

    if info.nr_modules >= 1 && info.modlist_paddr != 0 {
        let mut entry = [0u8; HVM_MODLIST_ENTRY_LEN];
        // SAFETY: as for the memory map.
        unsafe { copy_phys("module list", info.modlist_paddr, &mut entry)? };
        let module = HvmModule::parse(&entry).map_err(CaptureError::StartInfo)?;
        let len = (module.size.min(BOOT_INFO_LEN as u64)) as usize;
        if len > 0 {
            // SAFETY: as for the memory map.
            unsafe { copy_phys("module 0", module.paddr, &mut out.module0[..len])? };
        }
        out.module0_len = len;
    }
    Ok(())
}
