//! Symbolizes a guest RIP profile (`VIGIL_PROFILE` output: "count rip" lines) with the kallsyms
//! of a vmlinux, and sums the samples per function.
//! Usage: cargo run --release -p trap-handler --example symbolize -- <vmlinux> <profile>

use std::collections::HashMap;

use trap_handler::elf::Elf;
use trap_handler::kallsyms::Kallsyms;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(vmlinux), Some(profile)) = (args.next(), args.next()) else {
        return Err("usage: symbolize <vmlinux> <profile>".into());
    };
    let bytes = std::fs::read(vmlinux)?;
    let elf = Elf::parse(&bytes)?;
    let (kallsyms, _) = Kallsyms::from_elf(&elf)?;
    let mut per_function: HashMap<String, u64> = HashMap::new();
    let mut total = 0u64;
    for line in std::fs::read_to_string(profile)?.lines() {
        let mut parts = line.split_whitespace();
        let (Some(count), Some(rip)) = (parts.next(), parts.next()) else {
            continue;
        };
        let count: u64 = count.parse()?;
        let rip = u64::from_str_radix(rip.trim_start_matches("0x"), 16)?;
        let name = match kallsyms.symbolize(rip) {
            Some((symbol, _offset)) => symbol.name.clone(),
            None => format!("{rip:#x}"),
        };
        *per_function.entry(name).or_default() += count;
        total += count;
    }
    let mut rows: Vec<_> = per_function.into_iter().collect();
    rows.sort_by_key(|row| std::cmp::Reverse(row.1));
    for (name, count) in rows.iter().take(40) {
        println!(
            "{:6.2}% {count:7} {name}",
            100.0 * *count as f64 / total as f64
        );
    }
    Ok(())
}
