//! Attribution of a trapped socket operation to the guest process that made it.
//!
//! Input: the registers at the entry of a hooked LSM function (`security_socket_connect(sock,
//! address, addrlen)`, `security_socket_bind(sock, address, addrlen)`,
//! `security_socket_listen(sock, backlog)`: SysV ABI, so RDI, RSI, RDX), the kernel's GS base (the
//! per-CPU area, where `current_task` lives) and the kernel profile (BTF offsets, symbols).
//! Everything is read through the bounded [`VirtReader`]: a hostile guest can make attribution
//! fail (and the policy then fails closed), never loop or read outside its RAM.
//!
//! The address of a call is decoded by the socket's own family (`sk->sk_family`), never by the
//! family the caller wrote in its sockaddr: a sockaddr that disagrees is no address (and is
//! reported as such). The executable is reported as a path and as a file ([`ExeFile`]: its
//! identity, its mount's namespace, and where the calling instruction lives).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Serialize;
use thiserror::Error;

use crate::exec::{self, ExeFile, ExecError, KernelRoots, MountFacts};
use crate::mem::{GuestPhys, MemError, VirtReader};
pub use crate::names::{Comm, ExePath};
use crate::profile::{abi, Field, KernelProfile};

/// Longest file name component we read (NAME_MAX).
const MAX_NAME: usize = 255;
/// Most path components of an executable's path we accept (deeper is an error, not a suffix).
const MAX_PATH_DEPTH: usize = 64;
/// Most steps (components and mount crossings) of one path walk.
const MAX_PATH_STEPS: usize = 128;

/// The socket operations Vigil hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum SocketOp {
    Connect,
    Bind,
    Listen,
    /// `sendmsg` that names a destination (UDP `sendto`, TCP Fast Open); decided by the connect
    /// rules.
    Sendmsg,
}

impl SocketOp {
    /// The LSM hook function each operation passes through.
    pub fn hook_symbol(self) -> &'static str {
        match self {
            SocketOp::Connect => "security_socket_connect",
            SocketOp::Bind => "security_socket_bind",
            SocketOp::Listen => "security_socket_listen",
            SocketOp::Sendmsg => "security_socket_sendmsg",
        }
    }
}

#[derive(Debug, Error)]
pub enum AttributionError {
    #[error("reading guest memory: {0}")]
    Memory(#[from] MemError),
    #[error("the kernel profile lacks the symbol {0}")]
    MissingSymbol(&'static str),
    #[error("the executable's path is deeper than {0} components or its mounts loop")]
    PathTooDeep(usize),
    #[error("the executable's identity: {0}")]
    Exec(#[from] ExecError),
}

/// The process behind a trapped operation.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    pub tgid: u32,
    pub comm: Comm,
    /// Path of the executable (`mm->exe_file`), walked up through `d_parent` within its mount;
    /// `None` for kernel threads.
    pub exe: Option<ExePath>,
    pub uid: u32,
    pub ppid: u32,
    pub parent_comm: Comm,
    /// The executable as a file (identity, mount namespace, code origin); read by [`attribute`]
    /// only (not for tamper reports), `None` for kernel threads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exe_file: Option<ExeFile>,
    /// Why `exe_file` could not be read (a hostile or torn VMA tree, an unreadable inode): then
    /// no `exe` rule applies, while `comm` rules and ungoverned families still do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exe_error: Option<String>,
}

/// One attributed socket operation.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Attribution {
    pub op: SocketOp,
    /// AF_* of the socket.
    pub family: u16,
    /// SOCK_* of the socket.
    pub sock_type: u16,
    /// IPPROTO_* of the socket.
    pub protocol: u16,
    /// Remote address (connect) or local address (bind, listen), where it has one.
    pub addr: Option<IpAddr>,
    pub port: Option<u16>,
    /// The family the caller wrote in its sockaddr, when the socket's family does not take it:
    /// such a sockaddr is not an address (`addr` is `None`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub foreign_sockaddr: Option<u16>,
    /// An IPv6 socket that takes no IPv4 peer (`IPV6_V6ONLY`): a bind or listen on its wildcard
    /// is IPv6 only, and an IPv4 sockaddr is not its address.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub v6only: bool,
    pub process: Process,
    /// Why the executable's rules did not apply (identity mismatch, unpinned file, foreign
    /// code); set by the policy's decision.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_error: Option<String>,
}

/// Largest span of a dentry read at once (`d_parent` and `d_name`: 24 bytes on 6.1).
const DENTRY_SPAN: usize = 128;

/// One component of a path: where its name is and how long it is (capped at NAME_MAX).
#[derive(Clone, Copy, Default)]
struct Name {
    at: u64,
    len: usize,
}

/// A dentry's parent and name, in one read.
fn dentry_facts<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    dentry: u64,
    p: &KernelProfile,
) -> Result<(u64, Name), MemError> {
    let d = &p.dentry;
    let len = Field {
        offset: d.d_name.offset + p.qstr.len.offset,
        size: 4,
    };
    let name = Field {
        offset: d.d_name.offset + p.qstr.name.offset,
        size: 8,
    };
    let lo = d.d_parent.offset.min(len.offset).min(name.offset);
    let hi = (d.d_parent.offset + 8)
        .max(len.offset + 4)
        .max(name.offset + 8);
    let mut buf = [0u8; DENTRY_SPAN];
    let s = r.read_span(dentry, lo, hi, &mut buf)?;
    let name = Name {
        at: s.u64(name.offset),
        len: (s.u32(len.offset) as usize).min(MAX_NAME),
    };
    Ok((s.u64(d.d_parent.offset), name))
}

