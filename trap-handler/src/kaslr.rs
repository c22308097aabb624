//! KASLR and the address relationships of an x86-64 Linux kernel.
//!
//! Three address kinds matter:
//! - **link address**: what the vmlinux ELF and its kallsyms say (`_text` = 0xffffffff81000000).
//! - **virtual address** of the running kernel: link address + the virtual KASLR slide. The slide is a
//!   multiple of `CONFIG_PHYSICAL_ALIGN` (2 MiB) and keeps the image inside
//!   `__START_KERNEL_map .. + KERNEL_IMAGE_SIZE` (1 GiB). MSR_LSTAR holds the runtime address of
//!   `entry_SYSCALL_64` (arch/x86/kernel/cpu/common.c `syscall_init`; 6.1 has no PTI trampoline), so
//!   `slide = LSTAR - link(entry_SYSCALL_64)` ([`kaslr_slide`]).
//! - **physical address**: for the kernel image mapping, `phys = virt - __START_KERNEL_map + phys_base`
//!   (`__pa_symbol`, arch/x86/include/asm/page_64.h). `phys_base` is fixed by `__startup_64`
//!   (arch/x86/kernel/head64.c) from where the image really sits.
//!
//! Boot paths:
//! - **PVH / direct vmlinux boot** (what Vigil's VMM does): no decompressor runs, and KASLR lives in the
//!   decompressor (arch/x86/boot/compressed/kaslr.c), so the virtual slide is 0. The VMM loads each
//!   `PT_LOAD` at its `p_paddr` (`_text` at 0x1000000), so `phys_base` = 0. If the VMM loads the image
//!   elsewhere, `__startup_64` relocates itself physically only: `phys_base = load - p_paddr(_text)`,
//!   virtual addresses stay the link addresses.
//! - **bzImage with KASLR**: the decompressor picks a random physical and an independent random
//!   virtual offset and applies the relocations. The slide comes from LSTAR; `phys_base` from one
//!   page-table walk of `_text`'s runtime address ([`KernelLayout::from_text`]) or from the kernel's
//!   `phys_base` variable.
//!
//! How the walker gets CR3: it never needs the slide to walk. At every trap the VMM has the vCPU's CR3
//! (`KVM_GET_SREGS`). At a hook in kernel code the vCPU runs on a kernel page table: every process's
//! page table maps the kernel half the same way, so that CR3 reads any kernel address. Only the address
//! bits (51:12) are the table base; the low 12 bits are the PCID. If a trap lands in user mode with
//! page-table isolation on, CR3 is the user copy, which sits 4 KiB above the kernel one
//! (`PTI_USER_PGTABLE_BIT` = bit 12, arch/x86/entry/calling.h): [`kernel_cr3`] clears it. Without any
//! vCPU state, `init_top_pgt` (kallsyms) translated with [`KernelLayout::image_virt_to_phys`] is the
//! kernel's own top-level table.
//! `CONFIG_RANDOMIZE_MEMORY` also randomizes the direct map base (`page_offset_base`); pointers into it
//! (task_struct, sockets...) are followed through the page tables, so no base is needed for them.

use crate::mem::PHYS_ADDR_MASK;

/// `__START_KERNEL_map` (arch/x86/include/asm/page_64_types.h).
pub const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
/// `KERNEL_IMAGE_SIZE` with `CONFIG_RANDOMIZE_BASE` (arch/x86/include/asm/page_64_types.h): 1 GiB.
pub const KERNEL_IMAGE_SIZE: u64 = 1 << 30;
/// `CONFIG_PHYSICAL_ALIGN` of Debian's x86-64 config: KASLR offsets are multiples of it.
pub const KERNEL_ALIGN: u64 = 0x20_0000;
/// `PTI_USER_PGTABLE_BIT` (arch/x86/entry/calling.h): the user PGD is the kernel PGD + 4 KiB.
pub const PTI_USER_PGTABLE_BIT: u64 = 1 << 12;

/// Errors validating a KASLR slide.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KaslrError {
    #[error("slide {slide:#x} is not a multiple of {KERNEL_ALIGN:#x}")]
    Misaligned { slide: i64 },
    #[error("{addr:#x} is outside the kernel image area")]
    OutOfRange { addr: u64 },
}

/// Virtual KASLR slide: running address of `entry_SYSCALL_64` (MSR_LSTAR) minus its link address.
pub fn kaslr_slide(lstar: u64, entry_syscall_64_link_addr: u64) -> i64 {
    lstar.wrapping_sub(entry_syscall_64_link_addr) as i64
}

/// [`kaslr_slide`], refusing values no Linux kernel can produce (a guest can write any LSTAR).
pub fn checked_kaslr_slide(lstar: u64, entry_syscall_64_link_addr: u64) -> Result<i64, KaslrError> {
    if !(START_KERNEL_MAP..START_KERNEL_MAP + KERNEL_IMAGE_SIZE).contains(&lstar) {
        return Err(KaslrError::OutOfRange { addr: lstar });
    }
    let slide = kaslr_slide(lstar, entry_syscall_64_link_addr);
    if slide.rem_euclid(KERNEL_ALIGN as i64) != 0 {
        return Err(KaslrError::Misaligned { slide });
    }
    Ok(slide)
}

/// The kernel CR3 (top-level table address) from any CR3 value the vCPU had: drops the PCID and flag
/// bits and, if `pti` is on, the user-copy bit.
pub fn kernel_cr3(cr3: u64, pti: bool) -> u64 {
    let base = cr3 & PHYS_ADDR_MASK;
    if pti {
        base & !PTI_USER_PGTABLE_BIT
    } else {
        base
    }
}

