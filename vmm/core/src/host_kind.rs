//! Which kind of KVM host this is, and the guest profile that follows from it.
//!
//! Commodity servers run KVM on VT-x/AMD-V: guests run at full speed and nothing needs finishing by
//! the VMM. Some hosts (the development and CI machines of this project) run KVM through `kvm_pvm`
//! in its "native guest" mode: no VMX/SVM, guest ring 3 runs natively but guest ring 0 is emulated
//! instruction by instruction, several instructions are missing from the emulator, and `syscall`
//! from ring 3 is only half done. Those facts are in `shared/docs/kvm-here.md`; this module detects
//! the kind and names the kernel command line that keeps a stock Linux away from what the emulator
//! lacks.
//!
//! Owns: the host-kind detection and the Linux guest profile of each kind.
//! Must not: touch KVM (detection reads /proc/cpuinfo only) or decide anything per VM.

use std::fmt;
use std::fs;

/// The kind of KVM this host offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKind {
    /// VT-x or AMD-V: KVM runs the guest on the hardware.
    Hardware,
    /// No VMX/SVM: KVM (kvm_pvm) emulates guest ring 0.
    Emulating,
}

impl fmt::Display for HostKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostKind::Hardware => write!(f, "hardware (VT-x/AMD-V)"),
            HostKind::Emulating => write!(f, "emulating (kvm_pvm: guest ring 0 emulated)"),
        }
    }
}

impl HostKind {
    /// Detects the host kind: hardware virtualization is announced by the `vmx` (Intel) or `svm`
    /// (AMD) CPU flag; without either, a working /dev/kvm means an emulating KVM. `VIGIL_HOST_KIND`
    /// (`hardware` or `emulating`) overrides the detection, for tests of both profiles.
    pub fn detect() -> HostKind {
        crate::knobs::DebugKnobs::from_env().host_kind()
    }

    /// `forced` if given (see [`crate::knobs::DebugKnobs::host_kind`]), else detected from
    /// /proc/cpuinfo.
    pub fn detect_with(forced: Option<HostKind>) -> HostKind {
        if let Some(kind) = forced {
            return kind;
        }
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self::from_cpuinfo(&cpuinfo)
    }

    /// `hardware` or `emulating` (the values of `VIGIL_HOST_KIND`).
    pub fn from_name(name: &str) -> Option<HostKind> {
        match name {
            "hardware" => Some(HostKind::Hardware),
            "emulating" => Some(HostKind::Emulating),
            _ => None,
        }
    }

    /// Decides from the text of /proc/cpuinfo.
    pub fn from_cpuinfo(cpuinfo: &str) -> HostKind {
        let hardware = cpuinfo
            .lines()
            .filter(|line| line.starts_with("flags"))
            .any(|line| {
                line.split_whitespace()
                    .any(|flag| flag == "vmx" || flag == "svm")
            });
        if hardware {
            HostKind::Hardware
        } else {
            HostKind::Emulating
        }
    }

    /// Kernel command-line arguments a stock Linux tenant needs on this kind of host.
    ///
    /// On an emulating host KVM_SET_CPUID2 is not honoured for leaves 1, 7 and 0xD, so the features
    /// whose instructions the emulator lacks are hidden on the command line instead (`noxsave`,
    /// `clearcpuid=`), and the initcalls that cost minutes of emulated ring 0 and that a tenant does
    /// not need are skipped. Each entry is measured in kvm-here.md.
    pub fn linux_cmdline(self) -> &'static str {
        match self {
            HostKind::Hardware => "",
            HostKind::Emulating => concat!(
                "noxsave ",
                "clearcpuid=xsave,cx16,smap,invpcid,pcid,fsgsbase,popcnt,rdtscp,",
                "erms,fsrm,clflushopt,ssse3,114 ",
                // rdrand/rdseed stay visible: the VMM completes them from the host's getrandom,
                // and a CPU source the kernel trusts seeds its crng at once, instead of minutes of
                // emulated entropy gathering (blake2s was the top function of an emulated boot).
                "random.trust_cpu=on ",
                "mitigations=off init_on_alloc=0 tsc=reliable no_timer_check nowatchdog ",
                "cryptomgr.notests psi=0 rodata=off no-kvmclock ",
                "initcall_blacklist=ftrace_check_for_weak_functions,trace_eval_init,",
                "cubictcp_register,bpf_rstat_kfunc_init,bpf_key_sig_kfuncs_init,kfunc_init,",
                "bpf_prog_test_run_init,bpf_tcp_ca_kfunc_init,load_system_certificate_list,",
                "tracer_init_tracefs,add_rtc_cmos,init_ftrace_syscalls"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmx_or_svm_flag_means_hardware() {
        let intel = "processor: 0\nflags\t\t: fpu vme vmx sse2\n";
        let amd = "flags\t\t: fpu svm lm\n";
        assert_eq!(HostKind::from_cpuinfo(intel), HostKind::Hardware);
        assert_eq!(HostKind::from_cpuinfo(amd), HostKind::Hardware);
    }

    #[test]
    fn no_virtualization_flag_means_emulating() {
        // A flag that merely contains the letters must not count.
        let pvm = "flags\t\t: fpu vmxx hypervisor svm_lock\n";
        assert_eq!(HostKind::from_cpuinfo(pvm), HostKind::Emulating);
        assert!(HostKind::Emulating.linux_cmdline().contains("noxsave"));
        assert_eq!(HostKind::Hardware.linux_cmdline(), "");
    }
}
