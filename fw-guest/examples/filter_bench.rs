//! Native (host, one core) benchmark of the filter's data path. Prints one JSON object per line.
//!
//! `cargo run --release -p fw-guest --example filter_bench`
//!
//! - `fw_native_mpps_64`: 64-byte TCP frames of 1024 established flows, round robin, through
//!   `Filter::process` (parse + conntrack hit + state update).
//! - `fw_native_gbps_1500`: the same with 1514-byte frames (1500-byte IP packets), counted in
//!   frame bits; the filter reads headers only, so this is packet rate × size.
//! - `conntrack_lookup_ns_{1k,1m}`: hash + probe of a present key in a table holding 1k / 1M
//!   flows, keys visited in a shuffled order (the 1M table, 38 MB of slots, does not fit in cache).
//! - `flush_tenant_ms_50k`: `FlushTenant` of a tenant holding 50k established flows (removes
//!   every entry at once: a full scan of the table plus the deletions).
//! - `fw_flow_entry_bytes`: the hash slot every flow takes (a TCP flow takes as much again in
//!   the TCP pool, an IPv6 flow in the address pool). The micro-VM's RAM with 64k flows is
//!   measured, not computed: `fw_guest_ram_mib` in `vmm-core`'s `switch_bench`.
//! - `fw_native_syncookie_mpps`: SYNs of a flood from random sources answered with SYN cookies
//!   through `Filter::process_edge_mut` (the edge role with its SYN proxy engaged), per second;
//!   beside it `fw_native_syn_mpps`, the same SYNs forwarded (creating half-open entries, bounded
//!   by eviction) with the proxy off, measured in the same run.
//! - `fw_native_switch_mpps_64`: the 64-byte egress frames of `fw_native_mpps_64` as a switch's
//!   tenant port takes them: the port hygiene (`Filter::admit`: MAC, source address) then
//!   `Filter::process`; `fw_native_arp_proxy_mpps`: ARP requests for a neighbour the switch
//!   knows, answered by the switch itself (proxy ARP).

use std::hint::black_box;
use std::time::{Duration, Instant};

use fw_guest::filter::*;
use vigil_wire::verdict::v4;

const SEC: u64 = 1_000_000_000;

fn metric(name: &str, value: f64, unit: &str) {
    println!("{{\"metric\":\"{name}\",\"value\":{value:.3},\"unit\":\"{unit}\"}}");
}

/// Run `step` in batches until `dur` has passed; returns (operations, elapsed).
fn timed(dur: Duration, batch: u64, mut step: impl FnMut(u64)) -> (u64, Duration) {
    let start = Instant::now();
    let mut ops = 0u64;
    loop {
        for i in 0..batch {
            step(ops + i);
        }
        ops += batch;
        let el = start.elapsed();
        if el >= dur {
            return (ops, el);
        }
    }
}

// --- Minimal frame writer (the bench must not depend on dev-dependencies' builders). ---

fn csum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Ethernet + IPv4 + TCP (flags byte `flags`) frame of `frame_len` bytes.
fn tcp_frame(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    flags: u8,
    frame_len: usize,
) -> Vec<u8> {
    let mut f = vec![0u8; frame_len.max(54)];
    f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip_len = f.len() - 14;
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let c = csum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let tcp = &mut f[34..54];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    f
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const SYN_ACK: u8 = 0x12;
const PSH_ACK: u8 = 0x18;

fn leak<T: Clone>(v: T, n: usize) -> &'static mut [T] {
    Box::leak(vec![v; n].into_boxed_slice())
}

