//! Throughput of the switch-tier micro-VM between two real TAP devices: a UDP generator
//! (`udp-blast`, `sendmmsg`) in one network namespace sends 64-byte frames through its TAP into
//! the micro-VM's tenant port; a verdict opens the flow; the micro-VM forwards it out of its
//! uplink, a second TAP in another namespace, whose kernel counts what arrives. Nothing of the
//! path is simulated: the kernel's TAP queues, the VMM's device threads, the guest.
//!
//! One run measures one TAP I/O mode, the one `VIGIL_TAP_IO` selects when the TAPs open (batched
//! through io_uring by default; `frame`: one frame per system call, the baseline). scripts/bench
//! runs it in both modes, alternating, in one run.
//!
//! With `VIGIL_UPLINK=relay` there is no VM: a thread of this process moves the frames from one
//! TAP to the other with the same batched TAP I/O (read a batch, write it): the ceiling the TAPs
//! themselves put on this path on this machine, the physical limit beside the micro-VM's figure.
//!
//! With `VIGIL_UPLINK_PROBE=latency` it measures latency instead of throughput: one UDP datagram
//! every 2 ms (the micro-VM idles and rests between them) from a socket in the generator's
//! namespace to one in the sink's, each carrying its send time; the one-way latency of each (one
//! clock: one machine). `VIGIL_IDLE_WAKE=off` is the baseline: frames do not wake the resting
//! micro-VM.
//!
//! With `VIGIL_UPLINK=vxlan` the uplink is a VXLAN endpoint instead (as a host's switch has):
//! its peer is a UDP socket on 127.0.0.1 that is never read, so the kernel counts each datagram
//! that arrives (`Udp: InDatagrams` and `RcvbufErrors`) and drops it once its small buffer is
//! full (no ICMP is generated, no reader costs CPU). `VIGIL_VXLAN_IO` selects the endpoint's mode
//! (`recvmmsg`/`sendmmsg` batches by default; `frame`: one datagram per call).
//!
//! Prints one JSON object: `fw_uplink_mpps_64` with the frames offered and delivered, what each
//! device counted (frames over system calls: the batching achieved), and `account`: where every
//! offered frame went, stage by stage (the generator's namespace, the TAP's queue, the VMM's
//! read, the micro-VM's drops by reason, the uplink's send, the sink), with what no counter
//! explains as `unaccounted`.
//! Usage: uplink_bench FW_GUEST_ELF GEN_NETNS SINK_NETNS UDP_BLAST SECONDS

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vigil_wire::boot::Role;
use vigil_wire::verdict::{IpVersion, Op, Protocol, Rule, VerdictRepr};
use vmm_core::config::net::{NetBackend, NetConfig};
use vmm_core::config::VmConfig;
use vmm_core::devices::virtio::net::NetStats;
use vmm_core::host_kind::HostKind;
use vmm_core::knobs::DebugKnobs;
use vmm_core::verdict_region::FirewallCounters;
use vmm_core::vm::Vm;

const TENANT: u32 = 1;
const GEN_TAP: &str = "vgup-gen";
const SINK_TAP: &str = "vgup-sink";
const TENANT_MAC: &str = "52:54:00:00:00:02";
const DST_MAC: &str = "52:54:00:00:00:01";
const SRC_IP: [u8; 4] = [10, 1, 0, 2];
const DST_IP: [u8; 4] = [10, 1, 0, 1];
const DST_PORT: u16 = 9000;

fn verdict() -> [u8; 64] {
    let mut remote = [0u8; 16];
    remote[..4].copy_from_slice(&DST_IP);
    VerdictRepr {
        op: Op::Add,
        tenant: TENANT,
        seq: 1,
        lifetime_ms: 0,
        rule: Rule::egress_to(IpVersion::V4, Protocol::Udp, remote, DST_PORT),
    }
    .to_bytes()
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A counter of TAP `dev` in namespace `ns` (`/sys/class/net/DEV/statistics/NAME`).
fn tap_stat(ns: &str, dev: &str, name: &str) -> u64 {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "cat",
            &format!("/sys/class/net/{dev}/statistics/{name}"),
        ])
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(0)
}

