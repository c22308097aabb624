//! The soak: two in-process hosts (each with its switch micro-VM; uplinks are VXLAN endpoints
//! towards a local port nobody answers), and a loop that creates a tenant on host A, boots it,
//! migrates it live to host B and back, and deletes it. After every cycle the process's file
//! descriptors, threads and resident memory, each host's switch ports, its book of switch records
//! and its switch's active flows are read; after the loop they must be back where they were
//! after the first cycle (the warm-up: lazily made threads and caches).
//!
//! The tenant is the Debian kernel, booted but not waited for (its boot takes minutes on a host
//! that emulates ring 0): each cycle migrates it while its kernel runs early boot. No tenant
//! traffic flows here (tests/tests/supervisor.rs and cloud.rs cover that).
//!
//! Owns: the soak loop and its leak checks, shared by tests/tests/soak.rs (a short pass) and
//! `scripts/soak` (tests/examples/soak.rs). Must not: tolerate a leak silently.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm_host::{Host, VmSpec};

use crate::hosts::in_process_host;
use crate::workload::{idle_policy, vm_spec};
use crate::{tenant_dir, TempDir};

/// The soak tenant's RAM (MiB): larger than any allocator heap, so its mapping is told apart.
pub const GUEST_MIB: u64 = 128;

/// What the process holds at one point.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Resources {
    pub fds: usize,
    pub threads: usize,
    pub rss_kib: u64,
    /// Writable mappings of at least a tenant's guest RAM size ([`GUEST_MIB`]; a neighbour may
    /// be merged in): each holds a tenant's RAM (glibc's arena heaps are at most 64 MiB; the
    /// brk heap is left out).
    pub guest_maps: usize,
}

impl Resources {
    pub fn now() -> Resources {
        let count = |dir: &str| std::fs::read_dir(dir).map_or(0, |d| d.count());
        let rss_kib = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
            })
            .unwrap_or(0);
        let guest_maps = std::fs::read_to_string("/proc/self/maps").map_or(0, |maps| {
            maps.lines()
                .filter(|l| !l.ends_with("[heap]") && l.contains(" rw-p "))
                .filter_map(|l| {
                    let (a, b) = l.split_whitespace().next()?.split_once('-')?;
                    Some(u64::from_str_radix(b, 16).ok()? - u64::from_str_radix(a, 16).ok()?)
                })
                .filter(|&len| len >= GUEST_MIB << 20)
                .count()
        });
        Resources {
            guest_maps,
            fds: count("/proc/self/fd"),
            threads: count("/proc/self/task"),
            rss_kib,
        }
    }
}

/// What a host still holds of tenants: VMs, ports, booked attachments and verdicts, the
/// switch's active flows.
fn leftovers(host: &Host) -> Value {
    let status = host.switch_status();
    json!({
        "vms": host.list().len(),
        "ports_held": status.ports_held,
        "attachments": status.attachments,
        "verdicts": status.verdicts,
        "flows_active": host.switch_counters().map_or(u64::MAX, |c| c.flows_active),
        "switch_open": status.open,
    })
}

fn clean(v: &Value) -> bool {
    v["vms"] == 0
        && v["ports_held"] == 0
        && v["attachments"] == 0
        && v["verdicts"] == 0
        && v["flows_active"] == 0
        && v["switch_open"] == true
}

/// Runs `cycles` cycles (at least 2: the first is the warm-up) and returns the report; `Err`
/// says what failed or leaked.
pub fn soak(cycles: usize) -> Result<Value, String> {
    let cycles = cycles.max(2);
    vmm_core::events::bus().set_quiet(true);
    let dir = TempDir::new("vigil-soak");
    let keys = vmm_host::MigrationKeys::from_json(&crate::workload::migration_keys_json(&[
        "soak-a", "soak-b",
    ]))?;
    let a = in_process_host("soak-a", &dir, &keys);
    let b = in_process_host("soak-b", &dir, &keys);
    let mut spec: VmSpec = serde_json::from_value(vm_spec(
        &tenant_dir(),
        "soak",
        "10.91.0.2",
        "52:54:00:91:00:02",
        &idle_policy(),
    ))
    .map_err(|e| e.to_string())?;
    spec.memory_mib = GUEST_MIB;
    let started = Instant::now();
    let mut baseline = None;
    let mut last = Resources::now();
    for cycle in 0..cycles {
        let step = |what: &str, e: vmm_host::HostError| format!("cycle {cycle}: {what}: {e}");
        let t = Instant::now();
        a.create(spec.clone()).map_err(|e| step("create", e))?;
        a.boot("soak").map_err(|e| step("boot", e))?;
        let running = Resources::now();
        eprintln!(
            "soak cycle {cycle}: created and booted in {:?}; {running:?}",
            t.elapsed()
        );
        if running.guest_maps == 0 {
            return Err(format!(
                "cycle {cycle}: no mapping of the tenant's RAM is seen"
            ));
        }
        for (from, to, name) in [(&a, &b, "b"), (&b, &a, "a")] {
            let port = crate::outside::free_tcp_port().map_err(|e| e.to_string())?;
            let url = format!("tcp:127.0.0.1:{port}");
            to.receive_migration(&url)
                .map_err(|e| step("receive-migration", e))?;
            let report = from
                .send_migration("soak", &url, Default::default())
                .map_err(|e| step("send-migration", e))?;
            eprintln!(
                "soak cycle {cycle}: migrated to {name} at {:?}: {report}",
                t.elapsed()
            );
        }
        a.delete("soak").map_err(|e| step("delete", e))?;
        eprintln!(
            "soak cycle {cycle}: deleted at {:?}; {:?}",
            t.elapsed(),
            Resources::now()
        );
        for host in [&a, &b] {
            let left = leftovers(host);
            if !clean(&left) {
                return Err(format!("cycle {cycle}: {} holds {left}", host.name()));
            }
        }
        // Threads that end on their own (a migration's receiver) may still be on their way out.
        let deadline = Instant::now() + Duration::from_secs(5);
        last = Resources::now();
        while let Some(base) = baseline.filter(|b: &Resources| b.threads < last.threads) {
            if Instant::now() >= deadline {
                return Err(format!(
                    "cycle {cycle}: {} threads, {} after warm-up",
                    last.threads, base.threads
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
            last = Resources::now();
        }
        if baseline.is_none() {
            baseline = Some(last);
        }
    }
    let base = baseline.unwrap_or(last);
    let report = json!({
        "cycles": cycles, "migrations": 2 * cycles, "seconds": started.elapsed().as_secs_f64(),
        "fds": [base.fds, last.fds], "threads": [base.threads, last.threads],
        "rss_kib": [base.rss_kib, last.rss_kib],
        "leaked_fds": last.fds.saturating_sub(base.fds),
        "leaked_threads": last.threads.saturating_sub(base.threads),
        "guest_maps": [base.guest_maps, last.guest_maps],
        "rss_growth_kib": last.rss_kib as i64 - base.rss_kib as i64,
        "host_a": leftovers(&a), "host_b": leftovers(&b),
    });
    a.shutdown();
    b.shutdown();
    if last.fds > base.fds || last.threads > base.threads || last.guest_maps > base.guest_maps {
        return Err(format!("leaked: {report}"));
    }
    Ok(report)
}
