//! The verdict region of a firewall micro-VM: guest-physical memory the VMM reserves at the top of
//! the micro-VM's RAM and names in its boot information. It holds the verdict ring (the VMM
//! produces, the micro-VM consumes) and the counters block (the micro-VM writes, the VMM reads),
//! laid out by `vigil_wire::ring`. Both sides touch it only as `AtomicU64` words, so a hostile
//! micro-VM can garble what the VMM reads back, never make it undefined.
//!
//! Verdicts that arrive: the micro-VM writes what became of each record into the region's outcome
//! log (`vigil_wire::outcome`: added, refreshed, or refused with the reason: over its tenant's
//! quota, table full, not a record). [`VerdictRegion::deliver`] pushes a call's records and waits,
//! bounded by [`OUTCOME_WAIT`], until the micro-VM has applied them, then reads their outcomes: a
//! call whose verdict the switch refused is denied, never allowed with its flow dropped. No wait
//! when the micro-VM's last published room (free slots, quota left to its fullest tenant) is
//! larger than every record ahead of the call's last one: those cannot be refused (see
//! `vigil_wire::outcome`), so only a tenant near its quota or a nearly full table waits. The wait
//! is a spin on one shared word (no syscall, no allocation) while the micro-VM polls its ring; a
//! micro-VM resting in its idle exit is woken by its doorbell (`crate::idle`: one `unpark`).
//!
//! Owns: the region's placement and format, pushing verdict records, reading the counters and the
//! outcomes back, the idle doorbell, the `--verdicts` file format, waiting for a micro-VM to be
//! ready.
//! Must not: touch the region other than through atomics, or trust what the micro-VM wrote (an
//! outcome it garbled reads as refused).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::idle::IdleDoorbell;

use crate::GuestMemoryMmap;
use serde::Serialize;
use thiserror::Error;
use vigil_wire::outcome::{outcomes_bytes, Outcome, OutcomeReader};
use vigil_wire::ring::{
    self, CountersReader, DropReason, Producer, RingError, COUNTERS_OFFSET, GLOBAL_FLOWS_ACTIVE,
    GLOBAL_FLOWS_ADOPTED, GLOBAL_FLOWS_CREATED, GLOBAL_FLOWS_REVOKED, GLOBAL_FORWARDED,
    GLOBAL_VERDICTS_APPLIED, GLOBAL_VERDICTS_REJECTED, OUTCOMES_OFFSET, PORT_DROPPED,
    PORT_FORWARDED, PORT_RX_FRAMES, STAGE_BUSY_CYCLES, STAGE_BUSY_FRAMES, STAGE_KICKS,
    STAGE_TX_RING_FULL, VERDICT_REGION_BYTES, VERDICT_RING_CAPACITY,
};
use vigil_wire::verdict::{Op, VerdictRepr, RECORD_LEN};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryError};

