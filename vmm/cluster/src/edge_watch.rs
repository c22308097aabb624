//! The edge's side of the cluster: it registers the edge under a lease, and watches the hosts'
//! registrations. When a host's record goes (its lease expired: the host died or lost etcd; or
//! it deregistered), the edge fences that host: every tenant it attached is flushed at once and
//! its datagrams are not applied until it registers again (`edge::node::Edge::fence_host`).
//!
//! Owns: the edge's registration and the table of registered hosts' sender ids. Must not: act on
//! hosts, or readmit a host that has no live registration.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edge::node::Edge;
use etcd_client::{Client, EventType, GetOptions, PutOptions, WatchOptions};
use tokio::sync::watch;

use crate::background::{self, Background};
use crate::keys::{self, EdgeRecord, HostRecord};
use crate::store::{connect, from_json, to_json, REQUEST_TIMEOUT};
use crate::ClusterError;

const RETRY: Duration = Duration::from_millis(500);

#[derive(Clone, Debug)]
pub struct EdgeWatchConfig {
    pub endpoints: Vec<String>,
    /// The edge's name in the cluster.
    pub name: String,
    pub lease_ttl_s: i64,
}

/// A running edge watch; [`EdgeWatch::stop`] (or drop) deregisters the edge.
pub struct EdgeWatch {
    task: Background,
}

struct Watcher {
    edge: Arc<Edge>,
    config: EdgeWatchConfig,
    /// Registered hosts: name -> sender id.
    hosts: BTreeMap<String, u32>,
}

impl EdgeWatch {
    /// Connects to etcd and registers the edge (an error if that fails), then watches the hosts.
    pub fn start(edge: Arc<Edge>, config: EdgeWatchConfig) -> Result<EdgeWatch, ClusterError> {
        let key = keys::edge_key(&config.name)?;
        let rt = background::runtime("cluster-edge", 1)?;
        let watcher = Watcher {
            edge,
            config,
            hosts: BTreeMap::new(),
        };
        let (client, lease) = rt.block_on(async {
            let mut client = connect(&watcher.config.endpoints).await?;
            let lease = watcher.register(&mut client, &key).await?;
            Ok::<_, ClusterError>((client, lease))
        })?;
        let task = Background::spawn("cluster-edge", rt, move |stop| {
            watcher.run(client, key, lease, stop)
        })?;
        Ok(EdgeWatch { task })
    }

    /// Stops watching (the edge's registration goes with its lease). Dropping it does the same.
    pub fn stop(&mut self) {
        self.task.stop();
    }
}

impl Watcher {
    fn emit(&self, kind: &str, extra: serde_json::Value) {
        let mut body = serde_json::json!({"edge": self.config.name});
        if let (Some(body), serde_json::Value::Object(extra)) = (body.as_object_mut(), extra) {
            body.extend(extra);
        }
        vmm_core::events::bus().emit(kind, &body);
    }

    fn etcd(&self, source: etcd_client::Error) -> ClusterError {
        ClusterError::Etcd {
            endpoints: self.config.endpoints.join(","),
            source,
        }
    }

