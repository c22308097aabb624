//! Who the code behind a call really is: the identity of a process's executable file, where its
//! mount lives, and whether the instruction that entered the kernel belongs to that file.
//!
//! Owns: the file identity read from an inode ([`FileId`]), the mount-namespace and bind-mount
//! facts of the executable's mount, the caller's user-mode instruction pointer (`pt_regs` at the top
//! of its kernel stack), and a bounded lookup in the maple tree of VMAs (`mm->mm_mt`, Linux 6.1).
//! Must not: decide anything (the policy does), allocate, or walk guest memory without a bound:
//! the maple-tree walk descends at most [`MAX_MAPLE_DEPTH`] nodes and checks every pivot.

use serde::Serialize;
use thiserror::Error;

use crate::mem::{walk, DirectMap, GuestPhys, MemError, VirtReader, PAGE_1G};
use crate::profile::{abi, Field, KernelProfile};
use crate::steer::steered;
pub use crate::steer::{Steered, MAX_SECCOMP_FILTERS};

/// Deepest maple tree we walk. A 6.1 VMA tree of `max_map_count` (65530) VMAs is at most 5 high
/// (leaves of 16, internal nodes of 10); include/linux/maple_tree.h allows 31 (MAPLE_HEIGHT_MAX).
pub const MAX_MAPLE_DEPTH: usize = 8;

/// Encoded maple node pointers (include/linux/maple_tree.h, lib/maple_tree.c of 6.1): nodes are
/// 256-byte aligned and the low byte holds flags (`MAPLE_NODE_MASK`): the node type at bit 3
/// (`MAPLE_NODE_TYPE_SHIFT`, 4 bits), `MAPLE_ENODE_NULL` (0x04) in `mt_mk_node`'s child
/// entries, and `MAPLE_ROOT_NODE` (0x02) in `ma_root` only (`mte_mk_root`), which is what
/// `xa_is_node()` tests there.
const MAPLE_NODE_MASK: u64 = 255;
const MAPLE_NODE_TYPE_SHIFT: u64 = 3;
const MAPLE_NODE_TYPE_MASK: u64 = 0x0f;
/// `enum maple_type`.
const MAPLE_LEAF_64: u64 = 1;
const MAPLE_RANGE_64: u64 = 2;
const MAPLE_ARANGE_64: u64 = 3;
/// Entries below this are reserved values, never nodes (`MAPLE_RESERVED_RANGE`).
const MAPLE_RESERVED_RANGE: u64 = 4096;
/// Most pivots a node type has (`MAPLE_RANGE64_SLOTS - 1` = 15).
const MAX_PIVOTS: usize = 15;

#[derive(Debug, Error)]
pub enum ExecError {
    #[error("reading guest memory: {0}")]
    Memory(#[from] MemError),
    #[error("maple tree: {0}")]
    Maple(&'static str),
    #[error("seccomp filter: {0}")]
    Seccomp(&'static str),
    #[error("maple tree deeper than {MAX_MAPLE_DEPTH} levels (or a cycle)")]
    MapleTooDeep,
    #[error("the struct page of pfn {0:#x} is past the address space")]
    PageOverflow(u64),
    #[error("the VMA found for {addr:#x} spans {start:#x}..{end:#x}")]
    VmaMismatch { addr: u64, start: u64, end: u64 },
}

/// What identifies a file across names and mounts: its filesystem (`s_dev`) and inode number,
/// plus the inode's generation (a reused inode number on ext4/tmpfs gets a new one) and its
/// change time (any write, chmod, link or rename onto it moves `i_ctime`, which no system call
/// sets back). The inode's address is not part of it: an inode evicted and read again moves.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u32,
    pub ino: u64,
    pub generation: u32,
    pub ctime_sec: i64,
    pub ctime_nsec: u32,
}

impl std::fmt::Display for FileId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "dev {}:{} ino {} gen {} ctime {}.{:09}",
            self.dev >> 20,
            self.dev & 0xf_ffff,
            self.ino,
            self.generation,
            self.ctime_sec,
            self.ctime_nsec
        )
    }
}

