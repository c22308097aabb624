//! Whether another process steers a task's system calls: a tracer attached to it, or the
//! holder of a seccomp user-notification listener on one of its filters. What such a task is
//! made to do is the other process's doing, whatever code it runs, so its calls lend no
//! identity (see [`crate::exec::ExeFile::steered`]).
//!
//! Owns: [`Steered`], the bounded walk of a task's seccomp filter chain.
//! Must not: decide anything (the policy does), or walk without a bound: at most
//! [`MAX_SECCOMP_FILTERS`] filters, a longer or looping chain is [`Steered::Unknown`].

use serde::Serialize;

use crate::exec::{extent, ExecError};
use crate::mem::{GuestPhys, VirtReader};
use crate::profile::{abi, KernelProfile};

/// Another process that steers the calling task's system calls: what it makes the task do is
/// its own doing, whatever code the task runs.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Steered {
    /// A tracer is attached (`ptrace`, which any user may do to its own processes where Yama
    /// allows it): it rewrites the task's registers at every stop, the saved RIP included.
    Traced,
    /// A seccomp filter of the task has a user-notification listener (`SECCOMP_FILTER_FLAG_NEW_
    /// LISTENER`, which any user may install before it runs the program, under `no_new_privs`):
    /// its holder is told of each filtered call and may put its own socket in place of the
    /// task's descriptor (`SECCOMP_IOCTL_NOTIF_ADDFD` with `SECCOMP_ADDFD_FLAG_SETFD`) before it
    /// lets the call go on, so the genuine program's `connect` or `bind` is made on the
    /// holder's socket.
    SeccompListener,
    /// The filter chain is longer than [`MAX_SECCOMP_FILTERS`], or the profile cannot say:
    /// unknown (fail closed).
    Unknown,
}

/// Most seccomp filters walked per call. A process gets a few (systemd's, a sandbox's); Linux
/// bounds a chain only by its instructions (32,768 over the chain, each filter counting 4 more),
/// thousands of one-instruction filters.
pub const MAX_SECCOMP_FILTERS: usize = 64;

/// Largest span of a `seccomp_filter` read at once (`prev` .. `notif` are adjacent on 6.1).
const SECCOMP_FILTER_SPAN: usize = 128;

/// Whether another process steers `task`'s system calls (see [`Steered`]); `ptrace` is the
/// word read with the task's stack pointer. One read of `task->seccomp` (mode and filter),
/// and where the task is under filters, one per filter of its chain, newest first.
pub(crate) fn steered<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    p: &KernelProfile,
    task: u64,
    ptrace: Option<u32>,
) -> Result<Option<Steered>, ExecError> {
    let e = &p.exec;
    let (Some(ptrace), Some(mode), Some(filter), Some(prev), Some(notif)) = (
        ptrace,
        e.task_seccomp_mode,
        e.task_seccomp_filter,
        e.seccomp_filter_prev,
        e.seccomp_filter_notif,
    ) else {
        return Ok(Some(Steered::Unknown));
    };
    if ptrace != 0 {
        return Ok(Some(Steered::Traced));
    }
    let (lo, hi) = extent(&[mode, filter]);
    let mut buf = [0u8; SECCOMP_FILTER_SPAN];
    let s = r.read_span(task, lo, hi, &mut buf)?;
    if s.u32(mode.offset) != abi::SECCOMP_MODE_FILTER {
        return Ok(None);
    }
    let mut at = s.u64(filter.offset);
    let (lo, hi) = extent(&[prev, notif]);
    for _ in 0..MAX_SECCOMP_FILTERS {
        if at == 0 {
            return Ok(None);
        }
        let f = r.read_span(at, lo, hi, &mut buf)?;
        if f.u64(notif.offset) != 0 {
            return Ok(Some(Steered::SeccompListener));
        }
        at = f.u64(prev.offset);
    }
    Ok(Some(Steered::Unknown))
}
