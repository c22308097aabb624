//! Fuzz harnesses: every target is a `fn(&[u8])` over one crate's public API that must not panic,
//! hang or break an invariant on any input. The libFuzzer targets in `fuzz/` are one-line
//! wrappers over [`TARGETS`]; `tests/replay.rs` runs every committed corpus file and crash
//! regression through the same functions on stable, so CI needs no nightly.
//!
//! Owns: the input formats of the targets (documented per module), the seeds (`seeds`), and the
//! invariants checked beyond "no panic". Must not: reach the network beyond loopback, or keep
//! state from one input to the next (a replayed crash must crash alone).

pub mod api;
pub mod attribution;
pub mod channel;
mod input;
pub mod introspect;
pub mod packet_filter;
pub mod seeds;
pub mod verdicts;
pub mod virtio;
pub mod vxlan;

pub use input::Input;

/// One fuzz target: its name (the `fuzz/fuzz_targets/<name>.rs` and `fuzz/corpus/<name>/`), and
/// its harness.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
}

/// Every target, in the order `scripts/fuzz` runs them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "filter_switch",
        run: packet_filter::switch,
    },
    Target {
        name: "filter_edge",
        run: packet_filter::edge,
    },
    Target {
        name: "verdict_ring",
        run: verdicts::ring,
    },
    Target {
        name: "edge_channel",
        run: channel::run,
    },
    Target {
        name: "http_api",
        run: api::run,
    },
    Target {
        name: "vxlan",
        run: vxlan::run,
    },
    Target {
        name: "btf",
        run: introspect::btf,
    },
    Target {
        name: "kallsyms",
        run: introspect::kallsyms,
    },
    Target {
        name: "attribution",
        run: attribution::run,
    },
    Target {
        name: "virtio_net",
        run: virtio::run,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}
