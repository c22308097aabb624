//! Extracts the ELF vmlinux from a bzImage (or copies an ELF kernel) on the host.
//!
//! Usage: `cargo run --release -p vmm-core --example extract_vmlinux -- <bzImage> <out>`
//! scripts/build-tenant-image uses it to produce build/tenant/vmlinux.

use std::process::ExitCode;

use vmm_core::boot::bzimage;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, input, output] = args.as_slice() else {
        eprintln!("usage: extract_vmlinux <bzImage> <out>");
        return ExitCode::from(2);
    };
    match run(input, output) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("extract_vmlinux: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(input: &str, output: &str) -> Result<(), String> {
    let image = std::fs::read(input).map_err(|e| format!("reading {input}: {e}"))?;
    if let Ok(info) = bzimage::inspect(&image) {
        eprintln!(
            "{input}: boot protocol {:x}.{:02x}, {} payload of {} bytes at {:#x}, {} bytes uncompressed",
            info.protocol >> 8,
            info.protocol & 0xff,
            info.compression,
            info.payload_len,
            info.payload_start,
            info.uncompressed_size
        );
    }
    if let Some(release) = bzimage::kernel_release(&image) {
        eprintln!("{input}: kernel release {release}");
    }
    let elf = bzimage::extract_vmlinux(&image).map_err(|e| format!("{input}: {e}"))?;
    // Write beside the target and rename, so an interrupted run never leaves a partial vmlinux
    // that a cache check would take for a finished one.
    let tmp = format!("{output}.tmp");
    std::fs::write(&tmp, &elf).map_err(|e| format!("writing {tmp}: {e}"))?;
    std::fs::rename(&tmp, output).map_err(|e| format!("renaming {tmp} to {output}: {e}"))?;
    eprintln!("{output}: {} bytes (ELF64 x86-64)", elf.len());
    Ok(())
}