/// Why a micro-VM's verdict region could not be reserved.
#[derive(Debug, Error)]
pub enum RegionError {
    #[error("the micro-VM's RAM is smaller than its verdict region")]
    RamTooSmall,
    #[error("verdict region at {gpa:#x}: {source}")]
    Start {
        gpa: u64,
        #[source]
        source: GuestMemoryError,
    },
    #[error("verdict region end: {0}")]
    End(#[source] GuestMemoryError),
    /// `RingError` is `no_std` and has no `Error` impl: carried as a value.
    #[error("formatting the verdict ring: {0:?}")]
    Format(RingError),
}

/// Why a `--verdicts` file was refused (lines count from 1).
#[derive(Debug, Error)]
pub enum VerdictLinesError {
    #[error("line {line}: not JSON: {source}")]
    NotJson {
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("line {line}: no \"record\" field")]
    NoRecord { line: usize },
    #[error("line {line}: a record is {} hex digits", 2 * RECORD_LEN)]
    NotARecord { line: usize },
    #[error("{count} verdicts; the ring holds {VERDICT_RING_CAPACITY}")]
    TooMany { count: usize },
}

/// How long [`VerdictRegion::deliver`] waits for the micro-VM to apply a call's records. The
/// micro-VM takes them within microseconds once its vCPU runs; the bound is for a host so loaded
/// that its vCPU thread waits for a CPU (measured here, 2 cores at load 15: p50 0.2 ms, see
/// `verdict_confirm_us`), after which the call is denied (`switch_timeout`).
pub const OUTCOME_WAIT: Duration = Duration::from_millis(20);
/// Most records one delivery carries (a call opens at most a few verdicts).
pub const MAX_DELIVERY: usize = 8;

/// What became of records handed to a micro-VM with [`VerdictRegion::deliver`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivered {
    /// Every record is in the micro-VM's tables; per record, whether it created a verdict
    /// (`true`) or refreshed one it held (`false`).
    Applied([bool; MAX_DELIVERY]),
    /// In the ring, and the micro-VM's last word on its room says none of them can be refused:
    /// it applies them before any frame it reads next.
    Certain,
    /// The ring had no room for the batch: nothing was pushed (worth another try).
    Full,
    /// At least one record was refused (the first refusal's reason); the others took effect as
    /// `added` says (the caller revokes them: the call is denied).
    Refused {
        reason: &'static str,
        added: [bool; MAX_DELIVERY],
    },
    /// The micro-VM did not apply the records within [`OUTCOME_WAIT`] (or its ring is corrupt,
    /// or it keeps no outcome log): they may still apply later, so the caller revokes them.
    Unconfirmed(&'static str),
}

pub struct VerdictRegion {
    /// Keeps the mapping alive as long as the region is used.
    memory: GuestMemoryMmap,
    host: *const AtomicU64,
    pub gpa: u64,
    /// The ring has one producer: every tenant (and vCPU) pushing to this switch takes turns.
    producer: std::sync::Mutex<()>,
    /// Rung by producers of records, and by the micro-VM's network devices (see `idle`).
    doorbell: Arc<IdleDoorbell>,
}

// SAFETY: the region is only accessed through atomics, and the mapping it points into is owned
// (reference-counted) by `memory`.
unsafe impl Send for VerdictRegion {}
// SAFETY: as for `Send`: every access is atomic, and producers serialize on `producer`.
unsafe impl Sync for VerdictRegion {}

/// What the micro-VM's counters block says, as the VMM reports it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FirewallCounters {
    pub forwarded: u64,
    pub verdicts_applied: u64,
    pub verdicts_rejected: u64,
    pub flows_active: u64,
    pub flows_created: u64,
    /// Established flows taken over mid-stream by `Adopt` verdicts (a migrated tenant's).
    pub flows_adopted: u64,
    /// Flows closed because their verdict was removed or their tenant flushed.
    pub flows_revoked: u64,
    /// Drops by reason (only the reasons that occurred).
    pub drops: std::collections::BTreeMap<&'static str, u64>,
    /// Frames dropped because a transmit ring of the micro-VM was full.
    pub tx_ring_full: u64,
    /// Queue notifications the micro-VM wrote (exits).
    pub kicks: u64,
    /// TSC cycles the micro-VM spent in packet-loop rounds that moved frames, and the frames
    /// received in them.
    pub busy_cycles: u64,
    pub busy_frames: u64,
    /// Per port: frames received, forwarded, dropped.
    pub ports: Vec<PortCounters>,
    /// The last TCP segment dropped as out of window, with the windows it was judged against
    /// (absent until there is one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_out_of_window: Option<serde_json::Value>,
}

/// A [`WindowSample`] as the API shows it.
fn sample_json(s: &vigil_wire::ring::WindowSample) -> serde_json::Value {
    let flags: String = [
        (0x02, 'S'),
        (0x10, 'A'),
        (0x01, 'F'),
        (0x04, 'R'),
        (0x08, 'D'),
    ]
    .iter()
    .filter(|(bit, _)| s.flags & bit != 0)
    .map(|(_, c)| *c)
    .collect();
    let remote = if s.ipv6 {
        std::net::IpAddr::from(s.remote).to_string()
    } else {
        std::net::Ipv4Addr::new(s.remote[0], s.remote[1], s.remote[2], s.remote[3]).to_string()
    };
    let window = |w: [u32; 3]| serde_json::json!({"end": w[0], "maxend": w[1], "maxwin": w[2]});
    serde_json::json!({
        "count": s.count,
        "flags": flags,
        "state": s.state,
        "direction": if s.orig { "opener" } else { "responder" },
        "remote": remote,
        "remote_port": s.remote_port,
        "local_port": s.local_port,
        "seq": s.seq,
        "ack": s.ack,
        "len": s.len,
        "win": s.win,
        "sender": window(s.sender),
        "receiver": window(s.receiver),
        "wscale": s.wscale,
        "seq_offset": s.seq_offset,
        "now_s": s.now_s,
    })
}

