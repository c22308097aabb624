//! `vigil`: the command-line front end of the Vigil VMM.
//!
//! Owns: the command line (clap), the one read of the debug knobs, the logger, turning flags into
//! VM configs, and printing outcomes and exit codes.
//! Must not: build or run VMs other than through vmm-core, vmm-host and edge.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

mod cli_cloud;
mod cli_cluster;
use vigil_wire::boot::Role;
use vmm_core::config::{ConsoleConfig, LinkConfig, NetConfig, Payload, TierSink, VmConfig};
use vmm_core::host_kind::HostKind;
use vmm_core::knobs::DebugKnobs;
use vmm_core::vcpu::StopReason;
use vmm_core::verdict_region::parse_verdict_lines;
use vmm_core::vm::Vm;

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

/// What every VM run takes: where its console goes, when it stops, which lines are timed.
#[derive(Args)]
struct RunArgs {
    /// Also write the console to this file.
    #[arg(long)]
    console_log: Option<PathBuf>,
    /// Stop the VM after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// Time the first console line containing this text (repeatable); reported in vm_stopped.
    #[arg(long)]
    marker: Vec<String>,
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
        #[command(flatten)]
        run: RunArgs,
        /// A switch port: virtio-net backed by a TAP device (repeatable, in port order):
        /// tap=NAME[,netns=NS][,mac=MAC][,tenant=ID]; tenant 0 (the default) is the uplink.
        #[arg(long)]
        net: Vec<NetConfig>,
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
        net: Vec<NetConfig>,
        /// The tenant's application policy (JSON allow-list); enables introspection.
        #[arg(long)]
        policy: Option<PathBuf>,
        #[command(flatten)]
        run: RunArgs,
        /// Plug the tenant into a switch-tier firewall micro-VM booted from this fw-guest ELF:
        /// its NIC becomes a port of the switch, which forwards to --uplink only what the
        /// tenant's verdicts opened.
        #[arg(long, requires = "uplink")]
        switch: Option<PathBuf>,
        /// The switch's uplink (the way out of the host): tap=NAME[,netns=NS].
        #[arg(long, requires = "switch")]
        uplink: Option<NetConfig>,
    },
    /// Run a cloud host: its switch-tier micro-VM plus the tenants created through the REST API
    /// on --api-socket.
    Host(cli_cloud::HostArgs),
    /// Run an edge node: the fw-guest micro-VM in the edge role between a TAP (outside) and the
    /// hosts' VXLAN uplinks (cloud), taking signed verdicts from hosts.
    Edge(cli_cloud::EdgeArgs),
    /// Talk to a host's (or edge's) API socket.
    Remote(cli_cloud::RemoteArgs),
    /// The cluster's desired state in etcd: tenants (spec, policy, host), hosts, edges, keys.
    Cluster(cli_cluster::ClusterArgs),
}

/// The switch-tier micro-VM a tenant is plugged into (`run-tenant --switch`).
struct SwitchPlan {
    config: VmConfig,
}

fn print_outcome(outcome: &vmm_core::vm::VmOutcome) {
    println!(
        "{}",
        serde_json::json!({ "event": "vm_stopped", "outcome": outcome })
    );
}

