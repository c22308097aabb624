//! ACPI tables (RSDP, XSDT, FADT, MADT, DSDT) that describe the vCPUs, the interrupt controllers and
//! the virtio-mmio devices ("LNRO0005"), because Debian's kernel lacks
//! `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES` (and `CONFIG_X86_MPPARSE`, so there is no MP-table
//! fallback either). Without a MADT Linux leaves its local APIC in virtual-wire mode and ticks from
//! the PIT through the PIC; on an emulating KVM host those ticks alone ate most of a vCPU.
//!
//! The platform is "hardware-reduced ACPI" (no PM timer, no SCI, no fixed hardware): shutdown is
//! the FADT sleep control register, an I/O port the VMM watches ([`SLEEP_CONTROL_PORT`]).
//! Table layouts: ACPI specification 6.4, chapter 5; AML encoding: chapter 20.
//!
//! Owns: building the tables in guest memory and the RSDP address the boot information names.
//! Must not: describe a device the VM does not have, or write outside the ACPI area of the layout.

use crate::GuestMemoryMmap;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::devices::MmioDeviceInfo;
use crate::layout::{ACPI_SIZE, ACPI_START, IOAPIC_START, LAPIC_START};

/// I/O port of the FADT sleep control register. A write with SLP_EN (bit 5) set enters the sleep
/// state in SLP_TYP (bits 2-4); the DSDT's `_S5_` names 5 for soft-off.
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// SLP_EN bit of the sleep control register.
pub const SLEEP_ENABLE: u8 = 1 << 5;
/// SLP_TYP we give S5 (soft off) in `_S5_`.
pub const S5_SLEEP_TYPE: u8 = 5;

const OEM_ID: &[u8; 6] = b"VIGIL ";
const OEM_TABLE_ID: &[u8; 8] = b"VIGILVMM";
const CREATOR_ID: &[u8; 4] = b"VGIL";
/// FADT flag: HW_REDUCED_ACPI (ACPI 6.4 table 5.10).
const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;
/// IAPC_BOOT_ARCH: VGA not present (bit 2); no 8042 (bit 1 clear), so guests skip probing one.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
/// MADT flag: a dual 8259 PIC is present (KVM's in-kernel irqchip has one).
const MADT_PCAT_COMPAT: u32 = 1;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AcpiError {
    #[error("the ACPI tables ({0} bytes) do not fit their {ACPI_SIZE}-byte region")]
    TooLarge(usize),
    #[error("writing the ACPI tables to guest memory failed")]
    GuestWrite,
    #[error("{0} vCPUs: ACPI local APIC IDs here are one byte, at most 254")]
    TooManyVcpus(usize),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)))
}

/// A system description table: the 36-byte header, then `body`.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(36 + body.len());
    t.extend_from_slice(signature);
    t.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// Generic Address Structure for one byte-wide I/O port.