/// One switch port's counters as the micro-VM published them.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct PortCounters {
    pub rx_frames: u64,
    pub forwarded: u64,
    pub dropped: u64,
}

impl VerdictRegion {
    /// Reserves the region at the top of RAM (page aligned) and formats an empty ring.
    pub fn reserve(memory: &GuestMemoryMmap, ram_size: u64) -> Result<VerdictRegion, RegionError> {
        let bytes = VERDICT_REGION_BYTES as u64;
        let gpa = Self::gpa_for(ram_size).ok_or(RegionError::RamTooSmall)?;
        let host = memory
            .get_host_address(GuestAddress(gpa))
            .map_err(|source| RegionError::Start { gpa, source })?;
        // The whole region must be one contiguous host mapping (one RAM region here).
        memory
            .get_host_address(GuestAddress(gpa + bytes - 1))
            .map_err(RegionError::End)?;
        let region = VerdictRegion {
            memory: memory.clone(),
            host: host as *const AtomicU64,
            gpa,
            producer: std::sync::Mutex::new(()),
            doorbell: Arc::new(IdleDoorbell::default()),
        };
        ring::format(region.words(0, COUNTERS_OFFSET), VERDICT_RING_CAPACITY)
            .map_err(RegionError::Format)?;
        Ok(region)
    }

    pub fn size(&self) -> u64 {
        VERDICT_REGION_BYTES as u64
    }

    /// Where [`VerdictRegion::reserve`] puts the region in `ram_size` bytes of RAM: the last
    /// page-aligned place it fits.
    pub fn gpa_for(ram_size: u64) -> Option<u64> {
        Some(ram_size.checked_sub(VERDICT_REGION_BYTES as u64)? & !0xfff)
    }

    fn words(&self, offset: usize, bytes: usize) -> &[AtomicU64] {
        let _ = &self.memory;
        // SAFETY: offset + bytes <= VERDICT_REGION_BYTES, inside the mapping checked in
        // `reserve`; guest RAM is page aligned, so the words are aligned; `memory` keeps it mapped.
        unsafe { std::slice::from_raw_parts(self.host.add(offset / 8), bytes / 8) }
    }

    /// Pushes verdict records into the ring (in order), all or none: a batch that does not fit
    /// whole is refused with `Full`, so no half of it opens anything.
    pub fn push(&self, records: &[[u8; RECORD_LEN]]) -> Result<(), RingError> {
        self.push_all(records).map(|_| ())
    }

    /// [`push`](Self::push), returning the ring position after the last record; wakes a resting
    /// micro-VM.
    fn push_all(&self, records: &[[u8; RECORD_LEN]]) -> Result<u64, RingError> {
        let end = {
            let _turn = self.producer.lock().unwrap_or_else(|p| p.into_inner());
            let mut producer = Producer::attach(self.words(0, COUNTERS_OFFSET))?;
            if producer.capacity() - producer.in_flight() < records.len() as u64 {
                return Err(RingError::Full);
            }
            for record in records {
                producer.push(record)?;
            }
            producer.position()
        };
        self.ring_doorbell();
        Ok(end)
    }

    /// Pushes a call's records (all or none, at most [`MAX_DELIVERY`]) and waits, up to
    /// [`OUTCOME_WAIT`], until the micro-VM has applied them; then says what became of them.
    /// No allocation, no syscall unless the micro-VM rests (one wake) or the wait outlasts a
    /// short spin (then it yields its CPU between looks).
    pub fn deliver(&self, records: &[[u8; RECORD_LEN]]) -> Delivered {
        self.deliver_as(records, true)
    }

