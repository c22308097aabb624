//! The switch micro-VM forwards without copying: a received buffer moves to the output port's
//! transmit ring and the free buffer of that transmit descriptor takes its place in the receive
//! ring (fw-guest `virtio_net::Port::forward`). A slip in that bookkeeping (two descriptors over
//! one buffer, a buffer handed back while the device still reads it) shows as a frame carrying
//! another frame's bytes, or coming out twice.
//!
//! This drives the real image over memory links (the path tenants use) through every way a
//! buffer moves: a tenant's frames to the uplink (one target: the buffer moves), and the
//! uplink's replies to an unknown MAC (flooded to both tenant ports: a copy to one, the buffer
//! to the other), at every size from 60 to 1514 bytes, with the harness offering more than it
//! drains so transmit rings overflow. Every frame that comes out must be whole, and each port
//! must see a frame at most once and in the order sent.

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vigil_wire::boot::Role;
use vigil_wire::verdict::{IpVersion, Op, Protocol, Rule, VerdictRepr};
use vmm_core::config::{LinkConfig, VmConfig};
use vmm_core::host_kind::HostKind;
use vmm_core::knobs::DebugKnobs;
use vmm_core::vm::Vm;

const TENANT: u32 = 7;
const TENANT_MAC_A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];
const TENANT_MAC_B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 4];
const OUTSIDE_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
/// Behind no port: the switch floods an uplink frame for it to every tenant port.
const UNKNOWN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];
const TENANT_IP: [u8; 4] = [10, 1, 0, 2];
const OUTSIDE_IP: [u8; 4] = [10, 1, 0, 1];
const TENANT_PORT: u16 = 40000;
const OUTSIDE_PORT: u16 = 9000;
/// Frames each way.
const FRAMES: u32 = 40_000;
/// Frames offered per harness call.
const BATCH: usize = 256;

/// The frame size for sequence number `seq`: every size from 60 to 1514 comes up.
fn size_of(seq: u32) -> usize {
    60 + (seq as usize * 97) % (1514 - 60 + 1)
}

/// The payload byte at `i` of frame `seq` of direction `dir`.
fn pattern(dir: u8, seq: u32, i: usize) -> u8 {
    (seq.wrapping_mul(31) as usize ^ i.wrapping_mul(7) ^ usize::from(dir) << 5) as u8
}

