//! The verdict region of a firewall micro-VM: guest-physical memory the VMM reserves at the top of
//! the micro-VM's RAM and names in its boot information. It holds the verdict ring (the VMM
//! produces, the micro-VM consumes) and the counters block (the micro-VM writes, the VMM reads),
//! laid out by `vigil_wire::ring`. Both sides touch it only as `AtomicU64` words, so a hostile
//! micro-VM can garble what the VMM reads back, never make it undefined.
//!
//! Owns: the region's placement and format, pushing verdict records, reading the counters back,
//! the `--verdicts` file format, waiting for a micro-VM to be ready.
//! Must not: touch the region other than through atomics, or trust what the micro-VM wrote.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use crate::GuestMemoryMmap;
use serde::Serialize;
use thiserror::Error;
use vigil_wire::ring::{
    self, CountersReader, DropReason, Producer, RingError, COUNTERS_OFFSET, GLOBAL_FLOWS_ACTIVE,
    GLOBAL_FLOWS_ADOPTED, GLOBAL_FLOWS_CREATED, GLOBAL_FLOWS_REVOKED, GLOBAL_FORWARDED,
    GLOBAL_VERDICTS_APPLIED, GLOBAL_VERDICTS_REJECTED, PORT_DROPPED, PORT_FORWARDED,
    PORT_RX_FRAMES, STAGE_BUSY_CYCLES, STAGE_BUSY_FRAMES, STAGE_KICKS, STAGE_TX_RING_FULL,
    VERDICT_REGION_BYTES, VERDICT_RING_CAPACITY,
};
use vigil_wire::verdict::RECORD_LEN;
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

pub struct VerdictRegion {
    /// Keeps the mapping alive as long as the region is used.
    memory: GuestMemoryMmap,
    host: *const AtomicU64,
    pub gpa: u64,
    /// The ring has one producer: every tenant (and vCPU) pushing to this switch takes turns.
    producer: std::sync::Mutex<()>,
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
        let gpa = ram_size
            .checked_sub(bytes)
            .ok_or(RegionError::RamTooSmall)?
            & !0xfff;
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
        };
        ring::format(region.words(0, COUNTERS_OFFSET), VERDICT_RING_CAPACITY)
            .map_err(RegionError::Format)?;
        Ok(region)
    }

    pub fn size(&self) -> u64 {
        VERDICT_REGION_BYTES as u64
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
        let _turn = self.producer.lock().unwrap_or_else(|p| p.into_inner());
        let mut producer = Producer::attach(self.words(0, COUNTERS_OFFSET))?;
        if producer.capacity() - producer.in_flight() < records.len() as u64 {
            return Err(RingError::Full);
        }
        for record in records {
            producer.push(record)?;
        }
        Ok(())
    }

    /// Pushes records like [`push`](Self::push) and returns the ring position after the last
    /// one, for [`wait_consumed`](Self::wait_consumed).
    pub fn push_tracked(&self, records: &[[u8; RECORD_LEN]]) -> Result<u64, RingError> {
        let _turn = self.producer.lock().unwrap_or_else(|p| p.into_inner());
        let mut producer = Producer::attach(self.words(0, COUNTERS_OFFSET))?;
        for record in records {
            producer.push(record)?;
        }
        Ok(producer.position())
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

    /// The counters the micro-VM published, if it formatted the block.
    pub fn counters(&self) -> Option<FirewallCounters> {
        let reader = CountersReader::attach(
            self.words(COUNTERS_OFFSET, VERDICT_REGION_BYTES - COUNTERS_OFFSET),
        )
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
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap();
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

    #[test]
    fn ring_round_trip_through_guest_memory() {
        let size = 8 << 20;
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap();
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
