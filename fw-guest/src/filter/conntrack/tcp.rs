//! TCP sequence tracking of a conntrack entry, in the manner of Linux's `tcp_in_window` (after
//! G. van Rooij, "Real stateful TCP packet filtering in IP Filter", 2001): per direction the
//! highest sequence number sent, the highest edge the peer's window allows and the largest window;
//! and the TCP state machine a flag combination moves an entry through.
//!
//! Owns: the windows of a TCP flow ([`TcpExt`]), the in-window test, RST acceptance, the state
//! steps.
//! Must not: allocate, or let a segment outside the window change any state.

use super::*;

/// One direction's sequence-space state of a tracked TCP connection (Rooij's / Linux's
/// `td_end`, `td_maxend`, `td_maxwin`). `maxwin == 0`: nothing seen from this side yet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpWindow {
    /// Highest sequence number sent, plus one (seq + len of the furthest segment).
    pub end: u32,
    /// Highest sequence number the peer's window allows this side to send (ack + window).
    pub maxend: u32,
    /// Largest window (scaled) this side advertised; at least 1 once seen.
    pub maxwin: u32,
}

/// Least slack for acknowledgment numbers below the receiver's highest sequence number (Linux's
/// `MAXACKWINDOW`: a window's worth of ACKs may be reordered behind newer ones).
const MIN_ACK_WINDOW: u32 = 66_000;

/// What [`TcpExt::track`] made of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Track {
    /// In window; the windows were updated.
    InWindow,
    /// A RST whose sequence number is exactly the one the receiver expects next: it closes.
    ExactRst,
    /// A RST inside the window but not exact: it passes (the endpoint decides, RFC 5961 §3.2:
    /// it answers with a challenge ACK) but does not close the entry here.
    InWindowRst,
    /// Outside the window (or a RST that does not acknowledge the SYN it refuses).
    OutOfWindow,
}

/// `a` after `b` in sequence space (RFC 9293 §3.4 modular comparison).
#[inline]
fn after(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) < 0
}

#[inline]
fn before(a: u32, b: u32) -> bool {
    after(b, a)
}

impl TcpExt {
    /// The TCP window of the opener's (`orig`) or the responder's side.
    pub fn window(&self, orig: bool) -> TcpWindow {
        self.win[usize::from(!orig)]
    }

    /// The window scale shift of a side (0 when not negotiated).
    #[inline]
    fn scale(&self, side: usize) -> u8 {
        match (self.wscale >> (4 * side)) & 0xf {
            SCALE_NONE => 0,
            s => s,
        }
    }

    fn set_scale(&mut self, side: usize, wscale: u8) {
        let nibble = if wscale == NO_WSCALE {
            SCALE_NONE
        } else {
            wscale.min(MAX_WSCALE)
        };
        let shift = 4 * side;
        self.wscale = (self.wscale & !(0xf << shift)) | (nibble << shift);
    }

    /// A side's window (re)initialised from its SYN or SYN-ACK: the SYN's window is never scaled
    /// (RFC 7323 §2.2).
    fn init_side(&mut self, side: usize, end: u32, win: u16, wscale: u8) {
        self.win[side] = TcpWindow {
            end,
            maxend: end,
            maxwin: u32::from(win).max(1),
        };
        self.set_scale(side, wscale);
    }

    /// Feed a TCP segment travelling in the opener's direction (`orig`) or against it. The flags
    /// have already passed [`tcp_step`]. In the spirit of Linux's `tcp_in_window`:
    ///
    /// - sender S, receiver R; a segment `[seq, end)` with acknowledgment `ack` and window `win`
    ///   passes when `seq <= S.maxend` (inside what R's window allowed), `end >= S.end -
    ///   R.maxwin` (not older than a window), `ack <= R.end` (acknowledges nothing R has not
    ///   sent) and `ack >= R.end - max(S.maxwin, 66000)` (not older than a window of ACKs);
    /// - a side's first SYN (or SYN-ACK) initialises its window (a retransmitted SYN with a new
    ///   ISN re-initialises it); scaling holds only when both SYNs carried the option;
    /// - a side never seen (an adopted flow, [`TcpExt::adopt_windows`]) is picked up loosely
    ///   from its first segment, and the other side's end from that segment's ACK;
    /// - a RST passes only inside the window: an exact one (`seq == S.end`, what R expects next)
    ///   closes, an inexact one passes without closing (see [`Track`]). Before the handshake
    ///   there is no window: the opener's RST must be exact, the responder's RST to a SYN must
    ///   acknowledge the SYN exactly (RFC 9293 §3.10.7.3); the side of an adopted flow that has
    ///   not spoken may reset it with exactly the sequence number its peer acknowledged.
    ///
    /// `state` is the entry's state byte before the segment. Nothing is updated for a segment
    /// that does not pass, nor for a RST.
    #[inline(always)]
    pub fn track(&mut self, state: u8, orig: bool, f: TcpFlags, g: &TcpSeg) -> Track {
        let (s, r) = if orig { (0, 1) } else { (1, 0) };
        let (sw, rw) = (self.win[s], self.win[r]);
        if f.syn || f.rst || sw.maxwin == 0 || rw.maxwin == 0 {
            return self.track_slow(state, orig, f, g);
        }
        // The common case: a plain segment between two known sides.
        let end = g.seq.wrapping_add(g.len);
        let ack = if f.ack { g.ack } else { rw.end };
        if !in_window(&sw, &rw, g.seq, end, ack) {
            return Track::OutOfWindow;
        }
        self.learn(s, r, ack, end, u32::from(g.win) << self.scale(s));
        Track::InWindow
    }