/// Where the instruction that made the call lives (the user RIP saved at system-call entry).
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CodeOrigin {
    /// An executable VMA mapped from the executable file itself.
    Exe,
    /// An executable VMA of another file (a shared library) only root could have written,
    /// while the executable's own text (the VMA at `mm->start_code`) is mapped from the
    /// executable file.
    Library,
    /// An executable VMA with no file (injected or JIT code), or code in shared memory no
    /// directory names (memfd, `MAP_SHARED | MAP_ANONYMOUS`: see `library_file`).
    Anonymous,
    /// Another file's code whose file someone other than root could have written: not owned by
    /// (global) root, or writable by its group or by others. An `LD_PRELOAD`, `LD_AUDIT` or
    /// `LD_LIBRARY_PATH` library the caller wrote, or its own `libc.so.6` or dynamic loader
    /// bind-mounted over the system's in a private mount namespace: the caller's code, not a
    /// library of the executable's.
    UntrustedLibrary,
    /// Another file's code while the executable's text is not the executable, or no executable
    /// VMA at all.
    Foreign,
    /// The right file's VMA, but the page under the instruction is not that file's page cache:
    /// it was written (copy-on-write by `ptrace(POKETEXT)` or `/proc/PID/mem`).
    ModifiedText,
    /// The saved registers are not user mode's (a kernel thread or kernel worker made the call).
    Kernel,
}

impl CodeOrigin {
    /// Whether the call may carry the executable's identity.
    pub fn is_exe_code(self) -> bool {
        matches!(self, CodeOrigin::Exe | CodeOrigin::Library)
    }
}

/// The executable of a process as a file, not a name.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ExeFile {
    pub id: FileId,
    /// Whether the executable's mount belongs to the tenant's initial mount namespace (init's).
    pub init_mnt_ns: bool,
    /// Whether that mount shows a subtree or a single file of its filesystem (a bind mount: its
    /// root is not the superblock's root).
    pub bind_mount: bool,
    pub code: CodeOrigin,
    /// Whether `mm->exe_file` is the file `execve` opened (its `f_flags` carry `__FMODE_EXEC`,
    /// which only the exec path sets). `prctl(PR_SET_MM, PR_SET_MM_EXE_FILE | PR_SET_MM_MAP)`,
    /// which any user may call in a user namespace of its own, installs a file it opened with
    /// `open()`, which never carries it: a process that named another executable as its own
    /// after it started is not that executable, whatever it maps.
    pub from_exec: bool,
    /// Another process that steers the task's system calls, if any (see [`Steered`]): then no
    /// call of the task carries the executable's identity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steered: Option<Steered>,
    /// The user instruction pointer checked.
    #[serde(serialize_with = "hex")]
    pub rip: u64,
}

fn hex<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{v:#x}"))
}

/// Largest span of an inode read in one pass (`i_sb` .. `i_generation` is 556 bytes on Debian's
/// 6.1).
const INODE_SPAN: usize = 1024;

/// The lowest offset and the end of the highest of `fields`: the span one read covers.
pub(crate) fn extent(fields: &[Field]) -> (u64, u64) {
    let lo = fields.iter().map(|f| f.offset).min().unwrap_or(0);
    let hi = fields
        .iter()
        .map(|f| f.offset.saturating_add(f.size))
        .max()
        .unwrap_or(0);
    (lo, hi)
}

/// What the checks read of an inode: its identity, its page cache (`i_mapping`), its
/// superblock and that superblock's root dentry.
struct InodeFacts {
    id: FileId,
    mapping: u64,
    sb: u64,
    sb_root: u64,
}

/// Largest span of a superblock read at once (`s_dev` .. `s_root` is about 100 bytes).
const SB_SPAN: usize = 256;

/// A superblock's device number and root dentry, in one read.
fn sb_facts<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    p: &KernelProfile,
    sb: u64,
) -> Result<(u32, u64), MemError> {
    let e = &p.exec;
    let (lo, hi) = extent(&[e.sb_s_dev, e.sb_s_root]);
    let mut buf = [0u8; SB_SPAN];
    let s = r.read_span(sb, lo, hi, &mut buf)?;
    Ok((s.u32(e.sb_s_dev.offset), s.u64(e.sb_s_root.offset)))
}

/// Reads an inode's identity and page cache in one pass over the inode and one over its
/// superblock.
fn inode_facts<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    p: &KernelProfile,
    inode: u64,
) -> Result<InodeFacts, MemError> {
    let e = &p.exec;
    let (lo, hi) = extent(&[
        e.inode_i_sb,
        e.inode_i_ino,
        e.inode_i_generation,
        e.inode_ctime_sec,
        e.inode_ctime_nsec,
        e.inode_i_mapping,
    ]);
    let mut buf = [0u8; INODE_SPAN];
    let s = r.read_span(inode, lo, hi, &mut buf)?;
    let sb = s.u64(e.inode_i_sb.offset);
    let (dev, sb_root) = sb_facts(r, p, sb)?;
    Ok(InodeFacts {
        id: FileId {
            dev,
            ino: s.u64(e.inode_i_ino.offset),
            generation: s.u32(e.inode_i_generation.offset),
            ctime_sec: s.u64(e.inode_ctime_sec.offset) as i64,
            ctime_nsec: s.u64(e.inode_ctime_nsec.offset) as u32,
        },
        mapping: s.u64(e.inode_i_mapping.offset),
        sb,
        sb_root,
    })
}

