//! Tenant workloads: a shell script run by the tenant image's /init, handed over on the kernel
//! command line, reporting each of its checks as a `VIGIL-CHECK <name> <result>` console line.

use std::io::Write;
use std::path::Path;

use serde_json::{json, Value};

/// The prefix of a workload's report lines on the tenant's console.
pub const CHECK: &str = "VIGIL-CHECK";

/// A `vm.create` body: the tenant image in `images` (see [`crate::tenant_dir`]), 128 MiB, on
/// the switch with `mac` and `ip`, under `policy`. No command line: the image boots to its
/// default (no workload).
pub fn vm_spec(images: &Path, id: &str, ip: &str, mac: &str, policy: &Value) -> Value {
    json!({
        "id": id,
        "kernel": images.join("vmlinuz"),
        "initramfs": images.join("initramfs.cpio"),
        "memory_mib": 128,
        "mac": mac,
        "ip": ip,
        "policy": policy,
    })
}

/// A migration keys file's text for `hosts` (`vigil host --migration-keys`): a fresh random
/// 256-bit key each.
pub fn migration_keys_json(hosts: &[&str]) -> String {
    use std::io::Read;
    let mut map = serde_json::Map::new();
    for host in hosts {
        let mut key = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut key))
            .expect("/dev/urandom");
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        map.insert((*host).into(), Value::String(hex));
    }
    Value::Object(map).to_string()
}

/// The policy of a tenant that is created but not driven: busybox may connect to
/// 10.0.0.1:80/tcp, nothing else.
pub fn idle_policy() -> Value {
    json!({"allow": [{"op": "connect", "exe": "/bin/busybox", "protocol": "tcp",
                      "cidr": "10.0.0.1/32", "ports": "80"}]})
}

/// The kernel command line that boots the tenant image with address `ip/24`, gateway `gw`, and
/// runs `script`. The script goes compressed: the command line holds 2048 bytes, the host
/// profile takes a third.
pub fn cmdline(ip: &str, gw: &str, script: &str) -> String {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(script.as_bytes()).unwrap();
    let encoded = base64(&gz.finish().unwrap());
    format!(
        "console=ttyS0 reboot=k panic=-1 quiet vigil.ip={ip}/24 vigil.gw={gw} vigil.run={encoded}"
    )
}

/// A script line that waits (up to 10 s) until something listens on TCP `port` in the tenant.
pub fn wait_listening(port: u16) -> String {
    format!(
        "i=0; while ! netstat -ltn | grep -q ':{port} ' && [ $i -lt 200 ]; do i=$((i+1)); \
         usleep 50000; done\n"
    )
}

/// The console line of check `name`, if it ran.
pub fn find_check<'a>(lines: &'a [String], name: &str) -> Option<&'a String> {
    let needle = format!("{CHECK} {name}");
    lines.iter().find(|l| l.contains(&needle))
}

/// Standard base64 (RFC 4648, padded), for a workload on the kernel command line.
pub fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        // RFC 4648 §10.
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain:?}");
        }
    }

    #[test]
    fn cmdline_carries_the_compressed_script() {
        let line = cmdline("10.0.0.2", "10.0.0.1", "echo hi\n");
        assert!(
            line.starts_with("console=ttyS0 reboot=k panic=-1 quiet "),
            "{line}"
        );
        assert!(
            line.contains(" vigil.ip=10.0.0.2/24 vigil.gw=10.0.0.1 vigil.run=H4sI"),
            "{line}"
        );
    }

    #[test]
    fn a_check_is_found_by_its_name() {
        let lines = vec![
            "boot".to_string(),
            format!("{CHECK} tcp-reply host-says-hello"),
        ];
        assert_eq!(
            find_check(&lines, "tcp-reply").map(String::as_str),
            Some("VIGIL-CHECK tcp-reply host-says-hello")
        );
        assert_eq!(find_check(&lines, "addr"), None);
    }
}
