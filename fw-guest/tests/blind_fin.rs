//! A FIN counts where its sender's stream ends: a blind one anywhere else in the window (or one
//! ahead of a hole, which its endpoint holds until the hole fills) leaves an established entry
//! established. Taken as a FIN, it moved the entry to FIN-wait (2 minutes) for good, and an
//! idle connection died under a blind attacker. Real frames, explicit clock.

mod frames;

use frames::edge::*;
use frames::*;
use fw_guest::filter::*;

#[test]
fn a_fin_away_from_the_end_of_its_senders_stream_moves_nothing() {
    use TcpControl::{Fin, Psh};
    let mut f = edge(1024, Config::default());
    let (c, s) = connect(&mut f, 40000, 0);
    // In the window, but not where the client's stream ends: ahead of it (a hole), and behind it.
    for seq in [c.wrapping_add(1000), c.wrapping_sub(50)] {
        let fin = seg(Fin, seq, Some(s), 502, None);
        assert_eq!(inbound(&mut f, 40000, fin, b"", SEC), FWD, "{seq:#x}");
        assert_eq!(state_of(&f, 40000), TcpState::Established, "{seq:#x}");
    }
    // Idle past the FIN-wait timeout, the connection still works.
    let data = seg(Psh, s, Some(c), 509, None);
    assert_eq!(outbound(&mut f, 40000, data, &[9; 10], 300 * SEC), FWD);
    // Real FINs count: where the client's stream ends (after 20 more bytes), then its
    // retransmission, and the server's, with its last data on the same segment.
    let (c, s) = connect(&mut f, 40001, 300 * SEC);
    let more = seg(Psh, c, Some(s), 502, None);
    assert_eq!(inbound(&mut f, 40001, more, &[1; 20], 300 * SEC), FWD);
    let c = c.wrapping_add(20);
    for _ in 0..2 {
        let fin = seg(Fin, c, Some(s), 502, None);
        assert_eq!(inbound(&mut f, 40001, fin, b"", 301 * SEC), FWD);
        assert_eq!(state_of(&f, 40001), TcpState::FinWait);
    }
    let fin = seg(Fin, s, Some(c.wrapping_add(1)), 509, None);
    assert_eq!(outbound(&mut f, 40001, fin, &[2; 30], 302 * SEC), FWD);
    assert_eq!(state_of(&f, 40001), TcpState::Closing);
}
