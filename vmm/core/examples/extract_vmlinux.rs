//! Extracts the ELF vmlinux from a bzImage (or copies an ELF kernel) on the host.
//!
//! Usage: `cargo run --release -p vmm-core --example extract_vmlinux -- <bzImage> <out>`
//! scripts/build-tenant-image uses it to produce build/tenant/vmlinux. What it prints goes to the
//! person running it (stderr), so it is printed, not logged.

use std::io;
use std::process::ExitCode;

use thiserror::Error;
use vmm_core::boot::bzimage::{self, KernelImageError};

/// Why no vmlinux was written (every variant names the file).
#[derive(Debug, Error)]
enum ExtractError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("{path}: {source}")]
    Image {
        path: String,
        source: KernelImageError,
    },
    #[error("writing {path}: {source}")]
    Write { path: String, source: io::Error },
    #[error("renaming {from} to {to}: {source}")]
    Rename {
        from: String,
        to: String,
        source: io::Error,
    },
}

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

fn run(input: &str, output: &str) -> Result<(), ExtractError> {
    let image = std::fs::read(input).map_err(|source| ExtractError::Read {
        path: input.to_string(),
        source,
    })?;
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
    let elf = bzimage::extract_vmlinux(&image).map_err(|source| ExtractError::Image {
        path: input.to_string(),
        source,
    })?;
    // Write beside the target and rename, so an interrupted run never leaves a partial vmlinux
    // that a cache check would take for a finished one.
    let tmp = format!("{output}.tmp");
    std::fs::write(&tmp, &elf).map_err(|source| ExtractError::Write {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, output).map_err(|source| ExtractError::Rename {
        from: tmp.clone(),
        to: output.to_string(),
        source,
    })?;
    eprintln!("{output}: {} bytes (ELF64 x86-64)", elf.len());
    Ok(())
}
