//! The outcome log of the verdict region: what the micro-VM did with each record it took from the
//! verdict ring, so the VMM knows a verdict is *in* the firewall's table before it lets the call
//! that produced it return (and refuses the call when the table said no).
//!
//! The ring's consumer index only says a record was copied out; a record can still be refused
//! after that (its tenant holds its verdict quota, the verdict table is full, the record does not
//! parse, an `Attach` the port tables refused). Without this log such a refusal is silent: the call
//! was allowed in the guest and its flow is dropped on the wire.
//!
//! Layout (words of 8 bytes, little endian, at [`crate::ring::OUTCOMES_OFFSET`] of the region):
//!
//! | word | field |
//! |---|---|
//! | 0 | magic [`OUTCOMES_MAGIC`] (the micro-VM stores it last when it formats the block) |
//! | 1 | capacity in entries ([`OUTCOME_ENTRIES`]) |
//! | 8 | `done`: ring positions `< done` have their outcome written (own cache line) |
//! | 9 | `room`: `(done mod 2^40) << 24 | r`: after applying every record before `done`, any tenant could add `r` more new verdicts for certain (saturating at 2^24 - 1) |
//! | 16 + (p mod capacity) | entry of ring position p: `p << 8 | code` |
//!
//! Protocol: the micro-VM pops record `p`, applies it, stores the entry (Relaxed), then stores
//! `done = p + 1` with Release. The VMM pushed records `[start, end)`; it waits until `done >= end`
//! (Acquire), then reads each entry and checks that it names its own position: an entry that
//! names another position (overwritten after `OUTCOME_ENTRIES` more records, or garbled by a
//! hostile micro-VM) reads as unknown, which the VMM treats as refused (fail closed).
//!
//! Room: an `Add` is refused only for want of room (its tenant's quota, a free slot, a tenant
//! count), and each record takes at most one unit of each. So if the last `room` word says `r`
//! at position `q`, every record in `[q, q + r)` will be applied: the VMM need not wait for the
//! outcome of a call whose records end at or before `q + r` ([`OutcomeReader::room_covers`]).
//!
//! Owns: the block's layout, the outcome codes, the writer (micro-VM) and reader (VMM) ends.
//! Must not: allocate, or trust the other side: every read is validated and bounded.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::ring::RingError;

/// "VGLOUTC1", little endian.
pub const OUTCOMES_MAGIC: u64 = u64::from_le_bytes(*b"VGLOUTC1");
/// Entries kept: as many as the verdict ring holds, so the outcome of a record the VMM pushed is
/// still there when it looks, unless the ring went round a whole time in between.
pub const OUTCOME_ENTRIES: usize = crate::ring::VERDICT_RING_CAPACITY as usize;

const W_MAGIC: usize = 0;
const W_CAPACITY: usize = 1;
const W_DONE: usize = 8;
const W_ROOM: usize = 9;
const W_ENTRIES: usize = 16;
/// Bits of the position in the `room` word, and of the room.
const ROOM_POS_BITS: u32 = 40;
const ROOM_BITS: u32 = 24;
const ROOM_MAX: u64 = (1 << ROOM_BITS) - 1;
const POS_MASK: u64 = (1 << ROOM_POS_BITS) - 1;

fn room_word(done: u64, room: usize) -> u64 {
    ((done & POS_MASK) << ROOM_BITS) | (room as u64).min(ROOM_MAX)
}

/// Bytes the outcome block needs.
pub const fn outcomes_bytes() -> usize {
    (W_ENTRIES + OUTCOME_ENTRIES) * 8
}

/// What the micro-VM did with one record. The discriminant is the wire code (Vigil's ABI:
/// append only, never renumber). Codes below 16 mean the record took effect.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// An `Add`/`Adopt` that created a verdict.
    Added = 1,
    /// An `Add`/`Adopt` identical to a verdict held already (lifetime refreshed).
    Refreshed = 2,
    /// Any other record applied (`Remove`, `FlushTenant`, `Attach`).
    Done = 3,
    /// Not a verdict record.
    Invalid = 16,
    /// The verdict table had no free slot.
    TableFull = 17,
    /// The record's tenant holds its quota of verdicts.
    OverQuota = 18,
    /// A `Remove` of a verdict not held.
    NotFound = 19,
    /// An `Attach` the port and address tables refused.
    AttachRefused = 20,
    /// (Edge only, never written by a micro-VM.) The edge's book of owners refused the record:
    /// the sending host did not attach the tenant it names.
    NotOwner = 21,
    /// (Edge only, never written by a micro-VM.) An `Attach` that still collided with another
    /// host's tenant or address when the edge's claim wait ran out: that host has not released
    /// it (yet). The claim may be made again.
    Collision = 22,
}