/// Reads `names` (last component first) into `path`, each after a slash but the first of a
/// relative path.
fn write_path<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    names: &[Name],
    absolute: bool,
    path: &mut Vec<u8>,
) -> Result<(), AttributionError> {
    if names.is_empty() {
        if absolute {
            path.push(b'/');
        }
        return Ok(());
    }
    let total = names.iter().map(|n| n.len + 1).sum::<usize>() - usize::from(!absolute);
    path.resize(total, 0);
    let mut at = 0;
    for (i, n) in names.iter().rev().enumerate() {
        if absolute || i > 0 {
            path[at] = b'/';
            at += 1;
        }
        r.read_virt(n.at, &mut path[at..at + n.len])?;
        at += n.len;
    }
    Ok(())
}

/// Path of an executable from its `struct path` (dentry + vfsmount; `mount` is the vfsmount's
/// `struct mount`, read): names up to the root of the dentry's mount, then across mounts
/// (`mnt_mountpoint` in `mnt_parent`) up to the root of the mount tree, as `d_path` would. A
/// path the walk cannot finish within its limits is an error (the policy then denies), never a
/// suffix that could pass for an allowed absolute path; a file outside any mounted tree (memfd,
/// anonymous) yields its bare name, which no absolute `exe` rule matches. One read per dentry
/// and per mount crossed, one per name; the path is assembled in this thread's scratch buffer
/// (see [`crate::names`]).
fn exe_path<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    mut dentry: u64,
    vfsmount: u64,
    first: &MountFacts,
    p: &KernelProfile,
) -> Result<ExePath, AttributionError> {
    let m = &p.mount;
    // struct mount embeds the vfsmount: container_of.
    let mut mount = vfsmount.wrapping_sub(m.mnt.offset);
    let mut facts = *first;
    let mut names = [Name::default(); MAX_PATH_DEPTH];
    let mut parts = 0;
    let mut push = |name: Name| {
        if parts == MAX_PATH_DEPTH {
            return Err(AttributionError::PathTooDeep(MAX_PATH_DEPTH));
        }
        names[parts] = name;
        parts += 1;
        Ok(())
    };
    let mut absolute = None;
    for _ in 0..MAX_PATH_STEPS {
        if dentry == facts.root {
            let parent = facts.parent;
            if parent == mount || parent == 0 {
                // The root of the mount tree.
                absolute = Some(true);
                break;
            }
            dentry = facts.mountpoint;
            mount = parent;
            facts = exec::mount_facts(r, p, mount)?;
            continue;
        }
        let (parent, name) = dentry_facts(r, dentry, p)?;
        push(name)?;
        if parent == dentry || parent == 0 {
            // A root that is not its mount's root: a pseudo filesystem's file (memfd, anon).
            absolute = Some(false);
            break;
        }
        dentry = parent;
    }
    let Some(absolute) = absolute else {
        return Err(AttributionError::PathTooDeep(MAX_PATH_DEPTH));
    };
    let names = &names[..parts];
    crate::names::exe_path_with(|path| write_path(r, names, absolute, path))
}

