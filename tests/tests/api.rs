//! The host's REST API over its Unix socket, with real HTTP clients (curl, and Vigil's own
//! client that `vigil remote` uses) against a real `vigil host` process: its switch micro-VM
//! runs, tenants are Debian's kernel (created, booted, paused, resumed, snapshotted, restored,
//! deleted: none boots far, the test does not wait for the guest), bad input of every kind gets
//! a 4xx that says what is wrong, and the host keeps running and loses nothing.
//!
//! The switch's uplink is a VXLAN endpoint towards a local UDP port nobody answers: no edge and
//! no network namespace are needed here (the end-to-end test has both).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use vmm_api::http::{self, ClientResponse};

use vigil_tests::outside::free_tcp_port;
use vigil_tests::rest::{metric, request};
use vigil_tests::workload::{idle_policy, migration_keys_json, vm_spec};
use vigil_tests::{fw_guest_elf, tenant_dir, TempDir, VigilCommand, VigilProcess};

const TIMEOUT: Duration = Duration::from_secs(120);

struct Host {
    // Dropped in this order: the process (it removes its socket), then its directory.
    process: VigilProcess,
    socket: PathBuf,
    dir: TempDir,
}

fn start_host(name: &str) -> Host {
    let dir = TempDir::new(&format!("vigil-api-{name}"));
    let socket = dir.join("api.sock");
    let keys = dir.join("migration-keys.json");
    std::fs::write(&keys, migration_keys_json(&[name])).expect("keys file");
    let process = VigilCommand::new(format!("host {name}"))
        .args(["host", "--api-socket"])
        .arg(&socket)
        .arg("--switch-elf")
        .arg(fw_guest_elf())
        .args(["--uplink", "vxlan=127.0.0.1:9", "--tenant-ports", "2"])
        .args(["--name", name])
        .arg("--migration-keys")
        .arg(&keys)
        .start("serving")
        .expect("start vigil host");
    Host {
        process,
        socket,
        dir,
    }
}

fn call(socket: &Path, method: &str, path: &str, body: Option<&str>) -> ClientResponse {
    request(socket, method, path, body, TIMEOUT)
}

fn json_of(r: &ClientResponse) -> Value {
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&r.body)))
}

/// Status and error message of a call that must fail.
fn error_of(r: &ClientResponse) -> (u16, String) {
    let message = json_of(r)["error"]
        .as_str()
        .expect("an error body has an error message")
        .to_string();
    (r.status, message)
}

fn spec(id: &str, ip: &str, mac: &str) -> Value {
    vm_spec(&tenant_dir(), id, ip, mac, &idle_policy())
}

fn curl(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "120",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
    ])
    .arg("--unix-socket")
    .arg(socket)
    .args(["-X", method]);
    if let Some(body) = body {
        cmd.args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
        ]);
    }
    cmd.arg(format!("http://localhost/api/v1/{path}"));
    let out = cmd.output().expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').expect("curl printed the status");
    (
        code.trim().parse().expect("a status code"),
        body.to_string(),
    )
}