/// Reads a file's identity from its inode.
pub fn file_id<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    p: &KernelProfile,
    inode: u64,
) -> Result<FileId, MemError> {
    Ok(inode_facts(r, p, inode)?.id)
}

/// Reads `N` little-endian u64 of an array field into `out` (N ≤ 16, from the field's size).
fn read_u64s<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    base: u64,
    f: Field,
    out: &mut [u64; 16],
) -> Result<usize, ExecError> {
    let n = (f.size / 8) as usize;
    if n == 0 || n > out.len() {
        return Err(ExecError::Maple("array size out of range"));
    }
    let mut buf = [0u8; 128];
    r.read_virt(base.wrapping_add(f.offset), &mut buf[..n * 8])?;
    for (i, v) in out.iter_mut().take(n).enumerate() {
        *v = u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().unwrap());
    }
    Ok(n)
}

/// The VMA of `mm` containing `addr` (`vma_lookup`): a walk of the maple tree `mm->mm_mt` as
/// `mtree_lookup_walk` does, at most [`MAX_MAPLE_DEPTH`] nodes deep, every pivot checked to
/// rise within its node's range. The VMA found must contain `addr`.
pub fn find_vma<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    p: &KernelProfile,
    mm: u64,
    addr: u64,
) -> Result<Option<u64>, ExecError> {
    let e = &p.exec;
    let mut entry = r.read_field_u64(mm, e.mm_mt_root.offset)?;
    let (mut min, mut max) = (0u64, u64::MAX);
    let mut pivots = [0u64; 16];
    for depth in 0..MAX_MAPLE_DEPTH {
        // xa_is_node() of the root: tagged 0b10 in its low bits and above the reserved range. A
        // root that is not a node holds one entry at index 0 at most.
        if depth == 0 && (entry & 3 != 2 || entry <= MAPLE_RESERVED_RANGE) {
            return Ok(None);
        }
        let node = entry & !MAPLE_NODE_MASK;
        if node <= MAPLE_RESERVED_RANGE {
            return Err(ExecError::Maple("an internal slot that is not a node"));
        }
        let ty = (entry >> MAPLE_NODE_TYPE_SHIFT) & MAPLE_NODE_TYPE_MASK;
        let (pivot_f, slot_f, meta_end_f) = match ty {
            MAPLE_LEAF_64 | MAPLE_RANGE_64 => (e.mr64_pivot, e.mr64_slot, e.mr64_meta_end),
            MAPLE_ARANGE_64 => (e.ma64_pivot, e.ma64_slot, e.ma64_meta_end),
            _ => return Err(ExecError::Maple("unknown node type")),
        };
        let npiv = read_u64s(r, node, pivot_f, &mut pivots)?;
        if npiv > MAX_PIVOTS || slot_f.size / 8 != npiv as u64 + 1 {
            return Err(ExecError::Maple("node layout"));
        }
        // ma_data_end(): the last slot with data. An arange node always says it in its
        // metadata; a range or leaf node that is not full (last pivot 0) too; a full one ends at
        // its last pivot when that is the node's max, else at its last slot.
        let end = if ty != MAPLE_ARANGE_64 && pivots[npiv - 1] == max {
            npiv - 1
        } else if ty != MAPLE_ARANGE_64 && pivots[npiv - 1] != 0 {
            npiv
        } else {
            let end = r.read_u8(node.wrapping_add(meta_end_f.offset))? as usize;
            if end > npiv {
                return Err(ExecError::Maple("data end past the node's slots"));
            }
            end
        };
        // mtree_lookup_walk(): the first slot before `end` whose pivot reaches `addr`, else the
        // slot at `end`, which reaches the node's max. Every pivot passed must rise within the
        // node's range.
        let mut lo = min;
        let mut chosen = (end, max);
        for (i, &piv) in pivots.iter().take(end).enumerate() {
            if piv < lo || piv > max {
                return Err(ExecError::Maple("pivots out of order"));
            }
            if piv >= addr {
                chosen = (i, piv);
                break;
            }
            if piv == max {
                return Err(ExecError::Maple("pivots out of order"));
            }
            lo = piv + 1;
        }
        let (offset, hi) = chosen;
        if addr < lo || addr > hi {
            return Ok(None);
        }
        let slot = r.read_field_u64(node, slot_f.offset + offset as u64 * 8)?;
        if ty == MAPLE_LEAF_64 {
            // A leaf holds VMA pointers (8-aligned); anything else (0, a tagged value) is no VMA.
            if slot == 0 || slot & 7 != 0 {
                return Ok(None);
            }
            let start = r.read_field_u64(slot, e.vma_vm_start.offset)?;
            let end = r.read_field_u64(slot, e.vma_vm_end.offset)?;
            if !(start <= addr && addr < end) {
                return Err(ExecError::VmaMismatch { addr, start, end });
            }
            return Ok(Some(slot));
        }
        entry = slot;
        (min, max) = (lo, hi);
    }
    Err(ExecError::MapleTooDeep)
}

