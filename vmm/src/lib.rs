//! Vigil's virtual machine monitor.
//!
//! Owns: KVM VMs (guest memory, vCPU threads, CPUID), direct boot of an unmodified Linux kernel
//! (vmlinux extracted from a bzImage on the host, PVH entry), firmware-less boot of the firewall
//! micro-VM (PVH entry too), the serial console, virtio-mmio network devices, ACPI tables that
//! describe them, and the completion of instructions this host's KVM cannot run.
//! Must not: trust anything that comes from a guest (memory, registers, device rings).

pub mod acpi;
pub mod api;
pub mod boot;
pub mod cloud;
pub mod devices;
pub mod edge_node;
pub mod emulation;
pub mod events;
pub mod guest_ram;
pub mod host;
pub mod introspect;
pub mod layout;
pub mod net_config;
pub mod run_control;
pub mod snapshot;
pub mod vcpu;
pub mod verdict_region;
pub mod vm;
pub mod write_trap;
