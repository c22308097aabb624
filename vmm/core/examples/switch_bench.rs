//! Throughput of the switch-tier micro-VM, with the frame generator and sink in the VMM process.
//! The fw-guest ELF boots with two switch ports (a tenant port and the uplink); a verdict opens
//! the generator's UDP flow; what comes out of the uplink is counted. Two link kinds, measured in
//! the same run:
//!   memory      the generator writes frames straight into the micro-VM's receive queue and the
//!               sink reads them straight from its transmit queue (`HostPort`, one copy each, no
//!               system call, no exit while both sides poll): the path tenants and the switch use
//!   socketpair  the path before it (the baseline): a datagram socket pair per port, a system
//!               call per frame in the generator, in each device thread and in the sink
//! and the physical limit of this machine: a ring of frame buffers between two threads, one
//! memcpy in and one out per frame.
//!
//! Prints one JSON object per figure (see scripts/bench):
//!   fw_boot_to_forward_ms  VM create -> the first frame out of the uplink (memory link), median
//!                          of 9 fresh micro-VMs, one probe frame offered (and, alternating,
//!                          9 offering a frame on every pass: `offering_every_pass`)
//!   fw_mpps_64             frames/s through the micro-VM at 64 bytes (millions), the harness
//!                          moving 128 frames a call (and 256, `harness_batch_256`), with
//!                          `baseline_socketpair` from the same run
//!   fw_gbps_1500           Gbit/s through it at 1500 bytes, likewise
//!   fw_stage_ns_64         ns per frame by stage (guest, copy in, copy out, notify) and the
//!                          memcpy-ring limit
//!   memcpy_ring_mpps_64    the limit itself
//!   fw_guest_ram_mib       the micro-VM's resident guest pages after forwarding 64k flows
//!   vmm_overhead_mib_microvm  this VMM process's RSS minus those pages
//! Usage: cargo run --release -p vmm-core --example switch_bench -- FW_GUEST_ELF [SECONDS]
//! (SWITCH_BENCH_BOOTS_ONLY=1: only the boot-to-forward boots, printed as one line;
//! SWITCH_BENCH_MEMORY_ONLY=1: only the memory link at 64 bytes, or SWITCH_BENCH_SIZE bytes, one
//! line, for profiling)

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vigil_wire::boot::Role;
use vigil_wire::verdict::{IpVersion, Op, Protocol, Rule, VerdictRepr};
use vmm_core::config::{LinkConfig, VmConfig};
use vmm_core::devices::virtio::net::HostPort;
use vmm_core::host_kind::HostKind;
use vmm_core::knobs::DebugKnobs;
use vmm_core::verdict_region::{FirewallCounters, VerdictRegion};
use vmm_core::vm::{Vm, VmError, VmOutcome};

const TENANT: u32 = 1;
/// The second tenant of the RAM measurement: a tenant may hold at most half the flow table.
const TENANT2: u32 = 2;
const SRC_IP: [u8; 4] = [10, 1, 0, 2];
const DST_IP: [u8; 4] = [10, 1, 0, 1];
const DST_PORT: u16 = 9000;
const SRC_PORT: u16 = 40000;
/// Frames per send/receive call of the harness (the RAM run, the drains).
const BATCH: usize = 256;
/// Frames per send/receive call of the throughput runs. One harness thread offers a batch,
/// then takes what came out; a batch as long as the rings (256) overran the micro-VM's transmit
/// ring every round: a third of the offered frames were dropped there (`guest_tx_ring_full`),
/// each after the harness had copied it in, on the core the sink needs. 64 and 128 were
/// measured against 256 (`SWITCH_BENCH_BATCH`); the figures print the 256 run beside it.
const HARNESS_BATCH: usize = 128;
/// Flows of the RAM measurement.
const FLOWS: usize = 65536;
/// Fresh micro-VMs timed for `fw_boot_to_forward_ms` (the median is reported).
const BOOTS: usize = 9;

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
    fix_ipv4_checksum(&mut f);
    let udp = &mut f[34..42];
    udp[0..2].copy_from_slice(&SRC_PORT.to_be_bytes());
    udp[2..4].copy_from_slice(&DST_PORT.to_be_bytes());
    udp[4..6].copy_from_slice(&(ip_len - 20).to_be_bytes());
    f
}

fn verdict() -> [u8; 64] {
    verdict_for(TENANT)
}

