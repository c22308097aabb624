//! What waiting for the switch's word costs a granted call (see `vmm_core::verdict_region`): the
//! time from a call's verdict record entering the switch micro-VM's ring to the VMM having read
//! its outcome back (`VerdictRegion::deliver`), against the bare push the trap path did before
//! (`VerdictRegion::push`, no confirmation), on the same switch in the same run, in alternating
//! blocks so both see the same host load. Two spacings: back to back (the switch polls its ring)
//! and one call every 2 ms (the switch rests in its idle exit between calls and is woken by the
//! doorbell), as a tenant's calls come. Prints one JSON object per figure (see scripts/bench):
//!   verdict_confirm_us       p50 of a delivery that waits for the switch's outcome, spaced 2 ms
//!                            (with p90/p99/max, mean, and the back-to-back figures);
//!                            baseline_push_us: the bare push's p50; trap_path_us: the trap
//!                            path's delivery (it waits only when the switch's room does not
//!                            cover the call)
//!   verdict_confirm_added_us p50 trap-path delivery minus p50 bare push, spaced 2 ms
//!
//! Usage: cargo run --release -p vigil-tests --example verdict_confirm_bench -- [BLOCKS]
//! Needs root (network namespaces, /dev/kvm), the fw-guest ELF and the tenant image (created,
//! never booted).

use std::time::{Duration, Instant};

use serde_json::json;
use vigil_tests::restart::{egress, Rig};
use vigil_wire::verdict::{Op, Protocol, VerdictRepr};
use vmm_core::verdict_region::Delivered;

const PER_BLOCK: usize = 100;

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * q) as usize]
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

fn main() {
    let blocks: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    let rig = Rig::start("vc");
    let region = rig.host.switch_region_for_test().expect("a running switch");
    let record = VerdictRepr {
        op: Op::Add,
        tenant: vmm_core::introspect::tenant_id("t1"),
        seq: 1,
        lifetime_ms: 60_000,
        rule: egress(Protocol::Tcp, 7000),
    }
    .to_bytes();
    let mut results = Vec::new();
    for (label, spacing) in [
        ("spaced_2ms", Duration::from_millis(2)),
        ("back_to_back", Duration::ZERO),
    ] {
        // Three ways, in alternating blocks: the bare push (what the trap path did before), the
        // trap path's delivery now (no wait while the switch's room makes the verdict certain),
        // and a delivery that always waits for the switch's outcome (a tenant near its quota).
        let mut times: [Vec<f64>; 3] = Default::default();
        for _ in 0..blocks {
            for (way, samples) in times.iter_mut().enumerate() {
                for _ in 0..PER_BLOCK {
                    std::thread::sleep(spacing);
                    let t = Instant::now();
                    let outcome = match way {
                        0 => {
                            region.push(&[record]).expect("push");
                            Delivered::Certain
                        }
                        1 => region.deliver(&[record]),
                        _ => region.deliver_confirmed(&[record]),
                    };
                    samples.push(t.elapsed().as_secs_f64() * 1e6);
                    assert!(
                        matches!(outcome, Delivered::Applied(_) | Delivered::Certain),
                        "{outcome:?}"
                    );
                }
            }
        }
        let mut row = serde_json::Map::new();
        row.insert("spacing".into(), json!(label));
        row.insert("n".into(), json!(times[0].len()));
        for (name, samples) in ["push", "deliver", "confirmed"]
            .iter()
            .zip(times.iter_mut())
        {
            let m = mean(samples);
            row.insert(format!("{name}_mean_us"), json!(round(m)));
            for (q, tag) in [(0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (1.0, "max")] {
                row.insert(format!("{name}_{tag}_us"), json!(round(pct(samples, q))));
            }
        }
        results.push(serde_json::Value::Object(row));
    }
    let spaced = &results[0];
    let r = |k: &str| spaced[k].as_f64().unwrap();
    println!(
        "{}",
        json!({"metric": "verdict_confirm_us", "value": r("confirmed_p50_us"), "unit": "us",
            "baseline_push_us": r("push_p50_us"), "trap_path_us": r("deliver_p50_us"),
            "runs": results,
            "note": "a call's verdict pushed into the real switch micro-VM and its outcome read \
                back (confirmed), the trap path's delivery (waits only when the switch's published \
                room does not cover the call), and the bare push of the same record (baseline), \
                in alternating blocks in the same run; value: confirmed p50, one call every 2 ms"})
    );
    println!(
        "{}",
        json!({"metric": "verdict_confirm_added_us",
            "value": round(r("deliver_p50_us") - r("push_p50_us")), "unit": "us",
            "confirmed_added_us": round(r("confirmed_p50_us") - r("push_p50_us")),
            "note": "p50 trap-path delivery minus p50 bare push, one call every 2 ms (switch room \
                covers the call); confirmed_added_us: the same for a call that waits for the outcome"})
    );
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