/// The inode of an executable VMA's file: `Ok(None)` for an executable VMA without a file,
/// `Err(())` for a VMA that is not executable.
fn exec_vma_inode<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    p: &KernelProfile,
    vma: u64,
) -> Result<Result<Option<u64>, ()>, MemError> {
    let e = &p.exec;
    let flags = r.read_field_u64(vma, e.vma_vm_flags.offset)?;
    if flags & abi::VM_EXEC == 0 {
        return Ok(Err(()));
    }
    let file = r.read_field_u64(vma, e.vma_vm_file.offset)?;
    if file == 0 {
        return Ok(Ok(None));
    }
    Ok(Ok(Some(r.read_field_u64(file, e.file_f_inode.offset)?)))
}

/// Whether `inode` is the executable (`exe_inode`, identity `exe`): the same inode, or one with
/// the same identity (a stacked filesystem's two inodes of one file).
fn is_exe_inode<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    p: &KernelProfile,
    inode: u64,
    exe_inode: u64,
    exe: &FileId,
) -> Result<bool, MemError> {
    Ok(inode == exe_inode || file_id(r, p, inode)? == *exe)
}

/// The user instruction pointer of `task` (its `pt_regs` at the top of the kernel stack), or
/// `None` when those registers are not user mode's.
pub fn user_rip<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    p: &KernelProfile,
    task: u64,
) -> Result<Option<u64>, MemError> {
    Ok(task_regs(r, p, task)?.0)
}

/// [`user_rip`], and the task's `ptrace` word where the profile has it, read with its stack
/// pointer (they are 16 bytes apart on 6.1).
fn task_regs<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    p: &KernelProfile,
    task: u64,
) -> Result<(Option<u64>, Option<u32>), MemError> {
    let e = &p.exec;
    let ptrace_f = e.task_ptrace.unwrap_or(e.task_stack);
    let (lo, hi) = extent(&[e.task_stack, ptrace_f]);
    let mut buf = [0u8; TASK_HEAD_SPAN];
    let (stack, ptrace) = match r.read_span(task, lo, hi, &mut buf) {
        Ok(s) => (
            s.u64(e.task_stack.offset),
            e.task_ptrace.map(|f| s.u32(f.offset)),
        ),
        // A layout whose fields are far apart: one read each.
        Err(MemError::TooLong { .. }) => (
            r.read_field_u64(task, e.task_stack.offset)?,
            match e.task_ptrace {
                Some(f) => Some(r.read_field_u32(task, f.offset)?),
                None => None,
            },
        ),
        Err(err) => return Err(err),
    };
    Ok((user_rip_of(r, p, stack)?, ptrace))
}

/// Largest span of a `task_struct`'s head read at once (`stack` .. `ptrace`).
const TASK_HEAD_SPAN: usize = 64;

fn user_rip_of<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    p: &KernelProfile,
    stack: u64,
) -> Result<Option<u64>, MemError> {
    let e = &p.exec;
    let regs = stack
        .wrapping_add(e.thread_size)
        .wrapping_sub(e.pt_regs_size);
    let (lo, hi) = extent(&[e.pt_regs_ip, e.pt_regs_cs]);
    let mut buf = [0u8; PT_REGS_SPAN];
    let s = r.read_span(regs, lo, hi, &mut buf)?;
    if s.u64(e.pt_regs_cs.offset) & 3 != 3 {
        return Ok(None);
    }
    Ok(Some(s.u64(e.pt_regs_ip.offset)))
}

/// Largest span of `pt_regs` read at once (ip and cs are adjacent on x86-64).
const PT_REGS_SPAN: usize = 256;

/// What the identity checks need of the kernel itself, read once per call: init's mount
/// namespace and the base of the `struct page` array.
#[derive(Clone, Copy, Debug)]
pub struct KernelRoots {
    pub init_mnt_ns: u64,
    pub vmemmap_base: u64,
    /// The kernel's direct map, where `page_offset_base` was found and checked (see
    /// [`direct_map`]); `None`: every address is walked.
    pub direct_map: Option<DirectMap>,
}