/// A filter with `flows` established TCP flows tenant:port → server:80 and the data frames of
/// both directions, `frame_len` bytes each.
fn setup(flows: usize, frame_len: usize) -> (Filter<'static>, Vec<(Direction, Vec<u8>)>) {
    let mut f = Filter::new(
        leak(FlowSlot::EMPTY, slots_for(flows)),
        leak(VerdictSlot::EMPTY, 16),
        leak(IndexSlot::EMPTY, 32),
        // One tenant holds every flow of the benchmark.
        Config {
            flow_quota: Some(usize::MAX),
            ..Config::default()
        },
    )
    .unwrap();
    let (tenant, server) = ([10, 0, 0, 2], [10, 0, 1, 5]);
    f.apply(
        &VerdictRepr {
            op: Op::Add,
            tenant: 1,
            seq: 1,
            lifetime_ms: 0,
            rule: Rule {
                remote_addr: v4(server),
                remote_prefix: 32,
                remote_port_min: 80,
                remote_port_max: 80,
                ..Rule::any_port(Direction::Egress, IpVersion::V4, Protocol::Tcp)
            },
        },
        0,
    )
    .unwrap();
    let mut data = Vec::with_capacity(flows * 2);
    for i in 0..flows {
        let port = 10_000 + i as u16;
        let steps = [
            (
                Direction::Egress,
                tcp_frame(tenant, server, port, 80, SYN, 64),
            ),
            (
                Direction::Ingress,
                tcp_frame(server, tenant, 80, port, SYN_ACK, 64),
            ),
            (
                Direction::Egress,
                tcp_frame(tenant, server, port, 80, ACK, 64),
            ),
        ];
        for (dir, fr) in steps {
            assert_eq!(f.process(1, dir, &fr, SEC), Decision::Forward);
        }
        data.push((
            Direction::Egress,
            tcp_frame(tenant, server, port, 80, PSH_ACK, frame_len),
        ));
        data.push((
            Direction::Ingress,
            tcp_frame(server, tenant, 80, port, PSH_ACK, frame_len),
        ));
    }
    (f, data)
}

fn throughput(frame_len: usize) -> f64 {
    let (mut f, frames) = setup(1024, frame_len);
    // A mask, not `%`: a 64-bit division would cost as much as a good part of the filter.
    assert!(frames.len().is_power_of_two());
    let mask = frames.len() as u64 - 1;
    let mut run = |dur| {
        timed(dur, 4096, |i| {
            let (dir, fr) = &frames[(i & mask) as usize];
            let d = f.process(1, *dir, black_box(fr), black_box(2 * SEC));
            black_box(d);
        })
    };
    run(Duration::from_millis(300));
    let (ops, el) = run(Duration::from_millis(1500));
    assert_eq!(
        f.counters().drops.iter().sum::<u64>(),
        0,
        "bench frames must pass"
    );
    ops as f64 / el.as_secs_f64()
}

/// xorshift64* for reproducible keys and shuffles.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// A zeroed slot array on 2 MiB-aligned memory advised for transparent huge pages, as the
/// micro-VM maps its tables with large pages: with 4 KiB pages a 1M-flow table costs a TLB miss
/// (a two-dimensional page walk under virtualization) per lookup, which the guest does not pay.
fn huge_slots(n: usize) -> &'static mut [FlowSlot] {
    const HUGE: usize = 2 << 20;
    let bytes = (n * std::mem::size_of::<FlowSlot>()).div_ceil(HUGE) * HUGE;
    // SAFETY: a fresh private anonymous mapping (zero-filled by the kernel, advised before the
    // first touch so the faults allocate huge pages), aligned by hand within an over-sized
    // mapping. An all-zero FlowSlot is FlowSlot::EMPTY (integers and arrays, kind 0 = empty), so
    // the slice is initialised. Leaked on purpose.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            bytes + HUGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        let aligned = (p as usize).div_ceil(HUGE) * HUGE;
        libc::madvise(aligned as *mut libc::c_void, bytes, libc::MADV_HUGEPAGE);
        std::slice::from_raw_parts_mut(aligned as *mut FlowSlot, n)
    }
}