impl Outcome {
    pub const ALL: [Outcome; 10] = [
        Outcome::Added,
        Outcome::Refreshed,
        Outcome::Done,
        Outcome::Invalid,
        Outcome::TableFull,
        Outcome::OverQuota,
        Outcome::NotFound,
        Outcome::AttachRefused,
        Outcome::NotOwner,
        Outcome::Collision,
    ];

    pub fn from_code(code: u8) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| *o as u8 == code)
    }

    /// The record took effect in the micro-VM's tables.
    pub const fn took_effect(self) -> bool {
        (self as u8) < 16
    }

    /// The name events and counters use.
    pub const fn name(self) -> &'static str {
        match self {
            Outcome::Added => "added",
            Outcome::Refreshed => "refreshed",
            Outcome::Done => "done",
            Outcome::Invalid => "invalid_record",
            Outcome::TableFull => "table_full",
            Outcome::OverQuota => "over_quota",
            Outcome::NotFound => "not_found",
            Outcome::AttachRefused => "attach_refused",
            Outcome::NotOwner => "not_owner",
            Outcome::Collision => "collision",
        }
    }
}

fn check(region: &[AtomicU64]) -> Result<(), RingError> {
    let have = region.len() * 8;
    if have < outcomes_bytes() {
        return Err(RingError::RegionTooSmall {
            have,
            need: outcomes_bytes(),
        });
    }
    Ok(())
}

/// The micro-VM's end: one writer.
pub struct OutcomeWriter<'a> {
    region: &'a [AtomicU64],
}

impl<'a> OutcomeWriter<'a> {
    /// Formats the block: every entry unknown, `done` = `resume` (the ring's consumer index when
    /// the micro-VM attaches: records before it were never taken by this micro-VM), the room its
    /// tables have now, magic last.
    pub fn format(
        region: &'a [AtomicU64],
        resume: u64,
        room: usize,
    ) -> Result<OutcomeWriter<'a>, RingError> {
        check(region)?;
        region[W_MAGIC].store(0, Ordering::Relaxed);
        for w in &region[1..outcomes_bytes() / 8] {
            w.store(u64::MAX, Ordering::Relaxed);
        }
        region[W_CAPACITY].store(OUTCOME_ENTRIES as u64, Ordering::Relaxed);
        region[W_DONE].store(resume, Ordering::Relaxed);
        region[W_ROOM].store(room_word(resume, room), Ordering::Relaxed);
        region[W_MAGIC].store(OUTCOMES_MAGIC, Ordering::Release);
        Ok(OutcomeWriter { region })
    }

    /// Records the outcome of ring position `position` and publishes every position up to it as
    /// done, with the room the tables have after it (see the module's Room). Called in ring
    /// order, once per record.
    pub fn record(&self, position: u64, outcome: Outcome, room: usize) {
        let slot = W_ENTRIES + (position as usize % OUTCOME_ENTRIES);
        let done = position.wrapping_add(1);
        self.region[slot].store((position << 8) | outcome as u64, Ordering::Relaxed);
        self.region[W_ROOM].store(room_word(done, room), Ordering::Release);
        self.region[W_DONE].store(done, Ordering::Release);
    }
}

/// Why an outcome could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutcomeError {
    /// The block is not formatted (a micro-VM that keeps no outcome log, or not up yet).
    NotFormatted,
    /// The position is not done yet.
    Pending,
    /// The entry names another position or an unknown code: overwritten, or garbled.
    Unknown,
}

/// The VMM's end.
pub struct OutcomeReader<'a> {
    region: &'a [AtomicU64],
}

