//! The cloud end to end, one Debian tenant boot for every check: an edge node and two hosts, each
//! in its own network namespace (real veth underlay, real VXLAN-in-UDP between the hosts' switch
//! uplinks and the edge's cloud port), the outside world in a fourth namespace behind the edge's
//! TAP, real Linux TCP servers and clients there, busybox `nc` in the tenant.
//!
//! - The cloud runs on etcd (Debian's `etcd-server`, one member in the edge's namespace, reached
//!   over the underlay): the edge and both hosts join it.
//! - Create by writing the tenant's desired state (`vigil cluster put … --host host-a`): host A's
//!   agent creates and boots it; its policy is live before its first instruction and both tiers
//!   know its port and address.
//! - Tenant → outside, allowed by a connect verdict, through the switch tier and the edge.
//! - Outside → tenant service, allowed by the bind/listen verdicts; outside → a port no verdict
//!   opened dies at the edge (counted as `no_verdict` there).
//! - Exact ports: a `listen()` on a socket never bound opens exactly the port the kernel assigns
//!   (pinned with `ip_local_port_range`, so the outside knows it); one landing outside the listen
//!   rule's ports is refused in the guest; a UDP socket bound to :0 (a listener behind its port
//!   with no verdict of its own) gets nothing from the outside: dropped at the edge.
//! - No key files: each host signs with its own key from etcd, and migrations between them
//!   authenticate with those keys. A verdict for host A's sender id under another key than A's
//!   is rejected by the edge and reported.
//! - Live migration A → B of the running tenant with an established TCP connection to an outside
//!   server, by changing its host in etcd (`vigil cluster move`; the agents migrate it over TCP
//!   with pre-copy): bytes before and after the migration checked on both ends; A forgets the
//!   tenant, B's switch adopts its flows, the edge keeps them and learns the tenant's new
//!   location. Then back and forth through the hosts' API: with every page verified, and by
//!   stop-and-copy (the baseline).
//! - Host B is killed (SIGKILL): its lease expires and the edge closes everything B's tenant had
//!   opened (`edge_host_lost`; no flow, no tenant left at the edge).

use std::io::{BufReader, Read};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::json;
use vigil_tests::etcd::Etcd;
use vigil_tests::outside::{answer_one, echo, Request};
use vigil_tests::workload::{self, wait_listening};
use vigil_tests::{
    api, drop_count, edge_counters, fw_guest_elf, tenant_dir, veth, Namespace, TempDir,
    VigilCommand,
};

const OUTSIDE_IP: &str = "10.66.0.1";
const TENANT_IP: &str = "10.66.0.2";
const TENANT_MAC: &str = "52:54:00:00:00:02";
/// How long the outside waits for the tenant to echo one line of the long-lived connection.
const ECHO_WAIT: Duration = Duration::from_secs(300);

