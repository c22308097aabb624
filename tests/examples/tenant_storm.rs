//! The storm: one Debian tenant (booted once: minutes on an emulating host) makes 10,000 socket
//! calls Vigil hooks as fast as it can, allowed and denied mixed (scripts/bench-tools/vigil-storm.c:
//! per round a connect and a sendto on a fresh UDP socket, a sendto on another, all allowed, and a
//! connect and a sendto the policy denies). Behind the tenant: the switch micro-VM, then an
//! outside network namespace that counts what arrives. Prints one JSON object per figure (see
//! scripts/bench):
//!   storm_calls                  hooked calls the guest made (its own count), with their
//!                                outcomes in the guest (allowed, EPERM; an allowed sendto whose
//!                                verdict a tier refused, e.g. the tenant's verdict quota, is
//!                                denied: counted as `sendto_refused`, its event must say so)
//!   storm_events_per_call        socket events the VMM emitted for them, per call (must be 1:
//!                                exactly one per call, by kind and verdict)
//!   storm_allowed_delivered      allowed calls' datagrams that arrived outside, of those sent (each
//!                                is numbered: every allowed flow usable means all of them)
//!   storm_denied_leaked          datagrams to the denied port that arrived outside (must be 0)
//!   storm_vmm_rss_mib            the VMM's resident memory when the storm starts and when it ends
//!   storm_calls_per_s            the rate the guest made them at
//! Exits non-zero (after printing) when the workload did not run as intended or a call got no
//! event or more than one.
//!
//! Usage: cargo run --release -p vigil-tests --example tenant_storm -- [ROUNDS]   (5 calls each,
//! default 2000). Needs root (network namespace, /dev/kvm), cc with a static libc, the fw-guest
//! ELF and the tenant image (`$VIGIL_TENANT_DIR`, default build/tenant: only read; the storm
//! tool goes into a copy of its initramfs, as a second cpio archive the kernel unpacks after it).

use std::collections::{BTreeMap, BTreeSet};
use std::net::UdpSocket;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vigil_tests::{fw_guest_elf, tenant_dir, workload, Namespace, Stream, TempDir, VigilCommand};

const HOST_IP: &str = "10.78.0.1";
const GUEST_IP: &str = "10.78.0.2";
const ALLOW_C: u16 = 7201;
const ALLOW_S: u16 = 7202;
const DENY: u16 = 7203;
/// The whole run: the boot and the storm.
const LIMIT: Duration = Duration::from_secs(2700);

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Collects the payloads arriving on `socket` until `stop`.
fn sink(socket: UdpSocket, stop: Arc<AtomicBool>) -> JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::Relaxed) {
            if let Ok(n) = socket.recv(&mut buf) {
                got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        while let Ok(n) = socket.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        got
    })
}

