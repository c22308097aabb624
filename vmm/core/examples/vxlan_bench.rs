//! The cost per datagram of an edge's cloud port taking a VXLAN frame
//! (`Vxlan::accept_datagram`: who sent it, whose addresses it speaks for, decapsulation, MAC
//! learning, the copy), with and without address bindings, measured in the same run, rounds
//! alternating. The baseline is the trust-set check alone (the edge before bindings); the other
//! runs bind 256 and 4,096 addresses to hosts (the edge's firewall holds 256). No socket: the
//! datagrams are fed as the receive loop would after `recv_from`.
//!
//! Prints one JSON line per figure: `edge_vxlan_accept_ns_64` (no bindings: the baseline),
//! `edge_vxlan_accept_ns_64_bound` (with bindings: value at 256, and the 4,096 figure), and the
//! difference.
//!
//! Usage: `cargo run --release -p vmm-core --example vxlan_bench [ROUNDS]`

use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use vmm_core::devices::vxlan::{PeerTrust, Vxlan};

const VNI: u32 = 44;
/// Datagrams per timed batch.
const BATCH: usize = 1 << 20;
/// Distinct tenants (source MACs and addresses) the datagrams come from.
const TENANTS: usize = 64;

fn datagrams() -> Vec<Vec<u8>> {
    (0..TENANTS)
        .map(|t| {
            let mut d = vec![0x08, 0, 0, 0, 0, 0, VNI as u8, 0];
            d.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
            d.extend_from_slice(&[0x52, 0x54, 0, 0, 1, t as u8]);
            d.extend_from_slice(&[0x08, 0x00]);
            // IPv4 + UDP header and payload: a 64-byte frame in all.
            let mut ip = [0u8; 50];
            ip[0] = 0x45;
            ip[3] = 46;
            ip[8] = 64;
            ip[9] = 17;
            ip[12..16].copy_from_slice(&[10, 0, 0, t as u8 + 1]);
            ip[16..20].copy_from_slice(&[10, 66, 0, 1]);
            d.extend_from_slice(&ip);
            d
        })
        .collect()
}

/// An edge's endpoint trusting `host`, with `bound` addresses bound (the datagrams' own among
/// them, bound to `host`).
fn endpoint(host: IpAddr, bound: usize) -> Vxlan {
    let trust = PeerTrust::new();
    assert!(trust.trust(host));
    for n in 0..bound {
        let n = n as u32;
        let addr = if n < TENANTS as u32 {
            IpAddr::from([10, 0, 0, n as u8 + 1])
        } else {
            IpAddr::from((0x0b00_0000 + n).to_be_bytes())
        };
        assert!(trust.bind(addr, Some(host)));
    }
    Vxlan::bind("127.0.0.1:0".parse().unwrap(), vec![], VNI)
        .expect("bind")
        .with_trust(Arc::clone(&trust))
}

/// Nanoseconds per datagram over one batch.
fn batch(link: &Vxlan, from: SocketAddr, data: &[Vec<u8>], buf: &mut [u8]) -> f64 {
    let start = Instant::now();
    let mut taken = 0usize;
    for i in 0..BATCH {
        let d = &data[i % data.len()];
        taken += black_box(link.accept_datagram(black_box(d), from, buf)).is_some() as usize;
    }
    let ns = start.elapsed().as_nanos() as f64 / BATCH as f64;
    assert_eq!(taken, BATCH, "a datagram was refused");
    ns
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(7);
    let from: SocketAddr = "192.0.2.10:4789".parse().unwrap();
    let data = datagrams();
    let mut buf = vec![0u8; 2048];
    let links = [
        endpoint(from.ip(), 0),
        endpoint(from.ip(), 256),
        endpoint(from.ip(), 4096),
    ];
    // Warm up (tables learned, caches warm), then alternate.
    for link in &links {
        batch(link, from, &data, &mut buf);
    }
    let mut samples = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (i, link) in links.iter().enumerate() {
            samples[i].push(batch(link, from, &data, &mut buf));
        }
    }
    let [base, b256, b4k] = [0, 1, 2].map(|i| median(samples[i].clone()));
    let round = |x: f64| (x * 100.0).round() / 100.0;
    println!(
        "{}",
        serde_json::json!({"metric": "edge_vxlan_accept_ns_64", "value": round(base),
            "unit": "ns", "bound_addresses": 0, "rounds": rounds, "batch": BATCH,
            "samples": samples[0].iter().map(|x| round(*x)).collect::<Vec<_>>()})
    );
    println!(
        "{}",
        serde_json::json!({"metric": "edge_vxlan_accept_ns_64_bound", "value": round(b256),
            "unit": "ns", "bound_addresses": 256, "bound_4096_ns": round(b4k),
            "baseline_unbound_ns": round(base), "delta_ns": round(b256 - base),
            "delta_4096_ns": round(b4k - base), "rounds": rounds,
            "samples": samples[1].iter().map(|x| round(*x)).collect::<Vec<_>>(),
            "samples_4096": samples[2].iter().map(|x| round(*x)).collect::<Vec<_>>()})
    );
}