fn verdict_for(tenant: u32) -> [u8; 64] {
    let mut remote = [0u8; 16];
    remote[..4].copy_from_slice(&DST_IP);
    let rule = Rule::egress_to(IpVersion::V4, Protocol::Udp, remote, DST_PORT);
    VerdictRepr {
        op: Op::Add,
        tenant,
        seq: 1,
        lifetime_ms: 0,
        rule,
    }
    .to_bytes()
}

fn tsc() -> u64 {
    // SAFETY: rdtsc has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[derive(Default)]
struct Run {
    boot_to_forward: Duration,
    frames: u64,
    bytes: u64,
    elapsed: Duration,
    offered: u64,
    /// Harness time spent writing frames into the guest / reading them out, TSC ticks (a
    /// clock read through the vDSO took 10% of the harness's samples under `perf`).
    copy_in_ticks: u64,
    copy_out_ticks: u64,
    /// The micro-VM's counters before and after the measured window.
    before: FirewallCounters,
    after: FirewallCounters,
    /// TSC ticks per ns over the window.
    tsc_per_ns: f64,
}

fn micro_vm(
    elf: &std::path::Path,
    links: Vec<LinkConfig>,
    knobs: DebugKnobs,
) -> Result<Vm, String> {
    micro_vm_with(elf, links, vec![verdict()], knobs)
}

fn micro_vm_with(
    elf: &std::path::Path,
    links: Vec<LinkConfig>,
    verdicts: Vec<[u8; 64]>,
    knobs: DebugKnobs,
) -> Result<Vm, String> {
    let config = VmConfig::micro_vm("fw", elf, Role::Switch)
        .with_mem_mib(64)
        .with_verdicts(verdicts)
        .with_links(links)
        .with_debug(knobs);
    Vm::create(&config, HostKind::detect()).map_err(|e| e.to_string())
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A micro-VM on memory links, running: the generator feeds its tenant port, the sink reads its
/// uplink; `boot_to_forward` is VM create -> the first frame of `size` bytes out of the uplink.
struct Booted {
    generator: HostPort,
    sink: HostPort,
    region: Arc<VerdictRegion>,
    stop: Arc<AtomicBool>,
    vm_thread: std::thread::JoinHandle<Result<VmOutcome, VmError>>,
    boot_to_forward: Duration,
}

impl Booted {
    fn stop(self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.vm_thread.join();
    }
}

/// How the boot loop offers frames: one probe (the figure), or one on every pass of the loop
/// (the baseline: the harness before it was measured).
#[derive(Clone, Copy, PartialEq)]
enum Offer {
    Probe,
    EveryPass,
}

/// Boots the micro-VM on memory links and offers frames as `offer` says, sleeping on the links'
/// eventfds (the guest kicks while the harness is not polling), until one comes out of the
/// uplink. With `driver_sets_up_ports`, the VMM leaves the ports' set-up to the micro-VM's
/// driver (`VIGIL_DRIVER_SETS_UP_PORTS`: the boot's baseline).
fn boot_on_memory_links(
    elf: &std::path::Path,
    size: usize,
    offer: Offer,
    driver_sets_up_ports: bool,
) -> Result<Booted, String> {
    let (generator, tenant_end) =
        LinkConfig::host_pair(TENANT, [0x52, 0x54, 0, 0, 0, 2]).map_err(|e| e.to_string())?;
    let (sink, uplink_end) =
        LinkConfig::host_pair(0, [0x52, 0x54, 0, 0, 0, 3]).map_err(|e| e.to_string())?;
    let created = Instant::now();
    let knobs = DebugKnobs {
        driver_sets_up_ports: driver_sets_up_ports || DebugKnobs::from_env().driver_sets_up_ports,
        ..DebugKnobs::from_env()
    };
    let vm = micro_vm(elf, vec![tenant_end, uplink_end], knobs)?;
    let region = vm
        .verdict_region()
        .ok_or("the micro-VM has no verdict region")?;
    let stop = vm.stop_handle();
    let vm_thread = std::thread::spawn(move || vm.run(None));
    let frame = udp_frame(size);
    let mut scratch = vec![0u8; 65536];
    // One probe frame, sent as soon as the device takes it and again each millisecond that
    // nothing comes out; then the harness sleeps until the micro-VM transmits. (Offering a
    // frame on every pass, as before, filled the receive ring while the micro-VM was still
    // setting up its ports: its first round then read ~96 buffer pages it had never touched,
    // a first-touch exit each, before the first frame left: 3-7 ms of the figure.)
    let boot_to_forward = loop {
        let taken = generator.send([frame.as_slice()]);
        match offer {
            Offer::EveryPass => sink.wait(Duration::from_millis(1)),
            Offer::Probe if taken == 0 => generator.wait(Duration::from_millis(1)),
            Offer::Probe => sink.wait_for_frames(Duration::from_millis(1)),
        }
        if sink.recv(1, &mut scratch, |_| {}) > 0 {
            break created.elapsed();
        }
        if created.elapsed() > Duration::from_secs(30) {
            stop.store(true, Ordering::Release);
            return Err("no frame came out of the micro-VM within 30 s".into());
        }
    };
    Ok(Booted {
        generator,
        sink,
        region,
        stop,
        vm_thread,
        boot_to_forward,
    })
}

/// One micro-VM on memory links, one frame size: boots, waits for the first forwarded frame,
/// measures.
fn run_memory(
    elf: &std::path::Path,
    size: usize,
    seconds: f64,
    batch: usize,
) -> Result<Run, String> {
    let booted = boot_on_memory_links(elf, size, Offer::Probe, false)?;
    let (generator, sink, region) = (&booted.generator, &booted.sink, &booted.region);
    let frame = udp_frame(size);
    let mut scratch = vec![0u8; 65536];
    // Drain what the boot loop left.
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_millis(50) {
        sink.recv(BATCH, &mut scratch, |_| {});
    }

    let mut r = Run {
        boot_to_forward: booted.boot_to_forward,
        ..Run::default()
    };
    r.before = region.counters().unwrap_or_default();
    let frames: Vec<&[u8]> = vec![frame.as_slice(); batch];
    let started = Instant::now();
    let tsc_start = tsc();
    // One harness thread offers a batch, then takes what came out: on two cores the micro-VM's
    // vCPU has the other one to itself.
    let mut rounds = 0u32;
    while !rounds.is_multiple_of(1024) || started.elapsed().as_secs_f64() < seconds {
        rounds = rounds.wrapping_add(1);
        let t0 = tsc();
        r.offered += generator.send(frames.iter().copied()) as u64;
        let t1 = tsc();
        let got = sink.recv(batch, &mut scratch, |f| r.bytes += f.len() as u64);
        let t2 = tsc();
        r.frames += got as u64;
        r.copy_in_ticks += t1.wrapping_sub(t0);
        r.copy_out_ticks += t2.wrapping_sub(t1);
    }
    r.elapsed = started.elapsed();
    r.tsc_per_ns = (tsc() - tsc_start) as f64 / r.elapsed.as_nanos() as f64;
    // Let the frames in flight come out, so every offered frame is accounted for.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_millis(100) {
        r.frames += sink.recv(BATCH, &mut scratch, |f| r.bytes += f.len() as u64) as u64;
    }
    r.after = region.counters().unwrap_or_default();
    booted.stop();
    Ok(r)
}

/// A micro-VM of its own for the memory figures: two tenant ports and the uplink, each tenant
/// opening half of the 64k flows (a tenant holds at most half the flow table: its quota).
/// Returns (guest KiB, RSS KiB, flows active).
fn run_ram(elf: &std::path::Path) -> Result<(u64, u64, u64), String> {
    let (first, first_end) =
        LinkConfig::host_pair(TENANT, [0x52, 0x54, 0, 0, 0, 2]).map_err(|e| e.to_string())?;
    let (second, second_end) =
        LinkConfig::host_pair(TENANT2, [0x52, 0x54, 0, 0, 0, 4]).map_err(|e| e.to_string())?;
    let (sink, uplink_end) =
        LinkConfig::host_pair(0, [0x52, 0x54, 0, 0, 0, 3]).map_err(|e| e.to_string())?;
    let vm = micro_vm_with(
        elf,
        vec![first_end, second_end, uplink_end],
        vec![verdict_for(TENANT), verdict_for(TENANT2)],
        DebugKnobs::from_env(),
    )?;
    let memory = vm.memory().clone();
    let region = vm
        .verdict_region()
        .ok_or("the micro-VM has no verdict region")?;
    let stop = vm.stop_handle();
    let vm_thread = std::thread::spawn(move || vm.run(None));
    let frame = udp_frame(60);
    let mut second_frame = frame.clone();
    second_frame[6..12].copy_from_slice(&[0x52, 0x54, 0x00, 0, 0, 4]);
    second_frame[29] = 3; // source 10.1.0.3
    fix_ipv4_checksum(&mut second_frame);
    let result = sixty_four_k_flows(
        &[(&first, &frame), (&second, &second_frame)],
        &sink,
        &memory,
        &region,
    );
    stop.store(true, Ordering::Release);
    let _ = vm_thread.join();
    result
}

/// Recomputes the IPv4 header checksum of an Ethernet frame.
fn fix_ipv4_checksum(frame: &mut [u8]) {
    frame[24..26].copy_from_slice(&[0, 0]);
    let sum = frame[14..34]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let checksum = !((sum & 0xffff) + (sum >> 16)) as u16;
    frame[24..26].copy_from_slice(&checksum.to_be_bytes());
}

/// Forwards one frame of each of 64k flows, split between the `generators` (each its frame
/// with source ports 0, 1, ...), then reads the guest's resident pages and the process RSS.
/// Returns (guest KiB, RSS KiB, flows active).
fn sixty_four_k_flows(
    generators: &[(&HostPort, &[u8])],
    sink: &HostPort,
    memory: &vmm_core::GuestMemoryMmap,
    region: &vmm_core::verdict_region::VerdictRegion,
) -> Result<(u64, u64, u64), String> {
    let mut scratch = vec![0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(60);
    let each = FLOWS / generators.len();
    for (generator, frame) in generators {
        let mut block: Vec<Vec<u8>> = vec![frame.to_vec(); BATCH];
        let mut port = 0usize;
        while port < each {
            let n = BATCH.min(each - port);
            for (i, f) in block[..n].iter_mut().enumerate() {
                f[34..36].copy_from_slice(&((port + i) as u16).to_be_bytes());
            }
            let taken = generator.send(block[..n].iter().map(|f| f.as_slice()));
            port += taken;
            sink.recv(BATCH, &mut scratch, |_| {});
            if Instant::now() > deadline {
                return Err(format!("64k flows: only {port} frames taken in 60 s"));
            }
        }
    }
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_millis(200) {
        sink.recv(BATCH, &mut scratch, |_| {});
    }
    let flows = region.counters().map_or(0, |c| c.flows_active);
    if std::env::var_os("VIGIL_RAM_MAP").is_some() {
        for (gpa, kib) in vmm_core::guest_ram::resident_map_kib(
            memory,
            std::env::var("VIGIL_RAM_MAP_KIB")
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(256)
                << 10,
        ) {
            eprintln!("resident {gpa:#010x}: {kib:4} KiB");
        }
    }
    Ok((vmm_core::guest_ram::resident_kib(memory), rss_kib(), flows))
}

/// Boots on memory links, `boots` times: VM create -> the first frame out of the uplink, each
/// micro-VM fresh and stopped once it forwarded. Three kinds alternate: the figure's, one
/// offering a frame on every pass, and one whose driver sets its ports up itself. Each sorted,
/// so the median is the middle one.
fn boot_to_forward_ms(elf: &std::path::Path, boots: usize) -> Result<[Vec<f64>; 3], String> {
    let mut times = [
        Vec::with_capacity(boots),
        Vec::with_capacity(boots),
        Vec::with_capacity(boots),
    ];
    let kinds = [
        (Offer::Probe, false),
        (Offer::EveryPass, false),
        (Offer::Probe, true),
    ];
    for _ in 0..boots {
        for (k, (offer, driver_sets_up_ports)) in kinds.into_iter().enumerate() {
            let booted = boot_on_memory_links(elf, 60, offer, driver_sets_up_ports)?;
            times[k].push(booted.boot_to_forward.as_secs_f64() * 1e3);
            booted.stop();
        }
    }
    for t in times.iter_mut() {
        t.sort_by(f64::total_cmp);
    }
    Ok(times)
}

/// The baseline: the same micro-VM with socket pair links, a generator thread and the sink.
fn run_socketpair(elf: &std::path::Path, size: usize, seconds: f64) -> Result<Run, String> {
    let (generator, tenant_end) =
        LinkConfig::socket_pair(TENANT, [0x52, 0x54, 0, 0, 0, 2]).map_err(|e| e.to_string())?;
    let (sink, uplink_end) =
        LinkConfig::socket_pair(0, [0x52, 0x54, 0, 0, 0, 3]).map_err(|e| e.to_string())?;
    let blocking = |s: &UnixDatagram| s.set_nonblocking(false).map_err(|e| e.to_string());
    blocking(&generator)?;
    blocking(&sink)?;
    sink.set_read_timeout(Some(Duration::from_millis(1)))
        .map_err(|e| e.to_string())?;
    let created = Instant::now();
    let vm = micro_vm(elf, vec![tenant_end, uplink_end], DebugKnobs::from_env())?;
    let stop = vm.stop_handle();
    let vm_thread = std::thread::spawn(move || vm.run(None));
    let frame = udp_frame(size);
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
        offered: sent.load(Ordering::Relaxed),
        ..Run::default()
    })
}

