//! The configuration of a VM, one type per resource (Firecracker's `vmm_config/`): the VM itself
//! ([`VmConfig`]), what it boots ([`Payload`]), its console ([`ConsoleConfig`]), its network
//! interfaces ([`NetConfig`], backed by a TAP or VXLAN) and its in-process links ([`LinkConfig`]).
//!
//! Owns: these types, their one constructor each, and the validation of what they say (typed
//! [`ConfigError`]s), before any KVM or device is touched.
//! Must not: open files, devices or KVM (the VM builder does, from a validated config).

pub mod net;

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;
use vigil_wire::boot::Role;

use trap_handler::policy::PolicySpec;

use crate::introspect::VerdictSink;
use crate::knobs::DebugKnobs;
use crate::layout::{MAX_RAM, MIN_RAM, VIRTIO_MAX_DEVICES};
pub use net::{parse_mac, NetBackend, NetConfig, NetConfigError, Trust};

/// What is wrong with a [`VmConfig`].
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("the VM needs between {min} and {max} MiB of memory, {0} MiB was asked for", min = MIN_RAM >> 20, max = MAX_RAM >> 20)]
    BadMemorySize(u64),
    #[error("a VM needs at least one vCPU")]
    NoVcpus,
    #[error("{0} network interfaces asked for; at most {VIRTIO_MAX_DEVICES}")]
    TooManyNets(usize),
    #[error("a policy applies to Linux tenants only")]
    PolicyOnMicroVm,
    #[error("cmdline: {0}")]
    BadCmdline(String),
}

/// Checks a Linux guest's command line, to which the host appends its own options (the host
/// profile's, `tsc_early_khz=`): they must take effect whatever the spec says. The kernel reads
/// its options in order, the last of a name winning, so the host's come last; but a `"` left
/// open joins everything after it into one quoted value, and a `--` ends the kernel's options
/// (the rest goes to init), either swallowing the host's. Refused: a byte other than printable
/// ASCII (the kernel takes more bytes for spaces than Rust does, 0xa0 among them), an odd
/// number of `"`, and a word that, its quotes removed as the kernel removes them, is `--`.
pub fn check_cmdline(cmdline: &str) -> Result<(), ConfigError> {
    if let Some(b) = cmdline.bytes().find(|b| !(b' '..=b'~').contains(b)) {
        return Err(ConfigError::BadCmdline(format!(
            "byte {b:#04x}: only printable ASCII (words separated by spaces)"
        )));
    }
    if cmdline.bytes().filter(|&b| b == b'"').count() % 2 != 0 {
        return Err(ConfigError::BadCmdline(
            "a '\"' is left open: it would swallow the host's own options".into(),
        ));
    }
    // Words as the kernel splits them: at spaces outside quotes.
    let mut quoted = false;
    let mut word = String::new();
    for c in cmdline.chars().chain([' ']) {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if word == "--" {
                    return Err(ConfigError::BadCmdline(
                        "'--' ends the kernel's options: the host's own would go to init".into(),
                    ));
                }
                word.clear();
            }
            c => word.push(c),
        }
    }
    Ok(())
}

/// What the VM boots.
#[derive(Clone, Debug)]
pub enum Payload {
    /// A Linux kernel (bzImage or ELF vmlinux) with an optional initramfs. The host profile's
    /// command line is appended to `cmdline`.
    Linux {
        kernel: PathBuf,
        initramfs: Option<PathBuf>,
        cmdline: String,
    },
    /// The fw-guest micro-VM ELF in a role.
    MicroVm {
        elf: PathBuf,
        role: vigil_wire::boot::Role,
        /// Verdict records in the ring before the micro-VM starts.
        verdicts: Vec<[u8; vigil_wire::verdict::RECORD_LEN]>,
    },
}

/// Where the serial console goes.
#[derive(Clone, Debug, Default)]
pub struct ConsoleConfig {
    /// Per-VM log file (every byte the guest writes).
    pub log: Option<PathBuf>,
    /// Also copy whole lines to stdout, prefixed with the VM's name.
    pub stdout: bool,
    /// Console strings whose first appearance is timed (ms since the VM was created) and
    /// reported in the outcome: boot milestones for benchmarks.
    pub markers: Vec<String>,
}

/// The firewall tiers a tenant's verdicts go to (a [`VerdictSink`] shared with whoever owns the
/// tiers).
#[derive(Clone)]
pub struct TierSink(pub Arc<dyn VerdictSink>);

impl std::fmt::Debug for TierSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TierSink(..)")
    }
}

/// One VM: build it with [`VmConfig::micro_vm`] (plus the `with_*` setters) for a firewall
/// micro-VM; a Linux tenant names every field.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub name: String,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub payload: Payload,
    pub console: ConsoleConfig,
    /// Network interfaces (virtio-net over virtio-mmio), in guest order eth0, eth1, ...
    pub nets: Vec<NetConfig>,
    /// The tenant's application policy (see `trap_handler::policy`). With one, the guest
    /// kernel's socket hooks are trapped and every connect/bind/listen is decided by it.
    pub policy: Option<PolicySpec>,
    /// Where the verdicts of a tenant under a policy go (its firewall tiers): given at build, so
    /// the first allowed call already finds them. None: kept until a tier takes them.
    pub verdict_sink: Option<TierSink>,
    /// Network interfaces backed by an in-process link instead of a TAP (a tenant's NIC and
    /// the switch port it is plugged into), after `nets` in guest order.
    pub links: Vec<LinkConfig>,
    /// Debug knobs, read once by whoever builds the config (the CLI, a host, an edge).
    pub debug: DebugKnobs,
}

