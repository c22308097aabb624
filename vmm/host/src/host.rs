//! The host: its switch, its tenants, its link to the edge, and its start and shutdown.
//!
//! Owns: the [`Host`] value and what the API reads from it (name, uptime, counters, timings).
//! Must not: let one tenant's failure (bad config, a crashed guest) take down the host or another
//! tenant.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use vmm_core::host_kind::HostKind;

use crate::edge_link::EdgeLink;
use crate::switch::SwitchTier;
use crate::tenant::Tenant;
use crate::{HostConfig, ReconfigTimes, StartError, MAX_TENANT_PORTS};

pub struct Host {
    /// This host, for what outlives a call (a tenant VM's thread reports its own stop here).
    pub(crate) me: Weak<Host>,
    pub(crate) config: HostConfig,
    pub(crate) kind: HostKind,
    pub(crate) switch: Arc<SwitchTier>,
    pub(crate) edge: Option<Arc<EdgeLink>>,
    pub(crate) tenants: Mutex<BTreeMap<String, Tenant>>,
    /// Tenants being built or deleted, out of the table meanwhile (see `claims`).
    pub(crate) claims: crate::claims::Claims,
    pub(crate) started: Instant,
    /// Sequence numbers of the host's own records (Attach, FlushTenant).
    pub(crate) control_seq: AtomicU64,
    pub(crate) times: Mutex<ReconfigTimes>,
    /// Set once shutdown is asked for (`vmm.shutdown`, a signal): new work is refused.
    pub(crate) shutdown: Arc<AtomicBool>,
    /// The same, for those who wait for it ([`Host::wait_shutdown_requested`]).
    requested: (Mutex<bool>, Condvar),
    /// Held while the teardown runs; true once it ran ([`Host::shutdown`]).
    torn_down: Mutex<bool>,
    /// Tenants whose VM stopped on its own, marked before their flush, until `vm.delete`: a
    /// policy replacement racing that flush flushes again rather than re-attach them.
    pub(crate) stopped_on_own: Mutex<std::collections::HashSet<u32>>,
    /// The migration keys in force (the config's at start; the cluster agent replaces them as
    /// hosts' keys come, go and rotate).
    migration_keys: std::sync::RwLock<crate::MigrationKeys>,
    /// What an incoming migration may take in all ([`Host::set_receive_limit`]).
    pub(crate) receive_limit: Mutex<crate::ReceiveLimit>,
}

