//! `vigil`: the command-line front end of the Vigil VMM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use vigil_wire::boot::Role;
use vmm::host::HostKind;
use vmm::vcpu::StopReason;
use vmm::verdict_region::parse_verdict_lines;
use vmm::vm::{ConsoleConfig, Payload, Vm, VmConfig};

#[derive(Parser)]
#[command(
    name = "vigil",
    version,
    about = "Vigil: a hypervisor-level, application-aware firewall for KVM clouds"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    Switch,
    Edge,
}

#[derive(Subcommand)]
enum Command {
    /// Print what kind of KVM host this is and the guest profile Vigil applies on it.
    HostInfo,
    /// Boot the fw-guest firewall micro-VM firmware-less and run it until it stops.
    RunMicrovm {
        /// The fw-guest ELF (scripts/build-fw-guest prints its path).
        #[arg(long)]
        elf: PathBuf,
        #[arg(long, value_enum, default_value = "switch")]
        role: RoleArg,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 32)]
        mem: u64,
        /// Also write the console to this file.
        #[arg(long)]
        console_log: Option<PathBuf>,
        /// Stop the VM after this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
        /// Time the first console line containing this text (repeatable); reported in vm_stopped.
        #[arg(long)]
        marker: Vec<String>,
        /// A switch port: virtio-net backed by a TAP device (repeatable, in port order):
        /// tap=NAME[,netns=NS][,mac=MAC][,tenant=ID]; tenant 0 (the default) is the uplink.
        #[arg(long)]
        net: Vec<vmm::net_config::NetConfig>,
        /// Verdict records to put in the micro-VM's verdict ring before it starts: a file with one
        /// per line, hex or a tenant's `verdict` event (JSON with a `record` field).
        #[arg(long)]
        verdicts: Option<PathBuf>,
    },
    /// Boot a Linux tenant (bzImage or vmlinux, unmodified) by direct kernel boot.
    RunTenant {
        #[arg(long)]
        kernel: PathBuf,
        #[arg(long)]
        initramfs: Option<PathBuf>,
        /// Kernel command line; the host profile's arguments are appended.
        #[arg(long, default_value = "console=ttyS0 reboot=k panic=-1")]
        cmdline: String,
        #[arg(long, default_value_t = 128)]
        mem: u64,
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        /// A network interface: tap=NAME[,netns=NS][,mac=MAC] (repeatable).
        #[arg(long)]
        net: Vec<vmm::net_config::NetConfig>,
        /// The tenant's application policy (JSON allow-list); enables introspection.
        #[arg(long)]
        policy: Option<PathBuf>,
        #[arg(long)]
        console_log: Option<PathBuf>,
        #[arg(long)]
        timeout: Option<u64>,
        /// Time the first console line containing this text (repeatable); reported in vm_stopped.
        #[arg(long)]
        marker: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let host = HostKind::detect();
    let (config, timeout) = match cli.command {
        Command::HostInfo => {
            println!(
                "{}",
                serde_json::json!({
                    "host_kind": match host { HostKind::Hardware => "hardware", HostKind::Emulating => "emulating" },
                    "description": host.to_string(),
                    "linux_profile_cmdline": host.linux_cmdline(),
                })
            );
            return ExitCode::SUCCESS;
        }
        Command::RunMicrovm {
            elf,
            role,
            mem,
            console_log,
            timeout,
            marker,
            verdicts,
            net,
        } => (
            VmConfig {
                name: "fw".into(),
                mem_mib: mem,
                vcpus: 1,
                payload: Payload::MicroVm {
                    elf,
                    role: match role {
                        RoleArg::Switch => Role::Switch,
                        RoleArg::Edge => Role::Edge,
                    },
                    verdicts: match verdicts.as_ref().map(|path| {
                        std::fs::read_to_string(path)
                            .map_err(|e| format!("{}: {e}", path.display()))
                            .and_then(|text| {
                                parse_verdict_lines(&text)
                                    .map_err(|e| format!("{}: {e}", path.display()))
                            })
                    }) {
                        None => Vec::new(),
                        Some(Ok(records)) => records,
                        Some(Err(e)) => {
                            eprintln!("vigil: error: verdicts {e}");
                            return ExitCode::from(2);
                        }
                    },
                },
                nets: net,
                policy: None,
                console: ConsoleConfig {
                    log: console_log,
                    stdout: true,
                    markers: marker.clone(),
                },
            },
            timeout,
        ),
        Command::RunTenant {
            kernel,
            initramfs,
            cmdline,
            mem,
            vcpus,
            net,
            policy,
            console_log,
            timeout,
            marker,
        } => (
            VmConfig {
                name: "tenant".into(),
                mem_mib: mem,
                vcpus,
                payload: Payload::Linux {
                    kernel,
                    initramfs,
                    cmdline,
                },
                nets: net,
                policy,
                console: ConsoleConfig {
                    log: console_log,
                    stdout: true,
                    markers: marker.clone(),
                },
            },
            timeout,
        ),
    };
    eprintln!("vigil: host KVM is {host}; guest profile for this host in force");
    let vm = match Vm::create(&config, host) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("vigil: error: {e}");
            return ExitCode::from(2);
        }
    };
    vmm::vm::stop_on_signals();
    let outcome = match vm.run(timeout.map(Duration::from_secs)) {
        Ok(outcome) => outcome,
        Err(e) => {
            eprintln!("vigil: error: {e}");
            return ExitCode::from(2);
        }
    };
    println!(
        "{}",
        serde_json::json!({ "event": "vm_stopped", "outcome": outcome })
    );
    match outcome.stop {
        // Requested: stopped by SIGTERM/SIGINT, as the operator asked.
        StopReason::Poweroff
        | StopReason::Reset
        | StopReason::ExitCode(0)
        | StopReason::Requested => ExitCode::SUCCESS,
        StopReason::Crashed(why) => {
            eprintln!("vigil: VM {} stopped: {why}", outcome.name);
            ExitCode::from(1)
        }
        other => {
            eprintln!("vigil: VM {} stopped: {other:?}", outcome.name);
            ExitCode::from(1)
        }
    }
}