/// The page cache (`struct address_space`) a physical page belongs to, from its `struct page`
/// (or its compound head's): `page->mapping`, whose low bits tag anonymous, movable and KSM
/// pages (`PAGE_MAPPING_FLAGS`, include/linux/page-flags.h).
fn page_mapping<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    p: &KernelProfile,
    roots: &KernelRoots,
    gpa: u64,
) -> Result<u64, ExecError> {
    let e = &p.exec;
    let pfn = gpa >> 12;
    let page = pfn
        .checked_mul(e.page_size)
        .and_then(|o| roots.vmemmap_base.checked_add(o))
        .ok_or(ExecError::PageOverflow(pfn))?;
    let (lo, hi) = extent(&[e.page_compound_head, e.page_mapping]);
    let mut buf = [0u8; PAGE_SPAN];
    let s = r.read_span(page, lo, hi, &mut buf)?;
    let head = s.u64(e.page_compound_head.offset);
    if head & 1 == 1 {
        return Ok(r.read_field_u64(head - 1, e.page_mapping.offset)?);
    }
    Ok(s.u64(e.page_mapping.offset))
}

/// Largest span of a `struct page` read at once (it is 64 bytes).
const PAGE_SPAN: usize = 128;

/// `PAGE_MAPPING_ANON | PAGE_MAPPING_MOVABLE`: a mapping with either bit is no file's page cache.
const PAGE_MAPPING_FLAGS: u64 = 3;

/// Whether the page mapped at user address `addr` is a page of the page cache `file_mapping`.
fn page_is_files<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    p: &KernelProfile,
    roots: &KernelRoots,
    addr: u64,
    file_mapping: u64,
) -> Result<bool, ExecError> {
    let mapping = page_mapping(r, p, roots, r.translate(addr)?.gpa)?;
    Ok(mapping != 0 && mapping == file_mapping)
}

/// The code page under a user address as the CPU fetches it: the page cache it belongs to, if it
/// is a file's page that user mode may execute (`None` otherwise: anonymous, not executable, not
/// mapped).
fn executable_file_page<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    p: &KernelProfile,
    roots: &KernelRoots,
    addr: u64,
) -> Result<Option<u64>, ExecError> {
    let Ok((t, access)) = r.translate_user(addr) else {
        return Ok(None);
    };
    if !(access.user && access.exec) {
        return Ok(None);
    }
    let mapping = page_mapping(r, p, roots, t.gpa)?;
    Ok((mapping != 0 && mapping & PAGE_MAPPING_FLAGS == 0).then_some(mapping))
}

/// The executable the code is checked against: its inode, identity and page cache.
#[derive(Clone, Copy)]
struct Exe<'a> {
    inode: u64,
    id: &'a FileId,
    mapping: u64,
}

/// Where the code of the call lives, relative to the executable (`exe_inode`, identity `exe`).
///
/// The instruction checked is the last byte of the one that entered the kernel (`rip - 1`: the
/// saved RIP is the address after the `syscall`, which may be the first byte of another mapping).
/// The common case needs no VMA: the page tables map that byte user-executable from a page of the
/// executable's page cache (`struct page` → `mapping`), which only a mapping of the file itself
/// can do, and which is where the CPU fetched the instruction from. A library's page (another
/// file's page cache) needs the executable's own text to be the executable: one VMA lookup at
/// `mm->start_code`. Anything else is classified by the VMA under the instruction (anonymous,
/// written text, foreign), for the event.
pub fn code_origin<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    p: &KernelProfile,
    roots: &KernelRoots,
    task: u64,
    mm: u64,
    exe_inode: u64,
    exe: &FileId,
) -> Result<(CodeOrigin, u64), ExecError> {
    let mapping = r.read_field_u64(exe_inode, p.exec.inode_i_mapping.offset)?;
    let exe = Exe {
        inode: exe_inode,
        id: exe,
        mapping,
    };
    code_origin_of(r, p, roots, task, mm, exe)
}

fn code_origin_of<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    p: &KernelProfile,
    roots: &KernelRoots,
    task: u64,
    mm: u64,
    exe: Exe<'_>,
) -> Result<(CodeOrigin, u64), ExecError> {
    let (rip, _) = task_regs(r, p, task)?;
    code_origin_at(r, p, roots, mm, exe, rip)
}

/// [`code_origin_of`] with the user RIP read (`None`: not user mode's registers).
fn code_origin_at<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    p: &KernelProfile,
    roots: &KernelRoots,
    mm: u64,
    exe: Exe<'_>,
    rip: Option<u64>,
) -> Result<(CodeOrigin, u64), ExecError> {
    let Some(rip) = rip else {
        return Ok((CodeOrigin::Kernel, 0));
    };
    let insn = rip.wrapping_sub(1);
    let origin = match executable_file_page(r, p, roots, insn)? {
        Some(mapping) if mapping == exe.mapping => CodeOrigin::Exe,
        Some(mapping) => match library_file(r, p, mapping)? {
            LibraryFile::Unnamed => CodeOrigin::Anonymous,
            LibraryFile::NotRoots => CodeOrigin::UntrustedLibrary,
            LibraryFile::Roots if text_is_exe(r, p, mm, exe)? => CodeOrigin::Library,
            LibraryFile::Roots => CodeOrigin::Foreign,
        },
        None => classify_by_vma(r, p, roots, mm, insn)?,
    };
    Ok((origin, rip))
}