/// Where the running kernel image sits, virtually and physically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KernelLayout {
    /// Runtime virtual address minus link address.
    pub virt_slide: i64,
    /// The kernel's `phys_base`: `phys = virt - __START_KERNEL_map + phys_base` in the image mapping.
    /// Wrapping arithmetic: with KASLR it can be "negative".
    pub phys_base: u64,
}

impl KernelLayout {
    /// PVH/direct boot at the ELF's own `p_paddr`: no slide at all.
    pub const IDENTITY: KernelLayout = KernelLayout {
        virt_slide: 0,
        phys_base: 0,
    };

    /// From where `_text` is: its link address, runtime virtual address (link + LSTAR slide) and
    /// physical address (a page walk of the runtime address).
    pub fn from_text(text_link: u64, text_virt: u64, text_phys: u64) -> Self {
        KernelLayout {
            virt_slide: text_virt.wrapping_sub(text_link) as i64,
            phys_base: text_phys.wrapping_sub(text_virt.wrapping_sub(START_KERNEL_MAP)),
        }
    }

    /// Runtime virtual address of a link address.
    pub fn link_to_virt(&self, link: u64) -> u64 {
        link.wrapping_add(self.virt_slide as u64)
    }

    /// Link address of a runtime virtual address.
    pub fn virt_to_link(&self, virt: u64) -> u64 {
        virt.wrapping_sub(self.virt_slide as u64)
    }

    /// Physical address of a runtime virtual address inside the kernel image mapping.
    pub fn image_virt_to_phys(&self, virt: u64) -> Result<u64, KaslrError> {
        if !(START_KERNEL_MAP..START_KERNEL_MAP + KERNEL_IMAGE_SIZE).contains(&virt) {
            return Err(KaslrError::OutOfRange { addr: virt });
        }
        Ok((virt - START_KERNEL_MAP).wrapping_add(self.phys_base))
    }

    /// Physical address of a link address (kallsyms or ELF symbol).
    pub fn link_to_phys(&self, link: u64) -> Result<u64, KaslrError> {
        self.image_virt_to_phys(self.link_to_virt(link))
    }
}

/// Address of a per-CPU variable on one CPU. With `CONFIG_KALLSYMS_ABSOLUTE_PERCPU` kallsyms gives
/// per-CPU symbols as offsets into the per-CPU area (`current_task` = 0x1fb80 on Debian 6.1), and the
/// CPU's GS base in kernel mode (MSR_GS_BASE; MSR_KERNEL_GS_BASE while in user mode) is that CPU's
/// `__per_cpu_offset[cpu]`, because x86-64 links `.data..percpu` at 0.
pub fn per_cpu_addr(gs_base: u64, per_cpu_symbol: u64) -> u64 {
    gs_base.wrapping_add(per_cpu_symbol)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENTRY_LINK: u64 = 0xffff_ffff_81c0_0080;

    #[test]
    fn slide_from_lstar() {
        assert_eq!(kaslr_slide(ENTRY_LINK, ENTRY_LINK), 0);
        assert_eq!(
            kaslr_slide(ENTRY_LINK + 0x1e00_0000, ENTRY_LINK),
            0x1e00_0000
        );
        // A slide below the link address (possible in principle) is negative, not a huge u64.
        assert_eq!(kaslr_slide(ENTRY_LINK - 0x20_0000, ENTRY_LINK), -0x20_0000);
        assert_eq!(
            checked_kaslr_slide(ENTRY_LINK + 0x1e00_0000, ENTRY_LINK),
            Ok(0x1e00_0000)
        );
        assert_eq!(
            checked_kaslr_slide(ENTRY_LINK + 0x1000, ENTRY_LINK),
            Err(KaslrError::Misaligned { slide: 0x1000 })
        );
        assert_eq!(
            checked_kaslr_slide(0x4141_4141, ENTRY_LINK),
            Err(KaslrError::OutOfRange { addr: 0x4141_4141 })
        );
    }

    #[test]
    fn layout_round_trips() {
        // Direct boot: link address == virtual address, _text at p_paddr 0x1000000.
        let l = KernelLayout::from_text(0xffff_ffff_8100_0000, 0xffff_ffff_8100_0000, 0x100_0000);
        assert_eq!(l, KernelLayout::IDENTITY);
        assert_eq!(l.link_to_phys(0xffff_ffff_82a1_aa40).unwrap(), 0x2a1_aa40);
        // KASLR: virtual +0x2c000000, physical load at 0x7200000.
        let l = KernelLayout::from_text(0xffff_ffff_8100_0000, 0xffff_ffff_ad00_0000, 0x720_0000);
        assert_eq!(l.virt_slide, 0x2c00_0000);
        assert_eq!(l.link_to_virt(0xffff_ffff_81c0_0080), 0xffff_ffff_adc0_0080);
        assert_eq!(l.virt_to_link(0xffff_ffff_adc0_0080), 0xffff_ffff_81c0_0080);
        assert_eq!(
            l.image_virt_to_phys(0xffff_ffff_ad00_0000).unwrap(),
            0x720_0000
        );
        assert_eq!(l.link_to_phys(0xffff_ffff_8100_1000).unwrap(), 0x720_1000);
        assert!(l.image_virt_to_phys(0xffff_8880_0000_0000).is_err());
    }

    #[test]
    fn cr3_masks() {
        assert_eq!(kernel_cr3(0x8000_0000_0123_4005, false), 0x123_4000);
        assert_eq!(kernel_cr3(0x0123_5801, true), 0x123_4000);
        assert_eq!(
            per_cpu_addr(0xffff_8880_7fc0_0000, 0x1fb80),
            0xffff_8880_7fc1_fb80
        );
    }
}
