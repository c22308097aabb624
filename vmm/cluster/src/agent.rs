//! The host agent: registers its host in etcd under a lease, keeps the lease alive with a
//! heartbeat, watches the tenant records and reconciles those assigned to its host through the
//! host's own lifecycle (`Host::create` + `boot`, `replace_policy`, `delete`).
//!
//! - A record assigned here that the host does not run: created and booted. Its policy changed:
//!   re-applied on both tiers (flush, then re-attach). Anything else in its spec changed:
//!   deleted and created anew. Deleted, or assigned to another host: deleted here (flushed).
//! - A record the agent cannot read is no authority to run a tenant, nor to delete one running
//!   here: nothing changes for it (a status `failed`, action `keep`) until it reads again.
//! - After each action the agent writes `/vigil/status/<id>` (under its lease) with the record's
//!   revision, so a writer can wait for its change to be applied.
//! - A tenant moved to another host migrates live when both can: the new host's agent, seeing a
//!   tenant assigned to it that runs on a live host, listens for it and writes
//!   `/vigil/migrations/<id>` (the URL, under its lease); the old host's agent, seeing that
//!   record, sends the tenant there (`Host::send_migration`, pre-copy), and the new host adopts
//!   it when it runs there (status `action: migrate`; a record changed during the move is then
//!   applied to it, a new policy by `policy`). Otherwise, or when it fails, the move is
//!   a delete here and a create there from the spec: the old host waits at most
//!   [`LEAVE_WAIT`] for the record, then deletes (fail closed: nothing runs where etcd says it
//!   should not for longer); the new host waits at most [`ARRIVE_WAIT`] for the tenant, then
//!   creates it.
//! - A delete the host refuses (409 while an API-started migration of it runs, or a failed
//!   flush): the tenant stays in the applied table, its status says `failed` with the reason,
//!   and the agent plans it again from its record every [`DELETE_RETRY`] until the delete is
//!   done (or the record wants it here again): nothing runs here unreported and unretried.
//! - Lease lost (etcd answers that it expired: the edge has flushed this host's tenants by
//!   then): every tenant the agent runs is deleted before it registers again, so nothing runs
//!   here that the cluster may have started elsewhere. etcd merely unreachable is not a lost
//!   lease (etcd keeps leases of a cluster that lost its quorum): the agent keeps trying.
//!
//! - Keys: the agent makes the host's first channel key in etcd if it has none, and keeps the
//!   host's keys current from `/vigil/keys/` (`key_book`): every host's migration keys, and its
//!   own edge key after a rotation (`vigil cluster rotate-key`).
//!
//! Owns: the host's registration, its lease and heartbeat, and the table of tenants it applied.
//! Must not: touch a tenant the API created (ids it did not create are left alone, a clash is a
//! failed status); talk HTTP; block the lease's keep-alive on a slow VM build.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use tokio::sync::watch;
use vmm_host::{Host, VmSpec};

use crate::background::{self, Background};
use crate::key_book::KeyBook;
use crate::keys::{self, Capacity, HostRecord, TenantRecord, TenantStatus};
use crate::reconcile::{plan, Action};
use crate::store::{connect, to_json, REQUEST_TIMEOUT};
use crate::ClusterError;

#[path = "agent_moves.rs"]
mod moves;

/// Wait after a failed registration or watch before trying again.
const RETRY: Duration = Duration::from_millis(500);
/// How long a host keeps a tenant moved away while its new host gets ready to take it live.
pub const LEAVE_WAIT: Duration = Duration::from_secs(5);
/// How long a host waits for a tenant migrating in before it creates it from its spec.
pub const ARRIVE_WAIT: Duration = Duration::from_secs(60);
/// How long after a refused delete the agent plans that tenant again.
pub const DELETE_RETRY: Duration = Duration::from_secs(1);
/// How often the agent looks at migrations in progress.
const TICK: Duration = Duration::from_millis(50);

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub endpoints: Vec<String>,
    /// The host's name in the cluster (its key, and the `host` of the tenants it runs).
    pub name: String,
    /// Its sender id on the edge's verdict channel.
    pub sender: u32,
    pub api_socket: Option<String>,
    pub tenant_ports: usize,
    /// The lease's TTL (s): the host is taken for dead this long after its last heartbeat.
    pub lease_ttl_s: i64,
    /// Where this host takes tenants migrating in (`tcp:ADDR:PORT`, reachable from the other
    /// hosts); `None`: tenants moved here are created from their spec.
    pub migration_url: Option<String>,
}

