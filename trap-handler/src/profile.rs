//! The kernel profile: everything introspection needs to know about one kernel build (struct member
//! offsets from BTF, symbol link addresses from kallsyms), computed once and cached by build id.
//!
//! The socket address layouts (`sockaddr_in`, `sockaddr_in6`) and the family/type/protocol numbers
//! are user ABI and never change; they are constants in [`abi`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::btf::{Btf, BtfError};
use crate::kallsyms::Kallsyms;

/// Bumped whenever the profile's fields change meaning, so stale caches are ignored.
pub const PROFILE_FORMAT: u32 = 13;

/// Symbols the profile records (link addresses; add the KASLR slide at runtime).
pub const PROFILE_SYMBOLS: &[&str] = &[
    "_text",
    "_etext",
    "startup_64",
    "entry_SYSCALL_64",
    "init_task",
    // The base of the `struct page` array (CONFIG_SPARSEMEM_VMEMMAP; randomized with KASLR):
    // whether the page the caller runs from is its file's page cache.
    "vmemmap_base",
    // The base of the direct map of physical memory (randomized with KASLR): kernel objects
    // there translate by arithmetic on the trap path (mem::DirectMap).
    "page_offset_base",
    "init_top_pgt",
    "phys_base",
    "__per_cpu_offset",
    "current_task",
    "linux_banner",
    "security_socket_connect",
    "security_socket_bind",
    "security_socket_listen",
    "security_socket_sendmsg",
    // Port points (vmm-core's introspect::ports): entered once the kernel has assigned a
    // socket's local port.
    "inet_hash",
    "inet6_hash",
    "tcp_connect",
    "udp_sendmsg",
    "udpv6_sendmsg",
    // What the hooks depend on, guarded by write traps once the tenant has booted: the system
    // call entry and dispatch, the socket system calls that call the hooks, the LSM hook lists.
    "do_syscall_64",
    "x64_sys_call",
    "sys_call_table",
    "__sys_connect",
    "__sys_bind",
    "__sys_listen",
    "security_hook_heads",
    // A bare `ret` in kernel text (retbleed's default return thunk): a denied call returns
    // -EPERM through it when the guest's stack cannot be read (the CPU pops the return address).
    "__x86_return_thunk",
];

