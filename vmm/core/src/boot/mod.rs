//! Boot: loading an ELF kernel (Linux vmlinux or the fw-guest micro-VM) into guest memory and
//! writing the PVH start information both enter with.
//!
//! Both guests start at their PVH entry (Xen ELF note `XEN_ELFNOTE_PHYS32_ENTRY`): 32-bit protected
//! mode, paging off, EBX = guest-physical address of `hvm_start_info`. One boot path for a stock
//! Linux and for our micro-VM, and the same one QEMU's `-kernel` uses, so QEMU boots our ELF too.
//!
//! Owns: loading the kernel's segments, the PVH start information, memory map and module list,
//! the command line in guest memory, and (in [`bzimage`]) unpacking a bzImage on the host.
//! Must not: trust the kernel image (every offset is checked against guest RAM), or write outside
//! the boot areas of the layout.

pub mod bzimage;

use std::io::{Read, Seek};

use crate::GuestMemoryMmap;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use thiserror::Error;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, ReadVolatile};

use crate::layout::*;

/// `hvm_start_info.magic` (Xen public arch-x86/hvm/start_info.h).
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// E820 / PVH memory map types (ACPI spec, "Address Range Types").
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// End of conventional low memory below the EBDA, as firmware reports it.
const LOW_RAM_END: u64 = 0x9_fc00;

#[derive(Debug, Error)]
pub enum BootError {
    #[error("{0} is not a loadable ELF kernel: {1}")]
    BadElf(String, String),
    #[error("{0} has no PVH entry point (Xen ELF note 18); Vigil boots kernels through PVH")]
    NoPvhEntry(String),
    #[error("the kernel command line is {0} bytes long; the limit is {CMDLINE_MAX}")]
    CmdlineTooLong(usize),
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error(
        "the initramfs ({size} bytes) does not fit in guest RAM above the kernel (which ends at \
         {kernel_end:#x}); give the VM more memory"
    )]
    InitramfsTooLarge { size: usize, kernel_end: u64 },
    #[error("writing boot data to guest memory at {0:#x} failed")]
    GuestWrite(u64),
}

/// Where the loaded kernel starts executing.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// PVH 32-bit entry point (guest-physical).
    pub pvh_entry: u64,
    /// First byte after the loaded image.
    pub end: u64,
}

/// Loads an ELF64 kernel at its physical addresses and returns its PVH entry. Only the ELF
/// header, the program headers, the PT_LOAD segments and the notes are read from `elf`.
pub fn load_elf<F: Read + ReadVolatile + Seek>(
    mem: &GuestMemoryMmap,
    name: &str,
    elf: &mut F,
) -> Result<LoadedKernel, BootError> {
    let result = Elf::load(mem, None, elf, Some(GuestAddress(HIGH_RAM_START)))
        .map_err(|e| BootError::BadElf(name.to_string(), e.to_string()))?;
    match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => Ok(LoadedKernel {
            pvh_entry: entry.raw_value(),
            end: result.kernel_end,
        }),
        _ => Err(BootError::NoPvhEntry(name.to_string())),
    }
}

/// A module handed to the guest through the PVH module list (Linux takes the first as initramfs).
pub struct BootModule<'a> {
    pub bytes: &'a [u8],
    /// Where to put it; `None` places it high, below the end of RAM.
    pub at: Option<u64>,
}

/// Writes the command line, modules, memory map and `hvm_start_info`. Returns the start info's
/// guest-physical address (the value for EBX).
pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    kernel: &LoadedKernel,
    cmdline: &str,
    modules: &[BootModule<'_>],
    rsdp: Option<u64>,
) -> Result<u64, BootError> {
    if cmdline.len() + 1 > CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    let mut cmdline_bytes = cmdline.as_bytes().to_vec();
    cmdline_bytes.push(0);
    write(mem, CMDLINE_START, &cmdline_bytes)?;

    // Modules: placed from the top of RAM downwards, page aligned.
    let mut top = ram_size;
    let mut entries = Vec::with_capacity(modules.len());
    for module in modules {
        let addr = match module.at {
            Some(at) => at,
            None => {
                let size = module.bytes.len() as u64;
                let start = top.checked_sub(size).map(|s| s & !0xfff);
                match start {
                    Some(start) if start >= kernel.end => {
                        top = start;
                        start
                    }
                    _ => {
                        return Err(BootError::InitramfsTooLarge {
                            size: module.bytes.len(),
                            kernel_end: kernel.end,
                        })
                    }
                }
            }
        };
        write(mem, addr, module.bytes)?;
        entries.push(hvm_modlist_entry {
            paddr: addr,
            size: module.bytes.len() as u64,
            cmdline_paddr: 0,
            reserved: 0,
        });
    }
    for (i, entry) in entries.iter().enumerate() {
        write_obj(mem, PVH_MODLIST_START + (i * 32) as u64, *entry)?;
    }

    // Memory map: low RAM, the ACPI region reserved, RAM from 1 MiB to the end.
    let memmap = [
        hvm_memmap_table_entry {
            addr: 0,
            size: LOW_RAM_END,
            type_: E820_RAM,
            reserved: 0,
        },
        hvm_memmap_table_entry {
            addr: ACPI_START,
            size: ACPI_SIZE,
            type_: E820_RESERVED,
            reserved: 0,
        },
        hvm_memmap_table_entry {
            addr: HIGH_RAM_START,
            size: ram_size - HIGH_RAM_START,
            type_: E820_RAM,
            reserved: 0,
        },
    ];
    for (i, entry) in memmap.iter().enumerate() {
        write_obj(mem, PVH_MEMMAP_START + (i * 24) as u64, *entry)?;
    }

    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        flags: 0,
        nr_modules: entries.len() as u32,
        modlist_paddr: if entries.is_empty() {
            0
        } else {
            PVH_MODLIST_START
        },
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp.unwrap_or(0),
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        reserved: 0,
    };
    write_obj(mem, PVH_INFO_START, start_info)?;
    Ok(PVH_INFO_START)
}

fn write(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) -> Result<(), BootError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|_| BootError::GuestWrite(addr))
}

fn write_obj<T: ByteValued>(mem: &GuestMemoryMmap, addr: u64, value: T) -> Result<(), BootError> {
    mem.write_obj(value, GuestAddress(addr))
        .map_err(|_| BootError::GuestWrite(addr))
}

/// The ELF vmlinux inside a kernel image (an ELF is taken as it is; a bzImage is unpacked on the
/// host, so the guest never runs its own decompressor).
pub fn kernel_elf(image: &[u8]) -> Result<Vec<u8>, bzimage::KernelImageError> {
    bzimage::extract_vmlinux(image)
}