/// ns per lookup: one at a time, and in prefetched bursts of 16.
fn lookup_ns(entries: usize) -> (f64, f64) {
    let slots = huge_slots(slots_for(entries));
    let mut ct = Conntrack::new(slots, 0x1234_5678).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut keys = Vec::with_capacity(entries);
    let verdict = VerdictRef { slot: 0, gen: 0 };
    while keys.len() < entries {
        let r = rng.next();
        let key = FlowKey {
            tenant: 1 + (r % 64) as u32,
            ip_version: IpVersion::V4,
            protocol: Protocol::Tcp,
            local: v4([10, 0, (r >> 8) as u8, (r >> 16) as u8]),
            remote: v4([(r >> 24) as u8 | 1, (r >> 32) as u8, (r >> 40) as u8, 7]),
            local_port: (r >> 48) as u16,
            remote_port: 443,
        };
        let h = ct.hash(&key);
        if let Probe::Vacant(i) = ct.lookup(&key, h, 0) {
            ct.insert(
                i,
                &key,
                Direction::Egress,
                TcpState::Established,
                verdict,
                u32::MAX,
            );
            keys.push(key);
        }
    }
    // Visit in a shuffled order so consecutive lookups do not share cache lines.
    for i in (1..keys.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        keys.swap(i, j);
    }
    assert!(keys.len().is_power_of_two());
    let mask = keys.len() as u64 - 1;
    let mut found = 0u64;
    let mut run = |dur| {
        timed(dur, 4096, |i| {
            let k = &keys[(i & mask) as usize];
            let p = ct.lookup(black_box(k), ct.hash(k), black_box(10));
            found += u64::from(matches!(p, Probe::Found(_)));
        })
    };
    run(Duration::from_millis(300));
    let (ops, el) = run(Duration::from_millis(1500));
    let single = el.as_nanos() as f64 / ops as f64;
    // Burst mode: hash and prefetch 16 keys, then look them up (what a packet loop does with a
    // burst of frames from a virtio ring).
    const BURST: usize = 16;
    let mut hashes = [0u32; BURST];
    let mut run_burst = |dur| {
        timed(dur, 256, |i| {
            let base = ((i * BURST as u64) & mask) as usize;
            let burst = &keys[base..base + BURST];
            for (h, k) in hashes.iter_mut().zip(burst) {
                *h = ct.hash(black_box(k));
                ct.prefetch(*h);
            }
            for (h, k) in hashes.iter().zip(burst) {
                let p = ct.lookup(k, *h, black_box(10));
                found += u64::from(matches!(p, Probe::Found(_)));
            }
        })
    };
    run_burst(Duration::from_millis(300));
    let (ops, el) = run_burst(Duration::from_millis(1500));
    let burst = el.as_nanos() as f64 / (ops * BURST as u64) as f64;
    assert_eq!(found, black_box(found));
    (single, burst)
}

/// SYNs per second through the edge filter, from random sources to one open port: with the SYN
/// proxy engaged (every SYN answered with a cookie) or off (every SYN forwarded, half-open entries
/// evicted at their limit).
fn syn_flood_pps(proxy: bool) -> f64 {
    let mut f = Filter::new(
        leak(FlowSlot::EMPTY, slots_for(1 << 16)),
        leak(VerdictSlot::EMPTY, 16),
        leak(IndexSlot::EMPTY, 32),
        Config {
            synproxy: proxy.then(|| SynProxy::new([3, 4])),
            ..Config::default()
        },
    )
    .unwrap();
    let tenant = [10, 66, 0, 2];
    f.apply(
        &VerdictRepr::attach(1, 1, None, Some((IpVersion::V4, v4(tenant)))),
        0,
    )
    .unwrap();
    let open = Rule {
        local_port: 7000,
        ..Rule::any(Direction::Ingress, IpVersion::V4, Protocol::Tcp)
    };
    f.apply(&VerdictRepr::add(1, 2, 0, open), 0).unwrap();
    let mut rng = Rng(0x5eed);
    let mut frames: Vec<Vec<u8>> = (0..4096)
        .map(|_| {
            let r = rng.next();
            let src = [
                100 + (r % 100) as u8,
                (r >> 8) as u8,
                (r >> 16) as u8,
                1 | (r >> 24) as u8,
            ];
            tcp_frame(src, tenant, (r >> 32) as u16 | 1024, 7000, SYN, 64)
        })
        .collect();
    let mut replies = EdgeReplies::new();
    let mut answered = 0u64;
    let mut run = |dur| {
        timed(dur, 4096, |i| {
            let fr = &mut frames[(i & 4095) as usize];
            let d = f.process_edge_mut(
                EdgeSide::Outside,
                EdgeSide::Cloud,
                black_box(fr),
                &mut replies,
                black_box(2 * SEC),
            );
            answered += u64::from(d == Decision::Answered);
        })
    };
    run(Duration::from_millis(300));
    let (ops, el) = run(Duration::from_millis(1500));
    if proxy {
        // All but the first few (before the proxy engaged) were answered with a cookie.
        assert!(answered > ops / 2, "the proxy answered {answered} of {ops}");
    }
    ops as f64 / el.as_secs_f64()
}

