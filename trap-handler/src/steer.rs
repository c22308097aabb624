//! Whether another process steers a task's system calls: a tracer attached to it, or a seccomp
//! filter of its own that hands its calls to a user-notification listener. What such a task is
//! made to do is the other process's doing, whatever code it runs, so its calls lend no
//! identity (see [`crate::exec::ExeFile::steered`]).
//!
//! A listener's holder may close it the moment it has let a call go on (the filter's `notif`
//! is then NULL again when the call reaches its hook), so a filter is judged by its program,
//! which stays attached for the task's life: a filter whose program can return
//! `SECCOMP_RET_USER_NOTIF` (a `ret` of that action, or of the accumulator, which could hold
//! it) may have had a listener, and whoever held it may have put its own socket in place of the
//! task's descriptor. systemd's and container runtimes' filters return only constants of other
//! actions: theirs are no one's.
//!
//! Owns: [`Steered`], the bounded walk of a task's seccomp filter chain and of their programs.
//! Must not: decide anything (the policy does), or read without a bound: at most
//! [`MAX_SECCOMP_FILTERS`] filters and [`MAX_SECCOMP_INSNS`] instructions a call; past either
//! bound, or a program that cannot be read, is [`Steered::Unknown`].

use serde::Serialize;

use crate::exec::{extent, ExecError};
use crate::mem::{GuestPhys, VirtReader};
use crate::profile::{abi, KernelProfile};

/// Another process that steers the calling task's system calls: what it makes the task do is
/// its own doing, whatever code the task runs.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Steered {
    /// A tracer is attached (`ptrace`): it rewrites the task's registers at every stop, the
    /// saved RIP included. (A tracer that detaches at the system-call stop it rewrote is gone by
    /// the hook: see the README.)
    Traced,
    /// A seccomp filter of the task can hand its calls to a user-notification listener
    /// (`SECCOMP_RET_USER_NOTIF`; any user may install one, under `no_new_privs`, before it
    /// runs the program): the listener's holder is told of each such call and may put its own
    /// socket in place of the task's descriptor (`SECCOMP_IOCTL_NOTIF_ADDFD` with
    /// `SECCOMP_ADDFD_FLAG_SETFD`) before it lets the call go on, so the genuine program's
    /// `connect` or `bind` is made on the holder's socket.
    SeccompListener,
    /// The filter chain or its programs are longer than walked, or cannot be read, or the
    /// profile cannot say: unknown (fail closed).
    Unknown,
}

/// Most seccomp filters walked per call. A process gets a few (systemd's, a sandbox's); Linux
/// bounds a chain only by its instructions (32,768 over the chain, each filter counting 4 more),
/// thousands of one-instruction filters.
pub const MAX_SECCOMP_FILTERS: usize = 64;
/// Most filter instructions read per call, over the chain (systemd's filters are a few hundred).
pub const MAX_SECCOMP_INSNS: usize = 4096;

/// Largest span of a `seccomp_filter` read at once (`prev`, `prog`, `notif`: 24 bytes on 6.1),
/// of a `bpf_prog` or of a `sock_fprog_kern`.
const SPAN: usize = 128;
/// Instructions read at once (8 bytes each: `struct sock_filter`, UAPI).
const INSNS_AT_ONCE: usize = 64;
/// `BPF_RET | BPF_K`, `BPF_RET | BPF_A` (include/uapi/linux/bpf_common.h): the returns
/// `seccomp_check_filter` admits.
const RET_K: u16 = 0x06;
const RET_A: u16 = 0x16;
/// `SECCOMP_RET_ACTION_FULL`, `SECCOMP_RET_USER_NOTIF` (include/uapi/linux/seccomp.h).
const RET_ACTION_FULL: u32 = 0xffff_0000;
const RET_USER_NOTIF: u32 = 0x7fc0_0000;

/// Whether another process steers `task`'s system calls (see [`Steered`]); `ptrace` is the
/// word read with the task's stack pointer. One read of `task->seccomp` (mode and filter),
/// and where the task is under filters, for each filter of its chain, newest first, one read
/// of it, of its `bpf_prog`, of the program kept as loaded (`orig_prog`) and of its
/// instructions, 64 at a time.
pub(crate) fn steered<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    p: &KernelProfile,
    task: u64,
    ptrace: Option<u32>,
) -> Result<Option<Steered>, ExecError> {
    let e = &p.exec;
    let (Some(ptrace), Some(mode), Some(filter), Some(s)) = (
        ptrace,
        e.task_seccomp_mode,
        e.task_seccomp_filter,
        e.seccomp.as_ref(),
    ) else {
        return Ok(Some(Steered::Unknown));
    };
    if ptrace != 0 {
        return Ok(Some(Steered::Traced));
    }
    let (lo, hi) = extent(&[mode, filter]);
    let mut buf = [0u8; SPAN];
    let task_s = r.read_span(task, lo, hi, &mut buf)?;
    if task_s.u32(mode.offset) != abi::SECCOMP_MODE_FILTER {
        return Ok(None);
    }
    let mut at = task_s.u64(filter.offset);
    let mut budget = MAX_SECCOMP_INSNS;
    for _ in 0..MAX_SECCOMP_FILTERS {
        if at == 0 {
            return Ok(None);
        }
        let (lo, hi) = extent(&[s.filter_prev, s.filter_notif, s.filter_prog]);
        let f = r.read_span(at, lo, hi, &mut buf)?;
        if f.u64(s.filter_notif.offset) != 0 {
            return Ok(Some(Steered::SeccompListener));
        }
        let (prev, prog) = (f.u64(s.filter_prev.offset), f.u64(s.filter_prog.offset));
        match can_notify(r, s, prog, &mut budget)? {
            Some(false) => {}
            Some(true) => return Ok(Some(Steered::SeccompListener)),
            None => return Ok(Some(Steered::Unknown)),
        }
        at = prev;
    }
    Ok(Some(Steered::Unknown))
}

/// Whether the program of a filter (`prog`, its `struct bpf_prog`) can return
/// `SECCOMP_RET_USER_NOTIF`, from the classic BPF it was loaded as; `None` where that cannot be
/// told (no program kept, a program past what `budget` leaves to read).
fn can_notify<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    s: &crate::profile::SeccompLayout,
    prog: u64,
    budget: &mut usize,
) -> Result<Option<bool>, ExecError> {
    let orig = r.read_field_u64(prog, s.prog_orig_prog.offset)?;
    if orig == 0 {
        return Ok(None);
    }
    let mut buf = [0u8; SPAN];
    let (lo, hi) = extent(&[s.fprog_len, s.fprog_filter]);
    let f = r.read_span(orig, lo, hi, &mut buf)?;
    let (len, insns) = (
        usize::from(f.u16(s.fprog_len.offset)),
        f.u64(s.fprog_filter.offset),
    );
    if len > *budget {
        return Ok(None);
    }
    *budget -= len;
    let mut chunk = [0u8; INSNS_AT_ONCE * 8];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(INSNS_AT_ONCE);
        let at = insns
            .checked_add(done as u64 * 8)
            .ok_or(ExecError::Seccomp("a program past the address space"))?;
        r.read_virt(at, &mut chunk[..n * 8])?;
        for insn in chunk[..n * 8].chunks_exact(8) {
            let code = u16::from_le_bytes([insn[0], insn[1]]);
            let k = u32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]);
            if code == RET_A || (code == RET_K && k & RET_ACTION_FULL == RET_USER_NOTIF) {
                return Ok(Some(true));
            }
        }
        done += n;
    }
    Ok(Some(false))
}
