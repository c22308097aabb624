//! Prints the kernel profile (JSON) of a vmlinux and how long each discovery step took.
//! Usage: cargo run --release -p trap-handler --example kernel-profile -- <vmlinux>

use std::time::Instant;

use trap_handler::btf::Btf;
use trap_handler::elf::{hex, Elf};
use trap_handler::kallsyms::Kallsyms;
use trap_handler::profile::KernelProfile;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: kernel-profile <vmlinux>")?;
    let t = Instant::now();
    let bytes = std::fs::read(&path)?;
    let read = t.elapsed();
    let elf = Elf::parse(&bytes)?;
    let t = Instant::now();
    let btf = Btf::from_elf(&elf)?;
    let btf_t = t.elapsed();
    let t = Instant::now();
    let (ks, seg) = Kallsyms::from_elf(&elf)?;
    let ks_t = t.elapsed();
    let t = Instant::now();
    let profile = KernelProfile::build(&btf, Some(&ks), elf.build_id().map(hex))?;
    let prof_t = t.elapsed();
    println!("{}", serde_json::to_string_pretty(&profile)?);
    let tb = &ks.tables;
    eprintln!(
        "kallsyms tables at: offsets {:#x} relative_base {:#x} num_syms {:#x} names {:#x} markers {:#x} \
         seqs_of_names {:?} token_table {:#x} token_index {:#x}",
        seg + tb.offsets as u64,
        seg + tb.relative_base as u64,
        seg + tb.num_syms as u64,
        seg + tb.names as u64,
        seg + tb.markers as u64,
        tb.seqs_of_names.map(|s| format!("{:#x}", seg + s as u64)),
        seg + tb.token_table as u64,
        seg + tb.token_index as u64,
    );
    eprintln!(
        "read {read:?}; BTF parse {btf_t:?} ({} types); kallsyms find+decode {ks_t:?} ({} symbols); profile {prof_t:?}",
        btf.type_count(),
        ks.symbols().len()
    );
    Ok(())
}
