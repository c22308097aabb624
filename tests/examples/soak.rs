//! `scripts/soak`: the soak loop of `vigil_tests::soak`, longer. Prints one JSON line (cycles,
//! migrations, fds/threads/RSS after the warm-up cycle and at the end, what each host still
//! holds); exits non-zero on any failure or leak.
//!
//! Usage: cargo run --release -p vigil-tests --example soak -- [CYCLES]

fn main() {
    let cycles = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    match vigil_tests::soak::soak(cycles) {
        Ok(report) => println!("{report}"),
        Err(e) => {
            eprintln!("soak: {e}");
            std::process::exit(1);
        }
    }
}