#[test]
fn every_endpoint_answers_and_bad_input_gets_a_clear_4xx() {
    let host = start_host("api");
    let s = &host.socket;

    // Reads on an empty host.
    let pong = call(s, "GET", "vmm.ping", None);
    assert_eq!(pong.status, 200);
    assert_eq!(json_of(&pong)["host"], "api");
    assert_eq!(json_of(&call(s, "GET", "vm.list", None)), json!([]));

    // Create: the VM exists, on switch port 1, not booted; both tiers were reconfigured.
    let web = spec("web", "10.0.0.2", "52:54:00:00:00:02");
    let created = call(s, "PUT", "vm.create", Some(&web.to_string()));
    assert_eq!(
        created.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&created.body)
    );
    let info = json_of(&created);
    assert_eq!(info["state"], "created");
    assert_eq!(info["switch_port"], 1);

    // Bad input: each is refused with a message naming the problem.
    let cases: Vec<(&str, &str, String, u16, &str)> = vec![
        ("PUT", "vm.create", "{\"id\": ".into(), 400, "EOF"),
        ("PUT", "vm.create", "[1,2]".into(), 400, "invalid type"),
        (
            "PUT",
            "vm.create",
            {
                let mut v = spec("x", "10.0.0.9", "52:54:00:00:00:09");
                v["gpu"] = json!(true);
                v.to_string()
            },
            400,
            "unknown field `gpu`",
        ),
        (
            "PUT",
            "vm.create",
            {
                let mut v = spec("x", "10.0.0.9", "52:54:00:00:00:09");
                v["memory_mib"] = json!("lots");
                v.to_string()
            },
            400,
            "invalid type",
        ),
        (
            "PUT",
            "vm.create",
            spec("x", "10.0.0.9", "01:00:5e:00:00:01").to_string(),
            400,
            "not a unicast MAC",
        ),
        (
            "PUT",
            "vm.create",
            spec("../etc", "10.0.0.9", "52:54:00:00:00:09").to_string(),
            400,
            "id",
        ),
        (
            "PUT",
            "vm.create",
            spec("switch", "10.0.0.9", "52:54:00:00:00:09").to_string(),
            400,
            "the host's own",
        ),
        (
            "PUT",
            "vm.create",
            {
                let mut v = spec("x", "10.0.0.9", "52:54:00:00:00:09");
                v["policy"]["allow"][0]["cidr"] = json!("not-a-net");
                v.to_string()
            },
            400,
            "policy",
        ),
        (
            "PUT",
            "vm.create",
            {
                let mut v = spec("x", "10.0.0.9", "52:54:00:00:00:09");
                v["kernel"] = json!("/nonexistent/vmlinuz");
                v.to_string()
            },
            400,
            "/nonexistent/vmlinuz",
        ),
        // A device would be read without end (the host's memory, every VM with it): refused
        // at once, as anything but a regular file within its bound.
        (
            "PUT",
            "vm.create",
            {
                let mut v = spec("x", "10.0.0.9", "52:54:00:00:00:09");
                v["kernel"] = json!("/dev/zero");
                v.to_string()
            },
            400,
            "not a regular file (a character device)",
        ),
        (
            "PUT",
            "vm.create",
            {
                let mut v = spec("x", "10.0.0.9", "52:54:00:00:00:09");
                v["initramfs"] = json!("/dev/urandom");
                v.to_string()
            },
            400,
            "not a regular file",
        ),
        // The host appends its own kernel options to the spec's command line: a quote left
        // open would swallow them into one value, and a `--` would hand them to init.
        (
            "PUT",
            "vm.create",
            {
                let mut v = spec("x", "10.0.0.9", "52:54:00:00:00:09");
                v["cmdline"] = json!("console=ttyS0 vigil.x=\"open");
                v.to_string()
            },
            400,
            "left open",
        ),
        (
            "PUT",
            "vm.create",
            {
                let mut v = spec("x", "10.0.0.9", "52:54:00:00:00:09");
                v["cmdline"] = json!("console=ttyS0 -- quiet");
                v.to_string()
            },
            400,
            "'--' ends the kernel's options",
        ),
        (
            "PUT",
            "vm.create",
            {
                let mut v = spec("x", "10.0.0.9", "52:54:00:00:00:09");
                v["cmdline"] = json!("console=ttyS0 \"--\"");
                v.to_string()
            },
            400,
            "'--' ends the kernel's options",
        ),
        (
            "PUT",
            "vm.create",
            {
                let mut v = spec("x", "10.0.0.9", "52:54:00:00:00:09");
                // U+00E0 is C3 A0 in UTF-8: the kernel takes 0xa0 for a space.
                v["cmdline"] = json!("console=ttyS0 vigil.x=\u{e0}");
                v.to_string()
            },
            400,
            "printable ASCII",
        ),
        ("PUT", "vm.create", web.to_string(), 409, "exists"),
        (
            "PUT",
            "vm.create",
            spec("other", "10.0.0.2", "52:54:00:00:00:03").to_string(),
            409,
            "already has ip",
        ),
        (
            "PUT",
            "vm.create",
            format!("{{\"id\":\"big\",\"pad\":\"{}\"}}", "x".repeat(300 * 1024)),
            413,
            "",
        ),
        (
            "GET",
            "vm.info?id=nobody",
            String::new(),
            404,
            "no VM with id",
        ),
        ("GET", "vm.info", String::new(), 400, "missing field `id`"),
        ("GET", "vm.info?id=web&id=web", String::new(), 400, "twice"),
        ("PUT", "vm.boot", "{\"id\": 7}".into(), 400, "invalid type"),
        (
            "PUT",
            "vm.pause",
            "{\"id\": \"web\"}".into(),
            409,
            "only a running VM pauses",
        ),
        (
            "PUT",
            "vm.resume",
            "{\"id\": \"web\"}".into(),
            409,
            "only a paused VM resumes",
        ),
        (
            "PUT",
            "vm.delete",
            "{\"id\": \"nobody\"}".into(),
            404,
            "no VM with id",
        ),
        ("GET", "vm.create", String::new(), 405, "PUT"),
        ("PUT", "vm.list", String::new(), 405, "GET"),
        ("GET", "vm.explode", String::new(), 404, "no endpoint"),
        (
            "PUT",
            "vm.snapshot",
            "{\"id\":\"web\",\"destination_url\":\"ftp://x\"}".into(),
            400,
            "file:///",
        ),
        (
            "PUT",
            "vm.send-migration",
            "{\"id\":\"web\",\"destination_url\":\"unix:/x\"}".into(),
            400,
            "tcp:HOST:PORT",
        ),
        (
            "PUT",
            "vm.send-migration",
            "{\"id\":\"web\",\"destination_url\":\"tcp:127.0.0.1:9\"}".into(),
            409,
            "only a running VM migrates",
        ),
        (
            "PUT",
            "vm.receive-migration",
            "{\"receiver_url\":\"unix:/x\"}".into(),
            400,
            "tcp:HOST:PORT",
        ),
        (
            "PUT",
            "vm.policy",
            "{\"id\":\"web\",\"policy\":{\"allow\":[{\"op\":\"teleport\"}]}}".into(),
            400,
            "unknown variant",
        ),
    ];
    for (method, path, body, status, needle) in &cases {
        let body = (!body.is_empty()).then_some(body.as_str());
        let r = call(s, method, path, body);
        assert_eq!(
            r.status,
            *status,
            "{method} {path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let (_, message) = error_of(&r);
        assert!(
            message.contains(needle),
            "{method} {path}: {message:?} does not say {needle:?}"
        );
    }

    // Two ids of one tenant number (FNV-1a 32 collides for these): the second would share the
    // first's verdicts, ports and flows at both tiers, so it is refused.
    let first = spec("t439599", "10.0.0.11", "52:54:00:00:00:11");
    let r = call(s, "PUT", "vm.create", Some(&first.to_string()));
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let r = call(
        s,
        "PUT",
        "vm.create",
        Some(&spec("t622382", "10.0.0.12", "52:54:00:00:00:12").to_string()),
    );
    assert_eq!(r.status, 409, "{:?}", String::from_utf8_lossy(&r.body));
    let (_, message) = error_of(&r);
    assert!(message.contains("same tenant number"), "{message}");
    let r = call(s, "PUT", "vm.delete", Some("{\"id\": \"t439599\"}"));
    assert_eq!(r.status, 204, "{:?}", String::from_utf8_lossy(&r.body));

    // Nothing was lost: one VM, created, its policy as given.
    let list = json_of(&call(s, "GET", "vm.list", None));
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(
        json_of(&call(s, "GET", "vm.policy?id=web", None)),
        web["policy"]
    );

    // Policy replace, read back.
    let new_policy = json!({"allow": [{"op": "bind", "exe": "/bin/busybox", "protocol": "any",
                                       "ports": "7000"}]});
    let r = call(
        s,
        "PUT",
        "vm.policy",
        Some(&json!({"id": "web", "policy": new_policy}).to_string()),
    );
    assert_eq!(r.status, 204);
    let got = json_of(&call(s, "GET", "vm.policy?id=web", None));
    assert_eq!(got["allow"][0]["op"], "bind");

    // Lifecycle: boot, pause, resume, snapshot, delete, restore (paused), resume, delete.
    for (method, path, state) in [
        ("PUT", "vm.boot", "running"),
        ("PUT", "vm.pause", "paused"),
        ("PUT", "vm.resume", "running"),
    ] {
        let r = call(s, method, path, Some("{\"id\":\"web\"}"));
        assert_eq!(
            r.status,
            200,
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(json_of(&r)["state"], state, "{path}");
    }
    let snap_dir = host.dir.join("snap");
    let r = call(
        s,
        "PUT",
        "vm.snapshot",
        Some(
            &json!({"id": "web", "destination_url": format!("file://{}", snap_dir.display())})
                .to_string(),
        ),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(json_of(&r)["pages_written"].as_u64().unwrap() > 0);
    let info = json_of(&call(s, "GET", "vm.info?id=web", None));
    assert_eq!(info["state"], "running");
    // Its one NIC's counters, as the contract names them.
    let net = info["net"].as_array().expect("vm.info has net");
    assert_eq!(net.len(), 1, "{info}");
    for field in ["rx_frames", "tx_frames", "queue_errors", "interrupts"] {
        assert!(net[0][field].is_u64(), "{field} in {info}");
    }
    // A migration to nowhere fails cleanly and the VM runs on.
    let r = call(
        s,
        "PUT",
        "vm.send-migration",
        Some(&json!({"id": "web", "destination_url": format!("tcp:127.0.0.1:{}", free_tcp_port().unwrap())}).to_string()),
    );
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        error_of(&r).1.contains("cannot reach"),
        "{:?}",
        error_of(&r)
    );
    assert_eq!(
        json_of(&call(s, "GET", "vm.info?id=web", None))["state"],
        "running"
    );

    assert_eq!(
        call(s, "PUT", "vm.delete", Some("{\"id\":\"web\"}")).status,
        204
    );
    assert_eq!(json_of(&call(s, "GET", "vm.list", None)), json!([]));
    let r = call(
        s,
        "PUT",
        "vm.restore",
        Some(&json!({"source_url": format!("file://{}", snap_dir.display())}).to_string()),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(json_of(&r)["state"], "paused");
    let r = call(s, "PUT", "vm.resume", Some("{\"id\":\"web\"}"));
    assert_eq!(json_of(&r)["state"], "running");
    // Its first resume announced it into its switch port (no edge here to wait for).
    let announced = host
        .process
        .wait_event(TIMEOUT, "announced", |e| e["event"] == "announced")
        .expect("the restored VM announced");
    assert_eq!(announced["edge_claim"], "none", "{announced}");
    assert!(announced["frames"].as_u64() >= Some(1), "{announced}");

    // Metrics: Prometheus text with the VM and the switch's counters; every create, policy and
    // delete reached the switch (4 control records at least: attach, flush+attach, flush, and
    // the restore's attach).
    let metrics = call(s, "GET", "metrics", None);
    assert_eq!(metrics.status, 200);
    let text = String::from_utf8_lossy(&metrics.body).to_string();
    assert!(text.contains("vigil_vms{state=\"running\"} 1"), "{text}");
    let applied: f64 = metric(&text, "vigil_switch_verdicts_applied_total")
        .expect("switch counters")
        .parse()
        .unwrap();
    assert!(applied >= 4.0, "{text}");

    // curl against every endpoint: each answers with something other than "no such route".
    for route in vmm_api::ROUTES {
        let path = match route.path {
            "vm.info" | "vm.policy" if route.method == http::Method::Get => {
                format!("{}?id=web", route.path)
            }
            "events" | "vmm.shutdown" => continue,
            other => other.to_string(),
        };
        let body = (route.method == http::Method::Put).then_some("{}");
        let (code, text) = curl(s, route.method.as_str(), &path, body);
        assert!(
            code != 404 || text.contains("no VM"),
            "curl {} {path}: {code} {text}",
            route.method
        );
        assert_ne!(code, 405, "curl {} {path}: {text}", route.method);
        assert!(code < 500, "curl {} {path}: {code} {text}", route.method);
    }
    // The event stream with curl: once its response head is out, the stream is subscribed, and
    // a delete shows up in it as a reconfiguration of both tiers.
    let mut events = Command::new("curl")
        .args(["-sS", "-N", "--max-time", "60", "--unix-socket"])
        .arg(s)
        .arg("http://localhost/api/v1/events")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut event_lines = BufReader::new(events.stdout.take().unwrap()).lines();
    let hello: Value = serde_json::from_str(&event_lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(hello["event"], "subscribed");
    assert_eq!(
        call(s, "PUT", "vm.delete", Some("{\"id\":\"web\"}")).status,
        204
    );
    let delete = event_lines
        .map_while(Result::ok)
        .filter_map(|line| serde_json::from_str::<Value>(&line).ok())
        .find(|e| e["event"] == "reconfig" && e["action"] == "delete")
        .expect("the event stream reported the delete");
    assert_eq!(delete["vm"], "web");
    assert!(delete["tiers_ms"].as_f64().unwrap() >= 0.0);
    let _ = events.kill();
    let _ = events.wait();

    // Shutdown: answered, then the process exits cleanly.
    assert_eq!(call(s, "PUT", "vmm.shutdown", None).status, 204);
    let mut host = host;
    let status = host.process.wait();
    assert!(status.success(), "vigil host exited with {status}");
}

/// Creates of one id, and of two ids with one tenant number, sent at the same time: one wins,
/// the others are refused (409), and nothing is left behind. Each create checked the tenant
/// table, then built its VM (slow) outside the table's lock: all of them passed, the last one
/// replaced the others' entries in the table, and the replaced VMs kept their switch ports
/// (never released: no entry to delete) under the same tenant number.
#[test]
fn creates_racing_for_one_id_or_tenant_number_leave_one_tenant() {
    let host = start_host("race");
    let s = &host.socket;
    for (round, ids) in [["race"; 4], ["t439599", "t622382", "t439599", "t622382"]]
        .iter()
        .enumerate()
    {
        let statuses: Vec<u16> = std::thread::scope(|scope| {
            let calls: Vec<_> = ids
                .iter()
                .enumerate()
                .map(|(n, id)| {
                    // Addresses of their own: only the id or the number is shared.
                    let body = spec(
                        id,
                        &format!("10.0.{round}.{}", n + 2),
                        &format!("52:54:00:00:{round:02x}:{:02x}", n + 2),
                    )
                    .to_string();
                    scope.spawn(move || call(s, "PUT", "vm.create", Some(&body)).status)
                })
                .collect();
            calls.into_iter().map(|c| c.join().unwrap()).collect()
        });
        assert_eq!(
            statuses.iter().filter(|&&code| code == 200).count(),
            1,
            "round {round}: {statuses:?}"
        );
        assert!(
            statuses.iter().all(|&code| code == 200 || code == 409),
            "round {round}: {statuses:?}"
        );
        let list = json_of(&call(s, "GET", "vm.list", None));
        let list = list.as_array().unwrap();
        assert_eq!(list.len(), 1, "round {round}: {list:?}");
        let id = list[0]["id"].as_str().unwrap().to_string();
        let r = call(
            s,
            "PUT",
            "vm.delete",
            Some(&json!({ "id": id }).to_string()),
        );
        assert_eq!(r.status, 204, "{:?}", String::from_utf8_lossy(&r.body));
        // Both of the host's ports are free again.
        for n in 0..2 {
            let r = call(
                s,
                "PUT",
                "vm.create",
                Some(
                    &spec(
                        &format!("after{n}"),
                        &format!("10.1.0.{}", n + 2),
                        &format!("52:54:00:01:00:{:02x}", n + 2),
                    )
                    .to_string(),
                ),
            );
            assert_eq!(
                r.status,
                200,
                "round {round}: {:?}",
                String::from_utf8_lossy(&r.body)
            );
        }
        for n in 0..2 {
            let r = call(
                s,
                "PUT",
                "vm.delete",
                Some(&json!({ "id": format!("after{n}") }).to_string()),
            );
            assert_eq!(r.status, 204);
        }
    }
    assert_eq!(call(s, "PUT", "vmm.shutdown", None).status, 204);
    let mut host = host;
    let status = host.process.wait();
    assert!(status.success(), "vigil host exited with {status}");
}

/// A snapshot directory whose files are not regular files: each is refused at once (400),
/// naming the file, and the host goes on. `/dev/zero` as a state file grew the read until the
/// host process (every VM) died; as memory.bin it was page 0 for ever (the API worker spun);
/// a FIFO hung the worker.
#[test]
fn a_restore_reads_only_regular_snapshot_files_within_their_bounds() {
    let host = start_host("restore-files");
    let s = &host.socket;
    let r = call(
        s,
        "PUT",
        "vm.create",
        Some(&spec("snap", "10.0.0.2", "52:54:00:00:00:02").to_string()),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        call(s, "PUT", "vm.boot", Some("{\"id\":\"snap\"}")).status,
        200
    );
    let good = host.dir.join("good");
    let url = |dir: &Path| json!({"source_url": format!("file://{}", dir.display())}).to_string();
    let r = call(
        s,
        "PUT",
        "vm.snapshot",
        Some(
            &json!({"id": "snap", "destination_url": format!("file://{}", good.display())})
                .to_string(),
        ),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        call(s, "PUT", "vm.delete", Some("{\"id\":\"snap\"}")).status,
        204
    );
    for (n, (file, replacement)) in [
        ("memory.bin", "/dev/zero"),
        ("state.bin", "/dev/zero"),
        ("spec.json", "fifo"),
        ("memory.bin", "fifo"),
    ]
    .into_iter()
    .enumerate()
    {
        let bad = host.dir.join(format!("bad{n}"));
        std::fs::create_dir_all(&bad).unwrap();
        for name in ["spec.json", "state.bin", "introspection.bin", "memory.bin"] {
            if name != file {
                std::fs::copy(good.join(name), bad.join(name)).unwrap();
            }
        }
        if replacement == "fifo" {
            let path = std::ffi::CString::new(bad.join(file).to_str().unwrap()).unwrap();
            // SAFETY: a NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        } else {
            std::os::unix::fs::symlink(replacement, bad.join(file)).unwrap();
        }
        let r = request(
            s,
            "PUT",
            "vm.restore",
            Some(&url(&bad)),
            Duration::from_secs(20),
        );
        let (status, message) = error_of(&r);
        assert_eq!(status, 400, "{file} as {replacement}: {message}");
        assert!(
            message.contains(file) && message.contains("not a regular file"),
            "{file} as {replacement}: {message}"
        );
    }
    // Nothing was left of them, and the good snapshot still restores.
    assert_eq!(json_of(&call(s, "GET", "vm.list", None)), json!([]));
    let r = call(s, "PUT", "vm.restore", Some(&url(&good)));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        call(s, "PUT", "vm.delete", Some("{\"id\":\"snap\"}")).status,
        204
    );
    assert_eq!(call(s, "PUT", "vmm.shutdown", None).status, 204);
    let mut host = host;
    let status = host.process.wait();
    assert!(status.success(), "vigil host exited with {status}");
}

/// While a VM is being sent to another host, every action on it but reads is refused (409) and
/// nothing changes; once the migration failed it takes them again. A policy replaced during the
/// migration answered 204 here but was lost there (the target builds the VM from the spec sent
/// first); a resume ran it here after its last pages were sent; a delete left it running there.
/// The target here authenticates never: the migration waits in its handshake until the test
/// hangs up.
#[test]
fn a_vm_being_migrated_takes_no_other_action() {
    let host = start_host("migrating");
    let s = &host.socket;
    let r = call(
        s,
        "PUT",
        "vm.create",
        Some(&spec("mig", "10.0.0.2", "52:54:00:00:00:02").to_string()),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        call(s, "PUT", "vm.boot", Some("{\"id\":\"mig\"}")).status,
        200
    );
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = silent.local_addr().unwrap();
    let body = json!({"id": "mig", "destination_url": format!("tcp:{target}")}).to_string();
    std::thread::scope(|scope| {
        let migration = scope.spawn(|| call(s, "PUT", "vm.send-migration", Some(&body)));
        let (connection, _) = silent.accept().unwrap();
        let policy = json!({"id": "mig", "policy": {"allow": []}}).to_string();
        let snapshot = json!({"id": "mig",
            "destination_url": format!("file://{}", host.dir.join("snap").display())})
        .to_string();
        for (path, body) in [
            ("vm.policy", policy.as_str()),
            ("vm.resume", "{\"id\":\"mig\"}"),
            ("vm.pause", "{\"id\":\"mig\"}"),
            ("vm.snapshot", snapshot.as_str()),
            ("vm.delete", "{\"id\":\"mig\"}"),
        ] {
            let r = call(s, "PUT", path, Some(body));
            let (status, message) = error_of(&r);
            assert_eq!(status, 409, "{path} during the migration: {message}");
            assert!(message.contains("migrating"), "{path}: {message}");
        }
        assert_eq!(
            json_of(&call(s, "GET", "vm.policy?id=mig", None)),
            idle_policy()
        );
        // The target hangs up: the migration fails, and the VM runs on here.
        drop(connection);
        let r = migration.join().unwrap();
        assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    });
    assert_eq!(
        json_of(&call(s, "GET", "vm.info?id=mig", None))["state"],
        "running"
    );
    let r = call(
        s,
        "PUT",
        "vm.policy",
        Some(&json!({"id": "mig", "policy": {"allow": []}}).to_string()),
    );
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        call(s, "PUT", "vm.delete", Some("{\"id\":\"mig\"}")).status,
        204
    );
    assert_eq!(call(s, "PUT", "vmm.shutdown", None).status, 204);
    let mut host = host;
    let status = host.process.wait();
    assert!(status.success(), "vigil host exited with {status}");
}

/// A tenant's kernel and initramfs are read only if any user of the host may read them: its
/// guest reads them from its memory, and their paths come from whoever writes a spec (a
/// request, an etcd record, a snapshot's spec.json). The host's migration keys file (mode 0600)
/// named as an initramfs was loaded into the tenant's RAM.
#[test]
fn a_tenant_is_built_only_from_files_any_host_user_may_read() {
    use std::os::unix::fs::PermissionsExt;
    let host = start_host("public-inputs");
    let s = &host.socket;
    let secret = host.dir.join("migration-keys.json");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let private_kernel = host.dir.join("vmlinuz");
    std::fs::copy(tenant_dir().join("vmlinuz"), &private_kernel).unwrap();
    std::fs::set_permissions(&private_kernel, std::fs::Permissions::from_mode(0o640)).unwrap();
    for (field, path) in [("initramfs", &secret), ("kernel", &private_kernel)] {
        let mut body = spec("leak", "10.0.0.2", "52:54:00:00:00:02");
        body[field] = json!(path);
        let r = call(s, "PUT", "vm.create", Some(&body.to_string()));
        let (status, message) = error_of(&r);
        assert_eq!(status, 400, "{field}: {message}");
        assert!(
            message.contains("readable by any user"),
            "{field}: {message}"
        );
    }
    assert_eq!(json_of(&call(s, "GET", "vm.list", None)), json!([]));
    // The same kernel readable by all builds.
    std::fs::set_permissions(&private_kernel, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut body = spec("leak", "10.0.0.2", "52:54:00:00:00:02");
    body["kernel"] = json!(private_kernel);
    let r = call(s, "PUT", "vm.create", Some(&body.to_string()));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        call(s, "PUT", "vm.delete", Some("{\"id\":\"leak\"}")).status,
        204
    );
    assert_eq!(call(s, "PUT", "vmm.shutdown", None).status, 204);
    let mut host = host;
    let status = host.process.wait();
    assert!(status.success(), "vigil host exited with {status}");
}