/// A running host agent; [`HostAgent::stop`] (or drop) deregisters the host.
pub struct HostAgent {
    task: Background,
}

impl HostAgent {
    /// Connects to etcd and registers the host (an error if that fails), then reconciles in the
    /// background.
    pub fn start(host: Arc<Host>, config: AgentConfig) -> Result<HostAgent, ClusterError> {
        keys::host_key(&config.name)?;
        let rt = background::runtime("cluster-agent", 2)?;
        let agent = Agent {
            host,
            config: Arc::new(config),
            applied: BTreeMap::new(),
            leaving: BTreeMap::new(),
            arriving: BTreeMap::new(),
            undeleted: BTreeMap::new(),
            key_book: KeyBook::default(),
        };
        let mut agent = agent;
        let (client, session) = rt.block_on(async {
            let mut client = connect(&agent.config.endpoints).await?;
            let endpoints = agent.config.endpoints.join(",");
            crate::store::ensure_host_keys(&mut client, &endpoints, &agent.config.name).await?;
            agent.key_book.load(&mut client, &endpoints).await?;
            agent.install_keys();
            let session = agent.register(&mut client).await?;
            Ok::<_, ClusterError>((client, session))
        })?;
        let task = Background::spawn("cluster-agent", rt, move |stop| {
            agent.run(client, session, stop)
        })?;
        Ok(HostAgent { task })
    }

    /// Deregisters the host (its lease revoked) and stops the agent; the tenants it runs stay
    /// (the host's own shutdown deletes them). Dropping it does the same.
    pub fn stop(&mut self) {
        self.task.stop();
    }
}

/// A tenant moved here that the agent listens for.
struct Arriving {
    record: TenantRecord,
    revision: i64,
    /// The host that runs it and is to send it.
    from: String,
    since: Instant,
}

/// One registration: its lease, and a flag the keep-alive raises when etcd says it expired.
struct Session {
    lease: i64,
    lost: watch::Receiver<bool>,
    keeper: tokio::task::JoinHandle<()>,
}

struct Agent {
    host: Arc<Host>,
    config: Arc<AgentConfig>,
    /// The specs of the tenants this agent created, by id.
    applied: BTreeMap<String, VmSpec>,
    /// Tenants it runs that were moved to another host, waiting for that host to listen for
    /// them: the host, since when.
    leaving: BTreeMap<String, (String, Instant)>,
    /// Tenants moved here that it listens for: their record and its revision, since when.
    arriving: BTreeMap<String, Arriving>,
    /// Tenants whose delete the host refused (they still run here, and stay in `applied`):
    /// when it was last tried. Each is planned again from its record after [`DELETE_RETRY`].
    undeleted: BTreeMap<String, Instant>,
    /// Every host's channel keys.
    key_book: KeyBook,
}

fn host_record(host: &Host, config: &AgentConfig, lease: i64) -> HostRecord {
    let used = host.list().len();
    HostRecord {
        name: config.name.clone(),
        sender: config.sender,
        api_socket: config.api_socket.clone(),
        capacity: Capacity {
            tenant_ports: config.tenant_ports,
            free_ports: config.tenant_ports.saturating_sub(used),
        },
        lease,
        ttl_s: config.lease_ttl_s,
        heartbeat_unix_ms: keys::now_unix_ms(),
        migration: config.migration_url.clone(),
    }
}

async fn put_record(
    client: &mut Client,
    host: &Host,
    config: &AgentConfig,
    lease: i64,
) -> Result<(), etcd_client::Error> {
    let key = format!("{}{}", keys::HOSTS, config.name);
    let value = to_json(&host_record(host, config, lease));
    client
        .put(key, value, Some(PutOptions::new().with_lease(lease)))
        .await
        .map(|_| ())
}

