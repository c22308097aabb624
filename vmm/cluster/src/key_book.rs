//! The hosts' channel keys as one host's agent or the edge's watch sees them in etcd
//! (`/vigil/keys/<host>`), and what each end derives from them.
//!
//! - A host takes every host's migration keys from it (`Host::set_migration_keys`), so a
//!   migration between two hosts authenticates with their keys from etcd, rotations included;
//!   and it signs its datagrams to the edge with its own current edge key (`Host::set_edge_key`).
//! - The edge holds each registered host's sender id to that host's edge keys
//!   (`Edge::set_host_keys`), so one host cannot sign for another's sender id.
//!
//! A record that cannot be used whole (malformed, a short key, its current key missing) gives
//! its host no keys at all: fail closed, that host cannot migrate or be heard until fixed.
//!
//! Owns: the table of hosts' keys and the choice of what is installed from it. Must not: write
//! keys to etcd (`store` makes and rotates them), or log key material.

use std::collections::BTreeMap;

use etcd_client::{Client, GetOptions};
use vmm_host::{Host, MigrationKeys};

use crate::keys::{self, HostKeys, KeySet};
use crate::store::from_json;
use crate::ClusterError;

/// Every host's keys, by host name, as last read or watched.
#[derive(Default)]
pub(crate) struct KeyBook {
    hosts: BTreeMap<String, HostKeys>,
    /// What the host was last given: installs only on change.
    installed: Option<Installed>,
}

/// The key ids a host was given: every host's, and its own edge key's.
#[derive(PartialEq, Eq)]
struct Installed {
    hosts: BTreeMap<String, Vec<u32>>,
    own: Option<u16>,
}

impl KeyBook {
    /// Reads every host's keys (replacing what it held); returns the read's revision.
    pub(crate) async fn load(
        &mut self,
        client: &mut Client,
        endpoints: &str,
    ) -> Result<i64, ClusterError> {
        let resp = client
            .get(keys::KEYS, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|source| ClusterError::Etcd {
                endpoints: endpoints.into(),
                source,
            })?;
        self.hosts.clear();
        for kv in resp.kvs() {
            if let Some(host) = keys::name_under(keys::KEYS, kv.key()) {
                self.put(host, kv.key(), kv.value());
            }
        }
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// A host's keys record as stored (put or changed); an unreadable one removes its keys.
    pub(crate) fn put(&mut self, host: &str, key: &[u8], value: &[u8]) {
        match from_json::<HostKeys>(key, value) {
            Ok(keys) => {
                self.hosts.insert(host.to_string(), keys);
            }
            Err(e) => {
                log::warn!("keys of host {host} unusable: {e}");
                self.hosts.remove(host);
            }
        }
    }

    pub(crate) fn remove(&mut self, host: &str) {
        self.hosts.remove(host);
    }

    /// `host`'s edge keys (current id, keys by id), if it has usable ones.
    pub(crate) fn edge_keys(&self, host: &str) -> Option<KeySet<u16>> {
        let keys = self.hosts.get(host)?;
        keys.edge_keys()
            .map_err(|e| log::warn!("edge keys of host {host} unusable: {e}"))
            .ok()
    }

    /// Gives `host` (named `me`) every host's migration keys and its own current edge key, if
    /// they changed since the last call. Returns what it installed, for the event bus.
    pub(crate) fn install(&mut self, host: &Host, me: &str) -> Option<serde_json::Value> {
        let mut migration = MigrationKeys::default();
        let mut ids = BTreeMap::new();
        for (name, keys) in &self.hosts {
            let usable = keys
                .migration_keys()
                .and_then(|set| migration.set_host(name, set.current, set.keys));
            match usable {
                Ok(()) => {
                    ids.insert(name.clone(), keys.keys.iter().map(|k| k.id).collect());
                }
                Err(e) => log::warn!("migration keys of host {name} unusable: {e}"),
            }
        }
        let own = self.edge_keys(me);
        let now = Installed {
            hosts: ids,
            own: own.as_ref().map(|set| set.current),
        };
        if self.installed.as_ref() == Some(&now) {
            return None;
        }
        host.set_migration_keys(migration);
        let mut edge_key_id = host.edge_key_id();
        if let Some(set) = own {
            if edge_key_id.is_some() && edge_key_id != Some(set.current) {
                if let Some(key) = set.current_key() {
                    match host.set_edge_key(set.current, key.to_vec()) {
                        Ok(()) => edge_key_id = Some(set.current),
                        Err(e) => log::warn!("host {me}: edge key {} not taken: {e}", set.current),
                    }
                }
            }
        }
        let summary = serde_json::json!({"hosts": now.hosts, "edge_key_id": edge_key_id});
        self.installed = Some(now);
        Some(summary)
    }
}
