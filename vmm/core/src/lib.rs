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
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
