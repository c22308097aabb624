//! Runs files through one target's harness and times each: `cargo run -p fuzz-harness --example
//! replay -- TARGET FILE…` (a crash from `fuzz/artifacts/` reproduced on stable, with a backtrace).

fn main() {
    let mut args = std::env::args().skip(1);
    let name = args.next().expect("usage: replay TARGET FILE…");
    let target = fuzz_harness::target(&name).expect("no such target");
    for path in args {
        let data = std::fs::read(&path).expect("read input");
        let start = std::time::Instant::now();
        (target.run)(&data);
        println!("{path}: {} bytes, {:?}", data.len(), start.elapsed());
    }
}