impl VmConfig {
    /// A firewall micro-VM in `role`: 32 MiB, one vCPU, no verdicts in its ring, a silent
    /// console, no interfaces, production knobs.
    pub fn micro_vm(name: impl Into<String>, elf: impl Into<PathBuf>, role: Role) -> Self {
        VmConfig {
            name: name.into(),
            mem_mib: 32,
            vcpus: 1,
            payload: Payload::MicroVm {
                elf: elf.into(),
                role,
                verdicts: Vec::new(),
            },
            console: ConsoleConfig::default(),
            nets: Vec::new(),
            policy: None,
            verdict_sink: None,
            links: Vec::new(),
            debug: DebugKnobs::default(),
        }
    }

    pub fn with_mem_mib(mut self, mem_mib: u64) -> Self {
        self.mem_mib = mem_mib;
        self
    }

    pub fn with_console(mut self, console: ConsoleConfig) -> Self {
        self.console = console;
        self
    }

    pub fn with_nets(mut self, nets: Vec<NetConfig>) -> Self {
        self.nets = nets;
        self
    }

    pub fn with_links(mut self, links: Vec<LinkConfig>) -> Self {
        self.links = links;
        self
    }

    pub fn with_debug(mut self, debug: DebugKnobs) -> Self {
        self.debug = debug;
        self
    }

    /// Verdict records in a micro-VM's ring before it starts (nothing for a Linux tenant).
    pub fn with_verdicts(mut self, records: Vec<[u8; vigil_wire::verdict::RECORD_LEN]>) -> Self {
        if let Payload::MicroVm { verdicts, .. } = &mut self.payload {
            *verdicts = records;
        }
        self
    }

    /// RAM in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib.saturating_mul(1 << 20)
    }

    /// Checks what can be checked without touching the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(MIN_RAM..=MAX_RAM).contains(&self.mem_bytes()) {
            return Err(ConfigError::BadMemorySize(self.mem_mib));
        }
        if self.vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        let interfaces = self.nets.len() + self.links.len();
        if interfaces > VIRTIO_MAX_DEVICES as usize {
            return Err(ConfigError::TooManyNets(interfaces));
        }
        if self.policy.is_some() && matches!(self.payload, Payload::MicroVm { .. }) {
            return Err(ConfigError::PolicyOnMicroVm);
        }
        if let Payload::Linux { cmdline, .. } = &self.payload {
            check_cmdline(cmdline)?;
        }
        Ok(())
    }
}

/// One end of an in-process link carrying Ethernet frames between two VMs of this VMM (a
/// tenant's virtio-net and its port on the switch-tier micro-VM), or between a VM and a host-side
/// endpoint (a benchmark, a test).
#[derive(Clone, Debug)]
pub struct LinkConfig {
    pub link: LinkEnd,
    pub mac: [u8; 6],
    /// For a switch port: the tenant behind it.
    pub tenant: u32,
}

/// What a link end is.
#[derive(Clone, Debug)]
pub enum LinkEnd {
    /// By memory: the two devices read and write each other's virtqueues (the fast path).
    Memory(crate::devices::virtio::net::MemLinkEnd),
    /// One end of a `socketpair(AF_UNIX, SOCK_DGRAM)`, non-blocking: one system call per frame.
    /// For a peer that holds the other end as a socket (a test that injects and reads frames
    /// with plain `send`/`recv`).
    Socket(Arc<std::os::unix::net::UnixDatagram>),
}

impl LinkEnd {
    /// Sends one frame from the host as if this end's VM had sent it.
    pub fn send_frame(&self, frame: &[u8]) -> std::io::Result<()> {
        match self {
            LinkEnd::Memory(end) => end.send_frame(frame),
            LinkEnd::Socket(socket) => socket.send(frame).map(|_| ()),
        }
    }
}

impl LinkConfig {
    /// A connected pair by memory: (the tenant's end, the switch port's end).
    pub fn pair(tenant: u32, mac: [u8; 6]) -> std::io::Result<(LinkConfig, LinkConfig)> {
        let (a, b) =
            crate::devices::virtio::net::MemLinkEnd::pair().map_err(std::io::Error::other)?;
        let end = |link| LinkConfig {
            link: LinkEnd::Memory(link),
            mac,
            tenant,
        };
        Ok((end(a), end(b)))
    }

    /// A host endpoint and the VM's end of a link by memory.
    pub fn host_pair(
        tenant: u32,
        mac: [u8; 6],
    ) -> std::io::Result<(crate::devices::virtio::net::HostPort, LinkConfig)> {
        let (host, end) =
            crate::devices::virtio::net::MemLinkEnd::host_pair().map_err(std::io::Error::other)?;
        Ok((
            host,
            LinkConfig {
                link: LinkEnd::Memory(end),
                mac,
                tenant,
            },
        ))
    }

