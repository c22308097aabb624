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

use crate::exec::{self, ExeFile, ExecError};
use crate::mem::{GuestPhys, MemError, VirtReader};
use crate::profile::{abi, KernelProfile};

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
    pub comm: String,
    /// Path of the executable (`mm->exe_file`), walked up through `d_parent` within its mount;
    /// `None` for kernel threads.
    pub exe: Option<String>,
    pub uid: u32,
    pub ppid: u32,
    pub parent_comm: String,
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
    pub process: Process,
    /// Why the executable's rules did not apply (identity mismatch, unpinned file, foreign
    /// code); set by the policy's decision.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_error: Option<String>,
}

/// A `comm` (TASK_COMM_LEN bytes, NUL-terminated if shorter) as text.
fn comm_text(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    match std::str::from_utf8(&bytes[..end]) {
        Ok(text) => text.to_owned(),
        Err(_) => String::from_utf8_lossy(&bytes[..end]).into_owned(),
    }
}

/// A path gathered from its last component up: where each name is, read once the walk is done
/// (one allocation, for the path itself).
struct PathBuilder {
    /// (`d_name.name`, length) of each component, last first.
    names: [(u64, usize); MAX_PATH_DEPTH],
    parts: usize,
}

impl PathBuilder {
    fn new() -> Self {
        PathBuilder {
            names: [(0, 0); MAX_PATH_DEPTH],
            parts: 0,
        }
    }

    /// Notes the name of `dentry` (length-limited to NAME_MAX) as the component before the
    /// ones noted so far.
    fn push_name<M: GuestPhys + ?Sized>(
        &mut self,
        r: &VirtReader<'_, M>,
        dentry: u64,
        p: &KernelProfile,
    ) -> Result<(), AttributionError> {
        if self.parts == MAX_PATH_DEPTH {
            return Err(AttributionError::PathTooDeep(MAX_PATH_DEPTH));
        }
        let qstr = dentry.wrapping_add(p.dentry.d_name.offset);
        let (lo, hi) = (
            p.qstr.len.offset.min(p.qstr.name.offset),
            (p.qstr.len.offset + 4).max(p.qstr.name.offset + 8),
        );
        let s = r.read_span::<64>(qstr, lo, hi)?;
        let len = (s.u32(p.qstr.len.offset) as usize).min(MAX_NAME);
        self.names[self.parts] = (s.u64(p.qstr.name.offset), len);
        self.parts += 1;
        Ok(())
    }

