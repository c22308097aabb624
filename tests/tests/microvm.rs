//! Boots the real fw-guest ELF (built by `scripts/build-fw-guest`) in the real VMM on /dev/kvm and
//! checks its ring-3 banner; feeds the CLI bad input and checks it fails clearly.

use std::process::Command;

use vigil_tests::{events, fw_guest_elf, run_vigil as vigil, TempDir};

fn stopped_event(stdout: &str) -> serde_json::Value {
    events::vm_stopped(stdout.lines())
        .next()
        .unwrap_or_else(|| panic!("no vm_stopped event in:\n{stdout}"))
}

fn boot(role: &str) -> (String, serde_json::Value) {
    let elf = fw_guest_elf();
    let out = vigil(&[
        "run-microvm",
        "--elf",
        elf.to_str().unwrap(),
        "--role",
        role,
        "--timeout",
        "60",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "vigil failed: {stderr}\n{stdout}");
    let event = stopped_event(&stdout);
    (stdout, event)
}

#[test]
fn microvm_boots_to_ring3_banner_and_exits_through_the_exit_port() {
    let (stdout, event) = boot("switch");
    let banner = stdout
        .lines()
        .find(|l| l.contains("vigil fw-guest:"))
        .unwrap_or_else(|| panic!("no banner in:\n{stdout}"));
    assert!(banner.contains("role=switch"), "{banner}");
    assert!(
        banner.contains("cpl=3"),
        "the banner must come from ring 3: {banner}"
    );
    assert_eq!(event["outcome"]["stop"]["reason"], "exit_code");
    assert_eq!(event["outcome"]["stop"]["detail"], 0);
}

#[test]
fn microvm_role_comes_from_the_vmm() {
    let (stdout, _) = boot("edge");
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("vigil fw-guest:") && l.contains("role=edge")),
        "{stdout}"
    );
}

#[test]
fn missing_elf_is_a_clear_error() {
    let out = vigil(&["run-microvm", "--elf", "/nonexistent/fw-guest"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read /nonexistent/fw-guest"),
        "{stderr}"
    );
}

#[test]
fn corrupt_elf_is_a_clear_error() {
    let dir = TempDir::new("vigil-corrupt");
    let bad = dir.join("garbage.elf");
    // An ELF magic followed by garbage: past the first check, wrong everywhere else.
    let mut bytes = b"\x7fELF".to_vec();
    bytes.extend((0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8));
    std::fs::write(&bad, &bytes).unwrap();
    let out = vigil(&["run-microvm", "--elf", bad.to_str().unwrap()]);
    drop(dir);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not a loadable ELF kernel"), "{stderr}");
}

#[test]
fn too_little_memory_is_a_clear_error() {
    let elf = fw_guest_elf();
    let out = vigil(&["run-microvm", "--elf", elf.to_str().unwrap(), "--mem", "1"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("MiB of memory"), "{stderr}");
}

/// A VMM nobody here wrote boots the same ELF: QEMU's microvm machine through the PVH note.
#[test]
fn qemu_boots_the_same_elf_to_its_ring3_banner() {
    let elf = fw_guest_elf();
    let out = Command::new("qemu-system-x86_64")
        .args([
            "-M", "microvm", "-accel", "kvm", "-accel", "tcg", "-m", "64",
        ])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .args([
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x01",
            "-append",
            "role=edge",
        ])
        .arg("-kernel")
        .arg(&elf)
        .output()
        .expect("qemu-system-x86_64 is missing: run scripts/setup");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("vigil fw-guest: role=edge cpl=3"),
        "QEMU did not show the banner: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // isa-debug-exit reports (code << 1) | 1: exit code 0 is status 1.
    assert_eq!(out.status.code(), Some(1));
}

/// Verdicts reach the micro-VM through the shared-memory ring the VMM reserves for it, and its
/// counters come back the same way: three valid records applied, a corrupt one rejected.
#[test]
fn microvm_takes_verdicts_from_the_ring_and_reports_counters() {
    use vigil_wire::verdict::{Direction, IpVersion, Op, Protocol, Rule, VerdictRepr};
    let records: Vec<String> = (1..=4u64)
        .map(|seq| {
            let mut rule = Rule::any_port(Direction::Egress, IpVersion::V4, Protocol::Tcp);
            rule.remote_addr[..4].copy_from_slice(&[10, 77, 0, seq as u8]);
            rule.remote_prefix = 32;
            let mut bytes = VerdictRepr {
                op: Op::Add,
                tenant: 7,
                seq,
                lifetime_ms: 0,
                rule,
            }
            .to_bytes();
            if seq == 4 {
                bytes[0] = 9; // no such op: the micro-VM must reject it, not guess
            }
            hex::encode(bytes)
        })
        .collect();
    let dir = TempDir::new("vigil-verdicts");
    let file = dir.join("verdicts.txt");
    // One plain hex line, the rest as the tenant's verdict events carry them.
    let mut text = format!("{}\n", records[0]);
    for r in &records[1..] {
        text.push_str(&format!("{{\"event\":\"verdict\",\"record\":\"{r}\"}}\n"));
    }
    std::fs::write(&file, text).unwrap();
    let elf = fw_guest_elf();
    let out = vigil(&[
        "run-microvm",
        "--elf",
        elf.to_str().unwrap(),
        "--verdicts",
        file.to_str().unwrap(),
        "--timeout",
        "60",
    ]);
    drop(dir);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("fw-guest: verdicts taken=4 applied=3 rejected=1"),
        "{stdout}"
    );
    let firewall = &stopped_event(&stdout)["outcome"]["firewall"];
    assert_eq!(firewall["verdicts_applied"], 3, "{firewall}");
    assert_eq!(firewall["verdicts_rejected"], 1, "{firewall}");
}

#[test]
fn malformed_verdicts_file_is_a_clear_error() {
    let dir = TempDir::new("vigil-badverdicts");
    let file = dir.join("verdicts.txt");
    std::fs::write(&file, "not a record\n").unwrap();
    let elf = fw_guest_elf();
    let out = vigil(&[
        "run-microvm",
        "--elf",
        elf.to_str().unwrap(),
        "--verdicts",
        file.to_str().unwrap(),
    ]);
    drop(dir);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 1"), "{stderr}");
}