    async fn register(&self, client: &mut Client, key: &str) -> Result<i64, ClusterError> {
        let lease = client
            .lease_grant(self.config.lease_ttl_s, None)
            .await
            .map_err(|e| self.etcd(e))?
            .id();
        let record = EdgeRecord {
            name: self.config.name.clone(),
            control: self.edge.control_addr().to_string(),
            boot_id: format!("{:#x}", self.edge.boot_id()),
            lease,
        };
        client
            .put(
                key,
                to_json(&record),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .map_err(|e| self.etcd(e))?;
        Ok(lease)
    }

    /// The host is gone: fence it and flush its tenants.
    fn lost(&mut self, name: &str, sender: u32, why: &str) {
        self.hosts.remove(name);
        let started = Instant::now();
        let flushed = self.edge.fence_host(sender);
        self.emit(
            "edge_host_lost",
            serde_json::json!({"host": name, "sender": sender, "why": why,
                "flushed_tenants": flushed, "applied": flushed.is_some(),
                "flush_ms": started.elapsed().as_secs_f64() * 1e3}),
        );
    }

    fn registered(&mut self, record: HostRecord) {
        if self.edge.readmit_host(record.sender) {
            self.emit(
                "edge_host_readmitted",
                serde_json::json!({"host": record.name, "sender": record.sender}),
            );
        }
        if let Some(old) = self.hosts.insert(record.name.clone(), record.sender) {
            if old != record.sender {
                // The name moved to another sender id: the old one's tenants have no host.
                self.lost(&record.name, old, "sender changed");
                self.hosts.insert(record.name, record.sender);
            }
        }
    }

    /// Reads every host record: hosts known before and absent now are lost. Returns the
    /// revision of the read.
    async fn sync(&mut self, client: &mut Client) -> Result<i64, ClusterError> {
        let resp = client
            .get(keys::HOSTS, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.etcd(e))?;
        let mut now = Vec::new();
        for kv in resp.kvs() {
            match from_json::<HostRecord>(kv.key(), kv.value()) {
                Ok(record) => now.push(record),
                Err(e) => log::warn!("edge {}: {e}", self.config.name),
            }
        }
        let gone: Vec<(String, u32)> = self
            .hosts
            .iter()
            .filter(|(name, _)| !now.iter().any(|r| &r.name == *name))
            .map(|(n, s)| (n.clone(), *s))
            .collect();
        for (name, sender) in gone {
            self.lost(&name, sender, "absent when the edge read the hosts again");
        }
        for record in now {
            self.registered(record);
        }
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    async fn run(
        mut self,
        mut client: Client,
        key: String,
        mut lease: i64,
        mut stop: watch::Receiver<bool>,
    ) {
        let keeper_period = Duration::from_millis(self.config.lease_ttl_s.max(1) as u64 * 1000 / 3);
        let mut keeper = None;
        let mut tick = tokio::time::interval(keeper_period);
        'sync: loop {
            let revision = match self.sync(&mut client).await {
                Ok(r) => r,
                Err(e) => {
                    log::warn!("edge {}: reading the hosts: {e}", self.config.name);
                    tokio::select! {
                        _ = stop.changed() => break 'sync,
                        _ = tokio::time::sleep(RETRY) => continue 'sync,
                    }
                }
            };
            let options = WatchOptions::new()
                .with_prefix()
                .with_prev_key()
                .with_start_revision(revision + 1);
            let mut stream = match client.watch(keys::HOSTS, Some(options)).await {
                Ok(s) => s,
                Err(e) => {
                    log::warn!("edge {}: watching the hosts: {e}", self.config.name);
                    tokio::time::sleep(RETRY).await;
                    continue 'sync;
                }
            };
            loop {
                tokio::select! {
                    _ = stop.changed() => break 'sync,
                    _ = tick.tick() => {
                        lease = self.keep_alive(&mut client, &key, lease, &mut keeper).await;
                    }
                    message = stream.message() => {
                        let Ok(Some(message)) = message else {
                            log::warn!("edge {}: the hosts' watch ended; reading again",
                                self.config.name);
                            continue 'sync;
                        };
                        for event in message.events() {
                            let Some(kv) = event.kv() else { continue };
                            let Some(name) = keys::name_under(keys::HOSTS, kv.key()) else {
                                continue;
                            };
                            let name = name.to_string();
                            match event.event_type() {
                                EventType::Put => match from_json::<HostRecord>(kv.key(), kv.value()) {
                                    Ok(record) if record.name == name => self.registered(record),
                                    Ok(_) | Err(_) => log::warn!(
                                        "edge {}: a bad record for host {name}", self.config.name),
                                },
                                EventType::Delete => {
                                    let sender = event
                                        .prev_kv()
                                        .and_then(|p| from_json::<HostRecord>(p.key(), p.value()).ok())
                                        .map(|r| r.sender)
                                        .or_else(|| self.hosts.get(&name).copied());
                                    if let Some(sender) = sender {
                                        self.lost(&name, sender, "registration gone (lease expired or revoked)");
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        let _ = tokio::time::timeout(REQUEST_TIMEOUT, client.lease_revoke(lease)).await;
    }

    /// One keep-alive of the edge's own lease; registers anew if it was lost.
    async fn keep_alive(
        &self,
        client: &mut Client,
        key: &str,
        lease: i64,
        keeper: &mut Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)>,
    ) -> i64 {
        if keeper.is_none() {
            *keeper = client.lease_keep_alive(lease).await.ok();
        }
        let Some((k, responses)) = keeper.as_mut() else {
            return lease;
        };
        let answer = async {
            k.keep_alive().await?;
            responses.message().await
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, answer).await {
            Ok(Ok(Some(r))) if r.ttl() > 0 => lease,
            Ok(Ok(Some(_))) => {
                *keeper = None;
                match self.register(client, key).await {
                    Ok(new) => new,
                    Err(e) => {
                        log::warn!("edge {}: registering again: {e}", self.config.name);
                        lease
                    }
                }
            }
            _ => {
                *keeper = None;
                lease
            }
        }
    }
}