/// Keeps `lease` alive every third of its TTL and re-puts the host record (the heartbeat, with
/// the capacity now) every TTL; raises `lost` when etcd says the lease is gone.
async fn keep_alive(
    mut client: Client,
    host: Arc<Host>,
    config: Arc<AgentConfig>,
    lease: i64,
    lost: watch::Sender<bool>,
) {
    let period = Duration::from_millis((config.lease_ttl_s.max(1) as u64 * 1000) / 3);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stream = None;
    let mut rounds: u64 = 0;
    loop {
        tick.tick().await;
        rounds += 1;
        if stream.is_none() {
            match client.lease_keep_alive(lease).await {
                Ok(pair) => stream = Some(pair),
                Err(e) => {
                    log::warn!("cluster agent {}: keep-alive: {e}", config.name);
                    continue;
                }
            }
        }
        let Some((keeper, responses)) = stream.as_mut() else {
            continue;
        };
        let answer = async {
            keeper.keep_alive().await?;
            responses.message().await
        };
        match tokio::time::timeout(period, answer).await {
            Ok(Ok(Some(r))) if r.ttl() <= 0 => {
                let _ = lost.send(true);
                return;
            }
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                // The stream broke (etcd restarting, unreachable): open a new one next round.
                log::warn!("cluster agent {}: keep-alive unanswered", config.name);
                stream = None;
                continue;
            }
        }
        if rounds.is_multiple_of(3) {
            if let Err(e) = put_record(&mut client, &host, &config, lease).await {
                if e.to_string().contains("lease not found") {
                    let _ = lost.send(true);
                    return;
                }
                log::warn!("cluster agent {}: heartbeat: {e}", config.name);
            }
        }
    }
}

impl Agent {
    fn emit(&self, kind: &str, extra: serde_json::Value) {
        let mut body = serde_json::json!({"host": self.config.name});
        if let (Some(body), serde_json::Value::Object(extra)) = (body.as_object_mut(), extra) {
            body.extend(extra);
        }
        vmm_core::events::bus().emit(kind, &body);
    }

    /// Gives the host the keys of the book, if they changed.
    fn install_keys(&mut self) {
        if let Some(installed) = self.key_book.install(&self.host, &self.config.name) {
            self.emit("cluster_keys_installed", installed);
        }
    }

    /// Grants a lease, puts the host record under it, starts its keep-alive.
    async fn register(&self, client: &mut Client) -> Result<Session, ClusterError> {
        let endpoints = self.config.endpoints.join(",");
        let etcd = |source| ClusterError::Etcd {
            endpoints: endpoints.clone(),
            source,
        };
        let lease = client
            .lease_grant(self.config.lease_ttl_s, None)
            .await
            .map_err(etcd)?
            .id();
        put_record(client, &self.host, &self.config, lease)
            .await
            .map_err(etcd)?;
        let (lost_tx, lost) = watch::channel(false);
        let keeper = tokio::spawn(keep_alive(
            client.clone(),
            self.host.clone(),
            self.config.clone(),
            lease,
            lost_tx,
        ));
        self.emit(
            "cluster_registered",
            serde_json::json!({"lease": lease, "ttl_s": self.config.lease_ttl_s,
                "sender": self.config.sender}),
        );
        Ok(Session {
            lease,
            lost,
            keeper,
        })
    }

