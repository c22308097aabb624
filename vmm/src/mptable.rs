//! Intel MultiProcessor Specification 1.4 tables: the vCPUs' local APICs, the IOAPIC and the ISA
//! interrupt routing, for guests that do not (or not yet) take these from ACPI.
//!
//! Without either an MP table or an ACPI MADT, Linux switches the local APIC to "virtual wire"
//! mode and ticks from the PIT at HZ through the PIC. On a host whose KVM emulates guest ring 0
//! every tick costs thousands of emulated instructions, and the ticks alone ate most of a vCPU
//! (measured: the alternatives pass of a Debian 6.1 boot took 330 s instead of ~35 s). With an
//! MP table the guest runs its local APIC timer in TSC-deadline mode instead.
//!
//! Layout source: Intel MultiProcessor Specification v1.4, chapter 4 ("MP Configuration Table").

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{IOAPIC_START, LAPIC_START};

/// Where the tables go: the last KiB of conventional memory, one of the places Linux scans for the
/// floating pointer (the memory map does not give it to the guest as RAM).
pub const MPTABLE_START: u64 = 0x9_fc00;
const MPTABLE_MAX: usize = 0x400;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Pins of KVM's in-kernel IOAPIC.
const IOAPIC_PINS: u8 = 24;
/// CPUID signature and feature flags reported per processor (family 6; FPU and APIC present).
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MpTableError {
    #[error("{0} vCPUs do not fit in the MP table (at most {max})", max = max_vcpus())]
    TooManyVcpus(u8),
    #[error("writing the MP table to guest memory failed")]
    GuestWrite,
}

const fn max_vcpus() -> usize {
    // Header + floating pointer + fixed entries, the rest processor entries.
    (MPTABLE_MAX - 16 - 44 - 8 - 8 - (IOAPIC_PINS as usize) * 8 - 2 * 8) / 20
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)))
}

/// Builds the floating pointer and configuration table for `vcpus` processors (APIC IDs 0..n).
pub fn build(vcpus: u8) -> Result<Vec<u8>, MpTableError> {
    if vcpus == 0 || usize::from(vcpus) > max_vcpus() {
        return Err(MpTableError::TooManyVcpus(vcpus));
    }
    let table_address = (MPTABLE_START + 16) as u32;
    let ioapic_id = vcpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION]);
        entries.push(CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        // Source IRQ i on pin i, polarity and trigger conforming to the bus (ISA: edge, high).
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            pin,
            ioapic_id,
            pin,
        ]);
        count += 1;
    }
    // LINT0 is the PIC's ExtINT line, LINT1 NMI, on every local APIC (0xff).
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, below
    header.extend_from_slice(b"VIGIL   ");
    header.extend_from_slice(b"VIGIL-VMM   ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(LAPIC_START as u32).to_le_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(16);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&table_address.to_le_bytes());
    floating.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 1 paragraph, rev 1.4, checksum
    floating[10] = checksum(&floating);

    let mut all = floating;
    all.extend_from_slice(&table);
    Ok(all)
}

/// Writes the MP tables at [`MPTABLE_START`].
pub fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), MpTableError> {
    let bytes = build(vcpus)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(|_| MpTableError::GuestWrite)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts_are_right() {
        let bytes = build(2).unwrap();
        assert_eq!(&bytes[0..4], b"_MP_");
        assert_eq!(bytes[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let table = &bytes[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 2 + 1 + 1 + 24 + 2);
        // The pointer in the floating structure points at the table.
        let ptr = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as u64;
        assert_eq!(ptr, MPTABLE_START + 16);
        // The first processor is the bootstrap processor.
        assert_eq!(table[44 + 3], CPU_ENABLED | CPU_BSP);
        assert!(bytes.len() <= MPTABLE_MAX);
    }

    #[test]
    fn vcpu_count_is_bounded() {
        assert_eq!(build(0), Err(MpTableError::TooManyVcpus(0)));
        assert!(build(max_vcpus() as u8).is_ok());
        assert!(build(max_vcpus() as u8 + 1).is_err());
    }
}