/// What the file of a page cache holding code is, as a library (see [`library_file`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LibraryFile {
    /// Shared memory no directory names (memfd, shared anonymous memory).
    Unnamed,
    /// A file someone other than root could have written.
    NotRoots,
    /// A file only root could have written.
    Roots,
}

/// `S_IWGRP | S_IWOTH`: a file its group or anyone may write (an ACL granting a user write
/// shows in the group bits, its mask).
const GROUP_OR_OTHER_WRITE: u16 = 0o022;

/// What the file of the page cache `mapping` is, as a library: shared memory no directory
/// names (`memfd_create`, `MAP_SHARED | MAP_ANONYMOUS`: both `shmem_file_setup`, which clears
/// the inode's link count, or an `O_TMPFILE` on tmpfs or hugetlbfs), whose pages anyone may write
/// through the memfd or the shared mapping; a file someone other than root could have written
/// (its inode's `i_uid`, a `kuid_t`, is not global root's, or its mode lets its group or others
/// write); or a file only root could have written. Code in either of the first two is the
/// caller's, never a library of the executable's: any user may run the genuine program with
/// `LD_PRELOAD` (or `LD_AUDIT`, `LD_LIBRARY_PATH`) naming a library it wrote, or, in a user and
/// mount namespace of its own, bind-mount its own `libc.so.6` or dynamic loader over the
/// system's; a file it creates there (tmpfs, FUSE, an overlay's upper layer) is owned by its
/// own uid, which no user namespace maps to global root. A deleted file on a disk filesystem (a
/// library replaced by an upgrade while mapped) is still a file, judged by its owner. A file on
/// FUSE is never root's: its server says who owns it, and any user may mount one in init's
/// user namespace with the setuid `fusermount3`. One read of the inode (its mode, owner, link
/// count and superblock are within 80 bytes), after `mapping->host`, and one of the
/// superblock's magic for a file that looks root's or is unlinked. Where the profile lacks
/// the fields, no library is known to be root's (fail closed).
fn library_file<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    p: &KernelProfile,
    mapping: u64,
) -> Result<LibraryFile, ExecError> {
    let e = &p.exec;
    let (Some(host), Some(nlink), Some(magic)) = (e.mapping_host, e.inode_i_nlink, e.sb_s_magic)
    else {
        return Ok(LibraryFile::Unnamed);
    };
    let inode = r.read_field_u64(mapping, host.offset)?;
    let owner = e.inode_i_mode.zip(e.inode_i_uid);
    let (lo, hi) = match owner {
        Some((mode, uid)) => extent(&[nlink, e.inode_i_sb, mode, uid]),
        None => extent(&[nlink, e.inode_i_sb]),
    };
    let mut buf = [0u8; INODE_SPAN];
    let s = r.read_span(inode, lo, hi, &mut buf)?;
    let unlinked = s.u32(nlink.offset) == 0;
    let looks_roots = owner.is_some_and(|(mode, uid)| {
        s.u32(uid.offset) == 0 && s.u16(mode.offset) & GROUP_OR_OTHER_WRITE == 0
    });
    if !unlinked && !looks_roots {
        return Ok(LibraryFile::NotRoots);
    }
    let magic = r.read_field_u64(s.u64(e.inode_i_sb.offset), magic.offset)?;
    Ok(match magic {
        abi::TMPFS_MAGIC | abi::HUGETLBFS_MAGIC if unlinked => LibraryFile::Unnamed,
        // A FUSE file's owner is whatever its server says, and any user may mount one in
        // init's user namespace (the setuid `fusermount3`), where uid 0 is global root.
        abi::FUSE_SUPER_MAGIC => LibraryFile::NotRoots,
        _ if looks_roots => LibraryFile::Roots,
        _ => LibraryFile::NotRoots,
    })
}

/// Whether the executable's own text (the VMA at `mm->start_code`) is mapped from the
/// executable.
fn text_is_exe<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    p: &KernelProfile,
    mm: u64,
    exe: Exe<'_>,
) -> Result<bool, ExecError> {
    let start_code = r.read_field_u64(mm, p.exec.mm_start_code.offset)?;
    let Some(vma) = find_vma(r, p, mm, start_code)? else {
        return Ok(false);
    };
    Ok(match exec_vma_inode(r, p, vma)? {
        Ok(Some(inode)) => is_exe_inode(r, p, inode, exe.inode, exe.id)?,
        _ => false,
    })
}

