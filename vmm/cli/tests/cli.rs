//! The `vigil` binary's front end: its commands parse, and bad arguments get a clear error.
//! (Its presence also makes `cargo test --workspace` build the binary that the end-to-end tests in
//! `tests/` drive.)

use std::process::Command;

fn vigil(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(args)
        .output()
        .expect("run vigil")
}

#[test]
fn host_info_names_the_kind_of_kvm() {
    let out = vigil(&["host-info"]);
    assert!(out.status.success(), "{out:?}");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("host-info is JSON");
    let kind = info["host_kind"].as_str().expect("a host_kind field");
    assert!(
        kind == "hardware" || kind == "emulating",
        "host_kind {kind:?}"
    );
}

#[test]
fn an_unknown_command_is_refused_with_usage() {
    let out = vigil(&["run-everything"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Usage"), "{err}");
}

#[test]
fn a_bad_net_spec_names_the_problem() {
    let out = vigil(&["run-microvm", "--elf", "/nonexistent", "--net", "bogus=1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--net"), "{err}");
}