/// The tenant's initramfs plus a second archive holding bin/vigil-storm, built here.
fn initramfs_with_storm(work: &Path) -> Result<std::path::PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tree = work.join("tree");
    std::fs::create_dir_all(tree.join("bin"))?;
    let built = Command::new("cc")
        .args(["-static", "-Os", "-Wall", "-o"])
        .arg(tree.join("bin/vigil-storm"))
        .arg(root.join("scripts/bench-tools/vigil-storm.c"))
        .status()?;
    if !built.success() {
        return Err("cc -static vigil-storm.c failed (needs gcc and libc6-dev)".into());
    }
    let extra = work.join("storm.cpio");
    let packed = Command::new("python3")
        .arg(root.join("scripts/tenant/mkcpio.py"))
        .arg(&tree)
        .arg(&extra)
        .status()?;
    if !packed.success() {
        return Err("mkcpio.py failed".into());
    }
    let out = work.join("initramfs.cpio");
    let mut bytes = std::fs::read(tenant_dir().join("initramfs.cpio"))?;
    bytes.extend(std::fs::read(&extra)?);
    std::fs::write(&out, bytes)?;
    Ok(out)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() -> Result<()> {
    let rounds: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(2000);
    let work = TempDir::new("vigil-storm");
    let initramfs = initramfs_with_storm(work.path())?;
    let ns = format!("vigil-st{}", std::process::id());
    let tap = "vst0";
    let outside = Namespace::create(&ns, tap, HOST_IP);
    let stop = Arc::new(AtomicBool::new(false));
    let sinks: Vec<_> = [ALLOW_C, ALLOW_S, DENY]
        .into_iter()
        .map(|port| sink(outside.udp_socket((HOST_IP, port)), stop.clone()))
        .collect();
    let policy = work.join("policy.json");
    std::fs::write(
        &policy,
        json!({"allow": [{"op": "connect", "exe": "/bin/vigil-storm", "protocol": "udp",
            "cidr": format!("{HOST_IP}/32"), "ports": format!("{ALLOW_C}-{ALLOW_S}")}]})
        .to_string(),
    )?;
    let script = format!("vigil-storm {rounds} {HOST_IP} {ALLOW_C} {ALLOW_S} {DENY}\n");
    let vigil = VigilCommand::new("storm")
        .tsc_dilation()
        .quiet_stdout()
        .args(["run-tenant", "--kernel"])
        .arg(tenant_dir().join("vmlinuz"))
        .arg("--initramfs")
        .arg(&initramfs)
        .arg("--policy")
        .arg(&policy)
        .args(["--cmdline", &workload::cmdline(GUEST_IP, HOST_IP, &script)])
        .arg("--switch")
        .arg(fw_guest_elf())
        .args(["--uplink", &format!("tap={tap},netns={ns}")])
        .args(["--timeout", &LIMIT.as_secs().to_string()])
        .spawn()?;
    let pid = vigil.id();
    eprintln!("tenant_storm: booting the Debian tenant (minutes on an emulating host)");

    // Every stdout line, and the VMM's RSS and the time as the storm starts and ends.
    let lines = Mutex::new(Vec::new());
    let mut marks = BTreeMap::new();
    for marker in ["VIGIL-STORM start", "VIGIL-STORM end"] {
        vigil.wait_line(LIMIT, marker, |line| {
            if line.stream == Stream::Stdout {
                lines.lock().unwrap().push(line.text.clone());
            }
            line.stream == Stream::Stdout && line.text.contains(marker)
        })?;
        marks.insert(marker, (Instant::now(), rss_kib(pid)));
        eprintln!("tenant_storm: {marker}");
    }
    let finished = vigil.finish();
    let mut lines = lines.into_inner().unwrap();
    lines.extend(finished.stdout);
    stop.store(true, Ordering::Relaxed);
    let received: Vec<Vec<String>> = sinks.into_iter().map(|s| s.join().unwrap()).collect();
    if !finished.status.success() {
        return Err(format!("vigil run-tenant failed: {}", finished.stderr).into());
    }

    // The guest's own count of its calls.
    let counts_line = lines
        .iter()
        .find(|l| l.contains("VIGIL-STORM counts"))
        .ok_or("vigil-storm printed no counts")?;
    let counts: BTreeMap<&str, u64> = counts_line
        .split_whitespace()
        .filter_map(|f| f.split_once('='))
        .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
        .collect();
    let count = |k: &str| counts.get(k).copied().unwrap_or(0);
    let calls = count("connect_ok")
        + count("connect_eperm")
        + count("sendto_ok")
        + count("sendto_eperm")
        + count("sendto_refused");

    // The VMM's socket events for the storm's calls, by kind and verdict.
    let mut events: BTreeMap<(String, String), u64> = BTreeMap::new();
    // Denied sendmsg events that name a refused verdict (the tiers' word, not the policy's).
    let mut refused_events = 0u64;
    for line in &lines {
        let Ok(e) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if e["event"] == "socket" && e["process"]["exe"] == "/bin/vigil-storm" {
            let key = (
                e["op"].as_str().unwrap_or("?").to_string(),
                e["verdict"].as_str().unwrap_or("?").to_string(),
            );
            if key.0 == "sendmsg"
                && key.1 == "deny"
                && e["error"].as_str().is_some_and(|m| m.contains("refused"))
            {
                refused_events += 1;
            }
            *events.entry(key).or_default() += 1;
        }
    }
    let event = |op: &str, verdict: &str| {
        events
            .get(&(op.to_string(), verdict.to_string()))
            .copied()
            .unwrap_or(0)
    };
    let total_events: u64 = events.values().sum();
    let expected = [
        ("connect", "allow", count("connect_ok")),
        ("connect", "deny", count("connect_eperm")),
        ("sendmsg", "allow", count("sendto_ok")),
        (
            "sendmsg",
            "deny",
            count("sendto_eperm") + count("sendto_refused"),
        ),
    ];
    let by_kind_exact = expected.iter().all(|(op, v, n)| event(op, v) == *n)
        && refused_events == count("sendto_refused");

    // Outside: every allowed datagram, each exactly once; nothing to the denied port.
    let wanted = |prefix: &str| -> BTreeSet<String> {
        (0..rounds).map(|i| format!("{prefix}{i}")).collect()
    };
    let got_c: BTreeSet<String> = received[0].iter().cloned().collect();
    let got_s: BTreeSet<String> = received[1].iter().cloned().collect();
    let delivered = (got_c.intersection(&wanted("c")).count()
        + got_s.intersection(&wanted("s")).count()) as u64;
    let leaked = received[2].len() as u64;
    // The switch's own account (its vm_stopped outcome): what it did with the verdicts.
    let switch = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["event"] == "vm_stopped" && !e["outcome"]["firewall"].is_null())
        .map(|e| {
            let f = &e["outcome"]["firewall"];
            json!({"verdicts_applied": f["verdicts_applied"], "verdicts_rejected":
                f["verdicts_rejected"], "flows_created": f["flows_created"], "drops": f["drops"]})
        })
        .unwrap_or(Value::Null);
    let (start, rss_before) = marks["VIGIL-STORM start"];
    let (end, rss_after) = marks["VIGIL-STORM end"];
    let seconds = end.duration_since(start).as_secs_f64();

    let print = |v: Value| println!("{v}");
    print(
        json!({"metric": "storm_calls", "value": calls, "unit": "count", "rounds": rounds,
        "guest": counts_line.trim(), "unexpected_in_guest": count("unexpected")}),
    );
    print(json!({"metric": "storm_events_per_call",
        "value": if calls > 0 { total_events as f64 / calls as f64 } else { 0.0 },
        "unit": "ratio", "events": total_events, "calls": calls, "by_kind_exact": by_kind_exact,
        "refused_events": refused_events, "refused_in_guest": count("sendto_refused"),
        "events_by_kind": events.iter().map(|((o, v), n)| (format!("{o}/{v}"), *n)).collect::<BTreeMap<_, _>>(),
        "goal": "1, by kind and verdict"}));
    print(
        json!({"metric": "storm_allowed_delivered", "value": delivered, "unit": "datagrams",
        "sent": count("sendto_ok"), "goal": "all", "goal_met": delivered == count("sendto_ok"),
        "switch": switch}),
    );
    print(
        json!({"metric": "storm_denied_leaked", "value": leaked, "unit": "datagrams",
        "goal": 0}),
    );
    print(
        json!({"metric": "storm_vmm_rss_mib", "value": round1(rss_after), "unit": "MiB",
        "before_mib": round1(rss_before), "after_mib": round1(rss_after),
        "growth_mib": round1(rss_after.saturating_sub(rss_before)),
        "note": "VmRSS of the vigil process (guest pages it touched included) at the storm's start and end markers"}),
    );
    print(
        json!({"metric": "storm_calls_per_s", "value": (calls as f64 / seconds).round(),
        "unit": "1/s", "seconds": seconds}),
    );

    if count("unexpected") != 0 || calls != 5 * rounds {
        return Err(format!("the storm did not run as intended: {counts_line}").into());
    }
    if total_events != calls || !by_kind_exact {
        return Err(format!("{total_events} events for {calls} calls: {events:?}").into());
    }
    Ok(())
}

fn round1(kib: u64) -> f64 {
    (kib as f64 / 1024.0 * 10.0).round() / 10.0
}
