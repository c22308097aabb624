//! Debug and benchmark knobs, read from the environment once (the CLI's `main`, a host's start)
//! and carried from there in each [`crate::config::VmConfig`].
//!
//! Owns: the names and meanings of the `VIGIL_*` debugging variables (the README documents them;
//! scripts and tests set some), and their parsing. `DebugKnobs::default()` is production: every
//! knob off, no kernel-profile cache.
//! Must not: be read from the environment anywhere else in the engine (constructors take the
//! struct), or change what a VM does when every knob is at its default.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::host_kind::HostKind;

/// Every debug knob, as read once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DebugKnobs {
    /// `VIGIL_TRACE_EXITS` (set): log every emulation completion and debug exit.
    pub trace_exits: bool,
    /// `VIGIL_NO_SYSCALL_FIX` (set): leave the syscall fix off (to measure what it costs).
    pub no_syscall_fix: bool,
    /// `VIGIL_PROFILE=FILE`: sample guest RIPs every 10 ms and write the histogram to FILE.
    pub profile: Option<PathBuf>,
    /// `VIGIL_TSC_DILATION=N` (1 to 100, default 1): how many times faster than it really runs an
    /// emulated tenant is told its TSC runs. Guest time then passes N times slower than wall
    /// time, and so do its timer ticks, each of which costs thousands of emulated instructions;
    /// every guest timeout grows by the same factor in wall time.
    pub tsc_dilation: u64,
    /// Where kernel introspection profiles are cached: `VIGIL_CACHE_DIR`, else
    /// `$XDG_CACHE_HOME/vigil`, else `$HOME/.cache/vigil`; none: not cached.
    pub cache_dir: Option<PathBuf>,
    /// `VIGIL_HOST_KIND=hardware|emulating`: overrides the host-kind detection (tests of both
    /// profiles); other values are ignored.
    pub host_kind: Option<HostKind>,
    /// `VIGIL_BARE_HOOKS=bind,...` (benchmarks): these introspection hooks trap and resume with
    /// no work. The raw list; the introspection parses it.
    pub bare_hooks: Option<String>,
    /// `VIGIL_KEEP_ACPI` (set): the ACPI tests keep their decompiled tables.
    pub keep_acpi: bool,
    /// `VIGIL_IRQCHIP_FIRST` (set): create the interrupt controllers before registering RAM, the
    /// order before it was measured slow (`microvm_boot_ms`'s baseline).
    pub irqchip_first: bool,
    /// `VIGIL_DRIVER_SETS_UP_PORTS` (set): the VMM does not ready a micro-VM's ports; its driver
    /// sets them up through their registers, as under QEMU (`fw_boot_to_forward_ms`'s baseline,
    /// and the test that keeps that path working).
    pub driver_sets_up_ports: bool,
}

impl Default for DebugKnobs {
    fn default() -> Self {
        DebugKnobs {
            trace_exits: false,
            no_syscall_fix: false,
            profile: None,
            tsc_dilation: 1,
            cache_dir: None,
            host_kind: None,
            bare_hooks: None,
            keep_acpi: false,
            irqchip_first: false,
            driver_sets_up_ports: false,
        }
    }
}

impl DebugKnobs {
    /// Reads every knob from this process's environment.
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var_os(name))
    }

    /// Reads every knob through `var` (the environment, or a table in tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<OsString>) -> Self {
        let text = |name: &str| var(name).and_then(|v| v.into_string().ok());
        let cache_dir = var("VIGIL_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| var("XDG_CACHE_HOME").map(|dir| PathBuf::from(dir).join("vigil")))
            .or_else(|| var("HOME").map(|home| PathBuf::from(home).join(".cache/vigil")));
        DebugKnobs {
            trace_exits: var("VIGIL_TRACE_EXITS").is_some(),
            no_syscall_fix: var("VIGIL_NO_SYSCALL_FIX").is_some(),
            profile: var("VIGIL_PROFILE").map(PathBuf::from),
            tsc_dilation: text("VIGIL_TSC_DILATION")
                .and_then(|v| v.parse().ok())
                .filter(|d| (1..=100).contains(d))
                .unwrap_or(1),
            cache_dir,
            host_kind: text("VIGIL_HOST_KIND").and_then(|v| HostKind::from_name(&v)),
            bare_hooks: text("VIGIL_BARE_HOOKS"),
            keep_acpi: var("VIGIL_KEEP_ACPI").is_some(),
            irqchip_first: var("VIGIL_IRQCHIP_FIRST").is_some(),
            driver_sets_up_ports: var("VIGIL_DRIVER_SETS_UP_PORTS").is_some(),
        }
    }

    /// The host kind: forced by `VIGIL_HOST_KIND`, else detected.
    pub fn host_kind(&self) -> HostKind {
        HostKind::detect_with(self.host_kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn knobs(vars: &[(&str, &str)]) -> DebugKnobs {
        DebugKnobs::from_vars(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| OsString::from(v))
        })
    }

    #[test]
    fn nothing_set_is_production() {
        assert_eq!(knobs(&[]), DebugKnobs::default());
    }

    #[test]
    fn every_knob_is_read() {
        let k = knobs(&[
            ("VIGIL_TRACE_EXITS", "1"),
            ("VIGIL_NO_SYSCALL_FIX", ""),
            ("VIGIL_PROFILE", "/tmp/p"),
            ("VIGIL_TSC_DILATION", "8"),
            ("VIGIL_CACHE_DIR", "/c"),
            ("XDG_CACHE_HOME", "/x"),
            ("VIGIL_HOST_KIND", "hardware"),
            ("VIGIL_BARE_HOOKS", "bind,connect"),
            ("VIGIL_KEEP_ACPI", "1"),
            ("VIGIL_IRQCHIP_FIRST", "1"),
            ("VIGIL_DRIVER_SETS_UP_PORTS", "1"),
        ]);
        assert!(k.trace_exits && k.no_syscall_fix && k.keep_acpi && k.irqchip_first);
        assert!(k.driver_sets_up_ports);
        assert_eq!(k.profile, Some(PathBuf::from("/tmp/p")));
        assert_eq!(k.tsc_dilation, 8);
        assert_eq!(k.cache_dir, Some(PathBuf::from("/c")));
        assert_eq!(k.host_kind, Some(HostKind::Hardware));
        assert_eq!(k.host_kind(), HostKind::Hardware);
        assert_eq!(k.bare_hooks.as_deref(), Some("bind,connect"));
    }

    #[test]
    fn cache_dir_falls_back_to_xdg_then_home() {
        assert_eq!(
            knobs(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/h")]).cache_dir,
            Some(PathBuf::from("/x/vigil"))
        );
        assert_eq!(
            knobs(&[("HOME", "/h")]).cache_dir,
            Some(PathBuf::from("/h/.cache/vigil"))
        );
    }

    #[test]
    fn out_of_range_values_fall_back() {
        for bad in ["0", "101", "x", "-3"] {
            assert_eq!(knobs(&[("VIGIL_TSC_DILATION", bad)]).tsc_dilation, 1);
        }
        assert_eq!(knobs(&[("VIGIL_TSC_DILATION", "100")]).tsc_dilation, 100);
        assert_eq!(knobs(&[("VIGIL_HOST_KIND", "fast")]).host_kind, None);
        assert_eq!(
            knobs(&[("VIGIL_HOST_KIND", "emulating")]).host_kind,
            Some(HostKind::Emulating)
        );
    }
}
