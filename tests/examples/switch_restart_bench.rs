//! The switch supervisor under traffic (see `vigil_tests::restart` for the rig: an in-process
//! host, its switch micro-VM, a tenant namespace behind the tenant's port, an outside namespace
//! behind the uplink). Prints one JSON object per figure (see scripts/bench):
//!   switch_restart_ms            the switch micro-VM killed (fault injection: its vCPU stops) ->
//!                                the first datagram of the tenant's opened stream sent after the
//!                                new switch holds everything again arrives outside (median over
//!                                ROUNDS hosts, one kill each: later kills on one host back off)
//!   switch_restart_leaked_frames datagrams of a stream no verdict opens, sent by the tenant every
//!                                500 µs before, during and after every restart, that arrived
//!                                outside (must be 0); the baseline in the same run: the opened
//!                                stream's datagrams that arrived (the counter sees what passes)
//! Each round also checks that the tenant's established TCP connection goes on after the restart.
//!
//! Usage: cargo run --release -p vigil-tests --example switch_restart_bench -- [ROUNDS]
//! Needs root (network namespaces, /dev/kvm) and the fw-guest ELF and tenant image (the
//! tenant is created, never booted).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use vigil_tests::restart::{egress, Rig, OUTSIDE_IP};
use vigil_wire::verdict::Protocol;

const ECHO: u16 = 7000;
const OPENED_UDP: u16 = 7001;
const CLOSED_UDP: u16 = 7002;
const LIMIT: Duration = Duration::from_secs(30);

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Round {
    restart_ms: f64,
    host_restart_ms: f64,
    boot_ms: f64,
    replayed: u64,
    offered_closed: u64,
    offered_in_gap: u64,
    leaked: u64,
    opened_delivered: u64,
}

/// Drains `socket` (nonblocking) and returns how many datagrams it held.
fn drain(socket: &UdpSocket) -> u64 {
    let mut buf = [0u8; 64];
    let mut n = 0;
    // Until it is empty: an interruption (see `recv_restarting`) must not hide a leak.
    while recv_restarting(socket, &mut buf).is_ok() {
        n += 1;
    }
    n
}

/// `socket.recv`, again when a signal interrupted it: a socket with a read timeout is never
/// restarted after a handled signal (signal(7)), and this process runs a VMM, which kicks its
/// vCPU threads with one (`SIGRTMIN`). One such interruption once ended this benchmark.
fn recv_restarting(socket: &UdpSocket, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match socket.recv(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            done => return done,
        }
    }
}

