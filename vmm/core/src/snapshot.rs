//! A VM's state outside its RAM, and the RAM itself as a stream: what a snapshot holds and what
//! a live migration sends.
//!
//! - vCPUs: registers, system registers, FPU/XSAVE, XCRs, MSRs, local APIC, MP state, pending
//!   events. Captured by each vCPU's own thread as it parks (see `RunControl`), after one
//!   `KVM_RUN` with `immediate_exit` set so that KVM finishes an I/O instruction whose data the
//!   VMM already supplied.
//! - The VM: both PICs, the IOAPIC, the PIT, the KVM clock.
//! - Devices: the serial port's registers and each virtio-mmio transport (status, features, queue
//!   addresses); where the queues stand is read back from the used rings in RAM (the device
//!   is quiesced first, so every popped buffer was returned).
//! - RAM: every non-zero 4 KiB page, as (page number, bytes); the receiver starts from zeroed RAM.
//!
//! Everything is read back with the same strictness as guest input: a stream that lies about
//! sizes or addresses gives an error, never a write outside the VM's RAM.
//!
//! Owns: the snapshot's types, the capture and restore of one vCPU's state, and the formats of the
//! RAM page stream and the length-prefixed state documents.
//! Must not: pause or resume anything (the run control does), or trust a stream it reads.

use std::io::{self, Read, Write};

use crate::GuestMemoryMmap;
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

pub const PAGE: usize = 4096;
/// Marks the end of the page stream.
pub const END_OF_PAGES: u64 = u64::MAX;

/// Why a vCPU's state could not be captured or loaded.
#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("/dev/kvm: {0}")]
    Kvm(kvm_ioctls::Error),
    #[error("{what}: {source}")]
    KvmIoctl {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("MSR list: {0:?}")]
    MsrList(vmm_sys_util::fam::Error),
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::KvmIoctl { what, source }
}

/// One vCPU's architectural state.
#[derive(Serialize, Deserialize)]
pub struct VcpuSnapshot {
    pub index: u8,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: Option<kvm_xsave>,
    pub xcrs: Option<kvm_xcrs>,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub msrs: Vec<kvm_msr_entry>,
}

/// The MSRs KVM can save for this vCPU: its index list, minus those that read back nothing.
fn msr_indices() -> Result<Vec<u32>, SnapshotError> {
    let kvm = Kvm::new().map_err(SnapshotError::Kvm)?;
    let list = kvm
        .get_msr_index_list()
        .map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?;
    Ok(list.as_slice().to_vec())
}

/// Reads every MSR in `indices` that KVM will give (KVM_GET_MSRS stops at the first one it
/// refuses; that one is skipped and the rest read on).
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, SnapshotError> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < indices.len() {
        let chunk = &indices[start..(start + 256).min(indices.len())];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(SnapshotError::MsrList)?;
        let read = fd.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..read.min(chunk.len())]);
        // Past the ones read, and past the one refused (if any).
        start += if read < chunk.len() { read + 1 } else { read };
    }
    Ok(out)
}

impl VcpuSnapshot {
    /// Captures the state of a vCPU that is out of KVM_RUN (on its own thread).
    pub fn capture(index: u8, fd: &mut VcpuFd) -> Result<VcpuSnapshot, SnapshotError> {
        // Let KVM complete an I/O exit the VMM answered (an IN or MMIO read puts its data into
        // the register on the next entry) without running guest code.
        fd.set_kvm_immediate_exit(1);
        let _ = fd.run();
        fd.set_kvm_immediate_exit(0);
        let indices = msr_indices()?;
        Ok(VcpuSnapshot {
            index,
            regs: fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?,
            // A KVM without XSAVE/XCRs support leaves them out.
            xsave: fd.get_xsave().ok(),
            xcrs: fd.get_xcrs().ok(),
            lapic: fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?,
            mp_state: fd.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?,
            events: fd.get_vcpu_events().map_err(ioctl("KVM_GET_VCPU_EVENTS"))?,
            msrs: read_msrs(fd, &indices)?,
        })
    }

