//! The events of one VM's introspection: what the vCPU builds on its trap path, and the logger
//! thread that serializes them and publishes one JSON line each on the event bus.
//!
//! Owns: the event bodies (`socket`, `verdict`, `tamper`, `write_traps`, `soft_hooks`), the
//! queue between the vCPUs and the logger, the line format (`event` and `vm` first), the log form
//! of a verdict record.
//! Must not: format or write anything on a vCPU's trap path (the vCPU only queues), drop an event
//! (a full queue makes the vCPU wait, by design), or change a line's fields (scripts and the
//! end-to-end tests read them).

use std::net::IpAddr;
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use serde::Serialize;
use trap_handler::attribution::{Attribution, Process};
use trap_handler::policy::Verdict;
use vigil_wire::verdict::{Direction, IpVersion, VerdictRepr, RECORD_LEN};

/// Events waiting for the logger before a vCPU that produces one more waits. Sized for one
/// logger poll ([`LOGGER_POLL`]) at the fastest trap rate a hardware host gives (a hooked call
/// every ~5 µs per vCPU, two entries for an allowed one: ~800 per vCPU), for 8 vCPUs, with room.
/// The queue's slots are all written when it is made (std's bounded channel stamps each), so
/// they are resident for the VM's life: at 65,536 they were 18.5 MiB of every tenant VMM's
/// memory (`vmm_overhead_mib_tenant`); at 8,192, 2.3 MiB.
pub(super) const EVENT_QUEUE: usize = 8_192;

/// How often the logger looks for events. It polls rather than blocks, so that a vCPU queueing an
/// event never pays for waking a thread (a futex system call) on its trap path; an event reaches
/// stdout within this long.
const LOGGER_POLL: Duration = Duration::from_millis(2);

/// Monotonic clock in nanoseconds (CLOCK_MONOTONIC: comparable across the VMM's threads and
/// with other processes on the host).
#[inline]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid pointer it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One decision on a socket operation.
#[derive(Serialize)]
pub(super) struct SocketEvent {
    pub vcpu: u8,
    pub t_ns: u64,
    pub verdict: Verdict,
    #[serde(flatten)]
    pub attribution: Option<Attribution>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Sequence number of the verdict record an allowed call produced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict_seq: Option<u64>,
    /// Where the call's verdict waited for its local port (see `ports`), if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_point: Option<&'static str>,
    pub vmm_work_ns: u64,
}

/// A verdict record produced for the firewall tiers.
#[derive(Serialize)]
pub(super) struct VerdictEvent {
    pub tenant: u32,
    pub seq: u64,
    pub direction: &'static str,
    pub protocol: u8,
    pub local: String,
    pub remote: String,
    pub lifetime_ms: u64,
    /// The 64-byte record as the tiers receive it, hex.
    pub record: String,
}

/// A guest write to a write-trapped page, refused.
#[derive(Serialize)]
pub(super) struct TamperEvent {
    pub vcpu: u8,
    pub t_ns: u64,
    pub gpa: String,
    pub guarded: String,
    pub len: usize,
    pub data: String,
    pub rip: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<Process>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The software breakpoints were placed.
#[derive(Serialize)]
pub(super) struct SoftHooksEvent {
    pub t_ns: u64,
    pub placed: Vec<(String, String)>,
    pub skipped: Vec<String>,
}

/// The write traps were armed (or could not be).
#[derive(Serialize)]
pub(super) struct WriteTrapsEvent {
    pub t_ns: u64,
    pub kaslr_slide: String,
    pub pages: Vec<(String, String)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub(super) enum LogEntry {
    Socket(SocketEvent),
    /// A verdict record as produced (decoded for the log by the logger).
    Verdict([u8; RECORD_LEN]),
    Tamper(TamperEvent),
    WriteTraps(WriteTrapsEvent),
    SoftHooks(SoftHooksEvent),
    /// Answered once every entry queued before it is written.
    Barrier(mpsc::Sender<()>),
}

/// The fields every event line starts with.
#[derive(Serialize)]
struct Line<'a, T: Serialize> {
    event: &'static str,
    vm: &'a str,
    #[serde(flatten)]
    body: &'a T,
}

fn line<T: Serialize>(event: &'static str, vm: &str, body: &T) -> serde_json::Result<String> {
    serde_json::to_string(&Line { event, vm, body })
}

/// The log form of a verdict record.
fn verdict_event(tenant: u32, record: &[u8; RECORD_LEN]) -> Option<VerdictEvent> {
    let v = VerdictRepr::from_bytes(record).ok()?;
    let rule = v.rule;
    Some(VerdictEvent {
        tenant,
        seq: v.seq,
        direction: match rule.direction {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        },
        protocol: rule.protocol as u8,
        local: addr_text(rule.ip_version, &rule.local_addr, rule.local_port),
        remote: if rule.remote_prefix == 0 {
            "any".to_string()
        } else {
            addr_text(rule.ip_version, &rule.remote_addr, rule.remote_port_min)
        },
        lifetime_ms: v.lifetime_ms,
        record: hex::encode(record),
    })
}

fn addr_text(version: IpVersion, bytes: &[u8; 16], port: u16) -> String {
    let ip: IpAddr = match version {
        IpVersion::V4 => IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]]),
        IpVersion::V6 => IpAddr::from(*bytes),
    };
    match ip {
        IpAddr::V4(_) => format!("{ip}:{port}"),
        IpAddr::V6(_) => format!("[{ip}]:{port}"),
    }
}