impl Host {
    /// Boots the switch micro-VM and starts serving tenants.
    pub fn start(config: HostConfig) -> Result<Arc<Host>, StartError> {
        if config.tenant_ports == 0 || config.tenant_ports > MAX_TENANT_PORTS {
            return Err(StartError::TenantPorts(config.tenant_ports));
        }
        std::fs::create_dir_all(&config.state_dir).map_err(|source| StartError::StateDir {
            path: config.state_dir.clone(),
            source,
        })?;
        let kind = config.debug.host_kind();
        let switch = SwitchTier::start(&config, kind)?;
        let edge = match &config.edge {
            Some(edge) => Some(Arc::new(EdgeLink::new(edge.clone()).map_err(|source| {
                StartError::EdgeChannel {
                    addr: edge.control,
                    source,
                }
            })?)),
            None => None,
        };
        let host = Arc::new_cyclic(|me| Host {
            me: me.clone(),
            kind,
            switch,
            edge,
            tenants: Mutex::new(BTreeMap::new()),
            claims: Default::default(),
            started: Instant::now(),
            control_seq: AtomicU64::new(1),
            times: Mutex::new(ReconfigTimes::default()),
            shutdown: Arc::new(AtomicBool::new(false)),
            requested: (Mutex::new(false), Condvar::new()),
            torn_down: Mutex::new(false),
            stopped_on_own: Mutex::new(Default::default()),
            migration_keys: std::sync::RwLock::new(config.migration_keys.clone()),
            receive_limit: Mutex::new(Default::default()),
            config,
        });
        if let Some(edge) = &host.edge {
            // A restarted edge lost every attachment and verdict this host gave it: give them
            // again (Attach, then the verdicts as Adopt, from the switch's book).
            let weak = Arc::downgrade(&host);
            edge.on_edge_restart(Box::new(move || {
                if let Some(host) = weak.upgrade() {
                    host.resync_edge();
                }
            }));
            // Verdicts the edge refused after the host had let their calls go (its room said
            // they were certain, but other hosts filled the shared table first): taken back at
            // the switch too, so the tiers agree, and reported.
            let weak = Arc::downgrade(&host);
            edge.on_refused(Box::new(move |records, reason| {
                if let Some(host) = weak.upgrade() {
                    host.edge_revoked(records, reason);
                }
            }));
        }
        vmm_core::events::bus().emit(
            "host_started",
            &serde_json::json!({
                "host": host.config.name,
                "kvm": kind.to_string(),
                "tenant_ports": host.config.tenant_ports,
                "uplink": host.config.uplink.backend.to_string(),
                "edge": host.config.edge.as_ref().map(|e| e.control.to_string()),
            }),
        );
        Ok(host)
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Set once `vmm.shutdown` ran: the server stops.
    pub fn shutdown_flag(&self) -> Arc<AtomicBool> {
        self.shutdown.clone()
    }

    pub(crate) fn tenants(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Tenant>> {
        self.tenants.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn emit(&self, kind: &str, id: &str, extra: serde_json::Value) {
        let mut body = serde_json::json!({"host": self.config.name, "vm": id});
        if let (Some(body), serde_json::Value::Object(extra)) = (body.as_object_mut(), extra) {
            body.extend(extra);
        }
        vmm_core::events::bus().emit(kind, &body);
    }

    pub fn reconfig_times(&self) -> ReconfigTimes {
        self.times.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Edge channel counters: (records sent, send errors).
    pub fn edge_counters(&self) -> Option<(u64, u64)> {
        self.edge.as_ref().map(|e| {
            (
                e.sent_records.load(Ordering::Relaxed),
                e.send_errors.load(Ordering::Relaxed),
            )
        })
    }

    /// VXLAN datagrams the switch's uplink refused because they did not come from its edge
    /// (`None`: the uplink is not VXLAN).
    pub fn uplink_refused(&self) -> Option<u64> {
        self.switch.uplink_trust.as_ref().map(|t| t.refused())
    }

    /// The migration keys in force now (a copy: a handshake does not hold them locked).
    pub fn migration_keys(&self) -> crate::MigrationKeys {
        self.migration_keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the migration keys (every host's, this one's included): migrations that start
    /// from now on authenticate with them.
    pub fn set_migration_keys(&self, keys: crate::MigrationKeys) {
        log::info!("host {}: migration keys {keys:?}", self.config.name);
        *self
            .migration_keys
            .write()
            .unwrap_or_else(|p| p.into_inner()) = keys;
    }

    /// Signs this host's datagrams to the edge with its key `key_id` from now on (a rotation
    /// of its own key); an error when the host has no edge link or the key is too short.
    pub fn set_edge_key(&self, key_id: u16, key: Vec<u8>) -> std::io::Result<()> {
        let edge = self.edge.as_ref().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "this host has no edge link")
        })?;
        edge.set_key(key_id, key)
    }

    /// The id of the key this host's datagrams to the edge are signed with (`None`: no edge).
    pub fn edge_key_id(&self) -> Option<u16> {
        self.edge.as_ref().map(|e| e.key_id())
    }

    /// The edge link's delivery counters (retransmissions, unacknowledged datagrams, ...).
    pub fn edge_link_stats(&self) -> Option<crate::edge_link::EdgeLinkStats> {
        self.edge.as_ref().map(|e| e.stats())
    }

    /// `vmm.shutdown`: asks the host to stop, and returns at once (the answer must not wait for
    /// the teardown, nor the teardown for any client). New work is refused from now on; whoever
    /// serves the API sees the request ([`Host::wait_shutdown_requested`]) and runs
    /// [`Host::shutdown`].
    pub fn request_shutdown(&self) {
        if self.shutdown.swap(true, Ordering::AcqRel) {
            return;
        }
        let (flag, changed) = &self.requested;
        *flag.lock().unwrap_or_else(|p| p.into_inner()) = true;
        changed.notify_all();
        vmm_core::events::bus().emit(
            "host_stopping",
            &serde_json::json!({"host": self.config.name}),
        );
    }

    /// Waits up to `limit` for a shutdown request: whether one came.
    pub fn wait_shutdown_requested(&self, limit: Duration) -> bool {
        let (flag, changed) = &self.requested;
        let guard = flag.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = changed
            .wait_timeout_while(guard, limit, |requested| !*requested)
            .unwrap_or_else(|p| p.into_inner());
        *guard
    }

    /// The teardown: stops every tenant (flushing it from the tiers) and the switch. Runs once;
    /// a second caller returns when the first one's teardown has finished.
    pub fn shutdown(&self) {
        self.request_shutdown();
        let mut torn_down = self.torn_down.lock().unwrap_or_else(|p| p.into_inner());
        if *torn_down {
            return;
        }
        let ids: Vec<String> = self.tenants().keys().cloned().collect();
        for id in ids {
            let _ = self.delete(&id);
        }
        self.switch.shutdown();
        *torn_down = true;
        vmm_core::events::bus().emit(
            "host_stopped",
            &serde_json::json!({"host": self.config.name}),
        );
    }
}
