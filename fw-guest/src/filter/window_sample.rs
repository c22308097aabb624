//! The last segment the filter dropped as out of window, kept with the windows it was judged
//! against, for the counters block (`vigil_wire::ring::WindowSample`): what tells an injected
//! segment from a legitimate one the tracker misjudged.
//!
//! Owns: filling [`Counters::last_out_of_window`]. Must not: change any window or state.

use super::*;

impl Filter<'_> {
    /// Keeps the segment of slot `i` just judged out of window, with the windows as they stand
    /// (a segment out of window changes none of them), for the counters block.
    #[cold]
    #[inline(never)]
    pub(super) fn sample_out_of_window(
        &mut self,
        i: usize,
        orig: bool,
        flags: TcpFlags,
        seg: &TcpSeg,
        now_s: u32,
    ) {
        let s = self.conntrack.slot(i);
        let key = s.key();
        let w = |win: conntrack::TcpWindow| [win.end, win.maxend, win.maxwin];
        let previous = self.counters.last_out_of_window.count;
        self.counters.last_out_of_window = ring::WindowSample {
            count: previous + 1,
            flags: u8::from(flags.fin)
                | (u8::from(flags.syn) << 1)
                | (u8::from(flags.rst) << 2)
                | (u8::from(flags.data) << 3)
                | (u8::from(flags.ack) << 4),
            state: s.state_byte(),
            orig,
            ipv6: key.is_some_and(|k| k.ip_version == IpVersion::V6),
            seq: seg.seq,
            ack: seg.ack,
            len: seg.len,
            win: seg.win,
            remote_port: key.map_or(0, |k| k.remote_port),
            local_port: key.map_or(0, |k| k.local_port),
            remote: key.map_or([0; 16], |k| k.remote),
            sender: w(s.window(orig)),
            receiver: w(s.window(!orig)),
            wscale: s.wscale_nibbles(),
            seq_offset: s.seq_offset(),
            now_s,
        };
    }
}