    /// Loads the state into a fresh vCPU (before it first runs). MSRs KVM refuses are reported
    /// in the returned list, not fatal.
    pub fn restore(&self, fd: &VcpuFd) -> Result<Vec<u32>, SnapshotError> {
        fd.set_mp_state(self.mp_state)
            .map_err(ioctl("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(ioctl("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(ioctl("KVM_SET_SREGS"))?;
        if let Some(xsave) = &self.xsave {
            // SAFETY: the buffer came from KVM_GET_XSAVE of the same kind of vCPU.
            unsafe { fd.set_xsave(xsave) }.map_err(ioctl("KVM_SET_XSAVE"))?;
        }
        if let Some(xcrs) = &self.xcrs {
            fd.set_xcrs(xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
        }
        fd.set_lapic(&self.lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
        let mut refused = Vec::new();
        let mut rest: &[kvm_msr_entry] = &self.msrs;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(256)];
            let msrs = Msrs::from_entries(chunk).map_err(SnapshotError::MsrList)?;
            let set = fd.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
            if set < chunk.len() {
                refused.push(chunk[set].index);
                rest = &rest[set + 1..];
            } else {
                rest = &rest[set..];
            }
        }
        fd.set_vcpu_events(&self.events)
            .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
        Ok(refused)
    }
}

/// The serial port's programmable registers (its FIFO is not carried: at most a few bytes of
/// console input).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SerialRegs {
    pub divisor_low: u8,
    pub divisor_high: u8,
    pub interrupt_enable: u8,
    pub line_control: u8,
    pub modem_control: u8,
    pub scratch: u8,
}

/// One virtio queue's configuration (where it stands is read from RAM on restore).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct QueueConfig {
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

/// One virtio-mmio transport.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TransportSnapshot {
    pub device_status: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    /// The device was moving data (DRIVER_OK accepted).
    pub active: bool,
    pub queues: Vec<QueueConfig>,
}

/// Everything but RAM.
#[derive(Serialize, Deserialize)]
pub struct VmSnapshot {
    pub mem_bytes: u64,
    pub vcpus: Vec<VcpuSnapshot>,
    /// PIC master, PIC slave, IOAPIC (KVM_GET_IRQCHIP chip ids 0, 1, 2).
    pub irqchips: Vec<kvm_irqchip>,
    pub pit: Option<kvm_pit_state2>,
    pub clock: Option<kvm_clock_data>,
    pub serial: SerialRegs,
    pub transports: Vec<TransportSnapshot>,
}

/// Writes every non-zero page of `memory` to `out`: (page number u64 LE, 4096 bytes) each, then
/// the end marker. Returns (pages sent, pages in RAM).
pub fn write_memory(memory: &GuestMemoryMmap, out: &mut impl Write) -> io::Result<(u64, u64)> {
    let zero = [0u8; PAGE];
    let mut page = [0u8; PAGE];
    let mut sent = 0;
    let mut total = 0;
    for region in memory.iter() {
        let start = region.start_addr().0;
        let pages = region.len() / PAGE as u64;
        for n in 0..pages {
            let gpa = start + n * PAGE as u64;
            memory
                .read_slice(&mut page, GuestAddress(gpa))
                .map_err(|e| io::Error::other(e.to_string()))?;
            total += 1;
            if page == zero {
                continue;
            }
            out.write_all(&(gpa / PAGE as u64).to_le_bytes())?;
            out.write_all(&page)?;
            sent += 1;
        }
    }
    out.write_all(&END_OF_PAGES.to_le_bytes())?;
    Ok((sent, total))
}