/// The frames the sink namespace's TAP received (what the micro-VM wrote into it).
fn sink_rx(ns: &str) -> u64 {
    tap_stat(ns, SINK_TAP, "rx_packets")
}

/// This network namespace's UDP counter `name` (`/proc/net/snmp`, `Udp:`).
fn udp_counter(name: &str) -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Where the micro-VM's uplink goes, and how what arrives there is counted.
enum Sink {
    /// A TAP in the sink namespace: its rx_packets.
    Tap(String),
    /// A VXLAN endpoint sending to a UDP socket that is never read (its receive buffer the
    /// smallest): the kernel counts each datagram queued or dropped there.
    Vxlan {
        /// Held open (never read) for the run.
        _socket: std::net::UdpSocket,
    },
}

impl Sink {
    fn received(&self) -> u64 {
        match self {
            Sink::Tap(ns) => sink_rx(ns),
            // Queued to the sink socket, or dropped there (its buffer is kept full).
            Sink::Vxlan { .. } => udp_counter("InDatagrams") + udp_counter("RcvbufErrors"),
        }
    }
}

/// A UDP socket on 127.0.0.1 with the smallest receive buffer, never read: datagrams to it are
/// counted by the kernel (queued, then dropped once the buffer is full) and cost no reader.
fn sink_socket() -> Result<std::net::UdpSocket, String> {
    use std::os::fd::AsRawFd;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let size: libc::c_int = 0;
    // SAFETY: setsockopt on a socket we own, with an int option; the kernel clamps it to its
    // minimum.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    Ok(socket)
}

/// A counter of the generator's TAP.
fn gen_tap_stat(ns: &str, name: &str) -> u64 {
    tap_stat(ns, GEN_TAP, name)
}

