//! The edge's side of the cluster: it registers the edge under a lease, and watches the hosts'
//! registrations. When a host's record goes (its lease expired: the host died or lost etcd; or
//! it deregistered), the edge fences that host: every tenant it attached is flushed at once and
//! its datagrams are not applied until it registers again (`edge::node::Edge::fence_host`).
//!
//! It also watches the hosts' keys (`/vigil/keys/`): each registered host's sender id is held to
//! that host's own edge keys (`Edge::set_host_keys`), so the verdict channel authenticates each
//! host with its own key, rotations included, and one host cannot sign for another's sender id.
//! Two registered hosts claiming one sender id get no keys for it (`edge_sender_conflict`).
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
use crate::key_book::KeyBook;
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
    /// Every host's keys.
    key_book: KeyBook,
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
            key_book: KeyBook::default(),
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

    /// Holds `sender`'s datagrams to the edge keys of the registered host that has that sender
    /// id: none when no registered host (or more than one) has it.
    fn install_keys(&self, sender: u32) {
        let claimants: Vec<&String> = self
            .hosts
            .iter()
            .filter(|(_, s)| **s == sender)
            .map(|(name, _)| name)
            .collect();
        let keys = match claimants.as_slice() {
            [one] => self.key_book.edge_keys(one),
            [] => None,
            several => {
                self.emit(
                    "edge_sender_conflict",
                    serde_json::json!({"sender": sender, "hosts": several}),
                );
                None
            }
        };
        let keys = keys.map(|set| set.keys).unwrap_or_default();
        let ids: Vec<u16> = keys.iter().map(|(id, _)| *id).collect();
        match self.edge.set_host_keys(sender, keys) {
            Ok(()) => self.emit(
                "edge_host_keys",
                serde_json::json!({"sender": sender, "hosts": claimants, "key_ids": ids}),
            ),
            Err(e) => log::warn!("edge {}: keys of sender {sender}: {e}", self.config.name),
        }
    }

    /// The host is gone: fence it and flush its tenants.
    fn lost(&mut self, name: &str, sender: u32, why: &str) {
        self.hosts.remove(name);
        self.install_keys(sender);
        let started = Instant::now();
        let flushed = self.edge.fence_host(sender);
        self.emit(
            "edge_host_lost",
            serde_json::json!({"host": name, "sender": sender, "why": why,
                "flushed_tenants": flushed, "applied": flushed.is_some(),
                "flush_ms": started.elapsed().as_secs_f64() * 1e3}),
        );
    }

    /// A host record read or put. With `install`, the host's sender takes its keys now (a
    /// full read installs every sender's once, after it read the keys).
    fn registered(&mut self, record: HostRecord, install: bool) {
        if self.edge.readmit_host(record.sender) {
            self.emit(
                "edge_host_readmitted",
                serde_json::json!({"host": record.name, "sender": record.sender}),
            );
        }
        let sender = record.sender;
        match self.hosts.insert(record.name.clone(), sender) {
            Some(old) if old != sender => {
                // The name moved to another sender id: the old one's tenants have no host.
                self.lost(&record.name, old, "sender changed");
                self.hosts.insert(record.name, sender);
                if install {
                    self.install_keys(sender);
                }
            }
            Some(_) => {}
            None if install => self.install_keys(sender),
            None => {}
        }
    }

    /// A host's keys record changed (or went): its sender takes the keys now stored.
    fn keys_changed(&mut self, host: &str, value: Option<(&[u8], &[u8])>) {
        match value {
            Some((key, value)) => self.key_book.put(host, key, value),
            None => self.key_book.remove(host),
        }
        if let Some(sender) = self.hosts.get(host).copied() {
            self.install_keys(sender);
        }
    }

    /// Reads every host's keys, then every host record, and installs each sender's keys once;
    /// returns the revisions of both reads.
    async fn sync(&mut self, client: &mut Client) -> Result<(i64, i64), ClusterError> {
        let endpoints = self.config.endpoints.join(",");
        let keys_revision = self.key_book.load(client, &endpoints).await?;
        let hosts_revision = self.sync_hosts(client).await?;
        let senders: std::collections::BTreeSet<u32> = self.hosts.values().copied().collect();
        for sender in senders {
            self.install_keys(sender);
        }
        Ok((hosts_revision, keys_revision))
    }

    /// Reads every host record: hosts known before and absent now are lost. Returns the
    /// revision of the read.
    async fn sync_hosts(&mut self, client: &mut Client) -> Result<i64, ClusterError> {
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
            self.registered(record, false);
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
            let (hosts_revision, keys_revision) = match self.sync(&mut client).await {
                Ok(r) => r,
                Err(e) => {
                    log::warn!("edge {}: reading the hosts: {e}", self.config.name);
                    tokio::select! {
                        _ = stop.changed() => break 'sync,
                        _ = tokio::time::sleep(RETRY) => continue 'sync,
                    }
                }
            };
            let from = |revision: i64| {
                WatchOptions::new()
                    .with_prefix()
                    .with_prev_key()
                    .with_start_revision(revision + 1)
            };
            let watched = async {
                let hosts = client
                    .watch(keys::HOSTS, Some(from(hosts_revision)))
                    .await?;
                let keys = client.watch(keys::KEYS, Some(from(keys_revision))).await?;
                Ok::<_, etcd_client::Error>((hosts, keys))
            };
            let (mut hosts, mut keys) = match watched.await {
                Ok(streams) => streams,
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
                    message = hosts.message() => {
                        let Ok(Some(message)) = message else {
                            log::warn!("edge {}: the hosts' watch ended; reading again",
                                self.config.name);
                            continue 'sync;
                        };
                        for event in message.events() {
                            self.host_event(event);
                        }
                    }
                    message = keys.message() => {
                        let Ok(Some(message)) = message else {
                            log::warn!("edge {}: the keys' watch ended; reading again",
                                self.config.name);
                            continue 'sync;
                        };
                        for event in message.events() {
                            let Some(kv) = event.kv() else { continue };
                            let Some(host) = keys::name_under(keys::KEYS, kv.key()) else {
                                continue;
                            };
                            let host = host.to_string();
                            let value = (event.event_type() == EventType::Put)
                                .then(|| (kv.key(), kv.value()));
                            self.keys_changed(&host, value);
                        }
                    }
                }
            }
        }
        let _ = tokio::time::timeout(REQUEST_TIMEOUT, client.lease_revoke(lease)).await;
    }

    /// A host record put (registered, or its heartbeat) or deleted (lost).
    fn host_event(&mut self, event: &etcd_client::Event) {
        let Some(kv) = event.kv() else { return };
        let Some(name) = keys::name_under(keys::HOSTS, kv.key()) else {
            return;
        };
        let name = name.to_string();
        match event.event_type() {
            EventType::Put => match from_json::<HostRecord>(kv.key(), kv.value()) {
                Ok(record) if record.name == name => self.registered(record, true),
                Ok(_) | Err(_) => {
                    log::warn!("edge {}: a bad record for host {name}", self.config.name)
                }
            },
            EventType::Delete => {
                let sender = event
                    .prev_kv()
                    .and_then(|p| from_json::<HostRecord>(p.key(), p.value()).ok())
                    .map(|r| r.sender)
                    .or_else(|| self.hosts.get(&name).copied());
                if let Some(sender) = sender {
                    self.lost(
                        &name,
                        sender,
                        "registration gone (lease expired or revoked)",
                    );
                }
            }
        }
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
