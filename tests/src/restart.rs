//! A host whose switch restarts, with real traffic on both sides: an in-process [`Host`] (its
//! switch micro-VM boots; no Debian tenant boots) whose uplink is a TAP in an "outside" network
//! namespace, and one tenant created on it (built, not booted) whose switch port is bridged to a
//! TAP in a "tenant" namespace carrying the tenant's MAC and address. Linux's TCP/UDP stacks in
//! the two namespaces are the tenant and the outside world; the frames the switch sees are what a
//! tenant VM's NIC would send. The verdicts stand in for the tenant's trapped calls
//! ([`Host::grant_for_test`]: the same sink a granted call's verdicts go through), because the
//! trap path needs the tenant kernel running, which takes minutes here.
//!
//! Owns: the rig (host, namespaces, bridge) shared by tests/tests/supervisor.rs and the
//! switch_restart benchmark. Must not: touch the switch other than through the host.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_core::devices::virtio::net::HostPort;

use serde_json::Value;
use vigil_wire::verdict::{IpVersion, Protocol, Rule};
use vmm_core::devices::tap::Tap;
use vmm_host::{Host, HostConfig, VmSpec};

use crate::workload::{idle_policy, vm_spec};
use crate::{fw_guest_elf, tenant_dir, Namespace, TempDir};

pub const TENANT_IP: &str = "10.89.0.2";
pub const TENANT_MAC: &str = "52:54:00:89:00:02";
pub const OUTSIDE_IP: &str = "10.89.0.1";
pub const TENANT_ID: &str = "t1";

/// Copies frames both ways between a TAP and a switch port's tenant end, as a tenant VM's
/// virtio-net device would (one thread, poll on both).
pub struct PortBridge {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PortBridge {
    pub fn start(tap: Tap, link: HostPort) -> PortBridge {
        // SAFETY: fcntl on a descriptor the Tap owns.
        unsafe {
            let fd = tap.as_raw_fd();
            let flags = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            let mut out = vec![0u8; 65536];
            while !stopped.load(Ordering::Relaxed) {
                let mut fds = [libc::pollfd {
                    fd: tap.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                }];
                // The port is a memory link: its side is polled (1 ms), the TAP waited on.
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(fds.as_mut_ptr(), 1, 1) };
                while let Ok(n) = tap.read_frame(&mut buf) {
                    // A port without buffers drops the frame, as a NIC whose peer is gone would.
                    let _ = link.send([&buf[..n]]);
                }
                link.recv(256, &mut out, |f| {
                    let _ = tap.write_frame(f);
                });
            }
        });
        PortBridge {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for PortBridge {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The host, its tenant's namespace and the outside's. Dropped in field order: the bridge, the
/// host (shut down), the namespaces, the directory.
pub struct Rig {
    pub bridge: PortBridge,
    pub host: Arc<Host>,
    pub tenant: Namespace,
    pub outside: Namespace,
    pub dir: TempDir,
    /// Every event the host published since it started.
    pub events: Receiver<Arc<str>>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.host.shutdown();
    }
}

/// An egress verdict: the tenant may reach the outside at `port`.
pub fn egress(protocol: Protocol, port: u16) -> Rule {
    let mut remote = [0u8; 16];
    remote[..4].copy_from_slice(&OUTSIDE_IP.parse::<std::net::Ipv4Addr>().unwrap().octets());
    Rule::egress_to(IpVersion::V4, protocol, remote, port)
}

impl Rig {
    /// Starts the host (switch up) with tenant [`TENANT_ID`] created on port 1, bridged to the
    /// tenant namespace. `tag` keeps names apart (namespaces, TAPs: at most 4 characters).
    pub fn start(tag: &str) -> Rig {
        Rig::start_with_ports(tag, 1)
    }

    /// [`start`](Self::start) with `ports` tenant ports on the switch (for more tenants, built
    /// with [`Host::create`] and left unbridged).
    pub fn start_with_ports(tag: &str, ports: usize) -> Rig {
        Rig::start_with_edge(tag, ports, None)
    }

    /// [`start_with_ports`](Self::start_with_ports) with the host's verdict channel to `edge`.
    pub fn start_with_edge(tag: &str, ports: usize, edge: Option<vmm_host::EdgeLinkConfig>) -> Rig {
        let pid = std::process::id();
        let outside = Namespace::create(&format!("vsr{tag}o{pid}"), "sro0", OUTSIDE_IP);
        let tenant = Namespace::create(&format!("vsr{tag}t{pid}"), "srt0", TENANT_IP);
        crate::netns::ip(&[
            "-n",
            &tenant.name,
            "link",
            "set",
            "srt0",
            "address",
            TENANT_MAC,
        ]);
        let dir = TempDir::new(&format!("vigil-restart-{tag}"));
        let events = vmm_core::events::bus().subscribe();
        vmm_core::events::bus().set_quiet(true);
        let host = Host::start(HostConfig {
            name: format!("restart-{tag}"),
            switch_elf: fw_guest_elf(),
            uplink: format!("tap=sro0,netns={}", outside.name)
                .parse()
                .expect("uplink"),
            tenant_ports: ports,
            edge,
            state_dir: dir.join("state"),
            console_stdout: false,
            debug: vmm_core::knobs::DebugKnobs::default(),
            migration_keys: Default::default(),
        })
        .expect("the host starts");
        let spec: VmSpec = serde_json::from_value(vm_spec(
            &tenant_dir(),
            TENANT_ID,
            TENANT_IP,
            TENANT_MAC,
            &idle_policy(),
        ))
        .expect("a spec");
        let info = host.create(spec).expect("vm.create");
        let tap = Tap::open("srt0", Some(&tenant.name)).expect("open the tenant's TAP");
        let link = host
            .port_link(info.switch_port - 1)
            .expect("the tenant's port");
        Rig {
            bridge: PortBridge::start(tap, link),
            host,
            tenant,
            outside,
            dir,
            events,
        }
    }

    /// Waits for the next event of kind `kind` from this rig's host, up to `limit`.
    pub fn wait_event(&self, kind: &str, limit: Duration) -> Option<Value> {
        let deadline = Instant::now() + limit;
        let host = self.host.name().to_string();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.events.recv_timeout(left).ok()?;
            let Ok(event) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if event["event"] == kind && event["host"] == host.as_str() {
                return Some(event);
            }
        }
    }
}