    /// Everything but a plain segment between two known sides: SYNs, RSTs, pick-ups.
    #[inline(never)]
    fn track_slow(&mut self, state: u8, orig: bool, f: TcpFlags, g: &TcpSeg) -> Track {
        let (s, r) = if orig { (0, 1) } else { (1, 0) };
        let seq = g.seq;
        let end = seq.wrapping_add(g.len);
        let state = TcpState::from_bits(state);
        if f.rst && self.win[s].maxwin == 0 {
            if state == TcpState::Adopted {
                // The side that never spoke answers the adopted segment with a reset: it knows
                // no such connection (the segment was forged, or its flow is gone). RFC 9293
                // §3.10.7.1: the reset carries the segment's acknowledgment number as its
                // sequence number, and no ACK, which is what the pick-up learned as this side's
                // end. (An adopted flow's first segment is never a RST.)
                return if seq == self.win[s].end {
                    Track::ExactRst
                } else {
                    Track::OutOfWindow
                };
            }
            // A RST from a side never seen: only the responder's refusal of the SYN, which must
            // acknowledge it exactly.
            return if !orig && f.ack && g.ack == self.win[r].end {
                Track::ExactRst
            } else {
                Track::OutOfWindow
            };
        }
        if self.win[s].maxwin == 0 {
            if f.syn {
                self.init_side(s, end, g.win, g.wscale);
                if !f.ack {
                    return Track::InWindow;
                }
                // The SYN-ACK settles scaling: both sides or neither (RFC 7323 §1.3).
                if (self.wscale & 0xf) == SCALE_NONE || (self.wscale >> 4) == SCALE_NONE {
                    self.wscale = 0;
                }
            } else {
                // Loose pick-up of a side never seen.
                let swin = (u32::from(g.win) << self.scale(s)).max(1);
                self.win[s] = TcpWindow {
                    end,
                    maxend: end.wrapping_add(swin),
                    maxwin: swin,
                };
                if self.win[r].maxwin == 0 && f.ack {
                    self.win[r].end = g.ack;
                    self.win[r].maxend = g.ack;
                }
            }
        } else if f.syn
            && after(end, self.win[s].end)
            && ((orig && !f.ack && state == TcpState::SynSent)
                || (!orig && f.ack && state == TcpState::SynAckSeen))
        {
            // A new ISN on a retransmitted SYN (or SYN-ACK): start the side again.
            self.init_side(s, end, g.win, g.wscale);
            if !orig && ((self.wscale & 0xf) == SCALE_NONE || (self.wscale >> 4) == SCALE_NONE) {
                self.wscale = 0;
            }
        }
        let rw = self.win[r];
        let sw = self.win[s];
        // No ACK (or the RST+ACK with ack 0 some stacks send): nothing to check on that side.
        let ack = if !f.ack || (f.rst && g.ack == 0) {
            rw.end
        } else {
            g.ack
        };
        if !in_window(&sw, &rw, seq, end, ack) {
            return Track::OutOfWindow;
        }
        if f.rst {
            // A RST carries nothing to learn from; what the receiver expects next is the sender's
            // end so far. Toward a side never seen (the opener aborting its connect) there is no
            // window to be lenient with: exact or nothing.
            return if seq == sw.end {
                Track::ExactRst
            } else if rw.maxwin == 0 {
                Track::OutOfWindow
            } else {
                Track::InWindowRst
            };
        }
        let win = if f.syn {
            u32::from(g.win)
        } else {
            u32::from(g.win) << self.scale(s)
        };
        self.learn(s, r, ack, end, win);
        Track::InWindow
    }

    /// Update both sides from a segment of side `s` that passed: its end, its largest window
    /// (`win`, scaled), and how far the receiver `r` may now send.
    #[inline(always)]
    fn learn(&mut self, s: usize, r: usize, ack: u32, end: u32, win: u32) {
        let sender = &mut self.win[s];
        let s_maxend = sender.maxend;
        sender.maxwin = sender.maxwin.max(win);
        if after(end, sender.end) {
            sender.end = end;
        }
        let receiver = &mut self.win[r];
        if receiver.maxwin != 0 && after(end, s_maxend) {
            receiver.maxwin = receiver.maxwin.saturating_add(end.wrapping_sub(s_maxend));
        }
        // The receiver may send up to what this segment acknowledges plus its window.
        let edge = ack.wrapping_add(win);
        if after(edge, receiver.maxend.wrapping_sub(1)) {
            receiver.maxend = if win == 0 { edge.wrapping_add(1) } else { edge };
        }
    }