/// The logger thread of one VM: drains the queue every `LOGGER_POLL`, until every sender is
/// gone.
pub(super) fn run_logger(vm: String, tenant: u32, rx: Receiver<LogEntry>) {
    loop {
        let mut barriers = Vec::new();
        loop {
            let entry = match rx.try_recv() {
                Ok(entry) => entry,
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => return,
            };
            let text = match entry {
                LogEntry::Socket(e) => line("socket", &vm, &e),
                LogEntry::Verdict(record) => match verdict_event(tenant, &record) {
                    Some(e) => line("verdict", &vm, &e),
                    None => continue,
                },
                LogEntry::Tamper(e) => line("tamper", &vm, &e),
                LogEntry::WriteTraps(e) => line("write_traps", &vm, &e),
                LogEntry::SoftHooks(e) => line("soft_hooks", &vm, &e),
                LogEntry::Barrier(done) => {
                    barriers.push(done);
                    continue;
                }
            };
            if let Ok(text) = text {
                crate::events::bus().publish(&text);
            }
        }
        for done in barriers {
            let _ = done.send(());
        }
        std::thread::sleep(LOGGER_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_event_queue_costs_a_tenant_vmm_at_most_4_mib() {
        // Each slot holds an entry and its stamp, and every slot is written when the queue is
        // made: a larger entry or queue shows up here, not only in the benchmark's RSS.
        let bytes = EVENT_QUEUE * (std::mem::size_of::<LogEntry>() + 8);
        assert!(bytes <= 4 << 20, "{bytes} bytes");
    }
    use vigil_wire::verdict::{Op, Protocol, Rule};

    fn egress_record(tenant: u32, seq: u64) -> [u8; RECORD_LEN] {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[10, 77, 0, 1]);
        VerdictRepr {
            op: Op::Add,
            tenant,
            seq,
            lifetime_ms: 60_000,
            rule: Rule::egress_to(IpVersion::V4, Protocol::Tcp, addr, 8080),
        }
        .to_bytes()
    }

    #[test]
    fn event_lines_start_with_event_and_vm_and_decode_verdicts() {
        #[derive(Serialize)]
        struct Body {
            x: u8,
        }
        assert_eq!(
            line("tamper", "t1", &Body { x: 3 }).unwrap(),
            r#"{"event":"tamper","vm":"t1","x":3}"#
        );
        let record = egress_record(5, 9);
        let event = verdict_event(5, &record).unwrap();
        assert_eq!(
            (event.seq, event.direction, event.protocol),
            (9, "egress", 6)
        );
        assert_eq!(event.remote, "10.77.0.1:8080");
        assert_eq!(event.record.len(), 2 * RECORD_LEN);
        assert!(
            verdict_event(5, &[0u8; RECORD_LEN]).is_none(),
            "op 0 is not a verdict"
        );
    }

    #[test]
    fn verdict_records_are_logged_as_lowercase_hex_of_every_byte() {
        let record = egress_record(5, 0x0a0b);
        let event = verdict_event(5, &record).unwrap();
        let by_hand: String = record.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(event.record, by_hand);
        assert_eq!(hex::decode(&event.record).unwrap(), record.to_vec());
    }

    #[test]
    fn addresses_print_v4_plain_and_v6_bracketed_and_a_wildcard_remote_as_any() {
        let mut v4 = [0u8; 16];
        v4[..4].copy_from_slice(&[192, 0, 2, 7]);
        assert_eq!(addr_text(IpVersion::V4, &v4, 53), "192.0.2.7:53");
        let v6: [u8; 16] = "fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets();
        assert_eq!(addr_text(IpVersion::V6, &v6, 7000), "[fd00::2]:7000");

        let mut rule = Rule::any(Direction::Ingress, IpVersion::V6, Protocol::Tcp);
        rule.local_addr = v6;
        rule.local_port = 7000;
        let record = VerdictRepr {
            op: Op::Add,
            tenant: 3,
            seq: 1,
            lifetime_ms: 0,
            rule,
        }
        .to_bytes();
        let event = verdict_event(3, &record).unwrap();
        assert_eq!(event.direction, "ingress");
        assert_eq!(event.local, "[fd00::2]:7000");
        assert_eq!(event.remote, "any");
        assert_eq!(event.lifetime_ms, 0);
    }

    #[test]
    fn socket_events_flatten_the_attribution_and_omit_what_is_absent() {
        let event = SocketEvent {
            vcpu: 1,
            t_ns: 2,
            verdict: Verdict::Deny,
            attribution: None,
            error: Some("unreadable".into()),
            verdict_seq: None,
            port_point: None,
            vmm_work_ns: 3,
        };
        let text = line("socket", "t", &event).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["event"], "socket");
        assert_eq!(value["vm"], "t");
        assert_eq!(value["error"], "unreadable");
        assert!(value.get("verdict_seq").is_none());
        assert!(value.get("port_point").is_none());
        assert!(
            text.starts_with(r#"{"event":"socket","vm":"t","vcpu":1,"#),
            "{text}"
        );
    }

    #[test]
    fn the_logger_answers_barriers_and_ends_when_every_sender_is_gone() {
        let (tx, rx) = mpsc::sync_channel(8);
        let logger = std::thread::spawn(move || run_logger("t".into(), 1, rx));
        let (done, wait) = mpsc::channel();
        tx.send(LogEntry::Verdict([0u8; RECORD_LEN])).unwrap();
        tx.send(LogEntry::Barrier(done)).unwrap();
        wait.recv_timeout(Duration::from_secs(10))
            .expect("the barrier is answered");
        drop(tx);
        logger.join().unwrap();
    }
}