    /// Reads the names into the path, with a leading slash if `absolute`.
    fn finish<M: GuestPhys + ?Sized>(
        self,
        r: &VirtReader<'_, M>,
        absolute: bool,
    ) -> Result<String, AttributionError> {
        let names = &self.names[..self.parts];
        if names.is_empty() {
            return Ok(if absolute { "/" } else { "" }.to_string());
        }
        let total = names.iter().map(|&(_, len)| len + 1).sum::<usize>();
        let mut path = Vec::with_capacity(total);
        let mut name_buf = [0u8; MAX_NAME];
        for (i, &(name, len)) in names.iter().rev().enumerate() {
            if absolute || i > 0 {
                path.push(b'/');
            }
            r.read_virt(name, &mut name_buf[..len])?;
            path.extend_from_slice(&name_buf[..len]);
        }
        Ok(match String::from_utf8(path) {
            Ok(text) => text,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }
}

/// Path of an executable from its `struct path` (dentry + vfsmount): names up to the root of
/// the dentry's mount, then across mounts (`mnt_mountpoint` in `mnt_parent`) up to the root of
/// the mount tree, as `d_path` would. A path the walk cannot finish within its limits is an error
/// (the policy then denies), never a suffix that could pass for an allowed absolute path; a file
/// outside any mounted tree (memfd, anonymous) yields its bare name, which no absolute `exe` rule
/// matches.
fn exe_path<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    mut dentry: u64,
    vfsmount: u64,
    p: &KernelProfile,
) -> Result<String, AttributionError> {
    let m = &p.mount;
    // struct mount embeds the vfsmount: container_of.
    let mut mount = vfsmount.wrapping_sub(m.mnt.offset);
    let mut mnt_root = r.read_field_u64(vfsmount, m.vfsmount_mnt_root.offset)?;
    let mut path = PathBuilder::new();
    for _ in 0..MAX_PATH_STEPS {
        if dentry == mnt_root {
            let parent = r.read_field_u64(mount, m.mnt_parent.offset)?;
            if parent == mount || parent == 0 {
                // The root of the mount tree.
                return path.finish(r, true);
            }
            dentry = r.read_field_u64(mount, m.mnt_mountpoint.offset)?;
            mount = parent;
            mnt_root =
                r.read_field_u64(mount.wrapping_add(m.mnt.offset), m.vfsmount_mnt_root.offset)?;
            continue;
        }
        let parent = r.read_field_u64(dentry, p.dentry.d_parent.offset)?;
        if parent == dentry || parent == 0 {
            // A root that is not its mount's root: a pseudo filesystem's file (memfd, anon).
            path.push_name(r, dentry, p)?;
            return path.finish(r, false);
        }
        path.push_name(r, dentry, p)?;
        dentry = parent;
    }
    Err(AttributionError::PathTooDeep(MAX_PATH_DEPTH))
}

/// What [`read_process`] found on the way to the executable's path: `mm`, `mm->exe_file` and
/// its vfsmount (0 where absent).
#[derive(Clone, Copy, Default)]
struct ExeRefs {
    mm: u64,
    file: u64,
    vfsmount: u64,
}

/// Largest span of a `task_struct` read at once: `mm` .. `comm` is 720 bytes on Debian's 6.1.
const TASK_SPAN: usize = 2048;

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
    let task_s = r.read_span::<TASK_SPAN>(task, lo, hi)?;
    let pid = task_s.u32(t.pid.offset);
    let tgid = task_s.u32(t.tgid.offset);
    let comm = comm_text(task_s.bytes(t.comm.offset, abi::TASK_COMM_LEN));
    let cred = task_s.u64(t.cred.offset);
    let uid = r.read_field_u32(cred, p.cred.uid.offset)?;
    let parent = task_s.u64(t.real_parent.offset);
    let (plo, phi) = (
        t.tgid.offset.min(t.comm.offset),
        (t.tgid.offset + 4).max(t.comm.offset + abi::TASK_COMM_LEN as u64),
    );
    let parent_s = r.read_span::<TASK_SPAN>(parent, plo, phi)?;
    let ppid = parent_s.u32(t.tgid.offset);
    let parent_comm = comm_text(parent_s.bytes(t.comm.offset, abi::TASK_COMM_LEN));
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
            let path = file.wrapping_add(p.file.f_path.offset);
            let dentry = r.read_field_u64(path, p.path.dentry.offset)?;
            let vfsmount = r.read_field_u64(path, p.path.mnt.offset)?;
            refs.file = file;
            refs.vfsmount = vfsmount;
            Some(exe_path(r, dentry, vfsmount, p)?)
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
/// socket a `sockaddr_in6`, or a `sockaddr_in` when the caller says AF_INET (`udpv6_sendmsg`,
/// `ip6_datagram_connect` take IPv4 destinations). Every other socket family has no IP address,
/// whatever its sockaddr looks like: a `sockaddr_ll` crafted to read as a `sockaddr_in` is not
/// one. A family the socket does not take is reported, with no address.
fn read_sockaddr<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    sock_family: u16,
    addr: u64,
    addrlen: u64,
) -> Result<Decoded, MemError> {
    if addr == 0 || addrlen < 2 {
        return Ok((None, None, None));
    }
    let family = r.read_u16(addr)?;
    let v4 = || -> Result<Decoded, MemError> {
        if addrlen < abi::SOCKADDR_IN_LEN as u64 - 8 {
            return Ok((None, None, None));
        }
        let port = u16::from_be(r.read_u16(addr + abi::SIN_PORT as u64)?);
        let ip = r.read_field::<4>(addr, abi::SIN_ADDR as u64)?;
        Ok((Some(IpAddr::V4(Ipv4Addr::from(ip))), Some(port), None))
    };
    match (sock_family, family) {
        (abi::AF_INET, abi::AF_INET | abi::AF_UNSPEC) => v4(),
        (abi::AF_INET6, abi::AF_INET) => v4(),
        (abi::AF_INET6, abi::AF_INET6) if addrlen >= 24 => {
            let port = u16::from_be(r.read_u16(addr + abi::SIN6_PORT as u64)?);
            let ip = r.read_field::<16>(addr, abi::SIN6_ADDR as u64)?;
            Ok((Some(IpAddr::V6(Ipv6Addr::from(ip))), Some(port), None))
        }
        // A short sockaddr_in6, or AF_UNSPEC on an IPv6 socket (a send without destination).
        (abi::AF_INET6, abi::AF_INET6 | abi::AF_UNSPEC) => Ok((None, None, None)),
        (s, f) if s == f => Ok((None, None, None)),
        (_, f) => Ok((None, None, Some(f))),
    }
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

/// The process running on a vCPU whose kernel GS base (the per-CPU area) is `gs_base`: for events
/// that are not socket operations, such as a write to a guarded kernel page.
pub fn current_process<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    profile: &KernelProfile,
    gs_base: u64,
) -> Result<Process, AttributionError> {
    let current_task = *profile
        .symbols
        .get("current_task")
        .ok_or(AttributionError::MissingSymbol("current_task"))?;
    let task = r.read_u64(gs_base.wrapping_add(current_task))?;
    Ok(read_process(r, task, profile)?.0)
}