/// Runs the generator in `ns` for `seconds`; the datagrams it sent.
fn blast(ns: &str, tool: &str, seconds: f64) -> Result<u64, String> {
    let dst = std::net::Ipv4Addr::from(DST_IP).to_string();
    let out = Command::new("ip")
        .args(["netns", "exec", ns, tool, &dst, &DST_PORT.to_string(), "18"])
        .arg(seconds.to_string())
        .output()
        .map_err(|e| format!("udp-blast: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|_| format!("udp-blast: {}", String::from_utf8_lossy(&out.stderr)))
}

/// CPU time this process has used (every thread: vCPU, device threads), ns.
fn cpu_ns() -> u64 {
    // SAFETY: rusage is plain integers (all-zero is valid); getrusage writes the struct we pass,
    // which outlives the call.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let ns = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    ns(usage.ru_utime) + ns(usage.ru_stime)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 6 {
        eprintln!("usage: uplink_bench FW_GUEST_ELF GEN_NETNS SINK_NETNS UDP_BLAST SECONDS");
        std::process::exit(2);
    }
    if let Err(e) = run(
        Path::new(&args[1]),
        &args[2],
        &args[3],
        &args[4],
        args[5].parse().unwrap_or(3.0),
    ) {
        eprintln!("uplink_bench: {e}");
        std::process::exit(1);
    }
}

fn run(elf: &Path, gen_ns: &str, sink_ns: &str, tool: &str, seconds: f64) -> Result<(), String> {
    let mode = match std::env::var("VIGIL_TAP_IO").as_deref() {
        Ok("frame") => "frame",
        _ => "io_uring",
    };
    let tap = |name: &str, ns: &str, mac: [u8; 6], tenant: u32| NetConfig {
        backend: NetBackend::Tap {
            name: name.into(),
            netns: Some(ns.into()),
        },
        mac,
        tenant,
    };
    if std::env::var("VIGIL_UPLINK").as_deref() == Ok("relay") {
        return relay(gen_ns, sink_ns, tool, seconds, mode);
    }
    let (uplink, sink) = if std::env::var("VIGIL_UPLINK").as_deref() == Ok("vxlan") {
        let sink = sink_socket()?;
        let peer = sink.local_addr().map_err(|e| e.to_string())?.to_string();
        let uplink = NetConfig {
            backend: NetBackend::Vxlan {
                local: "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?,
                peer: Some(peer.parse().map_err(|e| format!("{e}"))?),
                vni: 1,
                trust: Default::default(),
            },
            mac: [0x52, 0x54, 0, 0, 0, 3],
            tenant: 0,
        };
        (uplink, Sink::Vxlan { _socket: sink })
    } else {
        (
            tap(SINK_TAP, sink_ns, [0x52, 0x54, 0, 0, 0, 3], 0),
            Sink::Tap(sink_ns.to_string()),
        )
    };
    let config = VmConfig::micro_vm("fw-uplink", elf, Role::Switch)
        .with_mem_mib(64)
        .with_verdicts(vec![verdict()])
        .with_nets(vec![
            uplink,
            tap(GEN_TAP, gen_ns, [0x52, 0x54, 0, 0, 0, 2], TENANT),
        ])
        .with_debug(DebugKnobs::from_env());
    let vm = Vm::create(&config, HostKind::detect()).map_err(|e| e.to_string())?;
    let counters = vm.net_counters();
    let region = vm.verdict_region();
    let stop = vm.stop_handle();
    let vm_thread = std::thread::spawn(move || vm.run(None));
    let firewall = || region.as_ref().and_then(|r| r.counters());
    let result = measure(gen_ns, &sink, tool, seconds, &counters, &firewall, mode);
    stop.store(true, Ordering::Release);
    let _ = vm_thread.join();
    result
}

/// The frames moved between the two TAPs by a plain relay thread (no VM), measured as the
/// micro-VM is.
fn relay(gen_ns: &str, sink_ns: &str, tool: &str, seconds: f64, mode: &str) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use vmm_core::devices::tap::Tap;
    use vmm_core::devices::virtio::net::{FrameBatch, FrameLink};

    let from = Tap::open(GEN_TAP, Some(gen_ns)).map_err(|e| e.to_string())?;
    let to = Tap::open(SINK_TAP, Some(sink_ns)).map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut batch = from.batch_slot().map(FrameBatch::new);
        let mut buf = vec![0u8; 65_536];
        let mut poll = libc::pollfd {
            fd: from.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        while !stopping.load(Ordering::Acquire) {
            // SAFETY: one valid pollfd, alive for the call.
            if unsafe { libc::poll(&mut poll, 1, 50) } <= 0 {
                continue;
            }
            match batch.as_mut() {
                Some(batch) => {
                    batch.clear();
                    if from.recv_batch(batch).is_ok() {
                        let _ = to.send_batch(batch);
                    }
                }
                None => {
                    while let Ok(n) = from.recv_frame(&mut buf) {
                        let _ = to.send_frame(&buf[..n]);
                    }
                }
            }
        }
    });
    let sink = Sink::Tap(sink_ns.to_string());
    let result = measure(gen_ns, &sink, tool, seconds, &[], &|| None, mode);
    stop.store(true, Ordering::Release);
    let _ = thread.join();
    result
}