    /// Whether a segment with sequence number `seq`, sent by the opener (`orig`) or the
    /// responder, may still be in flight: at most the sender's end, and not more than the
    /// receiver's largest window below it (at least one byte: a SYN not yet answered). A side
    /// never seen has nothing in flight; an adopted flow's sides are picked up loosely, so they
    /// pass once seen.
    pub fn in_flight(&self, orig: bool, seq: u32) -> bool {
        let (s, r) = if orig { (0, 1) } else { (1, 0) };
        let (sw, rw) = (self.win[s], self.win[r]);
        if sw.maxwin == 0 {
            return false;
        }
        let span = rw.maxwin.max(1);
        !after(seq, sw.end) && !before(seq, sw.end.wrapping_sub(span))
    }

    /// An adopted flow knows no windows: each side is picked up from its first segment, with the
    /// largest scale (RFC 7323 §2.3) since the handshake that negotiated it happened elsewhere.
    /// Loose by necessity: it never drops a segment of the real connection.
    pub fn adopt_windows(&mut self) {
        self.win = [TcpWindow::default(); 2];
        self.wscale = MAX_WSCALE | (MAX_WSCALE << 4);
    }
}

/// Rooij's four conditions for a segment `[seq, end)` acknowledging `ack`, sent by side `sw` to
/// side `rw` (see [`TcpExt::track`]).
#[inline(always)]
fn in_window(sw: &TcpWindow, rw: &TcpWindow, seq: u32, end: u32, ack: u32) -> bool {
    let in_recv_win =
        rw.maxwin == 0 || after(end, sw.end.wrapping_sub(rw.maxwin.saturating_add(1)));
    let ack_win = sw.maxwin.max(MIN_ACK_WINDOW);
    before(seq, sw.maxend.wrapping_add(1))
        && in_recv_win
        && before(ack, rw.end.wrapping_add(1))
        && after(ack, rw.end.wrapping_sub(ack_win).wrapping_sub(1))
}

/// Outcome of feeding a TCP segment to a tracked flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpStep {
    /// Pass; new state byte.
    Pass(u8),
    /// The segment does not fit the state.
    Invalid,
    /// A SYN from the opener on a closed flow: treat it as a new flow.
    Reopen,
}

/// The TCP tracking step: `state` is the slot's state byte, `orig` whether the segment travels in
/// the opener's direction. Tracks flags only (no sequence windows).
pub fn tcp_step(state: u8, orig: bool, f: TcpFlags) -> TcpStep {
    let high = state & !STATE_MASK;
    let with = |s: TcpState, extra: u8| TcpStep::Pass(high | extra | s as u8);
    if f.rst {
        return with(TcpState::Closed, 0);
    }
    let fin_bit = if orig { F_FIN_ORIG } else { F_FIN_REPLY };
    let syn_only = f.syn && !f.ack;
    let syn_ack = f.syn && f.ack;
    match TcpState::from_bits(state) {
        TcpState::SynSent => {
            if orig && syn_only {
                with(TcpState::SynSent, 0)
            } else if !orig && syn_ack {
                with(TcpState::SynAckSeen, 0)
            } else {
                TcpStep::Invalid
            }
        }
        TcpState::SynAckSeen => {
            if orig && f.ack && !f.syn {
                if f.fin {
                    with(TcpState::FinWait, fin_bit)
                } else {
                    with(TcpState::Established, 0)
                }
            } else if (orig && syn_only) || (!orig && syn_ack) {
                // Retransmitted handshake segments.
                with(TcpState::SynAckSeen, 0)
            } else {
                TcpStep::Invalid
            }
        }
        TcpState::Established | TcpState::FinWait | TcpState::Closing if f.syn => TcpStep::Invalid,
        TcpState::Established => {
            if f.fin {
                with(TcpState::FinWait, fin_bit)
            } else {
                with(TcpState::Established, 0)
            }
        }
        TcpState::FinWait => {
            let fins = high | if f.fin { fin_bit } else { 0 };
            if fins & (F_FIN_ORIG | F_FIN_REPLY) == F_FIN_ORIG | F_FIN_REPLY {
                TcpStep::Pass(fins | TcpState::Closing as u8)
            } else {
                TcpStep::Pass(fins | TcpState::FinWait as u8)
            }
        }
        TcpState::Closing => with(TcpState::Closing, 0),
        // Provisional until the other side answers (the caller confirms it then): FINs are
        // remembered in their bits meanwhile.
        TcpState::Adopted if f.syn => TcpStep::Invalid,
        TcpState::Adopted => with(TcpState::Adopted, if f.fin { fin_bit } else { 0 }),
        TcpState::Closed => {
            if orig && syn_only {
                TcpStep::Reopen
            } else if f.ack && !f.syn && !f.fin && !f.data {
                // The last ACK of a close, or an ACK answering the reset; no data.
                with(TcpState::Closed, 0)
            } else {
                TcpStep::Invalid
            }
        }
        TcpState::None => TcpStep::Invalid,
    }
}
