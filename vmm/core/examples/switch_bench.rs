//! Throughput of the switch-tier micro-VM, with the frame generator and sink in the VMM process:
//! the fw-guest ELF boots with two switch ports backed by socket pairs (a tenant port and the
//! uplink); a generator thread writes UDP frames of one size into the tenant port, a verdict opens
//! their flow, and a sink thread counts what comes out of the uplink. Prints one JSON object per
//! figure (see scripts/bench):
//!   fw_boot_to_forward_ms  VM create -> the first frame out of the uplink
//!   fw_mpps_64             frames/s through the micro-VM at 64 bytes (millions)
//!   fw_gbps_1500           Gbit/s through it at 1500 bytes
//! Usage: cargo run --release -p vmm-core --example switch_bench -- FW_GUEST_ELF [SECONDS]

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vigil_wire::boot::Role;
use vigil_wire::verdict::{IpVersion, Op, Protocol, Rule, VerdictRepr};
use vmm_core::config::{LinkConfig, VmConfig};
use vmm_core::host_kind::HostKind;
use vmm_core::knobs::DebugKnobs;
use vmm_core::vm::Vm;

const TENANT: u32 = 1;
const SRC_IP: [u8; 4] = [10, 1, 0, 2];
const DST_IP: [u8; 4] = [10, 1, 0, 1];
const DST_PORT: u16 = 9000;

/// An Ethernet + IPv4 + UDP frame of `size` bytes (without FCS) from the tenant to the outside.
fn udp_frame(size: usize) -> Vec<u8> {
    let size = size.max(42);
    let mut f = vec![0u8; size];
    f[0..6].copy_from_slice(&[0x52, 0x54, 0x00, 0, 0, 1]);
    f[6..12].copy_from_slice(&[0x52, 0x54, 0x00, 0, 0, 2]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (size - 14) as u16;
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&SRC_IP);
    ip[16..20].copy_from_slice(&DST_IP);
    let sum = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let checksum = !((sum & 0xffff) + (sum >> 16)) as u16;
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    let udp = &mut f[34..42];
    udp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    udp[2..4].copy_from_slice(&DST_PORT.to_be_bytes());
    udp[4..6].copy_from_slice(&(ip_len - 20).to_be_bytes());
    f
}

fn verdict() -> [u8; 64] {
    let mut remote = [0u8; 16];
    remote[..4].copy_from_slice(&DST_IP);
    let rule = Rule::egress_to(IpVersion::V4, Protocol::Udp, remote, DST_PORT);
    VerdictRepr {
        op: Op::Add,
        tenant: TENANT,
        seq: 1,
        lifetime_ms: 0,
        rule,
    }
    .to_bytes()
}

struct Run {
    boot_to_forward: Duration,
    frames: u64,
    bytes: u64,
    elapsed: Duration,
    sent: u64,
}