fn measure(
    gen_ns: &str,
    sink: &Sink,
    tool: &str,
    seconds: f64,
    counters: &[std::sync::Arc<vmm_core::devices::virtio::net::NetCounters>],
    firewall: &dyn Fn() -> Option<vmm_core::verdict_region::FirewallCounters>,
    mode: &str,
) -> Result<(), String> {
    let src = format!("{}/24", std::net::Ipv4Addr::from(SRC_IP));
    let dst = std::net::Ipv4Addr::from(DST_IP).to_string();
    let mut devices = vec![(gen_ns, GEN_TAP)];
    if let Sink::Tap(sink_ns) = sink {
        devices.push((sink_ns.as_str(), SINK_TAP));
    }
    for (ns, dev) in devices {
        ip(&[
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
        ])?;
        ip(&["-n", ns, "link", "set", dev, "up"])?;
    }
    ip(&["-n", gen_ns, "link", "set", GEN_TAP, "address", TENANT_MAC])?;
    ip(&["-n", gen_ns, "addr", "add", &src, "dev", GEN_TAP])?;
    ip(&[
        "-n",
        gen_ns,
        "neigh",
        "replace",
        &dst,
        "lladdr",
        DST_MAC,
        "dev",
        GEN_TAP,
        "nud",
        "permanent",
    ])?;
    // Boot, then the first frame through: short bursts until the sink sees one.
    let created = Instant::now();
    let start_rx = sink.received();
    while sink.received() == start_rx {
        if created.elapsed() > Duration::from_secs(30) {
            return Err("no frame came out of the micro-VM's uplink within 30 s".into());
        }
        blast(gen_ns, tool, 0.05)?;
    }
    if std::env::var("VIGIL_UPLINK_PROBE").as_deref() == Ok("latency") {
        if let Sink::Tap(sink_ns) = sink {
            return latency(gen_ns, sink_ns);
        }
        return Err("the latency probe needs a TAP sink".into());
    }
    let snap = |i: usize| counters.get(i).map(|c| c.snapshot()).unwrap_or_default();
    let (up0, port0) = (snap(0), snap(1));
    let fw0 = firewall().unwrap_or_default();
    let (gen_tx0, gen_drop0) = (
        gen_tap_stat(gen_ns, "tx_packets"),
        gen_tap_stat(gen_ns, "tx_dropped"),
    );
    let before = sink.received();
    let cpu_before = cpu_ns();
    let sent = blast(gen_ns, tool, seconds)?;
    let cpu = cpu_ns() - cpu_before;
    // What is still in flight comes out within a few milliseconds.
    let mut delivered = sink.received() - before;
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_millis(200) {
        std::thread::sleep(Duration::from_millis(20));
        delivered = sink.received() - before;
    }
    let (up1, port1) = (snap(0), snap(1));
    let fw1 = firewall().unwrap_or_default();
    let (gen_tx1, gen_drop1) = (
        gen_tap_stat(gen_ns, "tx_packets"),
        gen_tap_stat(gen_ns, "tx_dropped"),
    );
    let account = account(
        sent,
        (gen_tx1 - gen_tx0, gen_drop1 - gen_drop0),
        (&port0, &port1),
        (&up0, &up1),
        (&fw0, &fw1),
        delivered,
    );
    let per_call = |frames: u64, calls: u64| {
        if calls == 0 {
            0.0
        } else {
            (frames as f64 / calls as f64 * 100.0).round() / 100.0
        }
    };
    let rx_frames = port1.rx_frames - port0.rx_frames;
    let tx_frames = up1.tx_frames - up0.tx_frames;
    println!(
        "{}",
        serde_json::json!({
            "metric": "fw_uplink_mpps_64",
            "value": (delivered as f64 / seconds / 1e6 * 1e4).round() / 1e4,
            "unit": "Mpps",
            "tap_io": mode,
            "uplink_kind": match (sink, counters.is_empty()) {
                (_, true) => "relay",
                (Sink::Tap(_), false) => "tap",
                (Sink::Vxlan { .. }, false) => "vxlan",
            },
            "vxlan_io": match std::env::var("VIGIL_VXLAN_IO").as_deref() {
                Ok("frame") => "frame",
                _ => "mmsg",
            },
            "offered": sent,
            "delivered": delivered,
            "seconds": seconds,
            "vmm_cpu_ns_per_frame": cpu.checked_div(delivered).unwrap_or(0),
            "vmm_cpu_share": (cpu as f64 / (seconds * 1e9) * 100.0).round() / 100.0,
            "tenant_port": {"rx_frames": rx_frames,
                            "frames_per_read": per_call(rx_frames, port1.rx_link_calls - port0.rx_link_calls),
                            "rx_waits_for_buffers": port1.rx_waits_for_buffers - port0.rx_waits_for_buffers},
            "uplink": {"tx_frames": tx_frames,
                       "frames_per_write": per_call(tx_frames, up1.tx_link_calls - up0.tx_link_calls),
                       "tx_link_errors": up1.tx_link_errors - up0.tx_link_errors},
            "account": account,
            "path": match sink {
                Sink::Tap(_) if counters.is_empty() => "udp-blast (sendmmsg) in a netns -> TAP -> a relay thread (no VM) -> TAP in another netns",
                Sink::Tap(_) => "udp-blast (sendmmsg) in a netns -> TAP -> switch micro-VM (verdict) -> TAP in another netns",
                Sink::Vxlan { .. } => "udp-blast (sendmmsg) in a netns -> TAP -> switch micro-VM (verdict) -> VXLAN (UDP) to an unread socket on 127.0.0.1",
            },
        })
    );
    Ok(())
}