    async fn run(mut self, mut client: Client, first: Session, mut stop: watch::Receiver<bool>) {
        let mut session = Some(first);
        loop {
            let mut current = match session.take() {
                Some(s) => s,
                None => match self.register(&mut client).await {
                    Ok(s) => s,
                    Err(e) => {
                        log::warn!("cluster agent {}: register: {e}", self.config.name);
                        tokio::select! {
                            _ = stop.changed() => return,
                            _ = tokio::time::sleep(RETRY) => continue,
                        }
                    }
                },
            };
            let ended = self.serve(&mut client, &mut current, &mut stop).await;
            current.keeper.abort();
            match ended {
                Ended::Stopped => {
                    let _ =
                        tokio::time::timeout(REQUEST_TIMEOUT, client.lease_revoke(current.lease))
                            .await;
                    self.emit("cluster_deregistered", serde_json::json!({}));
                    return;
                }
                Ended::LeaseLost => {
                    // The edge flushed this host's tenants when the lease expired, and the
                    // cluster may start them elsewhere: stop them here before coming back.
                    let ids: Vec<String> = self.applied.keys().cloned().collect();
                    self.emit(
                        "cluster_lease_lost",
                        serde_json::json!({"lease": current.lease, "deleting": ids}),
                    );
                    for id in ids {
                        self.act(&mut client, &id, 0, Action::Delete, current.lease)
                            .await;
                    }
                    // Moves in progress went with the lease (its migration records with it):
                    // after registering again, the records say afresh what to do.
                    self.leaving.clear();
                    self.arriving.clear();
                }
            }
        }
    }