#[test]
#[ignore = "boots the Debian tenant: 10-15 min on an emulating KVM host; scripts/test runs it (not with --quick)"]
fn cloud_end_to_end_with_edge_and_live_migration() {
    let dir = tenant_dir();
    let pid = std::process::id();
    let work = TempDir::new("vigil-cloud");

    // The outside world, the edge, two hosts; underlay: edge–A 192.168.71.0/24, edge–B .72.
    let outside = Namespace::create(&format!("vc-out-{pid}"), "eo0", OUTSIDE_IP);
    let edge_ns = Namespace::bare(&format!("vc-edge-{pid}"));
    let a_ns = Namespace::bare(&format!("vc-a-{pid}"));
    let b_ns = Namespace::bare(&format!("vc-b-{pid}"));
    veth(&edge_ns, "ea", "192.168.71.1", &a_ns, "ua", "192.168.71.2");
    veth(&edge_ns, "eb", "192.168.72.1", &b_ns, "ub", "192.168.72.2");
    // The hosts' own network, for migration (TCP, no shared filesystem): .73.
    veth(&a_ns, "miga", "192.168.73.1", &b_ns, "migb", "192.168.73.2");

    // The cluster's state: etcd in the edge's namespace, the hosts reach it over the underlay.
    let etcd = Etcd::try_start_in("cloud", &edge_ns)
        .unwrap_or_else(|e| panic!("{e}"))
        .expect("no etcd binary on PATH: scripts/setup installs etcd-server");

    let elf = fw_guest_elf().display().to_string();
    let edge_sock: PathBuf = work.join("edge.sock");
    let a_sock: PathBuf = work.join("a.sock");
    let b_sock: PathBuf = work.join("b.sock");
    let s = |p: &Path| p.display().to_string();
    // Each in its namespace, with fewer guest timer ticks per wall second (see tenant.rs).
    let edge = VigilCommand::new("edge")
        .netns(&edge_ns.name)
        .tsc_dilation()
        .args(["edge", "--elf", &elf])
        .args(["--outside", &format!("tap=eo0,netns={}", outside.name)])
        .args(["--cloud", "local=0.0.0.0:4789", "--control", "0.0.0.0:4790"])
        .args(["--api-socket", &s(&edge_sock)])
        .args(["--name", "edge", "--etcd", etcd.endpoint()])
        .start("verdict channel on")
        .unwrap_or_else(|e| panic!("{e}"));
    let host =
        |name: &'static str, ns: &Namespace, sock: &Path, edge: &str, id: &str, mig: &str| {
            VigilCommand::new(name)
                .netns(&ns.name)
                .tsc_dilation()
                .args(["host", "--api-socket", &s(sock), "--switch-elf", &elf])
                .args(["--uplink", &format!("vxlan={edge}:4789")])
                .args(["--edge-control", &format!("{edge}:4790")])
                .args(["--host-id", id, "--name", name, "--console"])
                .args(["--etcd", &etcd.endpoint_at(edge)])
                .args(["--migration-listen", &format!("tcp:{mig}:7070")])
                .start("serving")
                .unwrap_or_else(|e| panic!("{e}"))
        };
    let host_a = host(
        "host-a",
        &a_ns,
        &a_sock,
        "192.168.71.1",
        "1",
        "192.168.73.1",
    );
    let mut host_b = host(
        "host-b",
        &b_ns,
        &b_sock,
        "192.168.72.1",
        "2",
        "192.168.73.2",
    );
    let hosts = etcd.cli_json(&["hosts"]);
    assert_eq!(hosts.as_array().map(Vec::len), Some(2), "{hosts}");

    // Outside servers: 8080 answers one line; 8081 is the long-lived connection that lives
    // through the migration (the tenant echoes every line back).
    let one_shot = answer_one(
        outside.tcp_listener((OUTSIDE_IP, 8080)),
        Request::Line,
        b"outside-says-hello\n",
        Duration::from_secs(600),
    );
    let long = outside.tcp_listener((OUTSIDE_IP, 8081));
    let (migrated_tx, migrated_rx) = mpsc::channel::<()>();
    let (before_tx, before_rx) = mpsc::channel::<()>();
    let long_server = std::thread::spawn(move || -> Result<_, String> {
        // The long-lived connection: lines before the migration, then after it. Each echo is
        // waited for up to ECHO_WAIT: a connection the migrations broke fails here, at once, not
        // when TCP gives up on it (15 minutes of retransmissions).
        let (stream, long_peer) = long.accept().map_err(|e| format!("accept: {e}"))?;
        let mut stream = BufReader::new(stream);
        let mut echoed = Vec::new();
        for i in 0..3 {
            let line = format!("before-{i}");
            echoed.push((line.clone(), echo(&mut stream, &line, ECHO_WAIT)?));
        }
        before_tx.send(()).unwrap();
        migrated_rx.recv().unwrap();
        for i in 0..3 {
            let line = format!("after-{i}-{}", "x".repeat(1000));
            echoed.push((line.clone(), echo(&mut stream, &line, ECHO_WAIT)?));
        }
        // Closing ends the tenant's nc, and its workload.
        drop(stream);
        Ok((long_peer, echoed))
    });

    // The tenant: out to 8080 (allowed), a service on 7000 (bind + listen allowed), then the
    // long-lived echo connection to 8081.
    let script = format!(
        "echo \"VIGIL-CHECK tcp-reply $(echo tenant-says-hello | nc -w 120 {OUTSIDE_IP} 8080)\"\n\
         nc -l -p 7000 -e echo served-by-tenant &\n\
         {wait_7000}\
         range=/proc/sys/net/ipv4/ip_local_port_range\n\
         echo '7006 7006' > $range\n\
         vigil-listen0 served-by-autobound > /tmp/listen0 2>&1 &\n\
         {wait_7006}\
         echo \"VIGIL-CHECK listen0 $(cat /tmp/listen0)\"\n\
         echo '7777 7777' > $range\n\
         echo \"VIGIL-CHECK listen-7777 $(vigil-listen0 never 2>&1)\"\n\
         echo '7008 7008' > $range\n\
         vigil-listen0 -u 900 > /tmp/udp0 2>&1 &\n\
         i=0; while [ ! -s /tmp/udp0 ] && [ $i -lt 200 ]; do i=$((i+1)); usleep 50000; done\n\
         echo '32768 60999' > $range\n\
         echo \"VIGIL-CHECK udp0-bound $(head -1 /tmp/udp0)\"\n\
         echo VIGIL-CHECK listening\n\
         nc {OUTSIDE_IP} 8081 -e cat\n\
         echo \"VIGIL-CHECK long-done rc=$?\"\n\
         echo \"VIGIL-CHECK udp0 [$(cat /tmp/udp0 | tr '\\n' ' ')]\"\n",
        wait_7000 = wait_listening(7000),
        wait_7006 = wait_listening(7006),
    );
    let cmdline = workload::cmdline(TENANT_IP, OUTSIDE_IP, &script);
    let policy = json!({"allow": [
        {"op": "connect", "exe": "/bin/busybox", "protocol": "tcp",
         "cidr": format!("{OUTSIDE_IP}/32"), "ports": "8080-8081"},
        {"op": "bind", "exe": "/bin/busybox", "ports": "7000-7010"},
        {"op": "bind", "exe": "/bin/vigil-listen0", "protocol": "udp"},
        {"op": "listen", "exe": "/bin/busybox", "ports": "7000-7010"},
        {"op": "listen", "exe": "/bin/vigil-listen0", "ports": "7000-7010"}
    ]});
    // The tenant's desired state, written to etcd: host A's agent creates and boots it.
    let spec = json!({
        "id": "web", "kernel": dir.join("vmlinuz"), "initramfs": dir.join("initramfs.cpio"),
        "cmdline": cmdline, "memory_mib": 256, "mac": TENANT_MAC, "ip": TENANT_IP,
        "policy": policy,
    });
    let spec_file = work.join("web.json");
    std::fs::write(&spec_file, spec.to_string()).unwrap();
    let status = etcd.cli_json(&["put", &s(&spec_file), "--host", "host-a", "--wait", "300"]);
    assert_eq!(
        (
            status["host"].as_str(),
            status["state"].as_str(),
            status["action"].as_str()
        ),
        (Some("host-a"), Some("running"), Some("create")),
        "{status}"
    );
    let create = host_a.wait_for("\"action\":\"create\"", Duration::from_secs(10));
    eprintln!("reconfig on create: {create}");
    let (status, info) = api(&a_sock, "GET", "vm.info?id=web", None);
    assert_eq!(
        (status, info["state"].as_str()),
        (200, Some("running")),
        "{info}"
    );

    // A forged verdict opening 7005 inbound, for host A's sender id and key id but under
    // another key: the edge rejects and reports it.
    let forged = edge_ns.spawn(|| {
        let bad_key = edge::channel::key_from_hex(&"ab".repeat(32)).unwrap();
        let sender = edge::link::VerdictLink::connect_keyed(
            "127.0.0.1:4790",
            (1, bad_key),
            1,
            1,
            edge::link::LinkConfig::default(),
        )
        .unwrap();
        let mut rule = vigil_wire::verdict::Rule::any(
            vigil_wire::verdict::Direction::Ingress,
            vigil_wire::verdict::IpVersion::V4,
            vigil_wire::verdict::Protocol::Tcp,
        );
        rule.local_port = 7005;
        let record = vigil_wire::verdict::VerdictRepr::add(
            vmm_core::introspect::tenant_id("web"),
            1,
            0,
            rule,
        );
        sender
            .send(&[record.to_bytes()], edge::link::Class::Verdict)
            .unwrap();
    });
    forged.join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while edge_counters(&edge_sock)["rejected"]["bad_tag"]
        .as_u64()
        .unwrap_or(0)
        == 0
    {
        assert!(
            Instant::now() < deadline,
            "the edge did not report the forged verdict"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Tenant → outside through both tiers.
    let reply = host_a.wait_for("VIGIL-CHECK tcp-reply", Duration::from_secs(1500));
    assert!(reply.ends_with("tcp-reply outside-says-hello"), "{reply}");

    // Outside → tenant: the service its bind/listen verdicts opened answers; a port nothing
    // opened is dropped at the edge (no answer at all, not even a reset).
    // (The exact-port checks print before "listening": read in order.)
    let listen0 = host_a.wait_for("VIGIL-CHECK listen0", Duration::from_secs(600));
    let refused = host_a.wait_for("VIGIL-CHECK listen-7777", Duration::from_secs(60));
    let bound = host_a.wait_for("VIGIL-CHECK udp0-bound", Duration::from_secs(60));
    host_a.wait_for("VIGIL-CHECK listening", Duration::from_secs(60));
    let inbound = outside.spawn(|| {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let attempt = TcpStream::connect_timeout(
                &format!("{TENANT_IP}:7000").parse().unwrap(),
                Duration::from_secs(20),
            )
            .and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(120)))?;
                let mut text = String::new();
                s.read_to_string(&mut text)?;
                Ok(text)
            });
            match attempt {
                Ok(text) if !text.is_empty() => return text,
                _ if Instant::now() < deadline => continue,
                other => panic!("no answer from the tenant's service: {other:?}"),
            }
        }
    });
    assert_eq!(inbound.join().unwrap().trim(), "served-by-tenant");
    let dropped_before = drop_count(&edge_counters(&edge_sock), "no_verdict");
    let closed = outside.spawn(|| {
        TcpStream::connect_timeout(
            &format!("{TENANT_IP}:7005").parse().unwrap(),
            Duration::from_secs(5),
        )
        .map(|_| ())
        .map_err(|e| e.kind())
    });
    assert_eq!(
        closed.join().unwrap(),
        Err(std::io::ErrorKind::TimedOut),
        "an unopened port must be dropped silently (the forged verdict must not have opened it)"
    );
    assert!(drop_count(&edge_counters(&edge_sock), "no_verdict") > dropped_before);

    // Exact ports. The listen on an unbound socket got the pinned port, and the outside reaches
    // exactly that port; the one that landed outside the rule's ports was refused in the guest.
    assert!(listen0.ends_with("listen0 port 7006"), "{listen0}");
    let autobound = outside.spawn(|| {
        let mut s = TcpStream::connect_timeout(
            &format!("{TENANT_IP}:7006").parse().unwrap(),
            Duration::from_secs(60),
        )
        .expect("the assigned port answers");
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    });
    assert_eq!(autobound.join().unwrap().trim(), "served-by-autobound");
    assert!(
        refused.contains("listen: Operation not permitted"),
        "an assigned port outside the listen rule's ports is refused: {refused}"
    );
    // The UDP socket bound to :0 listens on 7008, and no verdict opened it: the outside's
    // datagram dies at the edge (the tenant prints what it got at the end: nothing).
    assert!(bound.ends_with("udp0-bound port 7008"), "{bound}");
    let dropped_before = drop_count(&edge_counters(&edge_sock), "no_verdict");
    outside
        .spawn(|| {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            socket
                .send_to(b"must-not-arrive\n", format!("{TENANT_IP}:7008"))
                .unwrap();
        })
        .join()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while drop_count(&edge_counters(&edge_sock), "no_verdict") <= dropped_before {
        assert!(
            Instant::now() < deadline,
            "the datagram to the :0-bound socket was not dropped at the edge"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Live migration A → B with the 8081 connection established.
    if let Err(e) = before_rx.recv_timeout(Duration::from_secs(600)) {
        let why = match e {
            mpsc::RecvTimeoutError::Timeout => "600 s passed".to_string(),
            mpsc::RecvTimeoutError::Disconnected => match long_server.join() {
                Ok(Err(e)) => e,
                _ => "the outside's server ended".to_string(),
            },
        };
        panic!("the long-lived connection did not exchange its first lines: {why}");
    }
    // Over TCP on the hosts' own network, authenticated with the hosts' keys.
    let migrate = |from: &Path, to: &Path, url: &str, options: serde_json::Value| {
        let (status, v) = api(
            to,
            "PUT",
            "vm.receive-migration",
            Some(json!({ "receiver_url": url })),
        );
        assert_eq!(status, 204, "{v}");
        let mut body = json!({"id": "web", "destination_url": url});
        body.as_object_mut()
            .unwrap()
            .extend(options.as_object().unwrap().clone());
        let (status, report) = api(from, "PUT", "vm.send-migration", Some(body));
        assert_eq!(status, 200, "{report}");
        assert_eq!(report["transport"], "tcp", "{report}");
        report
    };
    // The move is a change of the tenant's host in etcd: B listens, A sends it (pre-copy).
    let status = etcd.cli_json(&["move", "web", "host-b", "--wait", "300"]);
    assert_eq!(
        (
            status["host"].as_str(),
            status["state"].as_str(),
            status["action"].as_str()
        ),
        (Some("host-b"), Some("running"), Some("migrate")),
        "{status}"
    );
    let migrated = host_a.wait_for("\"event\":\"cluster_migrated\"", Duration::from_secs(10));
    let migrated: serde_json::Value =
        serde_json::from_str(&migrated[migrated.find('{').unwrap_or(0)..]).unwrap();
    let report = &migrated["migration"];
    assert_eq!(report["transport"], "tcp", "{migrated}");
    assert_eq!(report["precopy"], true, "{migrated}");
    println!(
        "{}",
        json!({"metric": "migration_downtime_ms", "value": report["downtime_ms"], "unit": "ms",
               "transport": report["transport"], "precopy": report["precopy"],
               "orchestrated": "etcd (vigil cluster move)", "move_ms": migrated["ms"],
               "report": report})
    );
    let (_, list_a) = api(&a_sock, "GET", "vm.list", None);
    assert_eq!(list_a, json!([]), "host A forgot the tenant");
    let (status, info_b) = api(&b_sock, "GET", "vm.info?id=web", None);
    assert_eq!(status, 200, "{info_b}");
    assert_eq!(info_b["state"], "running");
    host_b.wait_for("\"event\":\"migrated_in\"", Duration::from_secs(10));
    // Back to A with every page checked at the target against the source's (the dirty log of
    // a booted tenant's kernel and userspace, and the devices' writes), then to B again by
    // stop-and-copy: the baseline, on the same booted tenant with the same open connection.
    let verified = migrate(
        &b_sock,
        &a_sock,
        "tcp:192.168.73.1:7071",
        json!({"precopy": true, "verify": true}),
    );
    assert_eq!(verified["verified"], true, "{verified}");
    let baseline = migrate(
        &a_sock,
        &b_sock,
        "tcp:192.168.73.2:7072",
        json!({"precopy": false}),
    );
    println!(
        "{}",
        json!({"metric": "migration_downtime_ms_stop_and_copy", "value": baseline["downtime_ms"],
               "unit": "ms", "transport": "tcp", "precopy": false,
               "verified_precopy_downtime_ms": verified["downtime_ms"], "report": baseline})
    );
    let (status, info_b) = api(&b_sock, "GET", "vm.info?id=web", None);
    assert_eq!(status, 200, "{info_b}");
    assert_eq!(info_b["state"], "running");
    // Each target announced the tenant (gratuitous ARPs) once the edge had acknowledged its
    // claim of the address: an announcement before that is refused at the edge, which then goes on
    // sending the tenant's traffic to the host it left, until the tenant speaks itself.
    for (host, name, migrations) in [(&host_b, "B", 2), (&host_a, "A", 1)] {
        for _ in 0..migrations {
            let e = host
                .wait_event(Duration::from_secs(30), "announced", |e| {
                    e["event"] == "announced"
                })
                .unwrap_or_else(|e| panic!("host {name}: {e}"));
            // Up to 3 frames: the repeats stop when the tenant migrates on (here within ms).
            assert_eq!(e["edge_claim"], "acknowledged", "host {name}: {e}");
            assert!(e["frames"].as_u64() >= Some(1), "host {name}: {e}");
        }
    }
    migrated_tx.send(()).unwrap();

    // Both ends of the connection: every line came back as sent, before and after.
    let (peer, said) = one_shot.join().expect("outside one-shot server");
    let (long_peer, echoed) = match long_server.join().expect("outside long-lived server") {
        Ok(done) => done,
        Err(e) => {
            // What each tier saw of it, for whoever reads the failure.
            let (_, info_b) = api(&b_sock, "GET", "vm.info?id=web", None);
            eprintln!("the tenant on host B: {info_b}");
            eprintln!("edge counters: {}", edge_counters(&edge_sock));
            panic!("the long-lived connection broke after the migrations: {e}");
        }
    };
    assert_eq!(peer.ip().to_string(), TENANT_IP);
    assert_eq!(said, "tenant-says-hello");
    assert_eq!(long_peer.ip().to_string(), TENANT_IP);
    assert_eq!(echoed.len(), 6);
    for (sent, got) in &echoed {
        assert_eq!(got, sent, "the tenant echoed what the outside sent");
    }
    // The tenant saw its side of the connection end normally, on host B.
    let done = host_b.wait_for("VIGIL-CHECK long-done", Duration::from_secs(600));
    assert!(done.ends_with("rc=0"), "{done}");
    let udp0 = host_b.wait_for("VIGIL-CHECK udp0", Duration::from_secs(60));
    assert!(
        udp0.ends_with("udp0 [port 7008 ]"),
        "the :0-bound socket received nothing: {udp0}"
    );
    // Host B dies (SIGKILL, no goodbye): its lease expires in etcd and the edge closes what
    // B's tenant had opened: its verdicts, flows and addresses.
    let before = edge_counters(&edge_sock);
    assert!(
        before["firewall"]["flows_active"].as_u64().unwrap_or(0) > 0
            || before["ownership"]["tenants"].as_u64().unwrap_or(0) > 0,
        "the edge holds nothing of the tenant before B dies: {before}"
    );
    // SAFETY: kill(2) on our own child's pid, not reaped yet.
    unsafe { libc::kill(host_b.id() as libc::pid_t, libc::SIGKILL) };
    let lost = edge.wait_for("\"event\":\"edge_host_lost\"", Duration::from_secs(30));
    assert!(lost.contains("\"host\":\"host-b\""), "{lost}");
    host_b.wait();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let c = edge_counters(&edge_sock);
        let (flows, tenants) = (
            c["firewall"]["flows_active"].as_u64(),
            c["ownership"]["tenants"].as_u64(),
        );
        if flows == Some(0) && tenants == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left at the edge after host B died: flows {flows:?}, tenants {tenants:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let counters = edge_counters(&edge_sock);
    eprintln!("edge counters at the end: {counters}");
    let _ = api(&a_sock, "PUT", "vmm.shutdown", None);
    drop(work);
}
