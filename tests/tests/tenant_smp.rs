//! End to end on the Debian tenant with two vCPUs, then with four: one boot each for every check
//! (a boot takes minutes on a host whose KVM emulates guest ring 0; the two never run at once):
//!
//! - Every vCPU completes system calls: the guest boots to its workload with both CPUs online and
//!   no process or kernel fault in its log (on an emulating host the syscall fix must be armed on
//!   each vCPU before it first runs user code).
//! - Every vCPU traps the hooks: pinned to each CPU in turn (busybox `taskset`), a denied connect
//!   fails with EPERM, an allowed one reaches its listener, and a sendto the policy does not allow
//!   is refused by the software-breakpoint hook; the events say on which vCPU.
//! - Write traps arm with several vCPUs (the others paused while the memory slots change).

use std::io::Write;
use std::sync::Mutex;

use vigil_tests::events::{events_of, vm_stopped};
use vigil_tests::workload::{self, find_check};
use vigil_tests::{tenant_dir, Finished, TempDir, VigilCommand};

/// One tenant boot at a time: two at once on a small host would each take twice as long.
static ONE_BOOT: Mutex<()> = Mutex::new(());

const POLICY: &str = r#"{"allow": [
  {"op": "connect", "exe": "/bin/busybox", "protocol": "tcp", "cidr": "127.0.0.0/8", "ports": "7000"},
  {"op": "bind", "exe": "/bin/busybox", "ports": "7000"},
  {"op": "listen", "exe": "/bin/busybox"}
]}"#;

/// The workload: for each CPU, a listener on 7000, then (pinned to that CPU) the allowed connect,
/// a denied one from a copy of busybox, a denied sendto; then the guest's own record of faults.
fn script(vcpus: u32) -> String {
    let mut script = String::from(
        "echo \"VIGIL-CHECK cpus $(nproc)\"\n\
         cp /bin/busybox /tmp/busybox-other\n",
    );
    for cpu in 0..vcpus {
        let mask = 1u32 << cpu;
        script.push_str(&format!(
            "nc -l -p 7000 -e echo served-on-{cpu} &\n\
             listener=$!\n\
             {wait}\
             echo \"VIGIL-CHECK on-cpu-{cpu} $(taskset {mask} cat /proc/self/stat | cut -d' ' -f39)\"\n\
             echo \"VIGIL-CHECK allowed-connect-{cpu} $(taskset {mask} nc -w 30 127.0.0.1 7000 </dev/null 2>&1)\"\n\
             echo \"VIGIL-CHECK denied-connect-{cpu} $(taskset {mask} /tmp/busybox-other nc -w 30 127.0.0.1 7000 </dev/null 2>&1)\"\n\
             echo \"VIGIL-CHECK denied-sendto-{cpu} $(taskset {mask} vigil-sendto 127.0.0.1 9998 must-not-leave 2>&1)\"\n\
             kill $listener 2>/dev/null\n",
            wait = workload::wait_listening(7000),
        ));
    }
    script.push_str(
        "echo \"VIGIL-CHECK faults $(dmesg | grep -ciE 'segfault|oops|bug:|general protection|invalid opcode|traps:')\"\n\
         dmesg | grep -iE 'segfault|oops|bug:|general protection|invalid opcode|traps:' | head -n 5\n",
    );
    script
}

/// No network: the image skips its interface set-up without `vigil.ip`.
fn cmdline(script: &str) -> String {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(script.as_bytes()).unwrap();
    let encoded = workload::base64(&gz.finish().unwrap());
    format!("console=ttyS0 reboot=k panic=-1 quiet vigil.run={encoded}")
}

#[test]
#[ignore = "boots the Debian tenant with 2 vCPUs: 5-15 min on an emulating KVM host; scripts/test runs it (not with --quick)"]
fn debian_tenant_on_two_vcpus() {
    boot_and_check(2);
}

#[test]
#[ignore = "boots the Debian tenant with 4 vCPUs: 5-15 min on an emulating KVM host; scripts/test runs it (not with --quick)"]
fn debian_tenant_on_four_vcpus() {
    boot_and_check(4);
}

fn boot_and_check(vcpus: u32) {
    let _one = ONE_BOOT.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tenant_dir();
    let work = TempDir::new("vigil-smp");
    let policy = work.join("policy.json");
    std::fs::write(&policy, POLICY).unwrap();
    let vigil = VigilCommand::new("tenant-smp")
        .tsc_dilation()
        .args(["run-tenant", "--kernel"])
        .arg(dir.join("vmlinuz"))
        .arg("--initramfs")
        .arg(dir.join("initramfs.cpio"))
        .arg("--policy")
        .arg(&policy)
        .args(["--vcpus", &vcpus.to_string()])
        .args(["--cmdline", &cmdline(&script(vcpus))])
        .args(["--marker", "VIGIL-INIT-START", "--timeout", "2700"])
        .spawn()
        .expect("start vigil");
    let Finished {
        status,
        stdout: lines,
        stderr,
    } = vigil.finish();
    drop(work);
    let console = lines.join("\n");
    assert!(status.success(), "vigil failed: {stderr}\n{console}");
    let check = |name: &str| -> &String {
        find_check(&lines, name).unwrap_or_else(|| panic!("check {name} did not run:\n{console}"))
    };
    let value = |name: &str| check(name).rsplit(' ').next().unwrap_or("").to_string();

    assert_eq!(value("cpus"), vcpus.to_string(), "{console}");
    let events = events_of(&lines, "socket");
    for cpu in 0..vcpus {
        assert_eq!(
            value(&format!("on-cpu-{cpu}")),
            cpu.to_string(),
            "{console}"
        );
        assert!(
            check(&format!("allowed-connect-{cpu}")).ends_with(&format!("served-on-{cpu}")),
            "{console}"
        );
        assert!(
            check(&format!("denied-connect-{cpu}")).contains("Operation not permitted"),
            "{console}"
        );
        assert!(
            check(&format!("denied-sendto-{cpu}")).contains("Operation not permitted"),
            "{console}"
        );
        // The decisions were taken on that vCPU.
        for (op, exe) in [
            ("connect", "/tmp/busybox-other"),
            ("sendmsg", "/bin/vigil-sendto"),
        ] {
            assert!(
                events.iter().any(|e| e["op"] == op
                    && e["process"]["exe"] == exe
                    && e["verdict"] == "deny"
                    && e["vcpu"] == cpu),
                "no denied {op} by {exe} on vCPU {cpu}: {events:#?}"
            );
        }
    }
    assert_eq!(value("faults"), "0", "the guest logged faults:\n{console}");
    for bad in ["segfault", "Oops", "BUG:", "general protection"] {
        assert!(!console.contains(bad), "{bad} on the console:\n{console}");
    }

    let armed = events_of(&lines, "write_traps");
    assert_eq!(armed.len(), 1, "{armed:#?}");
    assert!(armed[0].get("error").is_none(), "{:#?}", armed[0]);
    assert!(
        !armed[0]["pages"].as_array().unwrap().is_empty(),
        "{:#?}",
        armed[0]
    );

    let event = vm_stopped(lines.iter().map(String::as_str))
        .find(|e| e["outcome"]["name"] == "tenant")
        .unwrap_or_else(|| panic!("no vm_stopped event:\n{console}"));
    let outcome = &event["outcome"];
    assert_eq!(outcome["stop"]["reason"], "poweroff", "{outcome}");
    let stats = &outcome["stats"];
    assert_eq!(stats["hook_denials"], 2 * vcpus, "{stats}");
}