fn gas_io_byte(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // System I/O space
    g[1] = 8; // bit width
    g[3] = 1; // byte access
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

fn fadt(dsdt_address: u64) -> Vec<u8> {
    // Body offsets below are table offsets minus the 36-byte header.
    let mut body = vec![0u8; 276 - 36];
    let at = |offset: usize| offset - 36;
    body[at(40)..at(44)].copy_from_slice(&(dsdt_address as u32).to_le_bytes());
    body[at(109)..at(111)].copy_from_slice(&IAPC_VGA_NOT_PRESENT.to_le_bytes());
    body[at(112)..at(116)].copy_from_slice(&FADT_HW_REDUCED_ACPI.to_le_bytes());
    body[at(131)] = 3; // FADT minor version (6.3+)
    body[at(140)..at(148)].copy_from_slice(&dsdt_address.to_le_bytes());
    body[at(244)..at(256)].copy_from_slice(&gas_io_byte(SLEEP_CONTROL_PORT));
    body[at(256)..at(268)].copy_from_slice(&gas_io_byte(SLEEP_CONTROL_PORT));
    body[at(268)..at(276)].copy_from_slice(b"VIGILVMM");
    sdt(b"FACP", 6, &body)
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(LAPIC_START as u32).to_le_bytes());
    body.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for id in 0..vcpus {
        // Processor Local APIC: type 0, length 8, ACPI processor UID, APIC ID, flags (enabled).
        body.extend_from_slice(&[0, 8, id, id]);
        body.extend_from_slice(&1u32.to_le_bytes());
    }
    // I/O APIC: type 1, length 12, ID, reserved, address, GSI base 0.
    body.extend_from_slice(&[1, 12, vcpus, 0]);
    body.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    // Interrupt Source Override: ISA IRQ 0 (the PIT) arrives on GSI 2, as KVM routes it.
    body.extend_from_slice(&[2, 10, 0, 0]);
    body.extend_from_slice(&2u32.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    sdt(b"APIC", 5, &body)
}

/// AML PkgLength (ACPI 6.4 §20.2.4): the length counts its own bytes.
fn pkg_length(content_len: usize) -> Vec<u8> {
    for extra in 0..4usize {
        let total = content_len + 1 + extra;
        let fits = match extra {
            0 => total < 0x40,
            1 => total < 0x1000,
            2 => total < 0x10_0000,
            _ => total < 0x1000_0000,
        };
        if fits {
            if extra == 0 {
                return vec![total as u8];
            }
            let mut bytes = vec![((extra as u8) << 6) | (total & 0xf) as u8];
            for i in 0..extra {
                bytes.push((total >> (4 + 8 * i)) as u8);
            }
            return bytes;
        }
    }
    unreachable!("AML packages here are far below 256 MiB")
}

/// AML integer constant.
fn aml_integer(value: u32) -> Vec<u8> {
    match value {
        0 => vec![0x00],
        1 => vec![0x01],
        v if v <= 0xff => vec![0x0a, v as u8],
        v if v <= 0xffff => {
            let mut b = vec![0x0b];
            b.extend_from_slice(&(v as u16).to_le_bytes());
            b
        }
        v => {
            let mut b = vec![0x0c];
            b.extend_from_slice(&v.to_le_bytes());
            b
        }
    }
}

/// `Name(seg, <object>)`.
fn aml_name(seg: &[u8; 4], object: &[u8]) -> Vec<u8> {
    let mut b = vec![0x08];
    b.extend_from_slice(seg);
    b.extend_from_slice(object);
    b
}

fn aml_string(s: &str) -> Vec<u8> {
    let mut b = vec![0x0d];
    b.extend_from_slice(s.as_bytes());
    b.push(0);
    b
}

/// `_CRS` of a virtio-mmio device: its register window and its interrupt (edge, active high:
/// KVM irqfds inject edges into the IOAPIC).
fn virtio_crs(device: &MmioDeviceInfo) -> Vec<u8> {
    let mut resources = Vec::new();
    // Memory32Fixed: tag 0x86, length 9, read/write, base, length.
    resources.extend_from_slice(&[0x86, 0x09, 0x00, 0x01]);
    resources.extend_from_slice(&(device.base as u32).to_le_bytes());
    resources.extend_from_slice(&(device.size as u32).to_le_bytes());
    // Extended Interrupt: tag 0x89, length 6, flags (consumer | edge), one interrupt.
    resources.extend_from_slice(&[0x89, 0x06, 0x00, 0b0000_0011, 0x01]);
    resources.extend_from_slice(&device.gsi.to_le_bytes());
    // End tag with a zero checksum (accepted as "no checksum").
    resources.extend_from_slice(&[0x79, 0x00]);
    let mut buffer = aml_integer(resources.len() as u32);
    buffer.extend_from_slice(&resources);
    let mut b = vec![0x11];
    b.extend_from_slice(&pkg_length(buffer.len()));
    b.extend_from_slice(&buffer);
    b
}

/// COM1 as a PNP0501 device with its I/O ports and ISA IRQ 4. Hardware-reduced ACPI gives Linux
/// no legacy PIC, so ISA IRQs are not mapped up front: without this device the 8250 driver cannot
/// get IRQ 4 and every open of the console tty fails (the kernel's own printk, which polls, still
/// works, which hid it).
fn com1_device() -> Vec<u8> {
    let mut resources = Vec::new();
    // I/O port descriptor: tag 0x47, 16-bit decode, min = max = 0x3f8, alignment 1, 8 ports.
    resources.extend_from_slice(&[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]);
    // IRQ descriptor without flags (edge, active high): tag 0x22, mask with bit 4.
    resources.extend_from_slice(&[0x22, 0x10, 0x00]);
    resources.extend_from_slice(&[0x79, 0x00]);
    let mut buffer = aml_integer(resources.len() as u32);
    buffer.extend_from_slice(&resources);
    let mut crs = vec![0x11];
    crs.extend_from_slice(&pkg_length(buffer.len()));
    crs.extend_from_slice(&buffer);
    let mut dev = b"COM1".to_vec();
    dev.extend_from_slice(&aml_name(b"_HID", &aml_string("PNP0501")));
    dev.extend_from_slice(&aml_name(b"_UID", &aml_integer(0)));
    dev.extend_from_slice(&aml_name(b"_CRS", &crs));
    let mut b = vec![0x5b, 0x82];
    b.extend_from_slice(&pkg_length(dev.len()));
    b.extend_from_slice(&dev);
    b
}

fn dsdt(devices: &[MmioDeviceInfo]) -> Vec<u8> {
    let mut scope_body = b"\\_SB_".to_vec();
    scope_body.extend_from_slice(&com1_device());
    for (i, device) in devices.iter().enumerate() {
        let mut dev = format!("V{i:03X}").into_bytes();
        dev.extend_from_slice(&aml_name(b"_HID", &aml_string("LNRO0005")));
        dev.extend_from_slice(&aml_name(b"_UID", &aml_integer(i as u32)));
        dev.extend_from_slice(&aml_name(b"_CRS", &virtio_crs(device)));
        scope_body.extend_from_slice(&[0x5b, 0x82]); // DeviceOp
        scope_body.extend_from_slice(&pkg_length(dev.len()));
        scope_body.extend_from_slice(&dev);
    }
    let mut aml = vec![0x10]; // ScopeOp
    aml.extend_from_slice(&pkg_length(scope_body.len()));
    aml.extend_from_slice(&scope_body);
    // Name(_S5_, Package() { 5, 0 }): the SLP_TYP values for soft-off.
    let mut package = vec![0x02];
    package.extend_from_slice(&aml_integer(u32::from(S5_SLEEP_TYPE)));
    package.extend_from_slice(&aml_integer(0));
    let mut s5 = vec![0x12];
    s5.extend_from_slice(&pkg_length(package.len()));
    s5.extend_from_slice(&package);
    aml.extend_from_slice(&aml_name(b"_S5_", &s5));
    sdt(b"DSDT", 2, &aml)
}

fn rsdp(xsdt_address: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(36);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0); // checksum of the first 20 bytes
    r.extend_from_slice(OEM_ID);
    r.push(2); // revision: ACPI 2.0+
    r.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    r.extend_from_slice(&36u32.to_le_bytes());
    r.extend_from_slice(&xsdt_address.to_le_bytes());
    r.push(0); // extended checksum
    r.extend_from_slice(&[0; 3]);
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// Builds all tables as one image to be placed at `base`; the RSDP comes first.
pub fn build_tables(
    base: u64,
    vcpus: u8,
    devices: &[MmioDeviceInfo],
) -> Result<Vec<u8>, AcpiError> {
    if vcpus == 0 || vcpus == 255 {
        return Err(AcpiError::TooManyVcpus(usize::from(vcpus)));
    }
    let align = |n: usize| (n + 7) & !7;
    let rsdp_len = 36;
    let dsdt_table = dsdt(devices);
    let madt_table = madt(vcpus);
    // Order: RSDP, XSDT, FADT, MADT, DSDT.
    let xsdt_offset = align(rsdp_len);
    let xsdt_len = 36 + 2 * 8;
    let fadt_offset = align(xsdt_offset + xsdt_len);
    let fadt_len = 276;
    let madt_offset = align(fadt_offset + fadt_len);
    let dsdt_offset = align(madt_offset + madt_table.len());
    let total = dsdt_offset + dsdt_table.len();
    if total as u64 > ACPI_SIZE {
        return Err(AcpiError::TooLarge(total));
    }
    let at = |offset: usize| base + offset as u64;
    let mut xsdt_body = Vec::new();
    xsdt_body.extend_from_slice(&at(fadt_offset).to_le_bytes());
    xsdt_body.extend_from_slice(&at(madt_offset).to_le_bytes());
    let mut image = vec![0u8; total];
    let mut put =
        |offset: usize, bytes: &[u8]| image[offset..offset + bytes.len()].copy_from_slice(bytes);
    put(0, &rsdp(at(xsdt_offset)));
    put(xsdt_offset, &sdt(b"XSDT", 1, &xsdt_body));
    put(fadt_offset, &fadt(at(dsdt_offset)));
    put(madt_offset, &madt_table);
    put(dsdt_offset, &dsdt_table);
    Ok(image)
}

/// Writes the tables at [`ACPI_START`] and returns the RSDP's address (for `hvm_start_info`).
pub fn write_acpi_tables(
    mem: &GuestMemoryMmap,
    vcpus: u8,
    devices: &[MmioDeviceInfo],
) -> Result<GuestAddress, AcpiError> {
    let image = build_tables(ACPI_START, vcpus, devices)?;
    mem.write_slice(&image, GuestAddress(ACPI_START))
        .map_err(|_| AcpiError::GuestWrite)?;
    Ok(GuestAddress(ACPI_START))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_at(image: &[u8], offset: usize) -> &[u8] {
        let len = u32::from_le_bytes(image[offset + 4..offset + 8].try_into().unwrap()) as usize;
        &image[offset..offset + len]
    }

    fn sums_to_zero(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn every_table_is_reachable_and_checksummed() {
        let devices = [
            MmioDeviceInfo {
                base: 0xd000_0000,
                size: 0x1000,
                gsi: 5,
            },
            MmioDeviceInfo {
                base: 0xd000_1000,
                size: 0x1000,
                gsi: 6,
            },
        ];
        let base = ACPI_START;
        let image = build_tables(base, 2, &devices).unwrap();
        assert_eq!(&image[..8], b"RSD PTR ");
        assert!(sums_to_zero(&image[..20]));
        assert!(sums_to_zero(&image[..36]));
        let xsdt_at = (u64::from_le_bytes(image[24..32].try_into().unwrap()) - base) as usize;
        let xsdt = table_at(&image, xsdt_at);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(sums_to_zero(xsdt));
        let mut signatures = Vec::new();
        for entry in xsdt[36..].chunks(8) {
            let offset = (u64::from_le_bytes(entry.try_into().unwrap()) - base) as usize;
            let table = table_at(&image, offset);
            assert!(sums_to_zero(table), "{:?}", &table[..4]);
            signatures.push(table[..4].to_vec());
            if &table[..4] == b"FACP" {
                assert_eq!(table.len(), 276);
                let flags = u32::from_le_bytes(table[112..116].try_into().unwrap());
                assert_ne!(flags & FADT_HW_REDUCED_ACPI, 0);
                let dsdt_at =
                    (u64::from_le_bytes(table[140..148].try_into().unwrap()) - base) as usize;
                let dsdt = table_at(&image, dsdt_at);
                assert_eq!(&dsdt[..4], b"DSDT");
                assert!(sums_to_zero(dsdt));
                // Both devices are there with their HID and their windows.
                let aml = &dsdt[36..];
                let hid = b"LNRO0005\0";
                assert_eq!(aml.windows(hid.len()).filter(|w| w == hid).count(), 2);
                assert!(aml.windows(4).any(|w| w == 0xd000_1000u32.to_le_bytes()));
                assert!(aml.windows(4).any(|w| w == b"_S5_"));
                assert!(
                    aml.windows(8).any(|w| w == b"PNP0501\0"),
                    "COM1 is described"
                );
            }
            if &table[..4] == b"APIC" {
                // Two local APICs (type 0) and one IOAPIC (type 1).
                let mut at = 44;
                let mut kinds = Vec::new();
                while at < table.len() {
                    kinds.push(table[at]);
                    at += table[at + 1] as usize;
                }
                assert_eq!(kinds, vec![0, 0, 1, 2]);
            }
        }
        assert_eq!(signatures, vec![b"FACP".to_vec(), b"APIC".to_vec()]);
    }

    #[test]
    fn pkg_length_encodings() {
        assert_eq!(pkg_length(0x3e), vec![0x3f]);
        // 0x3f + 2 bytes = 0x41 total: two-byte form, low nibble 1, next byte 0x04.
        assert_eq!(pkg_length(0x3f), vec![0x41, 0x04]);
        // 0x1000 + 3 bytes = 0x1003: three-byte form, nibble 3, then 0x00, 0x01.
        assert_eq!(pkg_length(0x1000), vec![0x83, 0x00, 0x01]);
    }

    #[test]
    fn vcpu_limits() {
        assert_eq!(
            build_tables(ACPI_START, 0, &[]),
            Err(AcpiError::TooManyVcpus(0))
        );
        assert!(build_tables(ACPI_START, 64, &[]).is_ok());
    }
}

#[cfg(test)]
mod iasl {
    use super::*;

    /// Disassembles each table with ACPICA's `iasl -d` (Debian: acpica-tools) and checks what it
    /// decoded. Not run by default (cargo tests must not need iasl):
    /// `cargo test -p vmm-core --lib acpi::iasl -- --ignored`.
    #[test]
    #[ignore = "needs iasl (apt-get install acpica-tools)"]
    fn tables_disassemble_with_iasl() {
        let devices: Vec<MmioDeviceInfo> = (0..3)
            .map(|i| {
                let (base, size) = crate::layout::virtio_mmio_window(i);
                MmioDeviceInfo {
                    base,
                    size,
                    gsi: crate::layout::VIRTIO_FIRST_GSI + i,
                }
            })
            .collect();
        let image = build_tables(ACPI_START, 2, &devices).unwrap();
        let dir = std::env::temp_dir().join(format!("vigil-acpi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut offset = 40; // past the RSDP (36 bytes, aligned to 8)
        let mut decoded = String::new();
        while offset + 8 <= image.len() {
            let len =
                u32::from_le_bytes(image[offset + 4..offset + 8].try_into().unwrap()) as usize;
            let sig = String::from_utf8_lossy(&image[offset..offset + 4]).to_string();
            let file = dir.join(format!("{sig}.dat"));
            std::fs::write(&file, &image[offset..offset + len]).unwrap();
            let out = std::process::Command::new("iasl")
                .arg("-d")
                .arg(&file)
                .current_dir(&dir)
                .output()
                .expect("run iasl");
            let log = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "iasl -d {sig}: {log}");
            assert!(
                !log.contains("Error") && !log.contains("Warning"),
                "{sig}: {log}"
            );
            let dsl = std::fs::read_to_string(dir.join(format!("{sig}.dsl"))).unwrap();
            assert!(!dsl.contains("Invalid"), "{sig}:\n{dsl}");
            decoded.push_str(&dsl);
            offset = (offset + len + 7) & !7;
        }
        if std::env::var_os("VIGIL_KEEP_ACPI").is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        for i in 0..3u32 {
            assert!(
                decoded.contains(&format!("0xD000{i}000,         // Address Base")),
                "{decoded}"
            );
            assert!(decoded.contains(&format!("0x{:08X},", 5 + i)), "{decoded}");
        }
        assert_eq!(
            decoded.matches("Name (_HID, \"LNRO0005\")").count(),
            3,
            "{decoded}"
        );
        assert!(decoded.contains("Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )"));
        assert!(decoded.contains("Hardware Reduced (V5) : 1"), "{decoded}");
        assert_eq!(
            decoded.matches("Processor Enabled : 1").count(),
            2,
            "{decoded}"
        );
        assert!(decoded.contains("Address : FEC00000"), "{decoded}");
    }
}