/// Library diagnostics (the `log` crate) go to stderr as bare lines, as they did when they were
/// printed directly: Vigil's own crates at `info`, everything else at `warn`; `RUST_LOG`
/// overrides.
fn init_logging() {
    use std::io::Write;
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(
        "warn,vmm_core=info,vmm_host=info,vmm_api=info,edge=info,vigil=info,trap_handler=info",
    ))
    .format(|buf, record| writeln!(buf, "{}", record.args()))
    .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    // Every debug knob, read once here and carried in each VM's config.
    let knobs = DebugKnobs::from_env();
    let host = knobs.host_kind();
    let mut switch_plan: Option<SwitchPlan> = None;
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
        Command::Host(args) => return cli_cloud::host(args, knobs),
        Command::Edge(args) => return cli_cloud::edge(args),
        Command::Remote(args) => return cli_cloud::remote(args),
        Command::Cluster(args) => return cli_cluster::cluster(args),
        Command::RunMicrovm {
            elf,
            role,
            mem,
            run:
                RunArgs {
                    console_log,
                    timeout,
                    marker,
                },
            verdicts,
            net,
        } => {
            let verdicts = match verdicts.as_ref().map(|path| {
                std::fs::read_to_string(path)
                    .map_err(|e| format!("{}: {e}", path.display()))
                    .and_then(|text| {
                        parse_verdict_lines(&text).map_err(|e| format!("{}: {e}", path.display()))
                    })
            }) {
                None => Vec::new(),
                Some(Ok(records)) => records,
                Some(Err(e)) => {
                    eprintln!("vigil: error: verdicts {e}");
                    return ExitCode::from(2);
                }
            };
            let role = match role {
                RoleArg::Switch => Role::Switch,
                RoleArg::Edge => Role::Edge,
            };
            (
                VmConfig::micro_vm("fw", elf, role)
                    .with_mem_mib(mem)
                    .with_verdicts(verdicts)
                    .with_nets(net)
                    .with_console(ConsoleConfig {
                        log: console_log,
                        stdout: true,
                        markers: marker.clone(),
                    })
                    .with_debug(knobs.clone()),
                timeout,
            )
        }
        Command::RunTenant {
            kernel,
            initramfs,
            cmdline,
            mem,
            vcpus,
            net,
            policy,
            run:
                RunArgs {
                    console_log,
                    timeout,
                    marker,
                },
            switch,
            uplink,
        } => {
            let policy = match policy.as_deref().map(read_policy).transpose() {
                Ok(policy) => policy,
                Err(e) => {
                    eprintln!("vigil: error: {e}");
                    return ExitCode::from(2);
                }
            };
            let mut links = Vec::new();
            if let (Some(elf), Some(uplink)) = (switch, uplink) {
                let tenant = vmm_core::introspect::tenant_id("tenant");
                let (tenant_end, port_end) =
                    match LinkConfig::pair(tenant, [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]) {
                        Ok(pair) => pair,
                        Err(e) => {
                            eprintln!("vigil: error: cannot make the switch link: {e}");
                            return ExitCode::from(2);
                        }
                    };
                links.push(tenant_end);
                switch_plan = Some(SwitchPlan {
                    config: VmConfig::micro_vm("fw", elf, Role::Switch)
                        .with_nets(vec![NetConfig {
                            tenant: 0,
                            ..uplink
                        }])
                        .with_links(vec![port_end])
                        .with_console(ConsoleConfig {
                            log: None,
                            stdout: true,
                            markers: Vec::new(),
                        })
                        .with_debug(knobs.clone()),
                });
            }
            (
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
                    // Given once the switch is built (below): its ring.
                    verdict_sink: None,
                    links,
                    console: ConsoleConfig {
                        log: console_log,
                        stdout: true,
                        markers: marker.clone(),
                    },
                    debug: knobs.clone(),
                },
                timeout,
            )
        }
    };
    eprintln!("vigil: host KVM is {host}; guest profile for this host in force");
    vmm_core::vm::stop_on_signals();
    // The switch first: the tenant's verdicts need its ring, the tenant's NIC its port.
    let switch = match switch_plan {
        Some(plan) => match Vm::create(&plan.config, host) {
            Ok(vm) => Some(vm),
            Err(e) => {
                eprintln!("vigil: error: switch micro-VM: {e}");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let mut config = config;
    if let Some(ring) = switch.as_ref().and_then(|fw| fw.verdict_region()) {
        config.verdict_sink = Some(TierSink(ring));
    }
    let vm = match Vm::create(&config, host) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("vigil: error: {e}");
            return ExitCode::from(2);
        }
    };
    let switch = switch.map(|fw| {
        let stop = fw.stop_handle();
        (stop, std::thread::spawn(move || fw.run(None)))
    });
    let outcome = vm.run(timeout.map(Duration::from_secs));
    if let Some((stop, handle)) = switch {
        // The tenant is gone: so is the switch that served it.
        stop.store(true, std::sync::atomic::Ordering::Release);
        match handle.join() {
            Ok(Ok(fw)) => print_outcome(&fw),
            Ok(Err(e)) => eprintln!("vigil: switch micro-VM: {e}"),
            Err(_) => eprintln!("vigil: the switch micro-VM's thread panicked"),
        }
    }
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(e) => {
            eprintln!("vigil: error: {e}");
            return ExitCode::from(2);
        }
    };
    print_outcome(&outcome);
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

/// A tenant's policy file (JSON, see `trap_handler::policy`), read and parsed with an error that
/// names the file.
fn read_policy(path: &std::path::Path) -> Result<trap_handler::policy::PolicySpec, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("policy {}: {e}", path.display()))
}
