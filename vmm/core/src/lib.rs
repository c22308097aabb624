//! Vigil's VM engine.
//!
//! Owns: KVM VMs (guest memory, vCPU threads, CPUID), direct boot of an unmodified Linux kernel
//! (vmlinux extracted from a bzImage on the host, PVH entry), firmware-less boot of the firewall
//! micro-VM (PVH entry too), the serial console, virtio-mmio network devices, ACPI tables that
//! describe them, the completion of instructions this host's KVM cannot run, the introspection
//! glue (hooks, write traps, verdict sinks), the micro-VM's verdict region, snapshot and restore,
//! and the structured event bus; the configuration of a VM ([`config`]) and the debug knobs
//! ([`knobs`]) it carries.
//! Must not: trust anything that comes from a guest (memory, registers, device rings); know about
//! hosts, tenants' placement or the REST API (those crates build on this one, never the reverse).

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod config;
pub mod devices;
pub mod dirty_log;
pub mod emulation;
pub mod events;
pub mod failpoints;
pub mod guest_ram;
pub mod host_kind;
pub mod idle;
pub mod introspect;
pub mod knobs;
pub mod layout;
pub mod net_config;
pub mod run_control;
pub mod snapshot;
pub mod vcpu;
pub mod verdict_region;
pub mod vm;
pub mod write_trap;

/// Guest RAM as every part of the VMM sees it: vm-memory's mapping with a dirty bitmap, which
/// each write through its accessors marks (a migration's pre-copy reads it; see [`dirty_log`]).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<Option<vm_memory::bitmap::AtomicBitmap>>;

/// Anonymous guest RAM of `size` bytes at guest address 0. With `track_dirty`, vm-memory marks
/// every write the VMM makes through it in a dirty bitmap (what live migration sends again);
/// without, marking costs a branch: a micro-VM never migrates, and the bitmap was 6% of its
/// data path's CPU (the device threads' `mark_dirty`, `perf` on `uplink_bench`).
pub fn anonymous_memory(
    size: usize,
    track_dirty: bool,
) -> Result<GuestMemoryMmap, vm_memory::mmap::FromRangesError> {
    use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
    let bitmap = track_dirty.then(|| AtomicBitmap::with_len(size));
    let mapping = vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(size, bitmap)
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_PRIVATE)
        .build()
        .map_err(vm_memory::mmap::FromRangesError::MmapRegion)?;
    let region = vm_memory::GuestRegionMmap::new(mapping, vm_memory::GuestAddress(0))
        .ok_or(vm_memory::mmap::FromRangesError::InvalidGuestRegion)?;
    Ok(GuestMemoryMmap::from_regions(vec![region])?)
}