/// The executable file of the task, with init's mount namespace found from `init_task` and the
/// `struct page` array from `vmemmap_base`.
fn exe_file<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    profile: &KernelProfile,
    task: u64,
    refs: ExeRefs,
    kaslr_slide: u64,
) -> Result<ExeFile, AttributionError> {
    let symbol = |name: &'static str| {
        profile
            .symbols
            .get(name)
            .map(|a| a.wrapping_add(kaslr_slide))
            .ok_or(AttributionError::MissingSymbol(name))
    };
    let roots = exec::kernel_roots(r, profile, symbol("init_task")?, symbol("vmemmap_base")?)?;
    Ok(exec::exe_file(
        r,
        profile,
        &roots,
        task,
        refs.mm,
        refs.file,
        refs.vfsmount,
    )?)
}

/// Attributes one trapped operation.
pub fn attribute<M: GuestPhys + ?Sized>(
    r: &VirtReader<'_, M>,
    profile: &KernelProfile,
    op: SocketOp,
    args: HookArgs,
) -> Result<Attribution, AttributionError> {
    let current_task = *profile
        .symbols
        .get("current_task")
        .ok_or(AttributionError::MissingSymbol("current_task"))?;
    let task = r.read_u64(args.gs_base.wrapping_add(current_task))?;
    let (mut process, refs) = read_process(r, task, profile)?;
    if refs.file != 0 {
        match exe_file(r, profile, task, refs, args.kaslr_slide) {
            Ok(f) => process.exe_file = Some(f),
            Err(e) => process.exe_error = Some(e.to_string()),
        }
    }
    let sock = args.rdi;
    let sock_type = r.read_field_u16(sock, profile.socket.type_.offset)?;
    let sk = r.read_field_u64(sock, profile.socket.sk.offset)?;
    let (family, protocol) = if sk == 0 {
        (0, 0)
    } else {
        (
            r.read_field_u16(sk, profile.sock.skc_family.offset)?,
            r.read_field_u16(sk, profile.sock.sk_protocol.offset)?,
        )
    };
    let (addr, port, foreign_sockaddr) = match op {
        SocketOp::Connect | SocketOp::Bind => read_sockaddr(r, family, args.rsi, args.rdx)?,
        SocketOp::Sendmsg => {
            // security_socket_sendmsg(sock, msg, size): the kernel's copy of the msghdr.
            let msg = args.rsi;
            let name = r.read_field_u64(msg, profile.msghdr.msg_name.offset)?;
            let namelen = r.read_field_u32(msg, profile.msghdr.msg_namelen.offset)?;
            read_sockaddr(r, family, name, u64::from(namelen))?
        }
        SocketOp::Listen if sk != 0 && family == abi::AF_INET => {
            let local = r.read_field::<4>(sk, profile.sock.skc_rcv_saddr.offset)?;
            let port = r.read_field_u16(sk, profile.sock.skc_num.offset)?;
            (Some(IpAddr::V4(Ipv4Addr::from(local))), Some(port), None)
        }
        SocketOp::Listen if sk != 0 && family == abi::AF_INET6 => {
            let local = r.read_field::<16>(sk, profile.sock.skc_v6_rcv_saddr.offset)?;
            let port = r.read_field_u16(sk, profile.sock.skc_num.offset)?;
            (Some(IpAddr::V6(Ipv6Addr::from(local))), Some(port), None)
        }
        SocketOp::Listen => (None, None, None),
    };
    Ok(Attribution {
        op,
        family,
        sock_type,
        protocol,
        addr,
        port,
        foreign_sockaddr,
        process,
        identity_error: None,
    })
}