/// The physical limit: frames of `size` bytes through a ring of 256 2 KiB slots between two
/// threads, one memcpy in and one out each (the same copies the memory link makes at its two
/// ends). Returns Mpps.
fn memcpy_ring(size: usize, seconds: f64) -> f64 {
    const SLOTS: usize = 256;
    const SLOT: usize = 2048;
    struct Ring {
        buf: Box<[std::cell::UnsafeCell<[u8; SLOT]>]>,
        len: Box<[AtomicUsize]>,
        head: AtomicUsize,
        tail: AtomicUsize,
    }
    // SAFETY: a single producer writes slot i only while it is free (head - tail < SLOTS) and
    // the single consumer reads it only after head passed it; the indices order the accesses.
    unsafe impl Sync for Ring {}
    let ring = Arc::new(Ring {
        buf: (0..SLOTS)
            .map(|_| std::cell::UnsafeCell::new([0u8; SLOT]))
            .collect(),
        len: (0..SLOTS).map(|_| AtomicUsize::new(0)).collect(),
        head: AtomicUsize::new(0),
        tail: AtomicUsize::new(0),
    });
    let running = Arc::new(AtomicBool::new(true));
    let producer = {
        let (ring, running) = (ring.clone(), running.clone());
        std::thread::spawn(move || {
            let frame = udp_frame(size);
            let mut head = 0usize;
            while running.load(Ordering::Relaxed) {
                let tail = ring.tail.load(Ordering::Acquire);
                while head - tail < SLOTS {
                    let i = head % SLOTS;
                    // SAFETY: slot i is free (see the Sync impl).
                    unsafe { (&mut *ring.buf[i].get())[..size].copy_from_slice(&frame) };
                    ring.len[i].store(size, Ordering::Relaxed);
                    head += 1;
                }
                ring.head.store(head, Ordering::Release);
            }
        })
    };
    let mut out = [0u8; SLOT];
    let (mut tail, mut frames) = (0usize, 0u64);
    let started = Instant::now();
    while started.elapsed().as_secs_f64() < seconds {
        let head = ring.head.load(Ordering::Acquire);
        while tail != head {
            let i = tail % SLOTS;
            let len = ring.len[i].load(Ordering::Relaxed);
            // SAFETY: slot i was published by head (see the Sync impl).
            out[..len].copy_from_slice(unsafe { &(&*ring.buf[i].get())[..len] });
            std::hint::black_box(&out);
            tail += 1;
            frames += 1;
        }
        ring.tail.store(tail, Ordering::Release);
    }
    let secs = started.elapsed().as_secs_f64();
    running.store(false, Ordering::Relaxed);
    let _ = producer.join();
    frames as f64 / secs / 1e6
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(elf) = args.get(1) else {
        eprintln!("usage: switch_bench FW_GUEST_ELF [SECONDS]");
        std::process::exit(2);
    };
    let elf = std::path::Path::new(elf);
    let seconds: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3.0);
    if std::env::var_os("SWITCH_BENCH_MEMORY_ONLY").is_some() {
        // Quick look at the memory link alone at 64 bytes (for profiling).
        let size = std::env::var("SWITCH_BENCH_SIZE")
            .ok()
            .and_then(|s| s.parse().ok());
        let batch = std::env::var("SWITCH_BENCH_BATCH")
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|&b| (1..=BATCH).contains(&b))
            .unwrap_or(HARNESS_BATCH);
        match run_memory(elf, size.unwrap_or(60), seconds, batch) {
            Ok(r) => {
                let (b, a) = (&r.before, &r.after);
                let busy = (a.busy_frames - b.busy_frames).max(1) as f64;
                println!(
                    "mpps {:.3} guest_ns {:.1} copy_in_ns {:.1} copy_out_ns {:.1} tx_full {}",
                    r.frames as f64 / r.elapsed.as_secs_f64() / 1e6,
                    (a.busy_cycles - b.busy_cycles) as f64 / r.tsc_per_ns / busy,
                    r.copy_in_ticks as f64 / r.tsc_per_ns / r.offered.max(1) as f64,
                    r.copy_out_ticks as f64 / r.tsc_per_ns / r.frames.max(1) as f64,
                    a.tx_ring_full - b.tx_ring_full
                )
            }
            Err(e) => eprintln!("switch_bench: memory: {e}"),
        }
        return;
    }
    if std::env::var_os("SWITCH_BENCH_RAM_ONLY").is_some() {
        // Quick look at the 64k-flow memory figure alone (VIGIL_RAM_MAP=1 maps it).
        match run_ram(elf) {
            Ok((guest_kib, rss, flows)) => {
                println!("guest_resident_kib {guest_kib} vmm_rss_kib {rss} flows_active {flows}")
            }
            Err(e) => eprintln!("switch_bench: ram: {e}"),
        }
        return;
    }
    if std::env::var_os("SWITCH_BENCH_BOOTS_ONLY").is_some() {
        // Quick look at the boot alone (no throughput, no RAM run).
        match boot_to_forward_ms(elf, BOOTS) {
            Ok([b, every_pass, by_driver]) => println!(
                "boot_to_forward_ms median {:.1} all {b:.1?}; offering a frame every pass: \
                 median {:.1} all {every_pass:.1?}; the driver setting its ports up: median \
                 {:.1} all {by_driver:.1?}",
                b[b.len() / 2],
                every_pass[every_pass.len() / 2],
                by_driver[by_driver.len() / 2]
            ),
            Err(e) => eprintln!("switch_bench: boots: {e}"),
        }
        return;
    }
    let host = HostKind::detect().to_string();
    let fail = |what: &str, e: String| -> ! {
        eprintln!("switch_bench: {what}: {e}");
        std::process::exit(1)
    };
    let memory_path = "generator -> micro-VM RX queue (memory link, one copy) -> ring-3 filter -> \
                       TX queue -> sink (memory link, one copy)";
    let socket_path = "generator -> socketpair -> virtio-net (VMM thread) -> micro-VM ring-3 \
                       filter -> virtio-net -> socketpair -> sink";
    let limit = memcpy_ring(60, seconds.min(2.0));
    println!(
        "{}",
        serde_json::json!({"metric": "memcpy_ring_mpps_64", "value": round(limit, 3),
            "unit": "Mpps", "host": host,
            "path": "thread -> memcpy into a 256-slot ring -> memcpy out -> thread"})
    );
    // Wire sizes less the 4-byte FCS: a "64-byte frame" is 60 bytes here, a full 1500-byte-MTU
    // frame 1514.
    for (size, metric) in [(60usize, "fw_mpps_64"), (1514, "fw_gbps_1500")] {
        let base = run_socketpair(elf, size, seconds).unwrap_or_else(|e| fail(metric, e));
        let r = run_memory(elf, size, seconds, HARNESS_BATCH).unwrap_or_else(|e| fail(metric, e));
        let ring_batch = run_memory(elf, size, seconds, BATCH).unwrap_or_else(|e| fail(metric, e));
        let secs = r.elapsed.as_secs_f64();
        let value = |run: &Run| {
            let secs = run.elapsed.as_secs_f64();
            if size == 60 {
                run.frames as f64 / secs / 1e6
            } else {
                run.bytes as f64 * 8.0 / secs / 1e9
            }
        };
        if size == 60 {
            let [boots, every_pass, by_driver] =
                boot_to_forward_ms(elf, BOOTS).unwrap_or_else(|e| fail("boots", e));
            println!(
                "{}",
                serde_json::json!({"metric": "fw_boot_to_forward_ms",
                    "value": round(boots[boots.len() / 2], 1),
                    "min": round(boots[0], 1), "max": round(boots[boots.len() - 1], 1),
                    "boots": boots.len(),
                    "first_run": round(r.boot_to_forward.as_secs_f64() * 1e3, 1),
                    "unit": "ms", "host": host,
                    "baseline_socketpair": round(base.boot_to_forward.as_secs_f64() * 1e3, 1),
                    "offering_every_pass": round(every_pass[every_pass.len() / 2], 1),
                    "baseline_driver_sets_up_ports": round(by_driver[by_driver.len() / 2], 1),
                    "note": "value: median of `boots` fresh micro-VMs on memory links, one \
                             probe frame offered until one comes out; offering_every_pass: \
                             the same boots, alternating, with a frame offered on every pass \
                             of the harness's loop (the harness before this was measured); \
                             baseline_driver_sets_up_ports: the same boots, alternating, with \
                             the micro-VM's driver setting its ports up through their \
                             registers (VIGIL_DRIVER_SETS_UP_PORTS, as under QEMU); \
                             first_run: the throughput run's own boot; baseline: the \
                             socketpair run's boot"})
            );
        }
        let (b, a) = (&r.before, &r.after);
        let guest_drops: u64 = a.drops.values().sum::<u64>() - b.drops.values().sum::<u64>();
        let tx_full = a.tx_ring_full - b.tx_ring_full;
        let in_flight_or_lost = r.offered as i64 - r.frames as i64;
        println!(
            "{}",
            serde_json::json!({"metric": metric, "value": round(value(&r), 4),
                "unit": if size == 60 { "Mpps" } else { "Gbit/s" },
                "baseline_socketpair": round(value(&base), 4),
                "speedup": round(value(&r) / value(&base).max(1e-9), 1),
                "harness_batch": HARNESS_BATCH,
                "harness_batch_256": round(value(&ring_batch), 4),
                "harness_batch_256_tx_ring_full":
                    ring_batch.after.tx_ring_full - ring_batch.before.tx_ring_full,
                "frame_bytes": size, "frames_out": r.frames, "frames_offered": r.offered,
                "accounted": {"offered_not_out": in_flight_or_lost,
                              "guest_filter_drops": guest_drops, "guest_tx_ring_full": tx_full},
                "baseline_frames_out": base.frames, "baseline_frames_offered": base.offered,
                "seconds": round(secs, 2), "host": host, "path": memory_path,
                "baseline_path": socket_path})
        );
        if size == 60 {
            let frames = r.frames.max(1) as f64;
            let busy_frames = (a.busy_frames - b.busy_frames).max(1) as f64;
            let guest_ns = (a.busy_cycles - b.busy_cycles) as f64 / r.tsc_per_ns / busy_frames;
            let kicks = a.kicks - b.kicks;
            println!(
                "{}",
                serde_json::json!({"metric": "fw_stage_ns_64",
                    "value": round(1e3 / value(&r), 1), "unit": "ns/frame",
                    "guest_ns": round(guest_ns, 1),
                    "copy_in_ns": round(r.copy_in_ticks as f64 / r.tsc_per_ns / r.offered.max(1) as f64, 1),
                    "copy_out_ns": round(r.copy_out_ticks as f64 / r.tsc_per_ns / frames, 1),
                    "notify_kicks": kicks, "notify_kicks_per_frame": kicks as f64 / frames,
                    "uplink_ns": null,
                    "memcpy_ring_limit_ns": round(1e3 / limit, 1),
                    "host": host,
                    "note": "value: wall ns per frame at the sink; guest: TSC cycles of the \
                             micro-VM's busy rounds per frame; copy in/out: harness time in the \
                             memory link's send/recv per frame (guest rings read and written \
                             directly); notify: guest kicks (exits) in the window; uplink: this \
                             path has no TAP/VXLAN (not measured here)"})
            );
        }
    }
    let (guest_kib, rss, flows) = run_ram(elf).unwrap_or_else(|e| fail("fw_guest_ram_mib", e));
    println!(
        "{}",
        serde_json::json!({"metric": "fw_guest_ram_mib",
            "value": round(guest_kib as f64 / 1024.0, 2), "unit": "MiB",
            "method": "resident guest pages", "flows_offered": FLOWS,
            "flows_active": flows, "tenants": 2, "guest_mem_mib": 64, "host": host,
            "goal": "<= 4"})
    );
    println!(
        "{}",
        serde_json::json!({"metric": "vmm_overhead_mib_microvm",
            "value": round(rss.saturating_sub(guest_kib) as f64 / 1024.0, 2),
            "unit": "MiB", "vmm_rss_mib": round(rss as f64 / 1024.0, 2),
            "guest_resident_mib": round(guest_kib as f64 / 1024.0, 2), "host": host,
            "note": "VmRSS of this VMM process (vmm-core, one micro-VM, the bench \
                     harness) minus the guest's resident pages", "goal": "<= 5"})
    );
}