fn round(index: usize) -> Result<Round> {
    let rig = Rig::start(&format!("b{index}"));
    let echo = rig.outside.tcp_listener((OUTSIDE_IP, ECHO));
    let opened = rig.outside.udp_socket((OUTSIDE_IP, OPENED_UDP));
    let closed = rig.outside.udp_socket((OUTSIDE_IP, CLOSED_UDP));
    closed.set_nonblocking(true)?;
    std::thread::spawn(move || {
        if let Ok((stream, _)) = echo.accept() {
            let Ok(mut out) = stream.try_clone() else {
                return;
            };
            for line in BufReader::new(stream).lines().map_while(|l| l.ok()) {
                if out.write_all(format!("{line}\n").as_bytes()).is_err() {
                    break;
                }
            }
        }
    });
    if !rig.host.grant_for_test(
        "t1",
        &[
            egress(Protocol::Tcp, ECHO),
            egress(Protocol::Udp, OPENED_UDP),
        ],
    )? {
        return Err("the switch took no verdict".into());
    }
    let mut stream = rig
        .tenant
        .spawn(|| {
            let addr = (OUTSIDE_IP.parse::<std::net::IpAddr>().unwrap(), ECHO).into();
            TcpStream::connect_timeout(&addr, LIMIT)
        })
        .join()
        .map_err(|_| "connect thread")??;
    stream.set_read_timeout(Some(LIMIT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut echo_line = |text: &str| -> Result<()> {
        stream.write_all(format!("{text}\n").as_bytes())?;
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if line != format!("{text}\n") {
            return Err(format!("the established connection answered {line:?}").into());
        }
        Ok(())
    };
    echo_line("before")?;

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let sender = {
        let (stop, sent) = (stop.clone(), sent.clone());
        rig.tenant.spawn(move || {
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let _ = socket.send_to(&seq.to_le_bytes(), (OUTSIDE_IP, CLOSED_UDP));
                let _ = socket.send_to(&seq.to_le_bytes(), (OUTSIDE_IP, OPENED_UDP));
                sent.store(seq, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(500));
            }
            let _ = socket.send_to(&u64::MAX.to_le_bytes(), (OUTSIDE_IP, OPENED_UDP));
        })
    };
    opened.set_read_timeout(Some(LIMIT))?;
    let mut buf = [0u8; 64];
    let mut delivered = 0u64;
    let mut recv_seq = |delivered: &mut u64| -> Result<u64> {
        let n = recv_restarting(&opened, &mut buf)?;
        *delivered += 1;
        Ok(u64::from_le_bytes(
            buf[..n.min(8)].try_into().unwrap_or([0; 8]),
        ))
    };
    recv_seq(&mut delivered)?;

    let killed = Instant::now();
    let sent_at_kill = sent.load(Ordering::Relaxed);
    rig.host.kill_switch();
    let restored = rig
        .wait_event("switch_restored", LIMIT)
        .ok_or("no switch_restored event")?;
    let sent_at_restore = sent.load(Ordering::Relaxed);
    // Forwarding again: the first datagram sent after the restore arrives.
    while recv_seq(&mut delivered)? <= sent_at_restore {}
    let restart_ms = killed.elapsed().as_secs_f64() * 1e3;
    echo_line("after")?;

    stop.store(true, Ordering::Relaxed);
    sender.join().map_err(|_| "sender thread")?;
    while recv_seq(&mut delivered)? != u64::MAX {}
    let leaked = drain(&closed);
    Ok(Round {
        restart_ms,
        host_restart_ms: restored["restart_ms"].as_f64().unwrap_or(f64::NAN),
        boot_ms: restored["boot_ms"].as_f64().unwrap_or(f64::NAN),
        replayed: restored["records"].as_u64().unwrap_or(0),
        offered_closed: sent.load(Ordering::Relaxed),
        offered_in_gap: sent_at_restore - sent_at_kill,
        leaked,
        opened_delivered: delivered,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(5);
    let host = vmm_core::host_kind::HostKind::detect().to_string();
    let mut all = Vec::new();
    for i in 0..rounds {
        let r = round(i)?;
        eprintln!(
            "switch_restart_bench: round {i}: {:.1} ms (host: {:.1} ms, boot {:.1} ms), {} leaked",
            r.restart_ms, r.host_restart_ms, r.boot_ms, r.leaked
        );
        all.push(r);
    }
    let ms: Vec<f64> = all.iter().map(|r| r.restart_ms).collect();
    println!(
        "{}",
        json!({"metric": "switch_restart_ms", "value": median(ms.clone()), "unit": "ms",
            "runs": rounds, "min": ms.iter().copied().fold(f64::INFINITY, f64::min),
            "max": ms.iter().copied().fold(0.0, f64::max),
            "host_measured_ms": median(all.iter().map(|r| r.host_restart_ms).collect()),
            "new_switch_boot_ms": median(all.iter().map(|r| r.boot_ms).collect()),
            "records_replayed": all[0].replayed, "host": host})
    );
    println!(
        "{}",
        json!({"metric": "switch_restart_leaked_frames",
            "value": all.iter().map(|r| r.leaked).sum::<u64>(), "unit": "frames",
            "offered_without_verdict": all.iter().map(|r| r.offered_closed).sum::<u64>(),
            "offered_in_gaps": all.iter().map(|r| r.offered_in_gap).sum::<u64>(),
            "baseline_opened_delivered": all.iter().map(|r| r.opened_delivered).sum::<u64>(),
            "runs": rounds, "host": host})
    );
    Ok(())
}