impl<'a> OutcomeReader<'a> {
    pub fn attach(region: &'a [AtomicU64]) -> Result<OutcomeReader<'a>, OutcomeError> {
        check(region).map_err(|_| OutcomeError::NotFormatted)?;
        if region[W_MAGIC].load(Ordering::Acquire) != OUTCOMES_MAGIC
            || region[W_CAPACITY].load(Ordering::Relaxed) != OUTCOME_ENTRIES as u64
        {
            return Err(OutcomeError::NotFormatted);
        }
        Ok(OutcomeReader { region })
    }

    /// Whether every position before `end` is done (wrapping, as ring positions are).
    pub fn done_through(&self, end: u64) -> bool {
        let done = self.region[W_DONE].load(Ordering::Acquire);
        done.wrapping_sub(end) < (1 << 62)
    }

    /// The micro-VM's last word on its room: after every record it applied, any tenant could
    /// add this many more new verdicts for certain.
    pub fn room(&self) -> usize {
        (self.region[W_ROOM].load(Ordering::Acquire) & ROOM_MAX) as usize
    }

    /// Whether the micro-VM's last word on its room says every record in `[start, end)` will
    /// be applied (none refused for want of room), though it may not have applied them yet. Only
    /// a word from before `start` says so: one from after it speaks of later records.
    pub fn room_covers(&self, start: u64, end: u64) -> bool {
        let word = self.region[W_ROOM].load(Ordering::Acquire);
        let (at, room) = (word >> ROOM_BITS, word & ROOM_MAX);
        let half = 1 << (ROOM_POS_BITS - 1);
        let before = start.wrapping_sub(at) & POS_MASK;
        let ahead = end.wrapping_sub(at) & POS_MASK;
        before < half && ahead < half && before <= ahead && ahead <= room
    }

    /// The outcome of ring position `position` (which must be done).
    pub fn outcome(&self, position: u64) -> Result<Outcome, OutcomeError> {
        if !self.done_through(position.wrapping_add(1)) {
            return Err(OutcomeError::Pending);
        }
        let entry =
            self.region[W_ENTRIES + (position as usize % OUTCOME_ENTRIES)].load(Ordering::Relaxed);
        // Positions are compared modulo 2^56 (the entry keeps 56 bits of them).
        if (entry >> 8) != (position & (u64::MAX >> 8)) {
            return Err(OutcomeError::Unknown);
        }
        Outcome::from_code(entry as u8).ok_or(OutcomeError::Unknown)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    fn region() -> Vec<AtomicU64> {
        (0..outcomes_bytes() / 8)
            .map(|_| AtomicU64::new(0))
            .collect()
    }

    #[test]
    fn codes_round_trip_and_only_low_codes_took_effect() {
        for o in Outcome::ALL {
            assert_eq!(Outcome::from_code(o as u8), Some(o));
        }
        assert_eq!(Outcome::from_code(0), None);
        assert_eq!(Outcome::from_code(255), None);
        assert!(Outcome::Added.took_effect() && Outcome::Done.took_effect());
        assert!(!Outcome::OverQuota.took_effect() && !Outcome::TableFull.took_effect());
        let mut names: Vec<_> = Outcome::ALL.iter().map(|o| o.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Outcome::ALL.len());
    }

    #[test]
    fn nothing_reads_before_the_block_is_formatted() {
        let r = region();
        assert_eq!(
            OutcomeReader::attach(&r).err(),
            Some(OutcomeError::NotFormatted)
        );
        let short: Vec<AtomicU64> = (0..8).map(|_| AtomicU64::new(0)).collect();
        assert!(OutcomeWriter::format(&short, 0, 0).is_err());
        assert_eq!(
            OutcomeReader::attach(&short).err(),
            Some(OutcomeError::NotFormatted)
        );
    }

    #[test]
    fn outcomes_are_read_per_position_once_done() {
        let r = region();
        let w = OutcomeWriter::format(&r, 10, 0).unwrap();
        let reader = OutcomeReader::attach(&r).unwrap();
        // Positions before the micro-VM attached are done, but their outcome is unknown.
        assert!(reader.done_through(10) && !reader.done_through(11));
        assert_eq!(reader.outcome(9), Err(OutcomeError::Unknown));
        assert_eq!(reader.outcome(10), Err(OutcomeError::Pending));
        w.record(10, Outcome::Added, 0);
        w.record(11, Outcome::OverQuota, 0);
        assert!(reader.done_through(12) && !reader.done_through(13));
        assert_eq!(reader.outcome(10), Ok(Outcome::Added));
        assert_eq!(reader.outcome(11), Ok(Outcome::OverQuota));
        assert_eq!(reader.outcome(12), Err(OutcomeError::Pending));
    }

    #[test]
    fn an_overwritten_or_garbled_entry_is_unknown() {
        let r = region();
        let w = OutcomeWriter::format(&r, 0, 0).unwrap();
        let reader = OutcomeReader::attach(&r).unwrap();
        w.record(3, Outcome::Added, 0);
        // The ring went round: position 3's entry now holds 3 + OUTCOME_ENTRIES.
        w.record(3 + OUTCOME_ENTRIES as u64, Outcome::Done, 0);
        assert_eq!(reader.outcome(3), Err(OutcomeError::Unknown));
        assert_eq!(
            reader.outcome(3 + OUTCOME_ENTRIES as u64),
            Ok(Outcome::Done)
        );
        // A hostile micro-VM writes its own position with a code that means nothing.
        r[W_ENTRIES + 5].store((5 << 8) | 99, Ordering::Relaxed);
        assert_eq!(reader.outcome(5), Err(OutcomeError::Unknown));
        // ... or claims everything is done: entries never written stay unknown (refused).
        r[W_DONE].store(1 << 40, Ordering::Relaxed);
        assert_eq!(reader.outcome(7), Err(OutcomeError::Unknown));
    }

    #[test]
    fn room_covers_exactly_the_records_it_can_take() {
        let r = region();
        // Room for 3 at position 100: records 100, 101, 102 are certain, 103 is not.
        let w = OutcomeWriter::format(&r, 100, 3).unwrap();
        let reader = OutcomeReader::attach(&r).unwrap();
        assert!(reader.room_covers(100, 103) && reader.room_covers(101, 102));
        assert!(!reader.room_covers(100, 104));
        // A word from after the records' start says nothing of them; far ahead is not covered.
        assert!(!reader.room_covers(99, 100));
        assert!(!reader.room_covers(100 + (1 << 39), 101 + (1 << 39)));
        w.record(100, Outcome::Added, 2);
        assert!(reader.room_covers(101, 103) && !reader.room_covers(101, 104));
        assert!(
            !reader.room_covers(100, 102),
            "record 100 was applied: read its outcome"
        );
        w.record(101, Outcome::Added, 0);
        assert!(!reader.room_covers(102, 103), "no room left");
        // Room saturates rather than wraps into a small number.
        w.record(102, Outcome::Added, usize::MAX);
        assert!(reader.room_covers(103, 103 + ROOM_MAX));
        assert!(!reader.room_covers(103, 104 + ROOM_MAX));
        // A formatted block starts with the room it is given, and no room means none.
        let r2 = region();
        OutcomeWriter::format(&r2, 0, 0).unwrap();
        let reader = OutcomeReader::attach(&r2).unwrap();
        assert!(!reader.room_covers(0, 1));
        assert!(reader.room_covers(0, 0), "nothing to take");
    }

    #[test]
    fn positions_wrap() {
        let r = region();
        let start = u64::MAX - 1;
        let w = OutcomeWriter::format(&r, start, 0).unwrap();
        let reader = OutcomeReader::attach(&r).unwrap();
        w.record(start, Outcome::Added, 0);
        w.record(start.wrapping_add(1), Outcome::TableFull, 0);
        w.record(start.wrapping_add(2), Outcome::Refreshed, 0);
        assert!(reader.done_through(start.wrapping_add(3)));
        assert_eq!(reader.outcome(start), Ok(Outcome::Added));
        assert_eq!(reader.outcome(u64::MAX), Ok(Outcome::TableFull));
        assert_eq!(reader.outcome(0), Ok(Outcome::Refreshed));
    }

    #[test]
    fn a_reader_sees_outcomes_written_by_another_thread() {
        let r = std::sync::Arc::new(region());
        let w_region = r.clone();
        let writer = std::thread::spawn(move || {
            let w = OutcomeWriter::format(&w_region, 0, 0).unwrap();
            for p in 0..10_000u64 {
                let o = if p.is_multiple_of(7) {
                    Outcome::OverQuota
                } else {
                    Outcome::Added
                };
                w.record(p, o, 0);
            }
        });
        let reader = loop {
            if let Ok(reader) = OutcomeReader::attach(&r) {
                break reader;
            }
            std::hint::spin_loop();
        };
        let mut p = 0u64;
        while p < 10_000 {
            if !reader.done_through(p + 1) {
                std::hint::spin_loop();
                continue;
            }
            match reader.outcome(p) {
                // Overwritten if the writer ran a whole log ahead: never a wrong code.
                Err(OutcomeError::Unknown) => {}
                Ok(o) => assert_eq!(o == Outcome::OverQuota, p.is_multiple_of(7), "{p}"),
                Err(e) => panic!("{p}: {e:?}"),
            }
            p += 1;
        }
        writer.join().unwrap();
    }
}