    /// [`deliver`](Self::deliver) that always waits for the outcomes, even when the micro-VM's
    /// room makes them certain (for the benchmark's comparison).
    pub fn deliver_confirmed(&self, records: &[[u8; RECORD_LEN]]) -> Delivered {
        self.deliver_as(records, false)
    }

    fn deliver_as(&self, records: &[[u8; RECORD_LEN]], trust_room: bool) -> Delivered {
        if records.len() > MAX_DELIVERY {
            return Delivered::Unconfirmed("too_many_records");
        }
        let end = match self.push_all(records) {
            Ok(end) => end,
            Err(RingError::Full) => return Delivered::Full,
            Err(_) => return Delivered::Unconfirmed("ring_corrupt"),
        };
        let start = end.wrapping_sub(records.len() as u64);
        let Ok(log) = OutcomeReader::attach(self.words(OUTCOMES_OFFSET, outcomes_bytes())) else {
            return Delivered::Unconfirmed("no_outcome_log");
        };
        // The common case: the switch has room for far more than this call, so it cannot refuse
        // any of it: no wait (its doorbell was rung).
        if trust_room && log.room_covers(start, end) {
            return Delivered::Certain;
        }
        if !self.wait_done(&log, end, OUTCOME_WAIT) {
            return Delivered::Unconfirmed("switch_timeout");
        }
        let mut added = [false; MAX_DELIVERY];
        let mut refused = None;
        for (i, added) in added.iter_mut().enumerate().take(records.len()) {
            match log.outcome(start.wrapping_add(i as u64)) {
                Ok(Outcome::Added) => *added = true,
                Ok(o) if o.took_effect() => {}
                Ok(o) => {
                    refused.get_or_insert(o.name());
                }
                Err(_) => {
                    refused.get_or_insert("outcome_unknown");
                }
            }
        }
        match refused {
            None => Delivered::Applied(added),
            Some(reason) => Delivered::Refused { reason, added },
        }
    }

    /// After a [`push_tracked`](Self::push_tracked) that ended at `end`, waits up to `limit`
    /// until the micro-VM applied the `count` records before `end`, then calls `each(index,
    /// outcome)` for each (`None`: an outcome it did not write). False if they were not applied
    /// in time or the micro-VM keeps no outcome log (then `each` is not called).
    pub fn wait_outcomes(
        &self,
        end: u64,
        count: usize,
        limit: Duration,
        mut each: impl FnMut(usize, Option<Outcome>),
    ) -> bool {
        let Ok(log) = OutcomeReader::attach(self.words(OUTCOMES_OFFSET, outcomes_bytes())) else {
            return false;
        };
        let deadline = Instant::now() + limit;
        while !log.done_through(end) {
            if Instant::now() >= deadline {
                return false;
            }
            self.ring_doorbell();
            std::thread::sleep(Duration::from_micros(20));
        }
        let start = end.wrapping_sub(count as u64);
        for i in 0..count {
            each(i, log.outcome(start.wrapping_add(i as u64)).ok());
        }
        true
    }

    /// Takes back what a refused or unconfirmed delivery may have opened: a `Remove` for each
    /// `Add`/`Adopt` among `records` that `which` selects, pushed behind them (so applied after
    /// them). Returns false if the ring had no room for them.
    pub fn revoke(&self, records: &[[u8; RECORD_LEN]], which: &[bool]) -> bool {
        let mut removes = [[0u8; RECORD_LEN]; MAX_DELIVERY];
        let mut n = 0;
        for (record, _) in records.iter().zip(which).filter(|(_, w)| **w) {
            let Ok(mut v) = VerdictRepr::from_bytes(record) else {
                continue;
            };
            if !matches!(v.op, Op::Add | Op::Adopt) || n == MAX_DELIVERY {
                continue;
            }
            v.op = Op::Remove;
            removes[n] = v.to_bytes();
            n += 1;
        }
        n == 0 || self.push_all(&removes[..n]).is_ok()
    }