/// Reads a page stream into `memory` (which the caller zeroed, or which is fresh). A page
/// number outside RAM is an error, and so is a stream of more pages than RAM has: a writer
/// sends each page once, and a peer that sent page 0 without end (or a corrupt stream that
/// never ended) held the reader for ever.
pub fn read_memory(memory: &GuestMemoryMmap, input: &mut impl Read) -> io::Result<u64> {
    let mut page = [0u8; PAGE];
    let mut number = [0u8; 8];
    let mut pages = 0;
    let most = memory.iter().map(|r| r.len() / PAGE as u64).sum::<u64>();
    loop {
        input.read_exact(&mut number)?;
        let n = u64::from_le_bytes(number);
        if n == END_OF_PAGES {
            return Ok(pages);
        }
        if pages >= most {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("more pages than the VM's RAM has ({most}) and no end"),
            ));
        }
        input.read_exact(&mut page)?;
        let gpa = n
            .checked_mul(PAGE as u64)
            .filter(|gpa| memory.address_in_range(GuestAddress(gpa + PAGE as u64 - 1)))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("page {n:#x} lies outside the VM's RAM"),
                )
            })?;
        memory
            .write_slice(&page, GuestAddress(gpa))
            .map_err(|e| io::Error::other(e.to_string()))?;
        pages += 1;
    }
}

/// Writes a length-prefixed JSON document (u32 LE length).
pub fn write_json<T: Serialize>(out: &mut impl Write, value: &T) -> io::Result<()> {
    let text = serde_json::to_vec(value).map_err(io::Error::other)?;
    let len = u32::try_from(text.len()).map_err(io::Error::other)?;
    out.write_all(&len.to_le_bytes())?;
    out.write_all(&text)
}

/// Reads a length-prefixed JSON document of at most `max` bytes.
pub fn read_json<T: for<'de> Deserialize<'de>>(input: &mut impl Read, max: usize) -> io::Result<T> {
    let mut len = [0u8; 4];
    input.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a {len}-byte state document (at most {max})"),
        ));
    }
    let mut text = vec![0u8; len];
    input.read_exact(&mut text)?;
    serde_json::from_slice(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_round_trips_and_rejects_pages_outside_ram() {
        let a = crate::anonymous_memory(64 * PAGE, true).unwrap();
        a.write_slice(b"first", GuestAddress(0)).unwrap();
        a.write_slice(b"last", GuestAddress(63 * PAGE as u64 + 100))
            .unwrap();
        let mut stream = Vec::new();
        assert_eq!(write_memory(&a, &mut stream).unwrap(), (2, 64));
        let b = crate::anonymous_memory(64 * PAGE, true).unwrap();
        assert_eq!(read_memory(&b, &mut &stream[..]).unwrap(), 2);
        let mut got = [0u8; 4];
        b.read_slice(&mut got, GuestAddress(63 * PAGE as u64 + 100))
            .unwrap();
        assert_eq!(&got, b"last");
        // A hostile stream: page 64 is past the end; a truncated stream errors too.
        let mut bad = 64u64.to_le_bytes().to_vec();
        bad.extend_from_slice(&[0u8; PAGE]);
        assert!(read_memory(&b, &mut &bad[..]).is_err());
        assert!(read_memory(&b, &mut &stream[..stream.len() - 1]).is_err());
        // Page 0 without end: refused once the stream has more pages than RAM, not read on.
        let endless = vec![0u8; 1000 * (8 + PAGE)];
        let mut endless = &endless[..];
        let e = read_memory(&b, &mut endless).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        assert!(e.to_string().contains("more pages than"), "{e}");
    }

    #[test]
    fn json_documents_have_a_size_limit() {
        let mut out = Vec::new();
        write_json(&mut out, &vec![1u8; 100]).unwrap();
        assert!(read_json::<Vec<u8>>(&mut &out[..], 10).is_err());
        assert_eq!(
            read_json::<Vec<u8>>(&mut &out[..], 1000).unwrap().len(),
            100
        );
    }
}