    /// Syncs from a full read, then follows the watch, until stopped or the lease is lost.
    async fn serve(
        &mut self,
        client: &mut Client,
        session: &mut Session,
        stop: &mut watch::Receiver<bool>,
    ) -> Ended {
        loop {
            if *stop.borrow() {
                return Ended::Stopped;
            }
            if *session.lost.borrow() {
                return Ended::LeaseLost;
            }
            let revision = match self.sync(client, session.lease).await {
                Ok(rev) => rev,
                Err(e) => {
                    log::warn!("cluster agent {}: sync: {e}", self.config.name);
                    tokio::select! {
                        _ = stop.changed() => return Ended::Stopped,
                        _ = session.lost.changed() => return Ended::LeaseLost,
                        _ = tokio::time::sleep(RETRY) => continue,
                    }
                }
            };
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(revision + 1);
            // Tenants and migrations (the rest of the prefix is heartbeats and reports: cheap).
            let mut stream = match client.watch(keys::ROOT, Some(options)).await {
                Ok(s) => s,
                Err(e) => {
                    log::warn!("cluster agent {}: watch: {e}", self.config.name);
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            };
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.changed() => return Ended::Stopped,
                    _ = session.lost.changed() => return Ended::LeaseLost,
                    _ = tick.tick(), if !self.leaving.is_empty() || !self.arriving.is_empty()
                        || !self.undeleted.is_empty() => {
                        self.moves(client, session.lease).await;
                        self.retry_deletes(client, session.lease).await;
                    }
                    message = stream.message() => {
                        let Ok(Some(message)) = message else {
                            log::warn!("cluster agent {}: the watch ended; syncing again",
                                self.config.name);
                            break;
                        };
                        for event in message.events() {
                            let Some(kv) = event.kv() else { continue };
                            if let Some(id) = keys::name_under(keys::TENANTS, kv.key()) {
                                let desired = match event.event_type() {
                                    EventType::Put => self.parse(id, kv.value()),
                                    EventType::Delete => Some(None),
                                };
                                let id = id.to_string();
                                let Some(desired) = desired else {
                                    self.unreadable(client, &id, kv.mod_revision(), session.lease)
                                        .await;
                                    continue;
                                };
                                self.reconcile(client, &id, desired.as_ref(), kv.mod_revision(),
                                    session.lease).await;
                            } else if let Some(host) = keys::name_under(keys::KEYS, kv.key()) {
                                match event.event_type() {
                                    EventType::Put => self.key_book.put(host, kv.key(), kv.value()),
                                    EventType::Delete => self.key_book.remove(host),
                                }
                                self.install_keys();
                            } else if let Some(id) = keys::name_under(keys::MIGRATIONS, kv.key()) {
                                if event.event_type() == EventType::Put {
                                    let id = id.to_string();
                                    let record = serde_json::from_slice(kv.value()).ok();
                                    self.migration_ready(client, &id, record, session.lease)
                                        .await;
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// A stored record, or `None` if it cannot be read (reported as `cluster_bad_record`).
    fn parse(&self, id: &str, value: &[u8]) -> Option<Option<TenantRecord>> {
        match TenantRecord::parse(id, value) {
            Ok(r) => Some(Some(r)),
            Err(e) => {
                self.emit(
                    "cluster_bad_record",
                    serde_json::json!({"vm": id, "error": e.to_string()}),
                );
                None
            }
        }
    }

    /// A record that cannot be read is no authority to run a tenant, nor to delete one that
    /// runs here: a mistyped value, or a field an older agent does not know, deleted a running
    /// tenant (its RAM, its flows) as if the record were gone. It stays as it is, reported as
    /// failed for that revision, until the record is readable again or deleted.
    async fn unreadable(&mut self, client: &mut Client, id: &str, revision: i64, lease: i64) {
        if !self.applied.contains_key(id) {
            return;
        }
        let (Ok(key), status) = (
            keys::status_key(id),
            TenantStatus {
                host: self.config.name.clone(),
                revision,
                state: "failed".into(),
                error: Some("its record cannot be read: it runs on as it was".into()),
                action: "keep".into(),
                applied_ms: 0.0,
            },
        ) else {
            return;
        };
        let put = client.put(
            key,
            to_json(&status),
            Some(PutOptions::new().with_lease(lease)),
        );
        if let Err(e) = put.await {
            log::warn!("cluster agent {}: status of {id}: {e}", self.config.name);
        }
    }

    /// Reads every tenant record and reconciles each (and each applied tenant with no record);
    /// returns the read's revision.
    async fn sync(&mut self, client: &mut Client, lease: i64) -> Result<i64, ClusterError> {
        let resp = client
            .get(keys::TENANTS, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|source| ClusterError::Etcd {
                endpoints: self.config.endpoints.join(","),
                source,
            })?;
        let revision = resp.header().map_or(0, |h| h.revision());
        // Read after the tenants: a key change after `revision` is then read here or watched
        // (or both, which is harmless), never missed.
        let endpoints = self.config.endpoints.join(",");
        self.key_book.load(client, &endpoints).await?;
        self.install_keys();
        let mut desired: BTreeMap<String, (Option<Option<TenantRecord>>, i64)> = BTreeMap::new();
        for kv in resp.kvs() {
            if let Some(id) = keys::name_under(keys::TENANTS, kv.key()) {
                desired.insert(
                    id.to_string(),
                    (self.parse(id, kv.value()), kv.mod_revision()),
                );
            }
        }
        for id in self.applied.keys() {
            desired.entry(id.clone()).or_insert((Some(None), revision));
        }
        for (id, (record, rev)) in desired {
            match record {
                Some(record) => {
                    self.reconcile(client, &id, record.as_ref(), rev, lease)
                        .await
                }
                None => self.unreadable(client, &id, rev, lease).await,
            }
        }
        // Targets that listen for tenants leaving here (written while the watch was down).
        if !self.leaving.is_empty() {
            if let Ok(resp) = client
                .get(keys::MIGRATIONS, Some(GetOptions::new().with_prefix()))
                .await
            {
                for kv in resp.kvs() {
                    if let Some(id) = keys::name_under(keys::MIGRATIONS, kv.key()) {
                        let record = serde_json::from_slice(kv.value()).ok();
                        self.migration_ready(client, id, record, lease).await;
                    }
                }
            }
        }
        Ok(revision)
    }

    async fn reconcile(
        &mut self,
        client: &mut Client,
        id: &str,
        desired: Option<&TenantRecord>,
        revision: i64,
        lease: i64,
    ) {
        let me = self.config.name.clone();
        let here = desired.is_some_and(|d| d.host == me);
        // A move the record no longer asks for.
        if here {
            self.leaving.remove(id);
        } else if self.arriving.remove(id).is_some() {
            self.emit(
                "cluster_migration_abandoned",
                serde_json::json!({"vm": id, "why": "the tenant was moved again or deleted"}),
            );
            self.drop_migration_record(client, id, lease).await;
        }
        if let (true, Some(d), Some(waiting)) = (here, desired, self.arriving.get_mut(id)) {
            // Still listening for it: a newer revision of its record is what it adopts.
            waiting.record = d.clone();
            waiting.revision = revision;
            return;
        }
        let action = plan(&me, self.applied.get(id), desired);
        match (&action, desired) {
            (Action::Delete, Some(d)) if self.applied.contains_key(id) => {
                if self.leaving.contains_key(id) {
                    return;
                }
                if self.takes_migrations(client, &d.host).await {
                    self.leaving
                        .insert(id.to_string(), (d.host.clone(), Instant::now()));
                    self.emit(
                        "cluster_migration_waiting",
                        serde_json::json!({"vm": id, "to": d.host, "wait_ms": LEAVE_WAIT.as_millis()}),
                    );
                    // The new host may be listening already.
                    let record = self.migration_record(client, id).await;
                    self.migration_ready(client, id, record, lease).await;
                    return;
                }
            }
            (Action::Create(_), Some(d)) => {
                if let (Some(from), Some(url)) = (
                    self.running_elsewhere(client, id).await,
                    self.config.migration_url.clone(),
                ) {
                    match self.listen(client, id, &from, &url, lease).await {
                        Ok(()) => {
                            self.arriving.insert(
                                id.to_string(),
                                Arriving {
                                    record: d.clone(),
                                    revision,
                                    from: from.clone(),
                                    since: Instant::now(),
                                },
                            );
                            self.emit(
                                "cluster_migration_listening",
                                serde_json::json!({"vm": id, "from": from, "url": url}),
                            );
                            return;
                        }
                        Err(e) => self.emit(
                            "cluster_migration_failed",
                            serde_json::json!({"vm": id, "from": from, "error": e,
                                "then": "created here from its spec"}),
                        ),
                    }
                }
            }
            _ => {}
        }
        self.act(client, id, revision, action, lease).await;
    }

    /// Carries out `action` for tenant `id` on the host (on a blocking thread: a VM build takes
    /// a while) and reports it.
    async fn act(
        &mut self,
        client: &mut Client,
        id: &str,
        revision: i64,
        action: Action,
        lease: i64,
    ) {
        let name = match &action {
            Action::Nothing => return,
            Action::Confirm => "confirm",
            Action::Create(_) => "create",
            Action::Policy(_) => "policy",
            Action::Recreate(_) => "recreate",
            Action::Delete => "delete",
            Action::Adopt(_) => "migrate",
        };
        let host = self.host.clone();
        let owned = id.to_string();
        let step = action.clone();
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(move || -> Result<(), String> {
            let e = |e: vmm_host::HostError| e.to_string();
            match step {
                Action::Create(spec) => {
                    host.create(spec).map_err(e)?;
                    host.boot(&owned).map(|_| ()).map_err(e)
                }
                Action::Policy(policy) => host.replace_policy(&owned, policy).map_err(e),
                Action::Recreate(spec) => {
                    match host.delete(&owned) {
                        Ok(()) | Err(vmm_host::HostError::NotFound { .. }) => {}
                        Err(other) => return Err(other.to_string()),
                    }
                    host.create(spec).map_err(e)?;
                    host.boot(&owned).map(|_| ()).map_err(e)
                }
                Action::Delete => match host.delete(&owned) {
                    Ok(()) | Err(vmm_host::HostError::NotFound { .. }) => Ok(()),
                    Err(other) => Err(other.to_string()),
                },
                // It runs here already: it migrated in.
                Action::Nothing | Action::Confirm | Action::Adopt(_) => Ok(()),
            }
        })
        .await
        .unwrap_or_else(|e| Err(format!("the {name} step panicked: {e}")));
        let applied_ms = started.elapsed().as_secs_f64() * 1e3;
        if !matches!(action, Action::Delete) {
            self.undeleted.remove(id);
        }
        match (&action, &result) {
            (Action::Delete, Ok(())) => {
                self.applied.remove(id);
                self.undeleted.remove(id);
            }
            // It still runs here: it stays applied (so reported, and deleted by a lost lease)
            // and is tried again (`retry_deletes`).
            (Action::Delete, Err(_)) => {
                self.undeleted.insert(id.to_string(), Instant::now());
            }
            (Action::Create(spec) | Action::Recreate(spec) | Action::Adopt(spec), Ok(())) => {
                self.applied.insert(id.to_string(), spec.clone());
            }
            (Action::Create(_) | Action::Recreate(_) | Action::Adopt(_), Err(_)) => {
                // Whatever half of it exists is not ours to keep: nothing runs unreported.
                self.applied.remove(id);
            }
            (Action::Policy(policy), Ok(())) => {
                if let Some(spec) = self.applied.get_mut(id) {
                    spec.policy = policy.clone();
                }
            }
            // A policy the host refused leaves the old one in force there; the status says so.
            (Action::Policy(_), Err(_)) | (Action::Nothing | Action::Confirm, _) => {}
        }
        // The event after the status write: whoever sees it finds the status in etcd.
        let event = (
            if result.is_ok() {
                "cluster_reconciled"
            } else {
                "cluster_reconcile_failed"
            },
            serde_json::json!({"vm": id, "action": name, "revision": revision,
                "applied_ms": applied_ms, "error": result.as_ref().err()}),
        );
        let Ok(key) = keys::status_key(id) else {
            return;
        };
        let write = if matches!(action, Action::Delete) && result.is_ok() {
            // Only this host's report (under its lease): the tenant's new host may have
            // written its own by now.
            delete_own(client, key, lease).await;
            Ok(())
        } else {
            let status = TenantStatus {
                host: self.config.name.clone(),
                revision,
                state: if result.is_ok() { "running" } else { "failed" }.into(),
                error: result.err(),
                action: name.into(),
                applied_ms,
            };
            client
                .put(
                    key,
                    to_json(&status),
                    Some(PutOptions::new().with_lease(lease)),
                )
                .await
                .map(|_| ())
        };
        if let Err(e) = write {
            log::warn!("cluster agent {}: status of {id}: {e}", self.config.name);
        }
        self.emit(event.0, event.1);
    }
}

impl Agent {
    /// Plans again, from its record as etcd has it now, each tenant whose delete the host
    /// refused at least [`DELETE_RETRY`] ago.
    async fn retry_deletes(&mut self, client: &mut Client, lease: i64) {
        // Gone from here since (migrated away, or deleted by another step): nothing to retry.
        let applied = &self.applied;
        self.undeleted.retain(|id, _| applied.contains_key(id));
        let due: Vec<String> = self
            .undeleted
            .iter()
            .filter(|(_, at)| at.elapsed() >= DELETE_RETRY)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            // Tried again at the next due time whatever happens below.
            self.undeleted.insert(id.clone(), Instant::now());
            let Ok(key) = keys::tenant_key(&id) else {
                continue;
            };
            let resp = match client.get(key, None).await {
                Ok(resp) => resp,
                Err(e) => {
                    log::warn!("cluster agent {}: reading {id}: {e}", self.config.name);
                    continue;
                }
            };
            let revision = resp.header().map_or(0, |h| h.revision());
            match resp.kvs().first() {
                None => self.reconcile(client, &id, None, revision, lease).await,
                Some(kv) => match self.parse(&id, kv.value()) {
                    Some(record) => {
                        self.reconcile(client, &id, record.as_ref(), kv.mod_revision(), lease)
                            .await
                    }
                    None => {
                        // An unreadable record keeps it as it runs (`unreadable`).
                        self.undeleted.remove(&id);
                        self.unreadable(client, &id, kv.mod_revision(), lease).await
                    }
                },
            }
        }
    }
}

/// Deletes `key` if it lives under `lease` (this host wrote it), in one transaction: another
/// host's record of the same name is left alone.
async fn delete_own(client: &mut Client, key: String, lease: i64) {
    let txn = Txn::new()
        .when([Compare::lease(key.clone(), CompareOp::Equal, lease)])
        .and_then([TxnOp::delete(key.clone(), None)]);
    if let Err(e) = client.txn(txn).await {
        log::warn!("cluster agent: deleting {key}: {e}");
    }
}

enum Ended {
    Stopped,
    LeaseLost,
}