/// What [`read_process`] found on the way to the executable's path: `mm`, `mm->exe_file`, its
/// inode and its mount (0 and `None` where absent).
#[derive(Clone, Copy, Default)]
struct ExeRefs {
    mm: u64,
    file: u64,
    inode: u64,
    /// The exe file's `f_flags`, where the profile has them.
    flags: Option<u32>,
    mount: Option<MountFacts>,
}

/// Largest span of a `task_struct` read at once: `mm` .. `comm` is 720 bytes on Debian's 6.1.
const TASK_SPAN: usize = 2048;
/// Largest span of a `struct file` read at once (`f_path` .. `f_flags`: about 50 bytes on 6.1).
const FILE_SPAN: usize = 128;

fn read_process<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    task: u64,
    p: &KernelProfile,
) -> Result<(Process, ExeRefs), AttributionError> {
    let t = &p.task_struct;
    // One pass over the task and one over its parent: the fields sit within a few hundred bytes.
    let fields = [t.pid, t.tgid, t.comm, t.cred, t.real_parent, t.mm];
    let lo = fields.iter().map(|f| f.offset).min().unwrap_or(0);
    let hi = fields.iter().map(|f| f.offset + f.size).max().unwrap_or(0);
    let mut task_buf = [0u8; TASK_SPAN];
    let task_s = r.read_span(task, lo, hi, &mut task_buf)?;
    let pid = task_s.u32(t.pid.offset);
    let tgid = task_s.u32(t.tgid.offset);
    let comm = Comm::from_bytes(task_s.bytes(t.comm.offset, abi::TASK_COMM_LEN));
    let cred = task_s.u64(t.cred.offset);
    let uid = r.read_field_u32(cred, p.cred.uid.offset)?;
    let parent = task_s.u64(t.real_parent.offset);
    let (plo, phi) = (
        t.tgid.offset.min(t.comm.offset),
        (t.tgid.offset + 4).max(t.comm.offset + abi::TASK_COMM_LEN as u64),
    );
    let mut parent_buf = [0u8; TASK_SPAN];
    let parent_s = r.read_span(parent, plo, phi, &mut parent_buf)?;
    let ppid = parent_s.u32(t.tgid.offset);
    let parent_comm = Comm::from_bytes(parent_s.bytes(t.comm.offset, abi::TASK_COMM_LEN));
    let mm = task_s.u64(t.mm.offset);
    let mut refs = ExeRefs {
        mm,
        ..ExeRefs::default()
    };
    let exe = if mm == 0 {
        None
    } else {
        let file = r.read_field_u64(mm, p.mm_struct.exe_file.offset)?;
        if file == 0 {
            None
        } else {
            // One pass over the file: its path (dentry, vfsmount), its inode and its flags.
            let at = |f: Field| f.offset + p.file.f_path.offset;
            let (dentry_f, mnt_f) = (at(p.path.dentry), at(p.path.mnt));
            let inode_f = p.exec.file_f_inode.offset;
            let flags_f = p.exec.file_f_flags.map(|f| f.offset);
            let lo = dentry_f
                .min(mnt_f)
                .min(inode_f)
                .min(flags_f.unwrap_or(u64::MAX));
            let hi = (dentry_f.max(mnt_f).max(inode_f) + 8).max(flags_f.map_or(0, |f| f + 4));
            let mut buf = [0u8; FILE_SPAN];
            let file_s = r.read_span(file, lo, hi, &mut buf)?;
            let (dentry, vfsmount) = (file_s.u64(dentry_f), file_s.u64(mnt_f));
            let mount = exec::mount_facts(r, p, vfsmount.wrapping_sub(p.mount.mnt.offset))?;
            refs.file = file;
            refs.inode = file_s.u64(inode_f);
            refs.flags = flags_f.map(|f| file_s.u32(f));
            refs.mount = Some(mount);
            Some(exe_path(r, dentry, vfsmount, &mount, p)?)
        }
    };
    let process = Process {
        pid,
        tgid,
        comm,
        exe,
        uid,
        ppid,
        parent_comm,
        exe_file: None,
        exe_error: None,
    };
    Ok((process, refs))
}