/// One micro-VM, one frame size: boots, waits for the first forwarded frame, then measures.
fn run(elf: &std::path::Path, size: usize, seconds: f64) -> Result<Run, String> {
    let (tenant_vm_end, tenant_bench_end) =
        LinkConfig::pair(TENANT, [0x52, 0x54, 0, 0, 0, 2]).map_err(|e| e.to_string())?;
    let (uplink_vm_end, uplink_bench_end) =
        LinkConfig::pair(0, [0x52, 0x54, 0, 0, 0, 3]).map_err(|e| e.to_string())?;
    // The bench ends block (the generator waits for room, the sink for frames).
    let generator: UnixDatagram = tenant_bench_end
        .link
        .try_clone()
        .map_err(|e| e.to_string())?;
    let sink: UnixDatagram = uplink_bench_end
        .link
        .try_clone()
        .map_err(|e| e.to_string())?;
    generator
        .set_nonblocking(false)
        .map_err(|e| e.to_string())?;
    sink.set_nonblocking(false).map_err(|e| e.to_string())?;
    // While waiting for the first frame: one try per millisecond.
    sink.set_read_timeout(Some(Duration::from_millis(1)))
        .map_err(|e| e.to_string())?;
    let config = VmConfig::micro_vm("fw", elf, Role::Switch)
        .with_mem_mib(64)
        .with_verdicts(vec![verdict()])
        .with_links(vec![tenant_vm_end, uplink_vm_end])
        .with_debug(DebugKnobs::from_env());
    let created = Instant::now();
    let vm = Vm::create(&config, HostKind::detect()).map_err(|e| e.to_string())?;
    let stop = vm.stop_handle();
    let vm_thread = std::thread::spawn(move || vm.run(None));

    let frame = udp_frame(size);
    // Boot to first forward: one frame per millisecond until one comes out.
    let mut buf = vec![0u8; 65536];
    let boot_to_forward = loop {
        generator.send(&frame).map_err(|e| e.to_string())?;
        if sink.recv(&mut buf).is_ok() {
            break created.elapsed();
        }
        if created.elapsed() > Duration::from_secs(30) {
            stop.store(true, Ordering::Release);
            return Err("no frame came out of the micro-VM within 30 s".into());
        }
    };
    sink.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    while sink.recv(&mut buf).is_ok() {}

    let running = Arc::new(AtomicBool::new(true));
    let sent = Arc::new(AtomicU64::new(0));
    let gen = {
        let running = running.clone();
        let sent = sent.clone();
        std::thread::spawn(move || {
            while running.load(Ordering::Relaxed) {
                if generator.send(&frame).is_ok() {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let started = Instant::now();
    let (mut frames, mut bytes) = (0u64, 0u64);
    while started.elapsed().as_secs_f64() < seconds {
        if let Ok(n) = sink.recv(&mut buf) {
            frames += 1;
            bytes += n as u64;
        }
    }
    let elapsed = started.elapsed();
    running.store(false, Ordering::Relaxed);
    let _ = gen.join();
    stop.store(true, Ordering::Release);
    let _ = vm_thread.join();
    Ok(Run {
        boot_to_forward,
        frames,
        bytes,
        elapsed,
        sent: sent.load(Ordering::Relaxed),
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(elf) = args.get(1) else {
        eprintln!("usage: switch_bench FW_GUEST_ELF [SECONDS]");
        std::process::exit(2);
    };
    let seconds: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let host = HostKind::detect().to_string();
    // Wire sizes less the 4-byte FCS: a "64-byte frame" is 60 bytes here, a full 1500-byte-MTU
    // frame 1514.
    for (size, metric) in [(60usize, "fw_mpps_64"), (1514, "fw_gbps_1500")] {
        match run(std::path::Path::new(elf), size, seconds) {
            Ok(r) => {
                let secs = r.elapsed.as_secs_f64();
                if size == 60 {
                    println!(
                        "{}",
                        serde_json::json!({"metric": "fw_boot_to_forward_ms",
                            "value": (r.boot_to_forward.as_secs_f64() * 1e4).round() / 10.0,
                            "unit": "ms", "host": host})
                    );
                }
                let value = if size == 60 {
                    r.frames as f64 / secs / 1e6
                } else {
                    r.bytes as f64 * 8.0 / secs / 1e9
                };
                println!(
                    "{}",
                    serde_json::json!({"metric": metric,
                        "value": (value * 1e4).round() / 1e4,
                        "unit": if size == 60 { "Mpps" } else { "Gbit/s" },
                        "frame_bytes": size, "frames_out": r.frames, "frames_offered": r.sent,
                        "seconds": (secs * 100.0).round() / 100.0, "host": host,
                        "path": "generator -> socketpair -> virtio-net (VMM thread) -> micro-VM ring-3 filter -> virtio-net -> socketpair -> sink"})
                );
            }
            Err(e) => {
                eprintln!("switch_bench: {metric}: {e}");
                std::process::exit(1);
            }
        }
    }
}