    /// Spins (then yields) until the micro-VM has applied every record before `end`, waking it
    /// if it rests; false after `limit`.
    fn wait_done(&self, log: &OutcomeReader<'_>, end: u64, limit: Duration) -> bool {
        let started = Instant::now();
        let mut spins = 0u32;
        loop {
            if log.done_through(end) {
                return true;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) {
                // A micro-VM that went to rest between our push and now.
                self.ring_doorbell();
                if started.elapsed() >= limit {
                    return log.done_through(end);
                }
                if spins >= 64 * 32 {
                    std::thread::yield_now();
                }
            }
            std::hint::spin_loop();
        }
    }

    /// Wakes the micro-VM's vCPU if it rests in its idle exit.
    #[inline]
    fn ring_doorbell(&self) {
        self.doorbell.ring();
    }

    /// The micro-VM's idle doorbell, for the devices that give it work.
    pub fn doorbell(&self) -> Arc<IdleDoorbell> {
        self.doorbell.clone()
    }

    /// The micro-VM's idle exit (its vCPU thread, `us` µs at most): rests unless records wait in
    /// the ring, and wakes as soon as a producer pushes more or a device delivers frames.
    pub fn idle_wait(&self, us: u64) {
        self.doorbell.rest(Duration::from_micros(us), || {
            Producer::attach(self.words(0, COUNTERS_OFFSET))
                .map(|p| p.in_flight() != 0)
                .unwrap_or(false)
        });
    }

    /// Pushes records like [`push`](Self::push) and returns the ring position after the last
    /// one, for [`wait_consumed`](Self::wait_consumed).
    pub fn push_tracked(&self, records: &[[u8; RECORD_LEN]]) -> Result<u64, RingError> {
        let _turn = self.producer.lock().unwrap_or_else(|p| p.into_inner());
        let mut producer = Producer::attach(self.words(0, COUNTERS_OFFSET))?;
        for record in records {
            producer.push(record)?;
        }
        let position = producer.position();
        drop(_turn);
        self.ring_doorbell();
        Ok(position)
    }

    /// Waits until the micro-VM has taken every record up to `position` (it applies what it
    /// takes at once), or `limit` passes. The micro-VM has no doorbell to ring back: this polls
    /// the consumer index, every 20 µs.
    pub fn wait_consumed(&self, position: u64, limit: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let Ok(producer) = Producer::attach(self.words(0, COUNTERS_OFFSET)) else {
                return false;
            };
            let consumed = producer.position().wrapping_sub(producer.in_flight());
            if consumed.wrapping_sub(position) < (1 << 63) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_micros(20));
        }
    }

    /// New verdicts any tenant could add for certain, by the micro-VM's last word (0 when it
    /// keeps no outcome log).
    pub fn room(&self) -> usize {
        OutcomeReader::attach(self.words(OUTCOMES_OFFSET, outcomes_bytes()))
            .map_or(0, |log| log.room())
    }

    /// The counters the micro-VM published, if it formatted the block.
    pub fn counters(&self) -> Option<FirewallCounters> {
        let reader =
            CountersReader::attach(self.words(COUNTERS_OFFSET, OUTCOMES_OFFSET - COUNTERS_OFFSET))
                .ok()?;
        let global = |which| reader.global(which).unwrap_or(0);
        Some(FirewallCounters {
            forwarded: global(GLOBAL_FORWARDED),
            verdicts_applied: global(GLOBAL_VERDICTS_APPLIED),
            verdicts_rejected: global(GLOBAL_VERDICTS_REJECTED),
            flows_active: global(GLOBAL_FLOWS_ACTIVE),
            flows_created: global(GLOBAL_FLOWS_CREATED),
            flows_adopted: global(GLOBAL_FLOWS_ADOPTED),
            flows_revoked: global(GLOBAL_FLOWS_REVOKED),
            drops: DropReason::ALL
                .iter()
                .map(|&r| (r.name(), reader.drops(r)))
                .filter(|&(_, n)| n != 0)
                .collect(),
            tx_ring_full: reader.stage(STAGE_TX_RING_FULL).unwrap_or(0),
            kicks: reader.stage(STAGE_KICKS).unwrap_or(0),
            busy_cycles: reader.stage(STAGE_BUSY_CYCLES).unwrap_or(0),
            busy_frames: reader.stage(STAGE_BUSY_FRAMES).unwrap_or(0),
            ports: (0..reader.ports())
                .map(|p| PortCounters {
                    rx_frames: reader.port(p, PORT_RX_FRAMES).unwrap_or(0),
                    forwarded: reader.port(p, PORT_FORWARDED).unwrap_or(0),
                    dropped: reader.port(p, PORT_DROPPED).unwrap_or(0),
                })
                .collect(),
            last_out_of_window: reader
                .sample()
                .map(|w| sample_json(&vigil_wire::ring::WindowSample::from_words(&w))),
        })
    }
}

