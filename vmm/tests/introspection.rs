//! End to end: the unmodified Debian tenant under a policy. The VMM traps the kernel's socket LSM
//! hooks with hardware breakpoints and attributes each connect/bind to its process from outside
//! the guest. Two different executables connect to the same destination (one allowed, one
//! denied); a bind is decided the same way. Checked on both sides: the guest's own error messages
//! and the VMM's attributed event log.
//!
//! No network device is needed: the hooks run before routing, and loopback carries the allowed
//! connection.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

mod common;
use common::{base64, tenant_dir};

const POLICY: &str = r#"{"allow": [
  {"op": "connect", "exe": "/bin/busybox", "protocol": "tcp", "cidr": "127.0.0.0/8", "ports": "7000"},
  {"op": "bind", "exe": "/bin/busybox", "ports": "7000-7010"},
  {"op": "listen", "exe": "/bin/busybox"}
]}"#;

#[test]
#[ignore = "boots the Debian tenant: 15-25 min on an emulating KVM host; run with scripts/test --e2e"]
fn connects_and_binds_are_attributed_and_decided_from_outside_the_guest() {
    let dir = tenant_dir();
    let work = std::env::temp_dir().join(format!("vigil-introspection-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let policy = work.join("policy.json");
    std::fs::write(&policy, POLICY).unwrap();

    // busybox listens on 7000 (allowed bind + listen), busybox connects to it (allowed), a copy of
    // busybox under another name connects to the same port (denied) and binds 7001 (denied).
    let workload = "ip link set lo up\n\
        nc -l -p 7000 -e echo served-by-listener &\n\
        listener=$!\n\
        i=0; while ! netstat -ltn | grep -q ':7000 ' && [ $i -lt 200 ]; do i=$((i+1)); usleep 50000; done\n\
        echo \"VIGIL-CHECK allowed-connect $(nc -w 30 127.0.0.1 7000 </dev/null 2>&1)\"\n\
        cp /bin/busybox /tmp/busybox-other\n\
        echo \"VIGIL-CHECK denied-connect $(/tmp/busybox-other nc -w 30 127.0.0.1 7000 </dev/null 2>&1)\"\n\
        echo \"VIGIL-CHECK denied-bind $(/tmp/busybox-other nc -l -p 7001 </dev/null 2>&1)\"\n\
        kill $listener 2>/dev/null\n";
    let encoded = base64(workload.as_bytes());
    let cmdline = format!("console=ttyS0 reboot=k panic=-1 quiet vigil.run={encoded}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vigil"))
        // Fewer guest timer ticks per wall second on an emulating host (to /init: ~465 s with 8,
        // over 560 s without, measured); guest timeouts stretch by the same factor.
        .env("VIGIL_TSC_DILATION", "8")
        .args(["run-tenant", "--kernel"])
        .arg(dir.join("vmlinuz"))
        .arg("--initramfs")
        .arg(dir.join("initramfs.cpio"))
        .arg("--policy")
        .arg(&policy)
        .args(["--cmdline", &cmdline, "--timeout", "2700"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start vigil");
    let mut lines = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.expect("read vigil output");
        eprintln!("{line}");
        lines.push(line);
    }
    let status = child.wait().expect("wait for vigil");
    std::fs::remove_dir_all(&work).ok();
    let console = lines.join("\n");
    assert!(status.success(), "vigil failed:\n{console}");

    // Inside the guest: the allowed connection got the listener's answer, the denied ones failed
    // with EPERM.
    assert!(
        console.contains("VIGIL-CHECK allowed-connect served-by-listener"),
        "{console}"
    );
    let denied_connect = lines
        .iter()
        .find(|l| l.contains("VIGIL-CHECK denied-connect"))
        .expect("denied-connect ran");
    assert!(
        denied_connect.contains("Operation not permitted"),
        "{denied_connect}"
    );
    let denied_bind = lines
        .iter()
        .find(|l| l.contains("VIGIL-CHECK denied-bind"))
        .expect("denied-bind ran");
    assert!(
        denied_bind.contains("bind: Operation not permitted"),
        "{denied_bind}"
    );

    // Outside: every decision attributed to the right executable, with pids that match.
    let events: Vec<serde_json::Value> = lines
        .iter()
        .filter(|l| l.starts_with("{\"event\":\"socket\""))
        .map(|l| serde_json::from_str(l).expect("event is JSON"))
        .collect();
    let find = |op: &str, exe: &str, port: u64| {
        events
            .iter()
            .find(|e| e["op"] == op && e["process"]["exe"] == exe && e["port"] == port)
            .unwrap_or_else(|| panic!("no {op} event by {exe} on port {port} in {events:#?}"))
    };
    let allowed = find("connect", "/bin/busybox", 7000);
    assert_eq!(allowed["verdict"], "allow");
    assert_eq!(allowed["process"]["comm"], "nc");
    assert_eq!(allowed["addr"], "127.0.0.1");
    let denied = find("connect", "/tmp/busybox-other", 7000);
    assert_eq!(denied["verdict"], "deny");
    assert_ne!(allowed["process"]["pid"], denied["process"]["pid"]);
    assert!(denied["process"]["pid"].as_u64().unwrap() > 1);
    assert_eq!(find("bind", "/bin/busybox", 7000)["verdict"], "allow");
    assert_eq!(find("bind", "/tmp/busybox-other", 7001)["verdict"], "deny");
    assert!(
        events
            .iter()
            .any(|e| e["op"] == "listen" && e["verdict"] == "allow"),
        "the listener's listen() was trapped: {events:#?}"
    );

    let stopped: serde_json::Value = serde_json::from_str(
        lines
            .iter()
            .find(|l| l.contains("\"vm_stopped\""))
            .expect("vm_stopped"),
    )
    .unwrap();
    let stats = &stopped["outcome"]["stats"];
    assert_eq!(stats["hook_denials"], 2, "{stats}");
    assert_eq!(stopped["outcome"]["stop"]["reason"], "poweroff");
}