/// A decoded sockaddr: address and port, and the caller's family where the socket does not
/// take it.
type Decoded = (Option<IpAddr>, Option<u16>, Option<u16>);

/// Decodes a `struct sockaddr` the kernel already copied in, by the family of the socket
/// (`sock_family`), as the socket's own code reads it: an AF_INET socket reads a `sockaddr_in`
/// (AF_UNSPEC too: `inet_bind` binds it as INADDR_ANY, `udp_sendmsg` sends to it); an AF_INET6
/// socket a `sockaddr_in6`, or a `sockaddr_in` where `ipv4_on_ipv6` says the call takes one
/// (see [`takes_ipv4_sockaddr`]). Every other socket family has no IP address, whatever its
/// sockaddr looks like: a `sockaddr_ll` crafted to read as a `sockaddr_in` is not one. A family
/// the call does not take is reported, with no address.
fn read_sockaddr<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    sock_family: u16,
    ipv4_on_ipv6: bool,
    addr: u64,
    addrlen: u64,
) -> Result<Decoded, MemError> {
    if addr == 0 || addrlen < 2 {
        return Ok((None, None, None));
    }
    // The bytes decoding can use (a sockaddr_in6's first 24), read at once; where they cannot
    // all be read, field by field, so a short sockaddr before an unmapped page still decodes.
    let mut buf = [0u8; 24];
    let n = addrlen.min(buf.len() as u64) as usize;
    if r.read_virt(addr, &mut buf[..n]).is_ok() {
        return decode_sockaddr(sock_family, ipv4_on_ipv6, addrlen, |at, out| {
            out.copy_from_slice(&buf[at..at + out.len()]);
            Ok(())
        });
    }
    decode_sockaddr(sock_family, ipv4_on_ipv6, addrlen, |at, out| {
        r.read_virt(crate::mem::field_addr(addr, at as u64)?, out)
    })
}

/// [`read_sockaddr`]'s decoding, over `get(offset, bytes)`: never asks for a byte at or past
/// `addrlen`.
fn decode_sockaddr(
    sock_family: u16,
    ipv4_on_ipv6: bool,
    addrlen: u64,
    get: impl Fn(usize, &mut [u8]) -> Result<(), MemError>,
) -> Result<Decoded, MemError> {
    let u16_at = |at: usize| -> Result<u16, MemError> {
        let mut b = [0u8; 2];
        get(at, &mut b)?;
        Ok(u16::from_le_bytes(b))
    };
    let family = u16_at(0)?;
    let v4 = || -> Result<Decoded, MemError> {
        if addrlen < abi::SOCKADDR_IN_LEN as u64 - 8 {
            return Ok((None, None, None));
        }
        let port = u16::from_be(u16_at(abi::SIN_PORT)?);
        let mut ip = [0u8; 4];
        get(abi::SIN_ADDR, &mut ip)?;
        Ok((Some(IpAddr::V4(Ipv4Addr::from(ip))), Some(port), None))
    };
    match (sock_family, family) {
        (abi::AF_INET, abi::AF_INET | abi::AF_UNSPEC) => v4(),
        (abi::AF_INET6, abi::AF_INET) if ipv4_on_ipv6 => v4(),
        (abi::AF_INET6, abi::AF_INET6) if addrlen >= 24 => {
            let port = u16::from_be(u16_at(abi::SIN6_PORT)?);
            let mut ip = [0u8; 16];
            get(abi::SIN6_ADDR, &mut ip)?;
            Ok((Some(IpAddr::V6(Ipv6Addr::from(ip))), Some(port), None))
        }
        // A short sockaddr_in6, or AF_UNSPEC on an IPv6 socket (a send without destination).
        (abi::AF_INET6, abi::AF_INET6 | abi::AF_UNSPEC) => Ok((None, None, None)),
        (s, f) if s == f => Ok((None, None, None)),
        (_, f) => Ok((None, None, Some(f))),
    }
}