/// One struct member: byte offset in its struct and size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Field {
    pub offset: u64,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStructLayout {
    pub size: u64,
    pub pid: Field,
    pub tgid: Field,
    /// `char comm[TASK_COMM_LEN]`; the size is TASK_COMM_LEN (16).
    pub comm: Field,
    pub real_parent: Field,
    pub parent: Field,
    pub group_leader: Field,
    pub mm: Field,
    pub active_mm: Field,
    /// Effective credentials (`cred`), and the objective ones (`real_cred`).
    pub cred: Field,
    pub real_cred: Field,
    pub files: Field,
    /// `struct list_head tasks`: the list of all processes, headed by `init_task.tasks`.
    pub tasks: Field,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredLayout {
    /// `kuid_t uid` → its `val` (uid_t).
    pub uid: Field,
    pub gid: Field,
    pub euid: Field,
    pub egid: Field,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmLayout {
    pub exe_file: Field,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileLayout {
    pub f_path: Field,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathLayout {
    pub mnt: Field,
    pub dentry: Field,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DentryLayout {
    pub d_parent: Field,
    pub d_name: Field,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QstrLayout {
    /// `len` sits in an anonymous struct inside an anonymous union with `hash_len`.
    pub len: Field,
    pub name: Field,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountLayout {
    /// Offset of the embedded `struct vfsmount mnt` in `struct mount` (container_of from a vfsmount*).
    pub mnt: Field,
    pub mnt_parent: Field,
    pub mnt_mountpoint: Field,
    /// `vfsmount.mnt_root`.
    pub vfsmount_mnt_root: Field,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketLayout {
    pub state: Field,
    /// `short type` (SOCK_STREAM...).
    pub type_: Field,
    pub file: Field,
    pub sk: Field,
    pub ops: Field,
}

/// A one-bit member (a bitfield of width 1): the byte holding it and the bit within that byte
/// (x86-64 is little-endian: bitfields fill a byte from its least significant bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BitFlag {
    pub offset: u64,
    pub bit: u8,
}

impl BitFlag {
    /// As a one-byte [`Field`], for the spans a read covers.
    pub fn byte(self) -> Field {
        Field {
            offset: self.offset,
            size: 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SockLayout {
    /// `__sk_common.skc_family`.
    pub skc_family: Field,
    pub skc_daddr: Field,
    pub skc_rcv_saddr: Field,
    /// Destination port, network byte order.
    pub skc_dport: Field,
    /// Local port, host byte order.
    pub skc_num: Field,
    pub skc_v6_daddr: Field,
    pub skc_v6_rcv_saddr: Field,
    pub sk_type: Field,
    pub sk_protocol: Field,
    /// `__sk_common.skc_ipv6only`: an IPv6 socket that takes no IPv4 peer (`IPV6_V6ONLY`, or
    /// `net.ipv6.bindv6only` when it was made). `None` in a profile written before it was
    /// recorded: every IPv6 socket is taken for dual-stack, as before.
    #[serde(default)]
    pub skc_ipv6only: Option<BitFlag>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsghdrLayout {
    /// `void *msg_name`: the destination a `sendto`/`sendmsg` names (kernel copy), or NULL.
    pub msg_name: Field,
    pub msg_namelen: Field,
}

/// What the executable-identity checks read: the exe file's inode and superblock, the mount
/// namespace of its mount and of init, the caller's user registers (`pt_regs` at the top of its
/// kernel stack) and the VMA holding its instruction pointer (the maple tree `mm->mm_mt`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecLayout {
    /// `task_struct.stack` (the kernel stack's lowest page) and `task_struct.nsproxy`.
    pub task_stack: Field,
    pub task_nsproxy: Field,
    /// `nsproxy.mnt_ns`, `mount.mnt_ns`.
    pub nsproxy_mnt_ns: Field,
    pub mount_mnt_ns: Field,
    /// `vfsmount.mnt_sb`; `super_block.s_root`, `super_block.s_dev`.
    pub vfsmount_mnt_sb: Field,
    pub sb_s_root: Field,
    pub sb_s_dev: Field,
    /// `file.f_inode`; `inode.i_sb`, `i_ino`, `i_generation`, `i_ctime.tv_sec`, `i_ctime.tv_nsec`.
    pub file_f_inode: Field,
    /// `file.f_flags`: the open flags, where the exec path's `__FMODE_EXEC` stays
    /// ([`abi::FMODE_EXEC_OPEN`]). `None` in a profile written before it was recorded (the
    /// fuzz harness's): then no executable is known to come from `execve`, and no `exe` rule
    /// applies (fail closed).
    #[serde(default)]
    pub file_f_flags: Option<Field>,
    /// `address_space.host` (the inode a page cache belongs to), `inode.i_nlink` (in an
    /// anonymous union with `__i_nlink`) and `super_block.s_magic`: whether a page of code is
    /// shared memory no directory names (memfd, `MAP_SHARED | MAP_ANONYMOUS`). `None` in a
    /// profile written before they were recorded: then no library's code is verifiable, and
    /// none counts as the executable's (fail closed).
    #[serde(default)]
    pub mapping_host: Option<Field>,
    #[serde(default)]
    pub inode_i_nlink: Option<Field>,
    #[serde(default)]
    pub sb_s_magic: Option<Field>,
    /// `inode.i_mode` and `inode.i_uid` (a `kuid_t`: the global uid, whatever user namespace
    /// made the file): whether a library's file is one only root could have written. `None`
    /// in a profile written before they were recorded: then no library's code counts as the
    /// executable's (fail closed).
    #[serde(default)]
    pub inode_i_mode: Option<Field>,
    #[serde(default)]
    pub inode_i_uid: Option<Field>,
    /// `task_struct.ptrace` (non-zero while a tracer is attached), `task_struct.seccomp.mode`
    /// and `.filter`, and the filters' layout ([`SeccompLayout`]): whether another process
    /// steers the task's system calls. `None` in a
    /// profile written before they were recorded: then that is unknown, and no `exe` rule
    /// applies (fail closed).
    #[serde(default)]
    pub task_ptrace: Option<Field>,
    #[serde(default)]
    pub task_seccomp_mode: Option<Field>,
    #[serde(default)]
    pub task_seccomp_filter: Option<Field>,
    #[serde(default)]
    pub seccomp: Option<SeccompLayout>,
    pub inode_i_sb: Field,
    pub inode_i_ino: Field,
    pub inode_i_generation: Field,
    pub inode_ctime_sec: Field,
    pub inode_ctime_nsec: Field,
    /// `THREAD_SIZE`: the init task's stack (`__end_init_task - __start_init_task`) where
    /// kallsyms has it, else [`abi::THREAD_SIZE`]. `task_pt_regs()` is the last `pt_regs` below
    /// `task->stack + THREAD_SIZE` (no padding on x86-64).
    pub thread_size: u64,
    /// `sizeof(struct pt_regs)`, `pt_regs.ip`, `pt_regs.cs`.
    pub pt_regs_size: u64,
    pub pt_regs_ip: Field,
    pub pt_regs_cs: Field,
    /// `mm_struct.mm_mt.ma_root` (the maple tree of VMAs), `mm_struct.start_code`.
    pub mm_mt_root: Field,
    pub mm_start_code: Field,
    /// `vm_area_struct.vm_start`, `vm_end`, `vm_flags`, `vm_file`.
    pub vma_vm_start: Field,
    pub vma_vm_end: Field,
    pub vma_vm_flags: Field,
    pub vma_vm_file: Field,
    /// `maple_range_64.pivot` / `.slot` and `maple_arange_64.pivot` / `.slot`: the arrays' sizes
    /// give the slot counts (16 and 10 on 64-bit).
    pub mr64_pivot: Field,
    pub mr64_slot: Field,
    pub ma64_pivot: Field,
    pub ma64_slot: Field,
    /// `maple_range_64.meta.end`, `maple_arange_64.meta.end`: the last slot with data
    /// (`ma_meta_end`), read where the pivots do not say it.
    pub mr64_meta_end: Field,
    pub ma64_meta_end: Field,
    /// `sizeof(struct page)`, `page.compound_head` (bit 0: a tail page), `page.mapping`
    /// (the `address_space` of a page-cache page; bit 0 set for an anonymous one), and
    /// `inode.i_mapping`.
    pub page_size: u64,
    pub page_compound_head: Field,
    pub page_mapping: Field,
    pub inode_i_mapping: Field,
}

/// A seccomp filter as the steering check reads it: `seccomp_filter.prev` (the older filter),
/// `.notif` (a user-notification listener's state, NULL once none), `.prog` (its `bpf_prog`),
/// `bpf_prog.orig_prog` (the classic BPF as loaded, kept where `CONFIG_CHECKPOINT_RESTORE`
/// is set), and `sock_fprog_kern.len` / `.filter` (its instruction count and instructions).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompLayout {
    pub filter_prev: Field,
    pub filter_notif: Field,
    pub filter_prog: Field,
    pub prog_orig_prog: Field,
    pub fprog_len: Field,
    pub fprog_filter: Field,
}

/// Everything introspection needs about one kernel build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelProfile {
    pub format: u32,
    /// GNU build id (hex), the cache key.
    pub build_id: Option<String>,
    pub task_struct: TaskStructLayout,
    pub cred: CredLayout,
    pub mm_struct: MmLayout,
    pub file: FileLayout,
    pub path: PathLayout,
    pub dentry: DentryLayout,
    pub qstr: QstrLayout,
    pub mount: MountLayout,
    pub socket: SocketLayout,
    pub msghdr: MsghdrLayout,
    pub sock: SockLayout,
    pub exec: ExecLayout,
    /// Link addresses of [`PROFILE_SYMBOLS`] that kallsyms had. Written as hex strings: JSON tools
    /// that read numbers as doubles (jq, JavaScript) would round kernel addresses.
    #[serde(with = "hex_addrs")]
    pub symbols: BTreeMap<String, u64>,
}

mod hex_addrs {
    use std::collections::BTreeMap;

    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(m: &BTreeMap<String, u64>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(m.iter().map(|(k, v)| (k, format!("{v:#x}"))))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, u64>, D::Error> {
        BTreeMap::<String, String>::deserialize(d)?
            .into_iter()
            .map(|(k, v)| {
                let hex = v
                    .strip_prefix("0x")
                    .ok_or_else(|| D::Error::custom("address without 0x"))?;
                let a = u64::from_str_radix(hex, 16).map_err(D::Error::custom)?;
                Ok((k, a))
            })
            .collect()
    }
}

fn field(btf: &Btf, s: &str, path: &str) -> Result<Field, BtfError> {
    Ok(Field {
        offset: btf.member_offset(s, path)?,
        size: btf.member(s, path)?.size,
    })
}

/// A member that is a one-bit bitfield.
fn flag(btf: &Btf, s: &str, path: &str) -> Result<BitFlag, BtfError> {
    let m = btf.member(s, path)?;
    if m.bitfield_size != 1 {
        return Err(BtfError::NotAFlag {
            ty: s.to_string(),
            path: path.to_string(),
        });
    }
    Ok(BitFlag {
        offset: m.bit_offset / 8,
        bit: (m.bit_offset % 8) as u8,
    })
}

impl KernelProfile {
    /// Computes the profile from the kernel's BTF and (optionally) its kallsyms.
    pub fn build(
        btf: &Btf,
        kallsyms: Option<&Kallsyms>,
        build_id: Option<String>,
    ) -> Result<Self, BtfError> {
        let t = "task_struct";
        let sk = "sock";
        let symbols = kallsyms
            .map(|k| {
                PROFILE_SYMBOLS
                    .iter()
                    .filter_map(|&n| k.addr(n).map(|a| (n.to_string(), a)))
                    .collect()
            })
            .unwrap_or_default();
        Ok(KernelProfile {
            format: PROFILE_FORMAT,
            build_id,
            task_struct: TaskStructLayout {
                size: btf.struct_size(t)?,
                pid: field(btf, t, "pid")?,
                tgid: field(btf, t, "tgid")?,
                comm: field(btf, t, "comm")?,
                real_parent: field(btf, t, "real_parent")?,
                parent: field(btf, t, "parent")?,
                group_leader: field(btf, t, "group_leader")?,
                mm: field(btf, t, "mm")?,
                active_mm: field(btf, t, "active_mm")?,
                cred: field(btf, t, "cred")?,
                real_cred: field(btf, t, "real_cred")?,
                files: field(btf, t, "files")?,
                tasks: field(btf, t, "tasks")?,
            },
            cred: CredLayout {
                uid: field(btf, "cred", "uid.val")?,
                gid: field(btf, "cred", "gid.val")?,
                euid: field(btf, "cred", "euid.val")?,
                egid: field(btf, "cred", "egid.val")?,
            },
            mm_struct: MmLayout {
                exe_file: field(btf, "mm_struct", "exe_file")?,
            },
            file: FileLayout {
                f_path: field(btf, "file", "f_path")?,
            },
            path: PathLayout {
                mnt: field(btf, "path", "mnt")?,
                dentry: field(btf, "path", "dentry")?,
            },
            dentry: DentryLayout {
                d_parent: field(btf, "dentry", "d_parent")?,
                d_name: field(btf, "dentry", "d_name")?,
            },
            qstr: QstrLayout {
                len: field(btf, "qstr", "len")?,
                name: field(btf, "qstr", "name")?,
            },
            mount: MountLayout {
                mnt: field(btf, "mount", "mnt")?,
                mnt_parent: field(btf, "mount", "mnt_parent")?,
                mnt_mountpoint: field(btf, "mount", "mnt_mountpoint")?,
                vfsmount_mnt_root: field(btf, "vfsmount", "mnt_root")?,
            },
            socket: SocketLayout {
                state: field(btf, "socket", "state")?,
                type_: field(btf, "socket", "type")?,
                file: field(btf, "socket", "file")?,
                sk: field(btf, "socket", "sk")?,
                ops: field(btf, "socket", "ops")?,
            },
            msghdr: MsghdrLayout {
                msg_name: field(btf, "msghdr", "msg_name")?,
                msg_namelen: field(btf, "msghdr", "msg_namelen")?,
            },
            sock: SockLayout {
                skc_family: field(btf, sk, "__sk_common.skc_family")?,
                skc_daddr: field(btf, sk, "__sk_common.skc_daddr")?,
                skc_rcv_saddr: field(btf, sk, "__sk_common.skc_rcv_saddr")?,
                skc_dport: field(btf, sk, "__sk_common.skc_dport")?,
                skc_num: field(btf, sk, "__sk_common.skc_num")?,
                skc_v6_daddr: field(btf, sk, "__sk_common.skc_v6_daddr")?,
                skc_v6_rcv_saddr: field(btf, sk, "__sk_common.skc_v6_rcv_saddr")?,
                sk_type: field(btf, sk, "sk_type")?,
                sk_protocol: field(btf, sk, "sk_protocol")?,
                skc_ipv6only: Some(flag(btf, sk, "__sk_common.skc_ipv6only")?),
            },
            exec: ExecLayout {
                task_stack: field(btf, t, "stack")?,
                task_nsproxy: field(btf, t, "nsproxy")?,
                nsproxy_mnt_ns: field(btf, "nsproxy", "mnt_ns")?,
                mount_mnt_ns: field(btf, "mount", "mnt_ns")?,
                vfsmount_mnt_sb: field(btf, "vfsmount", "mnt_sb")?,
                sb_s_root: field(btf, "super_block", "s_root")?,
                sb_s_dev: field(btf, "super_block", "s_dev")?,
                file_f_inode: field(btf, "file", "f_inode")?,
                file_f_flags: Some(field(btf, "file", "f_flags")?),
                mapping_host: Some(field(btf, "address_space", "host")?),
                inode_i_nlink: Some(field(btf, "inode", "i_nlink")?),
                sb_s_magic: Some(field(btf, "super_block", "s_magic")?),
                inode_i_mode: Some(field(btf, "inode", "i_mode")?),
                inode_i_uid: Some(field(btf, "inode", "i_uid")?),
                task_ptrace: Some(field(btf, t, "ptrace")?),
                task_seccomp_mode: Some(field(btf, t, "seccomp.mode")?),
                task_seccomp_filter: Some(field(btf, t, "seccomp.filter")?),
                seccomp: Some(SeccompLayout {
                    filter_prev: field(btf, "seccomp_filter", "prev")?,
                    filter_notif: field(btf, "seccomp_filter", "notif")?,
                    filter_prog: field(btf, "seccomp_filter", "prog")?,
                    prog_orig_prog: field(btf, "bpf_prog", "orig_prog")?,
                    fprog_len: field(btf, "sock_fprog_kern", "len")?,
                    fprog_filter: field(btf, "sock_fprog_kern", "filter")?,
                }),
                inode_i_sb: field(btf, "inode", "i_sb")?,
                inode_i_ino: field(btf, "inode", "i_ino")?,
                inode_i_generation: field(btf, "inode", "i_generation")?,
                inode_ctime_sec: field(btf, "inode", "i_ctime.tv_sec")?,
                inode_ctime_nsec: field(btf, "inode", "i_ctime.tv_nsec")?,
                thread_size: kallsyms
                    .and_then(|k| {
                        let size = k.addr("__end_init_task")? - k.addr("__start_init_task")?;
                        (size.is_power_of_two() && (8 << 10..=64 << 10).contains(&size))
                            .then_some(size)
                    })
                    .unwrap_or(abi::THREAD_SIZE),
                pt_regs_size: btf.struct_size("pt_regs")?,
                pt_regs_ip: field(btf, "pt_regs", "ip")?,
                pt_regs_cs: field(btf, "pt_regs", "cs")?,
                mm_mt_root: field(btf, "mm_struct", "mm_mt.ma_root")?,
                mm_start_code: field(btf, "mm_struct", "start_code")?,
                vma_vm_start: field(btf, "vm_area_struct", "vm_start")?,
                vma_vm_end: field(btf, "vm_area_struct", "vm_end")?,
                vma_vm_flags: field(btf, "vm_area_struct", "vm_flags")?,
                vma_vm_file: field(btf, "vm_area_struct", "vm_file")?,
                mr64_pivot: field(btf, "maple_range_64", "pivot")?,
                mr64_slot: field(btf, "maple_range_64", "slot")?,
                ma64_pivot: field(btf, "maple_arange_64", "pivot")?,
                ma64_slot: field(btf, "maple_arange_64", "slot")?,
                mr64_meta_end: field(btf, "maple_range_64", "meta.end")?,
                ma64_meta_end: field(btf, "maple_arange_64", "meta.end")?,
                page_size: btf.struct_size("page")?,
                page_compound_head: field(btf, "page", "compound_head")?,
                page_mapping: field(btf, "page", "mapping")?,
                inode_i_mapping: field(btf, "inode", "i_mapping")?,
            },
            symbols,
        })
    }

    /// Cache file of a build id in `dir`.
    pub fn cache_path(dir: &Path, build_id: &str) -> PathBuf {
        dir.join(format!("kernel-profile-{build_id}.json"))
    }

    /// Loads a cached profile; `None` if absent, unreadable, of another format or another build.
    pub fn load_cached(dir: &Path, build_id: &str) -> Option<KernelProfile> {
        let text = std::fs::read_to_string(Self::cache_path(dir, build_id)).ok()?;
        let p: KernelProfile = serde_json::from_str(&text).ok()?;
        (p.format == PROFILE_FORMAT && p.build_id.as_deref() == Some(build_id)).then_some(p)
    }

    /// Writes the profile to the cache (needs a build id). Written to a temporary file and renamed, so a
    /// concurrent reader never sees half a file.
    pub fn save_cached(&self, dir: &Path) -> std::io::Result<PathBuf> {
        let id = self.build_id.as_deref().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "profile has no build id")
        })?;
        std::fs::create_dir_all(dir)?;
        let path = Self::cache_path(dir, id);
        let tmp = path.with_extension(format!("json.tmp{}", std::process::id()));
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }
}

/// User ABI constants (they do not depend on the kernel build).
pub mod abi {
    /// `AF_UNIX`, `AF_INET`, `AF_INET6`, `AF_PACKET` (include/linux/socket.h).
    pub const AF_UNIX: u16 = 1;
    pub const AF_INET: u16 = 2;
    pub const AF_INET6: u16 = 10;
    pub const AF_PACKET: u16 = 17;
    /// `SOCK_STREAM`, `SOCK_DGRAM`, `SOCK_RAW` (include/linux/net.h, x86 values).
    pub const SOCK_STREAM: u16 = 1;
    pub const SOCK_DGRAM: u16 = 2;
    pub const SOCK_RAW: u16 = 3;
    /// `IPPROTO_TCP`, `IPPROTO_UDP` (include/uapi/linux/in.h).
    pub const IPPROTO_TCP: u16 = 6;
    pub const IPPROTO_UDP: u16 = 17;
    /// `IPPROTO_ICMP`, `IPPROTO_ICMPV6`: ping sockets, whose sockaddr port is no port (ignored
    /// by `ping_v4_sendmsg` and `ping_v6_sendmsg`; the echo identifier for `ping_bind`).
    pub const IPPROTO_ICMP: u16 = 1;
    pub const IPPROTO_ICMPV6: u16 = 58;
    /// `IPPROTO_UDPLITE`: UDP-Lite sockets share UDP's IPv6 send and connect paths.
    pub const IPPROTO_UDPLITE: u16 = 136;

    /// `struct sockaddr_in` (include/uapi/linux/in.h): family u16, port be16 at 2, addr at 4, 16 bytes.
    pub const SIN_FAMILY: usize = 0;
    pub const SIN_PORT: usize = 2;
    pub const SIN_ADDR: usize = 4;
    pub const SOCKADDR_IN_LEN: usize = 16;
    /// `struct sockaddr_in6` (include/uapi/linux/in6.h): family, port be16 at 2, flowinfo at 4,
    /// addr (16 bytes) at 8, scope id at 24, 28 bytes.
    pub const SIN6_FAMILY: usize = 0;
    pub const SIN6_PORT: usize = 2;
    pub const SIN6_FLOWINFO: usize = 4;
    pub const SIN6_ADDR: usize = 8;
    pub const SIN6_SCOPE_ID: usize = 24;
    pub const SOCKADDR_IN6_LEN: usize = 28;
    /// `AF_UNSPEC`, `AF_NETLINK` (include/linux/socket.h).
    pub const AF_UNSPEC: u16 = 0;
    pub const AF_NETLINK: u16 = 16;
    /// `THREAD_SIZE` of x86-64 without KASAN (arch/x86/include/asm/page_64_types.h: 4 pages), for
    /// a profile built without kallsyms.
    pub const THREAD_SIZE: u64 = 16 << 10;
    /// `__FMODE_EXEC` (include/linux/fcntl.h: `FMODE_EXEC`, include/linux/fs.h): the open flag
    /// only the exec path's own opens carry (`do_open_execat`; fs/exec.c), kept in the file's
    /// `f_flags`. `open(2)` and `openat2(2)` never let user space set it (`VALID_OPEN_FLAGS`,
    /// `build_open_how`), nor does `fcntl(F_SETFL)` (`SETFL_MASK`).
    pub const FMODE_EXEC_OPEN: u32 = 0x20;
    /// `SECCOMP_MODE_FILTER` (include/uapi/linux/seccomp.h): a task under seccomp filters.
    pub const SECCOMP_MODE_FILTER: u32 = 2;
    /// `TMPFS_MAGIC`, `HUGETLBFS_MAGIC` (include/uapi/linux/magic.h): the filesystems of
    /// `memfd_create` (with and without `MFD_HUGETLB`) and of shared anonymous mappings.
    pub const TMPFS_MAGIC: u64 = 0x0102_1994;
    pub const HUGETLBFS_MAGIC: u64 = 0x9584_58f6;
    /// `FUSE_SUPER_MAGIC` (include/uapi/linux/magic.h: fuse and fuseblk): a filesystem whose
    /// server, any user's, says who owns its files.
    pub const FUSE_SUPER_MAGIC: u64 = 0x6573_5546;
    /// `VM_EXEC` (include/linux/mm.h).
    pub const VM_EXEC: u64 = 0x4;
    /// `TASK_COMM_LEN` (include/linux/sched.h).
    pub const TASK_COMM_LEN: usize = 16;
}
