//! Virtual machine introspection (VMI) for Vigil.
//!
//! Owns: bounded access to hostile guest memory, kernel discovery with no System.map, hooks and the
//! attribution of socket operations to guest processes. Must not depend on a particular VMM: it works
//! against any implementation of its guest-memory trait, a memory image in tests included.
//!
//! Modules:
//! - [`mem`]: the guest-physical trait, page-table walks (4/5 levels, huge pages), bounded virtual reads,
//!   strings and `list_head` walks.
//! - [`btf`]: the kernel's BTF (struct layouts); [`profile`]: the offsets Vigil uses, cached per build.
//! - [`kallsyms`]: the kernel symbol table found by structure in the image, no System.map needed.
//! - [`pagetable`]: page tables laid out in a memory image (tests, offline tools).
//! - [`exec`]: the executable as a file: identity, mount namespace, the VMA (maple tree) of the
//!   calling instruction.
//! - [`steer`]: whether another process steers a task's system calls (a tracer, a seccomp
//!   listener).
//! - [`names`]: the comm and exe path an attribution carries, with no allocation per trap.
//! - [`kaslr`]: link, virtual and physical kernel addresses; the slide from MSR_LSTAR.
//! - [`elf`]: the vmlinux reader behind all of the above (headers and notes, on the `object` crate).

pub mod attribution;
pub mod btf;
pub mod elf;
pub mod exec;
pub mod kallsyms;
pub mod kaslr;
pub mod mem;
pub mod names;
pub mod pagetable;
pub mod policy;
pub mod profile;
pub mod steer;

pub use btf::{Btf, BtfError};
pub use kallsyms::{Kallsyms, KallsymsError, Symbol};
pub use kaslr::{kaslr_slide, KernelLayout};
pub use mem::{GuestPhys, MemError, PagingMode, PhysImage, VirtReader};
pub use profile::KernelProfile;

/// Errors of [`analyze_vmlinux`].
#[derive(Debug, thiserror::Error)]
pub enum AnalyzeError {
    #[error(transparent)]
    Elf(#[from] elf::ElfError),
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error(transparent)]
    Kallsyms(#[from] KallsymsError),
    #[error(transparent)]
    Mem(#[from] MemError),
    #[error("no BTF blob in the guest's kernel image")]
    NoBtf,
    #[error("kernel image range of {len:#x} bytes exceeds the limit of {MAX_GUEST_IMAGE:#x}")]
    TooLarge { len: u64 },
}

/// Upper bound on the kernel image bytes [`analyze_guest_image`] reads out of a guest. Debian's
/// text + rodata + BTF is 40 MiB.
pub const MAX_GUEST_IMAGE: u64 = 128 << 20;

/// What discovery found in a guest's memory.
pub struct GuestDiscovery {
    pub btf: Btf,
    pub kallsyms: Kallsyms,
    /// GNU build id from the kernel's `.notes` (found via `__start_notes`), the profile cache key.
    pub build_id: Option<String>,
    /// Guest-physical address of the BTF blob.
    pub btf_gpa: u64,
    pub profile: KernelProfile,
}

/// Discovery with no vmlinux file at all: reads `len` bytes of guest-physical memory from `gpa` (the
/// kernel's text, rodata and BTF; `gpa` must be the physical address of `_text`: `p_paddr` of the first
/// PT_LOAD for a direct boot, `phys_base` + that with KASLR) and finds kallsyms, BTF and the build id in them with the same code used on
/// files. Symbol addresses come out as the running kernel has them (KASLR applied: the kernel
/// relocates `kallsyms_relative_base`).
pub fn analyze_guest_image<M: GuestPhys + ?Sized>(
    mem: &M,
    gpa: u64,
    len: u64,
) -> Result<GuestDiscovery, AnalyzeError> {
    if len > MAX_GUEST_IMAGE {
        return Err(AnalyzeError::TooLarge { len });
    }
    let mut img = vec![0u8; len as usize];
    mem.read_phys(gpa, &mut img)?;
    let kallsyms = Kallsyms::find(&img)?;
    let (off, blob_len) = *Btf::find_in(&img).first().ok_or(AnalyzeError::NoBtf)?;
    let btf = Btf::parse(&img[off..off + blob_len])?;
    // The build id is in the kernel's own `.notes`, located by its linker symbols (the vDSO images
    // embedded in rodata carry build-id notes of their own, so a blind scan could pick theirs).
    let build_id = match (
        kallsyms.addr("_text"),
        kallsyms.addr("__start_notes"),
        kallsyms.addr("__stop_notes"),
    ) {
        (Some(text), Some(start), Some(stop)) if text <= start && start <= stop => {
            let (a, b) = ((start - text) as usize, (stop - text) as usize);
            img.get(a..b)
                .and_then(elf::find_build_id_note)
                .map(elf::hex)
        }
        _ => None,
    };
    let profile = KernelProfile::build(&btf, Some(&kallsyms), build_id.clone())?;
    Ok(GuestDiscovery {
        btf,
        kallsyms,
        build_id,
        btf_gpa: gpa + off as u64,
        profile,
    })
}

/// Everything learned from one vmlinux file.
pub struct KernelAnalysis {
    pub btf: Btf,
    pub kallsyms: Kallsyms,
    /// Link address of the segment the kallsyms tables were found in.
    pub kallsyms_segment_vaddr: u64,
    pub profile: KernelProfile,
}

/// Parses BTF, decodes kallsyms and builds the profile of an uncompressed vmlinux image.
pub fn analyze_vmlinux(bytes: &[u8]) -> Result<KernelAnalysis, AnalyzeError> {
    let elf = elf::Elf::parse(bytes)?;
    let btf = Btf::from_elf(&elf)?;
    let (kallsyms, kallsyms_segment_vaddr) = Kallsyms::from_elf(&elf)?;
    let build_id = elf.build_id().map(elf::hex);
    let profile = KernelProfile::build(&btf, Some(&kallsyms), build_id)?;
    Ok(KernelAnalysis {
        btf,
        kallsyms,
        kallsyms_segment_vaddr,
        profile,
    })
}