/// Whether a call on an AF_INET6 socket takes a `sockaddr_in`: only a UDP socket's `connect`
/// and `sendmsg` (`ip6_datagram_connect`, `udpv6_sendmsg`), and only where the socket takes
/// IPv4 peers. `inet6_bind` and `tcp_v6_connect` refuse one (`EAFNOSUPPORT`), as do the ping
/// and raw IPv6 sockets, and an `IPV6_V6ONLY` socket refuses IPv4 (`ENETUNREACH`): decoded
/// as IPv4 anyway, such a call opened an IPv4 flow or port its socket never has.
fn takes_ipv4_sockaddr(op: SocketOp, protocol: u16, v6only: bool) -> bool {
    matches!(op, SocketOp::Connect | SocketOp::Sendmsg)
        && matches!(protocol, abi::IPPROTO_UDP | abi::IPPROTO_UDPLITE)
        && !v6only
}

/// Registers at the hook (function entry, SysV ABI).
#[derive(Clone, Copy, Debug)]
pub struct HookArgs {
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    /// Kernel GS base (MSR_GS_BASE while in the kernel): the per-CPU area.
    pub gs_base: u64,
    /// The KASLR slide (running address minus link address of kernel symbols): finds
    /// `init_task`, whose mount namespace is the tenant's initial one.
    pub kaslr_slide: u64,
}

/// The symbols a trap needs, resolved from the profile once per VM rather than by name on
/// every trap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrapSymbols {
    /// The per-CPU offset of `current_task`.
    pub current_task: u64,
    /// Link addresses of `init_task` and `vmemmap_base` (the identity checks need them; without
    /// them the executable's identity is unknown, see [`Process::exe_error`]).
    pub init_task: Option<u64>,
    pub vmemmap_base: Option<u64>,
    /// Link address of `page_offset_base`: the kernel's direct map (see [`crate::mem::DirectMap`]); without
    /// it every address is walked.
    pub page_offset_base: Option<u64>,
}

impl TrapSymbols {
    pub fn of(profile: &KernelProfile) -> Result<TrapSymbols, AttributionError> {
        let get = |name: &str| profile.symbols.get(name).copied();
        Ok(TrapSymbols {
            current_task: get("current_task")
                .ok_or(AttributionError::MissingSymbol("current_task"))?,
            init_task: get("init_task"),
            vmemmap_base: get("vmemmap_base"),
            page_offset_base: get("page_offset_base"),
        })
    }
}

/// What the identity checks read of the kernel itself: init's mount namespace
/// (`init_nsproxy.mnt_ns`, set by `init_mount_tree`) and `vmemmap_base` (set with the memory
/// map). Both are fixed before the first user process runs and never change after, so a VM
/// reads them once (per KASLR slide) rather than on every trap: three reads, and a walk of the
/// kernel image's pages, fewer. Only a read that found both set is kept.
#[derive(Debug, Default)]
pub struct RootsCache(std::sync::OnceLock<(u64, KernelRoots)>);

impl RootsCache {
    /// The kernel's direct map, once a trap has found and checked it.
    pub fn direct_map(&self) -> Option<crate::mem::DirectMap> {
        self.0.get().and_then(|(_, roots)| roots.direct_map)
    }
}

/// The process running on a vCPU whose kernel GS base (the per-CPU area) is `gs_base`: for events
/// that are not socket operations, such as a write to a guarded kernel page.
pub fn current_process<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    profile: &KernelProfile,
    gs_base: u64,
) -> Result<Process, AttributionError> {
    let current_task = TrapSymbols::of(profile)?.current_task;
    let task = r.read_u64(gs_base.wrapping_add(current_task))?;
    Ok(read_process(r, task, profile)?.0)
}

