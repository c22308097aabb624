//! `vigil cluster …`: the cluster's front end. It writes desired state to etcd (tenants, their
//! policy and host, channel keys) and reads what hosts and edges registered; the host agents
//! (`vigil host --etcd …`) do the rest.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde::Serialize;
use vmm_cluster::keys::TenantRecord;
use vmm_cluster::{ClusterError, Store};
use vmm_host::VmSpec;

#[derive(Args)]
pub struct ClusterArgs {
    /// etcd endpoints (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    etcd: Vec<String>,
    #[command(subcommand)]
    action: ClusterAction,
}

#[derive(Args)]
struct Wait {
    /// Wait until the tenant's host reports the change applied (at most this many seconds);
    /// exit 1 if it failed there or did not report in time.
    #[arg(long, value_name = "SECS")]
    wait: Option<u64>,
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Put a tenant's desired state: its spec (a vm.create JSON body, policy included) on a host.
    Put {
        /// The spec file, or - for standard input.
        spec: PathBuf,
        /// The host that runs it.
        #[arg(long)]
        host: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Print a tenant's record and its host's report.
    Get { id: String },
    /// List the tenants, each with its host's report.
    List,
    /// Replace a tenant's policy (both tiers re-applied by its host).
    Policy {
        id: String,
        /// The policy file (JSON allow-list).
        #[arg(long)]
        set: PathBuf,
        #[command(flatten)]
        wait: Wait,
    },
    /// Assign a tenant to another host.
    Move {
        id: String,
        host: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Delete a tenant (its host deletes it, flushing both tiers).
    Delete { id: String },
    /// The hosts registered now (live leases), with their capacity and last heartbeat.
    Hosts,
    /// The edges registered now.
    Edges,
    /// Give a host a new channel key (random, from /dev/urandom) and make it current.
    RotateKey { host: String },
    /// Print a host's channel keys (ids, creation times, the current one).
    Keys { host: String },
}

fn print<T: Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("vigil cluster: {e}"),
    }
}

fn read_input(path: &Path) -> Result<Vec<u8>, String> {
    if path.as_os_str() == "-" {
        let mut text = Vec::new();
        std::io::stdin()
            .read_to_end(&mut text)
            .map_err(|e| format!("standard input: {e}"))?;
        Ok(text)
    } else {
        std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// Waits for the report of revision `revision` of tenant `id` when asked to.
fn wait_for(store: &Store, id: &str, revision: i64, wait: &Wait) -> Result<(), String> {
    let Some(secs) = wait.wait else {
        println!("{{\"revision\": {revision}}}");
        return Ok(());
    };
    match store
        .wait_status(id, revision, Duration::from_secs(secs))
        .map_err(|e| e.to_string())?
    {
        Some(status) if status.state != "failed" => {
            print(&status);
            Ok(())
        }
        Some(status) => {
            print(&status);
            Err(format!(
                "{id}: its host failed to apply revision {revision}"
            ))
        }
        None => Err(format!(
            "{id}: no host reported revision {revision} within {secs} s"
        )),
    }
}

pub fn cluster(args: ClusterArgs) -> ExitCode {
    let store = match Store::connect(&args.etcd) {
        Ok(store) => store,
        Err(e) => {
            eprintln!("vigil cluster: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&store, args.action) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vigil cluster: {e}");
            ExitCode::from(1)
        }
    }
}

fn cluster_err(e: ClusterError) -> String {
    e.to_string()
}

fn run(store: &Store, action: ClusterAction) -> Result<(), String> {
    match action {
        ClusterAction::Put { spec, host, wait } => {
            let text = read_input(&spec)?;
            let spec: VmSpec = serde_json::from_slice(&text)
                .map_err(|e| format!("spec {}: {e}", spec.display()))?;
            let id = spec.id.clone();
            let revision = store
                .put_tenant(&TenantRecord { host, spec })
                .map_err(cluster_err)?;
            wait_for(store, &id, revision, &wait)
        }
        ClusterAction::Get { id } => {
            let (record, revision) = store
                .tenant(&id)
                .map_err(cluster_err)?
                .ok_or_else(|| format!("no tenant {id:?} in the cluster"))?;
            let status = store.status(&id).map_err(cluster_err)?;
            print(&serde_json::json!({"record": record, "revision": revision,
                "status": status}));
            Ok(())
        }
        ClusterAction::List => {
            let mut out = Vec::new();
            for record in store.tenants().map_err(cluster_err)? {
                let status = store.status(&record.spec.id).map_err(cluster_err)?;
                out.push(
                    serde_json::json!({"id": record.spec.id, "host": record.host,
                    "ip": record.spec.ip, "status": status}),
                );
            }
            print(&out);
            Ok(())
        }
        ClusterAction::Policy { id, set, wait } => {
            let text = read_input(&set)?;
            let policy = serde_json::from_slice(&text)
                .map_err(|e| format!("policy {}: {e}", set.display()))?;
            trap_handler::policy::Policy::compile(&policy)
                .map_err(|e| format!("policy {}: {e}", set.display()))?;
            let revision = store
                .update_tenant(&id, |r| r.spec.policy = policy.clone())
                .map_err(cluster_err)?;
            wait_for(store, &id, revision, &wait)
        }
        ClusterAction::Move { id, host, wait } => {
            let revision = store
                .update_tenant(&id, |r| r.host = host.clone())
                .map_err(cluster_err)?;
            wait_for(store, &id, revision, &wait)
        }
        ClusterAction::Delete { id } => {
            if store.delete_tenant(&id).map_err(cluster_err)? {
                Ok(())
            } else {
                Err(format!("no tenant {id:?} in the cluster"))
            }
        }
        ClusterAction::Hosts => {
            print(&store.hosts().map_err(cluster_err)?);
            Ok(())
        }
        ClusterAction::Edges => {
            print(&store.edges().map_err(cluster_err)?);
            Ok(())
        }
        ClusterAction::RotateKey { host } => {
            let id = store
                .rotate_host_key(
                    &host,
                    &vmm_cluster::keys::new_key_hex().map_err(cluster_err)?,
                )
                .map_err(cluster_err)?;
            println!("{{\"host\": {host:?}, \"current\": {id}}}");
            Ok(())
        }
        ClusterAction::Keys { host } => {
            let keys = store
                .host_keys(&host)
                .map_err(cluster_err)?
                .ok_or_else(|| format!("host {host:?} has no channel keys"))?;
            // The ids and dates, never the key material.
            let listed: Vec<_> = keys
                .keys
                .iter()
                .map(|k| serde_json::json!({"id": k.id, "created_unix_ms": k.created_unix_ms}))
                .collect();
            print(&serde_json::json!({"current": keys.current, "keys": listed}));
            Ok(())
        }
    }
}