/// Frames per second through a switch's tenant port: 64-byte egress data frames of established
/// flows (`arp` false), or ARP requests for the gateway the switch learned from the uplink and
/// answers itself (`arp` true).
fn switch_port_pps(arp: bool) -> f64 {
    let (mut f, frames) = setup(1024, 64);
    let (mac, tenant, gw) = ([2, 0, 0, 0, 0, 2], [10, 0, 0, 2], [10, 0, 0, 1]);
    f.tenancy_mut().set_boot_port(0, UPLINK_TENANT);
    let attach =
        VerdictRepr::attach_with_mac(1, 9, Some(1), Some((IpVersion::V4, v4(tenant))), Some(mac));
    f.apply(&attach, 0).unwrap();
    let arp_frame = |op: u8, sha: [u8; 6], spa: [u8; 4], dst: [u8; 6], tpa: [u8; 4]| {
        let mut b = vec![0u8; 60];
        b[0..6].copy_from_slice(&dst);
        b[6..12].copy_from_slice(&sha);
        b[12..22].copy_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, op]);
        b[22..28].copy_from_slice(&sha);
        b[28..32].copy_from_slice(&spa);
        b[38..42].copy_from_slice(&tpa);
        b
    };
    let gw_mac = [2, 0, 0, 0, 0, 1];
    f.observe_uplink(&arp_frame(1, gw_mac, gw, [0xff; 6], tenant), 0);
    let egress: Vec<Vec<u8>> = if arp {
        vec![arp_frame(1, mac, tenant, [0xff; 6], gw)]
    } else {
        frames
            .into_iter()
            .filter(|(d, _)| *d == Direction::Egress)
            .map(|(_, fr)| fr)
            .collect()
    };
    assert!(egress.len().is_power_of_two());
    let mask = egress.len() as u64 - 1;
    let mut reply = [0u8; 128];
    let mut run = |dur| {
        timed(dur, 4096, |i| {
            let fr = &egress[(i & mask) as usize];
            match f.admit(1, black_box(fr), black_box(2 * SEC), &mut reply) {
                Admit::Pass => {
                    let d = f.process(1, Direction::Egress, fr, black_box(2 * SEC));
                    assert_eq!(d, Decision::Forward);
                }
                Admit::Reply(n) => {
                    black_box(&reply[..n]);
                }
                other => panic!("bench frame not admitted: {other:?}"),
            }
        })
    };
    run(Duration::from_millis(300));
    let (ops, el) = run(Duration::from_millis(1500));
    ops as f64 / el.as_secs_f64()
}

fn main() {
    // An optional argument restricts the run to metrics whose name contains it (for profiling).
    let only = std::env::args().nth(1).unwrap_or_default();
    let want = |name: &str| name.contains(only.as_str());
    if want("fw_native_mpps_64") {
        metric("fw_native_mpps_64", throughput(64) / 1e6, "Mpps");
    }
    if want("fw_native_switch_mpps_64") {
        metric(
            "fw_native_switch_mpps_64",
            switch_port_pps(false) / 1e6,
            "Mpps",
        );
    }
    if want("fw_native_arp_proxy_mpps") {
        metric(
            "fw_native_arp_proxy_mpps",
            switch_port_pps(true) / 1e6,
            "Mpps",
        );
    }
    if want("fw_native_gbps_1500") {
        let pps = throughput(1514);
        metric("fw_native_gbps_1500", pps * 1514.0 * 8.0 / 1e9, "Gbit/s");
    }
    for (name, entries) in [("1k", 1 << 10), ("1m", 1 << 20)] {
        let single = format!("conntrack_lookup_ns_{name}");
        let burst = format!("conntrack_lookup_ns_{name}_burst16");
        if want(&single) || want(&burst) {
            let (s, b) = lookup_ns(entries);
            metric(&single, s, "ns");
            metric(&burst, b, "ns");
        }
    }
    if want("flush_tenant_ms_50k") {
        let (mut f, _) = setup(50_000, 64);
        let start = Instant::now();
        f.apply(&VerdictRepr::flush_tenant(1, 2), SEC).unwrap();
        let elapsed = start.elapsed();
        assert_eq!(f.conntrack().used(), 0);
        assert_eq!(f.counters().flows_revoked, 50_000);
        metric("flush_tenant_ms_50k", elapsed.as_secs_f64() * 1e3, "ms");
    }
    if want("fw_native_syncookie_mpps") || want("fw_native_syn_mpps") {
        metric("fw_native_syn_mpps", syn_flood_pps(false) / 1e6, "Mpps");
        metric(
            "fw_native_syncookie_mpps",
            syn_flood_pps(true) / 1e6,
            "Mpps",
        );
    }
    let entry = std::mem::size_of::<FlowSlot>();
    if want("fw_flow_entry_bytes") {
        metric("fw_flow_entry_bytes", entry as f64, "bytes");
    }
}