/// Why code that is not a user-executable page of a file's page cache is not the executable's:
/// by the VMA under the instruction at `addr`.
fn classify_by_vma<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    p: &KernelProfile,
    roots: &KernelRoots,
    mm: u64,
    addr: u64,
) -> Result<CodeOrigin, ExecError> {
    let Some(vma) = find_vma(r, p, mm, addr)? else {
        return Ok(CodeOrigin::Foreign);
    };
    Ok(match exec_vma_inode(r, p, vma)? {
        Err(()) => CodeOrigin::Foreign,
        Ok(None) => CodeOrigin::Anonymous,
        Ok(Some(inode)) => {
            let file_mapping = r.read_field_u64(inode, p.exec.inode_i_mapping.offset)?;
            if !page_is_files(r, p, roots, addr, file_mapping)? {
                CodeOrigin::ModifiedText
            } else {
                // The file's own page, yet not user-executable in the page tables.
                CodeOrigin::Foreign
            }
        }
    })
}

/// What one read of a `struct mount` gives: its parent and mountpoint (the path walk), and of
/// its embedded `vfsmount` the root dentry and superblock, and its mount namespace (the
/// identity checks).
#[derive(Clone, Copy, Debug)]
pub struct MountFacts {
    pub parent: u64,
    pub mountpoint: u64,
    pub root: u64,
    pub sb: u64,
    pub ns: u64,
}

/// Largest span of a `struct mount` read at once (`mnt_parent` .. `mnt_ns` is about 200 bytes
/// on Debian's 6.1).
const MOUNT_SPAN: usize = 384;

/// Reads the `struct mount` at `mount` in one pass.
pub fn mount_facts<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    p: &KernelProfile,
    mount: u64,
) -> Result<MountFacts, MemError> {
    let m = &p.mount;
    let at = |f: Field, within: Field| Field {
        offset: f.offset + within.offset,
        size: within.size,
    };
    let root = at(m.mnt, m.vfsmount_mnt_root);
    let sb = at(m.mnt, p.exec.vfsmount_mnt_sb);
    let (lo, hi) = extent(&[
        m.mnt_parent,
        m.mnt_mountpoint,
        root,
        sb,
        p.exec.mount_mnt_ns,
    ]);
    let mut buf = [0u8; MOUNT_SPAN];
    let s = r.read_span(mount, lo, hi, &mut buf)?;
    Ok(MountFacts {
        parent: s.u64(m.mnt_parent.offset),
        mountpoint: s.u64(m.mnt_mountpoint.offset),
        root: s.u64(root.offset),
        sb: s.u64(sb.offset),
        ns: s.u64(p.exec.mount_mnt_ns.offset),
    })
}

/// The executable file of a process: `file` is `mm->exe_file`, `vfsmount` its `f_path.mnt`.
pub fn exe_file<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    p: &KernelProfile,
    roots: &KernelRoots,
    task: u64,
    mm: u64,
    file: u64,
    vfsmount: u64,
) -> Result<ExeFile, ExecError> {
    let inode = r.read_field_u64(file, p.exec.file_f_inode.offset)?;
    let flags = match p.exec.file_f_flags {
        Some(f) => Some(r.read_field_u32(file, f.offset)?),
        None => None,
    };
    let mount = mount_facts(r, p, vfsmount.wrapping_sub(p.mount.mnt.offset))?;
    exe_file_of(r, p, roots, task, mm, inode, flags, &mount)
}

/// [`exe_file`] from what attribution has read already: the file's inode, its `f_flags` (`None`:
/// the profile does not have them) and its mount.
#[allow(clippy::too_many_arguments)]
pub(crate) fn exe_file_of<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    p: &KernelProfile,
    roots: &KernelRoots,
    task: u64,
    mm: u64,
    inode: u64,
    flags: Option<u32>,
    mount: &MountFacts,
) -> Result<ExeFile, ExecError> {
    let facts = inode_facts(r, p, inode)?;
    let id = facts.id;
    // The mount's own superblock (normally the inode's, read already).
    let s_root = if mount.sb == facts.sb {
        facts.sb_root
    } else {
        sb_facts(r, p, mount.sb)?.1
    };
    let exe = Exe {
        inode,
        id: &id,
        mapping: facts.mapping,
    };
    let (user_rip, ptrace) = task_regs(r, p, task)?;
    let (code, rip) = code_origin_at(r, p, roots, mm, exe, user_rip)?;
    Ok(ExeFile {
        id,
        init_mnt_ns: mount.ns != 0 && mount.ns == roots.init_mnt_ns,
        bind_mount: mount.root != s_root,
        code,
        from_exec: flags.is_some_and(|f| f & abi::FMODE_EXEC_OPEN != 0),
        steered: steered(r, p, task, ptrace)?,
        rip,
    })
}