/// The kernel's roots: init's mount namespace found from `init_task`, the `struct page` array
/// from `vmemmap_base`, the direct map from `page_offset_base`; read once per VM (per KASLR
/// slide), from the first trap that finds them set.
fn kernel_roots<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    profile: &KernelProfile,
    syms: &TrapSymbols,
    cache: &RootsCache,
    kaslr_slide: u64,
) -> Result<KernelRoots, AttributionError> {
    if let Some(&(slide, roots)) = cache.0.get() {
        if slide == kaslr_slide {
            return Ok(roots);
        }
    }
    let symbol = |addr: Option<u64>, name: &'static str| {
        addr.map(|a| a.wrapping_add(kaslr_slide))
            .ok_or(AttributionError::MissingSymbol(name))
    };
    let roots = exec::kernel_roots(
        r,
        profile,
        symbol(syms.init_task, "init_task")?,
        symbol(syms.vmemmap_base, "vmemmap_base")?,
        syms.page_offset_base.map(|a| a.wrapping_add(kaslr_slide)),
    )?;
    if roots.init_mnt_ns != 0 && roots.vmemmap_base != 0 {
        let _ = cache.0.set((kaslr_slide, roots));
    }
    Ok(roots)
}

/// The executable file of the task.
fn exe_file<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    profile: &KernelProfile,
    roots: KernelRoots,
    task: u64,
    refs: ExeRefs,
) -> Result<ExeFile, AttributionError> {
    let Some(mount) = refs.mount else {
        return Err(AttributionError::Exec(ExecError::Maple("no mount read")));
    };
    Ok(exec::exe_file_of(
        r, profile, &roots, task, refs.mm, refs.inode, refs.flags, &mount,
    )?)
}

/// Largest span of a `struct sock` read at once (the fields attribution takes,
/// `skc_rcv_saddr` .. `sk_protocol`, are 514 bytes on 6.1).
const SOCK_SPAN: usize = 1024;
/// Largest span of a `struct socket` (`type` .. `sk`) or a kernel `msghdr` (`msg_name`,
/// `msg_namelen`) read at once.
const SOCKET_SPAN: usize = 128;

/// Attributes one trapped operation (the symbols looked up by name: see [`attribute_with`]).
pub fn attribute<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    profile: &KernelProfile,
    op: SocketOp,
    args: HookArgs,
) -> Result<Attribution, AttributionError> {
    let syms = TrapSymbols::of(profile)?;
    attribute_with(r, profile, &syms, &RootsCache::default(), op, args)
}

