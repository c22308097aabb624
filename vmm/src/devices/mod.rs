//! Devices the VMM emulates.

pub mod virtio;