/// Parses verdict records for `--verdicts`: one per line, either the 128-digit hex record or a
/// JSON object with a `record` field holding it (the `verdict` events of a tenant's log).
pub fn parse_verdict_lines(text: &str) -> Result<Vec<[u8; RECORD_LEN]>, VerdictLinesError> {
    let mut records = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let value;
        let hex = if line.starts_with('{') {
            value = serde_json::from_str::<serde_json::Value>(line).map_err(|source| {
                VerdictLinesError::NotJson {
                    line: number,
                    source,
                }
            })?;
            value["record"]
                .as_str()
                .ok_or(VerdictLinesError::NoRecord { line: number })?
        } else {
            line
        };
        let mut record = [0u8; RECORD_LEN];
        hex::decode_to_slice(hex, &mut record)
            .map_err(|_| VerdictLinesError::NotARecord { line: number })?;
        records.push(record);
    }
    if records.len() as u64 > VERDICT_RING_CAPACITY {
        return Err(VerdictLinesError::TooMany {
            count: records.len(),
        });
    }
    Ok(records)
}

/// How long a firewall micro-VM may take from start to forwarding.
pub const READY_LIMIT: Duration = Duration::from_secs(20);

/// Waits until a firewall micro-VM has formatted its counters (tables and ports up), or its
/// thread ended, or `READY_LIMIT` passed. The micro-VM has no doorbell: this polls every ms.
pub fn wait_ready<T>(region: &VerdictRegion, thread: &std::thread::JoinHandle<T>) -> bool {
    let deadline = Instant::now() + READY_LIMIT;
    while Instant::now() < deadline && !thread.is_finished() {
        if region.counters().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn verdict_lines_accept_hex_and_events_and_reject_the_rest() {
        let hex = "01".repeat(RECORD_LEN);
        let text = format!("{hex}\n\n{{\"event\":\"verdict\",\"record\":\"{hex}\"}}\n");
        let records = parse_verdict_lines(&text).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0], [1u8; RECORD_LEN]);
        assert!(parse_verdict_lines("abc")
            .unwrap_err()
            .to_string()
            .contains("line 1"));
        assert!(parse_verdict_lines("{\"x\":1}")
            .unwrap_err()
            .to_string()
            .contains("record"));
        assert!(parse_verdict_lines(&"zz".repeat(RECORD_LEN)).is_err());
    }

    #[test]
    fn verdict_line_errors_name_the_line_and_the_cause() {
        let upper = "AB".repeat(RECORD_LEN);
        assert_eq!(
            parse_verdict_lines(&upper).unwrap(),
            vec![[0xab; RECORD_LEN]]
        );
        assert_eq!(
            parse_verdict_lines(&format!("\n{}", "0".repeat(2 * RECORD_LEN - 1)))
                .unwrap_err()
                .to_string(),
            format!("line 2: a record is {} hex digits", 2 * RECORD_LEN)
        );
        assert_eq!(
            parse_verdict_lines("{\"x\":1}").unwrap_err().to_string(),
            "line 1: no \"record\" field"
        );
        let e = parse_verdict_lines("{nope").unwrap_err();
        assert!(e.to_string().starts_with("line 1: not JSON: "));
        assert!(std::error::Error::source(&e).is_some());
        let too_many =
            format!("{}\n", "00".repeat(RECORD_LEN)).repeat(VERDICT_RING_CAPACITY as usize + 1);
        assert_eq!(
            parse_verdict_lines(&too_many).unwrap_err().to_string(),
            format!(
                "{} verdicts; the ring holds {VERDICT_RING_CAPACITY}",
                VERDICT_RING_CAPACITY + 1
            )
        );
    }

    #[test]
    fn a_region_needs_room_in_ram() {
        let size = 64 << 10;
        let memory = crate::anonymous_memory(size, true).unwrap();
        // The ring alone is VERDICT_RING_CAPACITY records of RECORD_LEN bytes.
        assert!(VERDICT_REGION_BYTES > size);
        assert!(matches!(
            VerdictRegion::reserve(&memory, size as u64),
            Err(RegionError::RamTooSmall)
        ));
        // RAM said to be larger than what is mapped: the region's start is not guest memory.
        let e = VerdictRegion::reserve(&memory, 64 << 20).err().unwrap();
        assert!(matches!(e, RegionError::Start { .. }), "{e}");
    }

    /// The micro-VM's side of the protocol, as fw-guest runs it (`drain_ring_reporting`): pops
    /// each record and writes the outcome `decide` gives it. A test double for the micro-VM,
    /// whose real run is tested end to end (tests/tests/switch.rs).
    fn micro_vm(
        region: std::sync::Arc<VerdictRegion>,
        stop: std::sync::Arc<AtomicBool>,
        decide: impl Fn(&VerdictRepr) -> Outcome + Send + 'static,
    ) -> std::thread::JoinHandle<Vec<VerdictRepr>> {
        use vigil_wire::outcome::OutcomeWriter;
        let (up, is_up) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let mut consumer = ring::Consumer::attach(region.words(0, COUNTERS_OFFSET)).unwrap();
            let log = OutcomeWriter::format(
                region.words(OUTCOMES_OFFSET, outcomes_bytes()),
                consumer.position(),
                0,
            )
            .unwrap();
            up.send(()).unwrap();
            let mut seen = Vec::new();
            let mut out = [0u8; RECORD_LEN];
            while !stop.load(Ordering::Relaxed) {
                let position = consumer.position();
                if !consumer.pop(&mut out).unwrap() {
                    // Rests as the micro-VM does when idle: the producer's push wakes it.
                    region.idle_wait(500);
                    continue;
                }
                let v = VerdictRepr::from_bytes(&out).unwrap();
                log.record(position, decide(&v), 0);
                seen.push(v);
            }
            seen
        });
        is_up.recv().unwrap();
        thread
    }

    fn add(port: u16) -> [u8; RECORD_LEN] {
        use vigil_wire::verdict::{IpVersion, Protocol, Rule};
        VerdictRepr {
            op: Op::Add,
            tenant: 5,
            seq: u64::from(port),
            lifetime_ms: 0,
            rule: Rule::egress_to(
                IpVersion::V4,
                Protocol::Tcp,
                [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                port,
            ),
        }
        .to_bytes()
    }

    fn region() -> std::sync::Arc<VerdictRegion> {
        let size = 8 << 20;
        let memory = crate::anonymous_memory(size, true).unwrap();
        std::sync::Arc::new(VerdictRegion::reserve(&memory, size as u64).unwrap())
    }

    #[test]
    fn a_delivery_returns_once_applied_and_names_a_refusal() {
        let region = region();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        // Port 9 is over the tenant's quota; port 7 is held already.
        let vm = micro_vm(region.clone(), stop.clone(), |v| {
            match v.rule.remote_port_min {
                9 => Outcome::OverQuota,
                7 => Outcome::Refreshed,
                _ if v.op == Op::Remove => Outcome::Done,
                _ => Outcome::Added,
            }
        });
        let mut expect = [false; MAX_DELIVERY];
        expect[0] = true;
        assert_eq!(
            region.deliver(&[add(80), add(7)]),
            Delivered::Applied(expect)
        );
        // Many in a row, each confirmed before the next (the micro-VM rests in between).
        for port in 100..200 {
            assert!(
                matches!(region.deliver(&[add(port)]), Delivered::Applied(_)),
                "{port}"
            );
        }
        let refused = region.deliver(&[add(81), add(9)]);
        let mut added = [false; MAX_DELIVERY];
        added[0] = true;
        assert_eq!(
            refused,
            Delivered::Refused {
                reason: "over_quota",
                added
            }
        );
        // The refused call's other verdict is taken back: a Remove behind it.
        assert!(region.revoke(&[add(81), add(9)], &added));
        assert!(matches!(region.deliver(&[add(300)]), Delivered::Applied(_)));
        stop.store(true, Ordering::Relaxed);
        let seen = vm.join().unwrap();
        let removes: Vec<_> = seen.iter().filter(|v| v.op == Op::Remove).collect();
        assert_eq!(removes.len(), 1);
        assert_eq!(removes[0].rule.remote_port_min, 81);
        assert_eq!(seen.len(), 2 + 100 + 2 + 1 + 1);
    }

    #[test]
    fn room_the_micro_vm_published_spares_the_wait_and_only_that() {
        let region = region();
        // A micro-VM that says it has room for 4 records, then never applies anything.
        vigil_wire::outcome::OutcomeWriter::format(
            region.words(OUTCOMES_OFFSET, outcomes_bytes()),
            0,
            4,
        )
        .unwrap();
        let started = Instant::now();
        assert_eq!(region.deliver(&[add(1), add(2)]), Delivered::Certain);
        assert_eq!(region.deliver(&[add(3), add(4)]), Delivered::Certain);
        assert!(started.elapsed() < OUTCOME_WAIT, "no wait");
        // The fifth record is beyond its room: this one waits for the outcome (none comes).
        assert_eq!(
            region.deliver(&[add(5)]),
            Delivered::Unconfirmed("switch_timeout")
        );
        // And the comparison path never trusts the room.
        assert_eq!(
            region.deliver_confirmed(&[add(6)]),
            Delivered::Unconfirmed("switch_timeout")
        );
    }

    #[test]
    fn a_micro_vm_that_does_not_answer_leaves_the_delivery_unconfirmed() {
        let region = region();
        // No outcome log: a micro-VM that never formatted one (not up, or one that keeps none).
        assert_eq!(
            region.deliver(&[add(80)]),
            Delivered::Unconfirmed("no_outcome_log")
        );
        // A log, but nobody applies: the wait is bounded.
        vigil_wire::outcome::OutcomeWriter::format(
            region.words(OUTCOMES_OFFSET, outcomes_bytes()),
            0,
            0,
        )
        .unwrap();
        let started = Instant::now();
        assert_eq!(
            region.deliver(&[add(81)]),
            Delivered::Unconfirmed("switch_timeout")
        );
        assert!(started.elapsed() >= OUTCOME_WAIT);
        assert!(started.elapsed() < OUTCOME_WAIT * 20, "bounded");
        // The batch is too large for one call.
        assert_eq!(
            region.deliver(&[add(1); MAX_DELIVERY + 1]),
            Delivered::Unconfirmed("too_many_records")
        );
    }

    #[test]
    fn an_outcome_the_micro_vm_did_not_write_is_a_refusal() {
        let region = region();
        // A hostile micro-VM claims far more records done than it applied, writing no outcome.
        vigil_wire::outcome::OutcomeWriter::format(
            region.words(OUTCOMES_OFFSET, outcomes_bytes()),
            1 << 40,
            0,
        )
        .unwrap();
        assert_eq!(
            region.deliver(&[add(1), add(2)]),
            Delivered::Refused {
                reason: "outcome_unknown",
                added: [false; MAX_DELIVERY]
            }
        );
    }

    #[test]
    fn ring_round_trip_through_guest_memory() {
        let size = 8 << 20;
        let memory = crate::anonymous_memory(size, true).unwrap();
        let region = VerdictRegion::reserve(&memory, size as u64).unwrap();
        assert_eq!(region.gpa % 4096, 0);
        assert!(region.gpa + region.size() <= size as u64);
        region
            .push(&[[7u8; RECORD_LEN], [8u8; RECORD_LEN]])
            .unwrap();
        // The consumer side, as the micro-VM runs it.
        let mut consumer = ring::Consumer::attach(region.words(0, COUNTERS_OFFSET)).unwrap();
        let mut out = [0u8; RECORD_LEN];
        assert!(consumer.pop(&mut out).unwrap());
        assert_eq!(out, [7u8; RECORD_LEN]);
        assert!(consumer.pop(&mut out).unwrap());
        assert!(!consumer.pop(&mut out).unwrap());
        // Nothing published yet: no counters.
        assert!(region.counters().is_none());
    }
}