/// Attributes one trapped operation, with the symbols resolved once ([`TrapSymbols::of`]) and
/// the kernel's roots read once per VM (`roots`, see [`RootsCache`]). One
/// read per kernel object (task, parent, cred, mm, file, each mount and dentry of the path,
/// inode, superblock, socket, sock, sockaddr), each into a stack buffer; the exe path is
/// assembled in this thread's scratch buffer and shared when seen before (see
/// [`crate::names`]): a trap of a process this thread has seen allocates nothing.
pub fn attribute_with<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    profile: &KernelProfile,
    syms: &TrapSymbols,
    roots: &RootsCache,
    op: SocketOp,
    args: HookArgs,
) -> Result<Attribution, AttributionError> {
    let task = r.read_u64(args.gs_base.wrapping_add(syms.current_task))?;
    // The roots after the first read, so that a trap whose task cannot be read reads nothing
    // else; from here on kernel objects in the direct map are read without a walk.
    let roots = kernel_roots(r, profile, syms, roots, args.kaslr_slide);
    if let Ok(roots) = &roots {
        r.use_direct_map(roots.direct_map);
    }
    let (mut process, refs) = read_process(r, task, profile)?;
    if refs.file != 0 {
        match roots.and_then(|roots| exe_file(r, profile, roots, task, refs)) {
            Ok(f) => process.exe_file = Some(f),
            Err(e) => process.exe_error = Some(e.to_string()),
        }
    }
    let (so, sk_f) = (&profile.socket, &profile.sock);
    let mut sock_buf = [0u8; SOCKET_SPAN];
    let sock_s = {
        let (lo, hi) = span_of(&[so.type_, so.sk]);
        r.read_span(args.rdi, lo, hi, &mut sock_buf)?
    };
    let sock_type = sock_s.u16(so.type_.offset);
    let sk = sock_s.u64(so.sk.offset);
    let mut sk_buf = [0u8; SOCK_SPAN];
    let sk_s = if sk == 0 {
        None
    } else {
        // The IPv6-only flag sits in `sock_common`, among the fields read anyway.
        let flag = sk_f.skc_ipv6only.map_or(sk_f.skc_family, |f| f.byte());
        let (lo, hi) = span_of(&[
            sk_f.skc_family,
            sk_f.sk_protocol,
            sk_f.skc_rcv_saddr,
            sk_f.skc_num,
            sk_f.skc_v6_rcv_saddr,
            flag,
        ]);
        Some(r.read_span(sk, lo, hi, &mut sk_buf)?)
    };
    let (family, protocol) = match &sk_s {
        None => (0, 0),
        Some(s) => (
            s.u16(sk_f.skc_family.offset),
            s.u16(sk_f.sk_protocol.offset),
        ),
    };
    let v6only = family == abi::AF_INET6
        && match (&sk_s, sk_f.skc_ipv6only) {
            (Some(s), Some(f)) => s.bytes(f.offset, 1)[0] >> f.bit & 1 == 1,
            _ => false,
        };
    let ipv4_on_ipv6 = takes_ipv4_sockaddr(op, protocol, v6only);
    let (addr, port, foreign_sockaddr) = match (op, &sk_s) {
        (SocketOp::Connect | SocketOp::Bind, _) => {
            read_sockaddr(r, family, ipv4_on_ipv6, args.rsi, args.rdx)?
        }
        (SocketOp::Sendmsg, _) => {
            // security_socket_sendmsg(sock, msg, size): the kernel's copy of the msghdr.
            let m = &profile.msghdr;
            let (lo, hi) = span_of(&[m.msg_name, m.msg_namelen]);
            let mut buf = [0u8; SOCKET_SPAN];
            let msg = r.read_span(args.rsi, lo, hi, &mut buf)?;
            let name = msg.u64(m.msg_name.offset);
            let namelen = msg.u32(m.msg_namelen.offset);
            read_sockaddr(r, family, ipv4_on_ipv6, name, u64::from(namelen))?
        }
        (SocketOp::Listen, Some(s)) if family == abi::AF_INET => {
            let mut local = [0u8; 4];
            local.copy_from_slice(s.bytes(sk_f.skc_rcv_saddr.offset, 4));
            let port = s.u16(sk_f.skc_num.offset);
            (Some(IpAddr::V4(Ipv4Addr::from(local))), Some(port), None)
        }
        (SocketOp::Listen, Some(s)) if family == abi::AF_INET6 => {
            let mut local = [0u8; 16];
            local.copy_from_slice(s.bytes(sk_f.skc_v6_rcv_saddr.offset, 16));
            let port = s.u16(sk_f.skc_num.offset);
            (Some(IpAddr::V6(Ipv6Addr::from(local))), Some(port), None)
        }
        (SocketOp::Listen, _) => (None, None, None),
    };
    Ok(Attribution {
        op,
        family,
        sock_type,
        protocol,
        addr,
        port,
        foreign_sockaddr,
        v6only,
        process,
        identity_error: None,
    })
}

/// The lowest offset and the end of the highest of `fields`: the span one read covers.
fn span_of(fields: &[Field]) -> (u64, u64) {
    let lo = fields.iter().map(|f| f.offset).min().unwrap_or(0);
    let hi = fields
        .iter()
        .map(|f| f.offset.saturating_add(f.size))
        .max()
        .unwrap_or(0);
    (lo, hi)
}