/// The kernel's roots: init's mount namespace (`init_task.nsproxy->mnt_ns`, set by
/// `init_mount_tree`) and `vmemmap_base`; `init_task` and `vmemmap_base_var` are the running
/// addresses of those symbols.
pub fn kernel_roots<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    p: &KernelProfile,
    init_task: u64,
    vmemmap_base_var: u64,
    page_offset_base_var: Option<u64>,
) -> Result<KernelRoots, MemError> {
    let nsproxy = r.read_field_u64(init_task, p.exec.task_nsproxy.offset)?;
    Ok(KernelRoots {
        init_mnt_ns: r.read_field_u64(nsproxy, p.exec.nsproxy_mnt_ns.offset)?,
        vmemmap_base: r.read_u64(vmemmap_base_var)?,
        direct_map: page_offset_base_var.and_then(|var| direct_map(r, var)),
    })
}

/// The kernel's direct map from `page_offset_base` (`var`: the variable's running address),
/// if the guest's own page tables agree with it: the base is in the kernel half and 1 GiB
/// aligned (KASLR places it on a PUD boundary, arch/x86/mm/kaslr.c), and the page tables map
/// the direct-map alias of the variable's own page to that page. Otherwise `None`, and every
/// address is walked. `page_offset_base` is `__ro_after_init`, set before the first user
/// process: read once per VM, with the other roots.
pub fn direct_map<M: GuestPhys + ?Sized>(r: &VirtReader<'_, M>, var: u64) -> Option<DirectMap> {
    let base = r.read_u64(var).ok()?;
    let size = r.mem().ram_size();
    if (base as i64) >= 0 || base % PAGE_1G != 0 || base.checked_add(size).is_none() {
        return None;
    }
    // Walked, never by arithmetic: this is the check of the arithmetic.
    let (var_page, _) = walk(r.mem(), r.cr3(), r.mode(), var).ok()?;
    let (alias, _) = walk(r.mem(), r.cr3(), r.mode(), base + var_page.gpa).ok()?;
    (alias.gpa == var_page.gpa).then_some(DirectMap { base, size })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::{PageTableBuilder, PagingMode, PhysImage, PAGE_2M, PAGE_4K};

    const BASE: u64 = 0xffff_9a00_0000_0000;
    /// `page_offset_base` in the kernel image, and the physical page under it.
    const VAR: u64 = 0xffff_ffff_8260_0010;
    const VAR_GPA: u64 = 0x60_0000;
    const RAM: usize = 16 << 20;

    /// Guest RAM whose tables map the variable's page, and its direct-map alias to `alias_gpa`;
    /// the variable holds `base`.
    fn guest(base: u64, alias_gpa: u64) -> (PhysImage, u64) {
        let mut img = PhysImage::new(RAM);
        let cr3 = {
            let mut b =
                PageTableBuilder::new(&mut img, PagingMode::Level4, 0x1000, 0x10_0000).unwrap();
            b.map(VAR & !(PAGE_4K - 1), VAR_GPA, PAGE_4K).unwrap();
            b.map(base.wrapping_add(VAR_GPA), alias_gpa, PAGE_2M)
                .unwrap();
            b.root()
        };
        img.write(VAR_GPA + 0x10, &base.to_le_bytes()).unwrap();
        (img, cr3)
    }

    #[test]
    fn the_direct_map_is_taken_only_where_the_page_tables_agree() {
        let (img, cr3) = guest(BASE, VAR_GPA);
        let r = VirtReader::new(&img, cr3, PagingMode::Level4);
        assert_eq!(
            direct_map(&r, VAR),
            Some(DirectMap {
                base: BASE,
                size: RAM as u64
            })
        );
        // The alias maps another page: the arithmetic would read what the kernel does not.
        let (img, cr3) = guest(BASE, VAR_GPA + PAGE_2M);
        assert_eq!(
            direct_map(&VirtReader::new(&img, cr3, PagingMode::Level4), VAR),
            None
        );
        // A base the kernel cannot have, its alias mapped as the arithmetic says: not 1 GiB
        // aligned, or in the user half.
        for base in [BASE + PAGE_2M, 0x0000_7f00_0000_0000] {
            let (img, cr3) = guest(base, VAR_GPA);
            let r = VirtReader::new(&img, cr3, PagingMode::Level4);
            assert_eq!(direct_map(&r, VAR), None, "{base:#x}");
        }
        // The variable unreadable.
        let (img, cr3) = guest(BASE, VAR_GPA);
        let r = VirtReader::new(&img, cr3, PagingMode::Level4);
        assert_eq!(direct_map(&r, VAR + PAGE_2M), None);
    }
}