fn checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet + IPv4 + UDP frame carrying `seq` (the first payload word) and its pattern.
fn udp_frame(dir: u8, seq: u32, macs: ([u8; 6], [u8; 6]), ips: ([u8; 4], [u8; 4])) -> Vec<u8> {
    let size = size_of(seq);
    let (src_port, dst_port) = if dir == 0 {
        (TENANT_PORT, OUTSIDE_PORT)
    } else {
        (OUTSIDE_PORT, TENANT_PORT)
    };
    let mut f = vec![0u8; size];
    f[0..6].copy_from_slice(&macs.1);
    f[6..12].copy_from_slice(&macs.0);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (size - 14) as u16;
    f[14] = 0x45;
    f[16..18].copy_from_slice(&ip_len.to_be_bytes());
    f[22] = 64;
    f[23] = 17;
    f[26..30].copy_from_slice(&ips.0);
    f[30..34].copy_from_slice(&ips.1);
    let sum = checksum(&f[14..34]);
    f[24..26].copy_from_slice(&sum.to_be_bytes());
    f[34..36].copy_from_slice(&src_port.to_be_bytes());
    f[36..38].copy_from_slice(&dst_port.to_be_bytes());
    f[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
    f[42..46].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in f.iter_mut().enumerate().skip(46) {
        *b = pattern(dir, seq, i);
    }
    f
}

/// What one receiving port saw: the last sequence number, and every frame checked whole.
#[derive(Default)]
struct Seen {
    frames: u64,
    last: Option<u32>,
    wrong: Vec<String>,
}

impl Seen {
    fn check(&mut self, dir: u8, frame: &[u8]) {
        self.frames += 1;
        if frame.len() < 46 {
            self.wrong.push(format!("a {}-byte frame", frame.len()));
            return;
        }
        let seq = u32::from_be_bytes(frame[42..46].try_into().unwrap());
        if frame.len() != size_of(seq) {
            self.wrong.push(format!(
                "frame {seq}: {} bytes, sent {}",
                frame.len(),
                size_of(seq)
            ));
        } else if let Some(i) = (46..frame.len()).find(|&i| frame[i] != pattern(dir, seq, i)) {
            self.wrong
                .push(format!("frame {seq}: byte {i} is not the one sent"));
        }
        // Frame 0 of the tenant opens the flow: it is sent until one comes through.
        let opener = dir == 0 && seq == 0;
        if self.last.is_some_and(|last| seq <= last) && !opener {
            self.wrong
                .push(format!("frame {seq} after frame {:?}", self.last));
        }
        self.last = Some(seq);
    }
}

#[test]
fn forwarded_buffers_carry_each_frame_whole_once_and_in_order() {
    forward_every_size_both_ways(false);
}

/// The same through ports the micro-VM's driver set up through their registers, as under QEMU
/// (the VMM readies them otherwise: `BOOT_FLAG_PORTS_READY`), so that path keeps working.
#[test]
fn ports_the_driver_sets_up_itself_forward_the_same() {
    forward_every_size_both_ways(true);
}

fn forward_every_size_both_ways(driver_sets_up_ports: bool) {
    let elf = common::fw_guest_elf();
    let (tenant_a, end_a) = LinkConfig::host_pair(TENANT, TENANT_MAC_A).unwrap();
    let (tenant_b, end_b) = LinkConfig::host_pair(TENANT, TENANT_MAC_B).unwrap();
    let (uplink, end_up) = LinkConfig::host_pair(0, OUTSIDE_MAC).unwrap();
    let mut remote = [0u8; 16];
    remote[..4].copy_from_slice(&OUTSIDE_IP);
    let verdict = VerdictRepr {
        op: Op::Add,
        tenant: TENANT,
        seq: 1,
        lifetime_ms: 0,
        rule: Rule::egress_to(IpVersion::V4, Protocol::Udp, remote, OUTSIDE_PORT),
    }
    .to_bytes();
    let config = VmConfig::micro_vm("fw", &elf, Role::Switch)
        .with_mem_mib(64)
        .with_verdicts(vec![verdict])
        .with_links(vec![end_a, end_b, end_up])
        .with_debug(DebugKnobs {
            driver_sets_up_ports,
            ..DebugKnobs::default()
        });
    let vm = Vm::create(&config, HostKind::detect()).expect("the micro-VM is created");
    let region = vm.verdict_region().expect("a verdict region");
    let stop = vm.stop_handle();
    let vm_thread = std::thread::spawn(move || vm.run(None));

    let out: Vec<Vec<u8>> = (0..FRAMES)
        .map(|s| udp_frame(0, s, (TENANT_MAC_A, OUTSIDE_MAC), (TENANT_IP, OUTSIDE_IP)))
        .collect();
    let back: Vec<Vec<u8>> = (0..FRAMES)
        .map(|s| udp_frame(1, s, (OUTSIDE_MAC, UNKNOWN_MAC), (OUTSIDE_IP, TENANT_IP)))
        .collect();
    let mut scratch = vec![0u8; 2048];
    let mut seen: HashMap<&str, Seen> = HashMap::new();
    let mut drain = |seen: &mut HashMap<&str, Seen>| {
        uplink.recv(BATCH, &mut scratch, |f| {
            seen.entry("uplink").or_default().check(0, f)
        });
        for (name, port) in [("tenant a", &tenant_a), ("tenant b", &tenant_b)] {
            port.recv(BATCH, &mut scratch, |f| {
                seen.entry(name).or_default().check(1, f)
            });
        }
    };

    // The first frame opens the flow (its verdict applies once the switch is up).
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.get("uplink").is_none_or(|s| s.frames == 0) {
        assert!(
            Instant::now() < deadline,
            "no frame came through within 30 s"
        );
        tenant_a.send([out[0].as_slice()]);
        uplink.wait(Duration::from_millis(1));
        drain(&mut seen);
    }
    let (mut next_out, mut next_back) = (1usize, 0usize);
    let mut rounds = 0u64;
    while next_out < out.len() || next_back < back.len() {
        let end = (next_out + BATCH).min(out.len());
        next_out += tenant_a.send(out[next_out..end].iter().map(Vec::as_slice));
        let end = (next_back + BATCH).min(back.len());
        next_back += uplink.send(back[next_back..end].iter().map(Vec::as_slice));
        rounds += 1;
        // Drain every third round only: the transmit rings fill and overflow meanwhile.
        if rounds.is_multiple_of(3) {
            drain(&mut seen);
        }
        assert!(
            Instant::now() < deadline,
            "the switch stopped taking frames"
        );
    }
    // What is still in flight comes out (or was dropped, and counted).
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_millis(300) {
        drain(&mut seen);
    }
    let counters = region.counters().expect("the switch's counters");
    stop.store(true, Ordering::Release);
    let _ = vm_thread.join();

    for (name, s) in &seen {
        assert!(
            s.wrong.is_empty(),
            "{name}: {} of {} frames wrong, first: {:?}",
            s.wrong.len(),
            s.frames,
            &s.wrong[..s.wrong.len().min(5)]
        );
    }
    let count = |name: &str| seen.get(name).map_or(0, |s| s.frames);
    eprintln!(
        "switch_buffers (driver sets up ports: {driver_sets_up_ports}): uplink {} tenant a {} \
         tenant b {} of {FRAMES} each way; tx ring full {}",
        count("uplink"),
        count("tenant a"),
        count("tenant b"),
        counters.tx_ring_full
    );
    // Each path carried frames: the moved buffer (uplink, and one tenant port of a flood) and
    // the copy (the other tenant port).
    for name in ["uplink", "tenant a", "tenant b"] {
        assert!(
            count(name) >= u64::from(FRAMES) / 10,
            "{name} got {} of {FRAMES} frames",
            count(name)
        );
    }
}