    /// A connected pair over a datagram socket pair: (the peer's socket, the VM's end).
    pub fn socket_pair(
        tenant: u32,
        mac: [u8; 6],
    ) -> std::io::Result<(std::os::unix::net::UnixDatagram, LinkConfig)> {
        let (a, b) = std::os::unix::net::UnixDatagram::pair()?;
        a.set_nonblocking(true)?;
        b.set_nonblocking(true)?;
        // Room for bursts: a full queue of frames in flight either way.
        for end in [&a, &b] {
            let size: libc::c_int = 4 << 20;
            // SAFETY: setsockopt with a valid fd and an int option value.
            unsafe {
                libc::setsockopt(
                    end.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_SNDBUF,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
        }
        Ok((
            a,
            LinkConfig {
                link: LinkEnd::Socket(Arc::new(b)),
                mac,
                tenant,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cmdline_that_would_neutralise_the_hosts_options_is_refused() {
        for fine in [
            "console=ttyS0 reboot=k panic=-1",
            "vigil.run=H4sIAAAA+/= dyndbg=\"file x.c +p\" quiet",
            "",
            "a--b --x =-- --=x",
        ] {
            check_cmdline(fine).unwrap_or_else(|e| panic!("{fine:?}: {e}"));
        }
        for bad in [
            "console=ttyS0 x=\"open",
            "\"",
            "quiet -- init_arg",
            "--",
            "quiet \"--\"",
            "quiet -\"-\"",
            "x=\u{e0}",
            "a\tb",
            "a\nb",
        ] {
            assert!(
                matches!(check_cmdline(bad), Err(ConfigError::BadCmdline(_))),
                "{bad:?}"
            );
        }
    }

    fn micro() -> VmConfig {
        VmConfig::micro_vm("fw", "/fw.elf", Role::Switch)
    }

    #[test]
    fn a_micro_vm_has_one_set_of_defaults() {
        let c = micro();
        assert_eq!((c.name.as_str(), c.mem_mib, c.vcpus), ("fw", 32, 1));
        assert!(c.nets.is_empty() && c.links.is_empty() && c.policy.is_none());
        assert!(!c.console.stdout && c.console.log.is_none());
        assert_eq!(c.debug, DebugKnobs::default());
        assert!(matches!(
            c.payload,
            Payload::MicroVm { role: Role::Switch, ref verdicts, .. } if verdicts.is_empty()
        ));
        assert_eq!(c.validate(), Ok(()));
        let c = micro()
            .with_mem_mib(64)
            .with_verdicts(vec![[1; vigil_wire::verdict::RECORD_LEN]]);
        assert_eq!(c.mem_mib, 64);
        assert!(matches!(c.payload, Payload::MicroVm { ref verdicts, .. } if verdicts.len() == 1));
    }

    #[test]
    fn validation_names_what_is_wrong() {
        assert_eq!(
            micro().with_mem_mib(1).validate(),
            Err(ConfigError::BadMemorySize(1))
        );
        assert_eq!(
            micro().with_mem_mib(u64::MAX).validate(),
            Err(ConfigError::BadMemorySize(u64::MAX))
        );
        let mut c = micro();
        c.vcpus = 0;
        assert_eq!(c.validate(), Err(ConfigError::NoVcpus));
        let mut c = micro();
        c.policy = Some(PolicySpec { allow: Vec::new() });
        assert_eq!(c.validate(), Err(ConfigError::PolicyOnMicroVm));
        let net: NetConfig = "tap=t0".parse().unwrap();
        let c = micro().with_nets(vec![net; VIRTIO_MAX_DEVICES as usize + 1]);
        assert_eq!(
            c.validate(),
            Err(ConfigError::TooManyNets(VIRTIO_MAX_DEVICES as usize + 1))
        );
        assert_eq!(
            ConfigError::TooManyNets(20).to_string(),
            "20 network interfaces asked for; at most 19"
        );
    }

    #[test]
    fn a_socket_link_pair_carries_frames_both_ways() {
        let (a, b) = LinkConfig::socket_pair(7, [2, 0, 0, 0, 0, 1]).unwrap();
        assert_eq!(b.tenant, 7);
        let LinkEnd::Socket(b) = b.link else {
            panic!("a socket pair's VM end is a socket")
        };
        a.send(b"ping").unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(b.recv(&mut buf).unwrap(), 4);
        b.send(b"pong!").unwrap();
        assert_eq!(a.recv(&mut buf).unwrap(), 5);
    }

    #[test]
    fn a_memory_link_pair_has_two_sides_of_one_link() {
        let (a, b) = LinkConfig::pair(7, [2, 0, 0, 0, 0, 1]).unwrap();
        assert_eq!((a.tenant, b.tenant), (7, 7));
        assert!(matches!(
            (a.link, b.link),
            (LinkEnd::Memory(_), LinkEnd::Memory(_))
        ));
    }
}