/// Runs `f` on a thread of its own that entered network namespace `ns`.
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> std::thread::JoinHandle<Result<T, String>> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        // SAFETY: setns on this thread only, with a descriptor we own.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
        }
        f()
    })
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass, which outlives the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One-way latency of spaced datagrams through the micro-VM: prints `fw_idle_latency_us`.
fn latency(gen_ns: &str, sink_ns: &str) -> Result<(), String> {
    const PROBES: usize = 400;
    const GAP: Duration = Duration::from_millis(2);
    let dst = std::net::Ipv4Addr::from(DST_IP);
    ip(&["-n", sink_ns, "link", "set", SINK_TAP, "address", DST_MAC])?;
    ip(&[
        "-n",
        sink_ns,
        "addr",
        "add",
        &format!("{dst}/24"),
        "dev",
        SINK_TAP,
    ])?;
    let (bound_tx, bound) = std::sync::mpsc::channel();
    let receiver = in_netns(sink_ns, move || {
        let socket = std::net::UdpSocket::bind((dst, DST_PORT)).map_err(|e| e.to_string())?;
        let _ = bound_tx.send(());
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .map_err(|e| e.to_string())?;
        let mut lat = Vec::with_capacity(PROBES);
        let mut buf = [0u8; 64];
        let mut misses = 0;
        while lat.len() < PROBES && misses < 10 {
            match socket.recv(&mut buf) {
                Ok(n) if n >= 8 => {
                    let sent = u64::from_le_bytes(buf[..8].try_into().unwrap_or([0; 8]));
                    if sent != 0 {
                        lat.push(monotonic_ns().saturating_sub(sent));
                    }
                }
                Ok(_) => {}
                Err(_) => misses += 1,
            }
        }
        Ok(lat)
    });
    // The first probe goes once the receiver is bound.
    if bound.recv().is_err() {
        return receiver
            .join()
            .map_err(|_| "the receiver panicked".to_string())?
            .map(|_| ());
    }
    let sender = in_netns(gen_ns, move || {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        for _ in 0..PROBES {
            std::thread::sleep(GAP);
            socket
                .send_to(&monotonic_ns().to_le_bytes(), (dst, DST_PORT))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    });
    sender.join().map_err(|_| "the sender panicked")??;
    let mut lat = receiver.join().map_err(|_| "the receiver panicked")??;
    if lat.len() < PROBES / 2 {
        return Err(format!("only {} of {PROBES} probes arrived", lat.len()));
    }
    lat.sort_unstable();
    let at = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize] as f64 / 1e3;
    println!(
        "{}",
        serde_json::json!({
            "metric": "fw_idle_latency_us",
            "value": (at(0.5) * 10.0).round() / 10.0,
            "unit": "us",
            "p90_us": (at(0.9) * 10.0).round() / 10.0,
            "p99_us": (at(0.99) * 10.0).round() / 10.0,
            "max_us": (at(1.0) * 10.0).round() / 10.0,
            "probes": PROBES,
            "arrived": lat.len(),
            "gap_ms": GAP.as_millis() as u64,
            "idle_wake": std::env::var("VIGIL_IDLE_WAKE").as_deref() != Ok("off"),
            "path": "UDP socket in a netns -> TAP -> switch micro-VM (verdict) -> TAP -> UDP socket in another netns, one datagram every 2 ms",
        })
    );
    Ok(())
}

/// Where the offered frames went, stage by stage, from the counters before and after the run.
fn account(
    offered: u64,
    (gen_tap_tx, gen_tap_dropped): (u64, u64),
    (port0, port1): (&NetStats, &NetStats),
    (up0, up1): (&NetStats, &NetStats),
    (fw0, fw1): (&FirewallCounters, &FirewallCounters),
    delivered: u64,
) -> serde_json::Value {
    let d = |a: u64, b: u64| b.saturating_sub(a);
    let guest_port = |fw: &FirewallCounters| fw.ports.get(1).map(|p| p.rx_frames).unwrap_or(0);
    let guest_drops: std::collections::BTreeMap<&str, u64> = fw1
        .drops
        .iter()
        .map(|(reason, n)| (*reason, d(fw0.drops.get(reason).copied().unwrap_or(0), *n)))
        .filter(|(_, n)| *n > 0)
        .collect();
    let stages = [
        // Sent by the generator but never handed to the TAP (the namespace's stack, a qdisc).
        (
            "generator_netns",
            offered.saturating_sub(gen_tap_tx + gen_tap_dropped),
        ),
        // The TAP's queue to the VMM was full.
        ("tap_queue_full", gen_tap_dropped),
        // Read by the VMM, then dropped before the guest (too big, cut).
        (
            "vmm_rx",
            d(port0.rx_dropped_too_big, port1.rx_dropped_too_big)
                + d(port0.rx_dropped_cut, port1.rx_dropped_cut),
        ),
        ("guest_filter", guest_drops.values().sum()),
        ("guest_tx_ring_full", d(fw0.tx_ring_full, fw1.tx_ring_full)),
        (
            "uplink_send_errors",
            d(up0.tx_link_errors, up1.tx_link_errors),
        ),
        // Sent out of the uplink, not seen at the sink.
        (
            "after_uplink",
            d(up0.tx_frames, up1.tx_frames).saturating_sub(delivered),
        ),
    ];
    let lost: u64 = stages.iter().map(|(_, n)| n).sum();
    let mut json: serde_json::Map<String, serde_json::Value> = stages
        .iter()
        .map(|(k, n)| (k.to_string(), (*n).into()))
        .collect();
    json.insert("offered".into(), offered.into());
    json.insert("tap_queued".into(), gen_tap_tx.into());
    json.insert(
        "vmm_read".into(),
        d(port0.rx_frames, port1.rx_frames).into(),
    );
    json.insert(
        "guest_received".into(),
        d(guest_port(fw0), guest_port(fw1)).into(),
    );
    json.insert(
        "guest_forwarded".into(),
        d(fw0.forwarded, fw1.forwarded).into(),
    );
    json.insert("guest_drops".into(), serde_json::json!(guest_drops));
    json.insert("uplink_sent".into(), d(up0.tx_frames, up1.tx_frames).into());
    json.insert("delivered".into(), delivered.into());
    // What the path cost in notifications: the guest's queue kicks (each an exit), the VMM's
    // interrupts to it.
    json.insert("guest_kicks".into(), d(fw0.kicks, fw1.kicks).into());
    json.insert(
        "vmm_interrupts".into(),
        (d(port0.interrupts, port1.interrupts) + d(up0.interrupts, up1.interrupts)).into(),
    );
    // Frames in flight at either end of the run (queues, rings) show here, a few hundred.
    json.insert(
        "unaccounted".into(),
        (offered as i64 - lost as i64 - delivered as i64).into(),
    );
    json.into()
}
