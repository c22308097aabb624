//! The cluster's key layout in etcd and the records stored under it (JSON values).
//!
//! ```text
//! /vigil/tenants/<id>   TenantRecord: the tenant's spec (its policy inside) and its desired host
//! /vigil/hosts/<name>   HostRecord under the host's lease: its edge-channel sender id, API
//!                       socket, capacity, last heartbeat (gone when the lease expires)
//! /vigil/edges/<name>   EdgeRecord under the edge's lease: its verdict channel and boot id
//! /vigil/keys/<host>    HostKeys: the channel keys the host may use, by key id, and the current
//! /vigil/status/<id>    TenantStatus, written by the host agent after it reconciled the tenant
//! /vigil/migrations/<id> MigrationRecord under the target host's lease: it listens for the
//!                       tenant at `url`; the source host's agent sends it there
//! ```
//!
//! Owns: key names, the record types and their checks. Must not: talk to etcd (`store`, `agent`
//! and `edge_watch` do).

use serde::{Deserialize, Serialize};
use vmm_host::VmSpec;

use crate::ClusterError;

pub const ROOT: &str = "/vigil/";
pub const TENANTS: &str = "/vigil/tenants/";
pub const HOSTS: &str = "/vigil/hosts/";
pub const EDGES: &str = "/vigil/edges/";
pub const KEYS: &str = "/vigil/keys/";
pub const STATUS: &str = "/vigil/status/";
pub const MIGRATIONS: &str = "/vigil/migrations/";

/// Longest host or edge name (it names keys and appears in events).
pub const MAX_NAME_LEN: usize = 32;

/// A host, edge or tenant name: 1 to 32 letters, digits, `-`, `_`, `.`, not starting with `.`
/// (the same rule as a VM id, so a name never holds a `/` that would move it to another key).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn checked(kind: &str, name: &str) -> Result<(), ClusterError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(ClusterError::InvalidName {
            kind: kind.into(),
            name: name.into(),
        })
    }
}

pub fn tenant_key(id: &str) -> Result<String, ClusterError> {
    checked("tenant", id)?;
    Ok(format!("{TENANTS}{id}"))
}

pub fn host_key(name: &str) -> Result<String, ClusterError> {
    checked("host", name)?;
    Ok(format!("{HOSTS}{name}"))
}

pub fn edge_key(name: &str) -> Result<String, ClusterError> {
    checked("edge", name)?;
    Ok(format!("{EDGES}{name}"))
}

pub fn keys_key(host: &str) -> Result<String, ClusterError> {
    checked("host", host)?;
    Ok(format!("{KEYS}{host}"))
}

pub fn status_key(id: &str) -> Result<String, ClusterError> {
    checked("tenant", id)?;
    Ok(format!("{STATUS}{id}"))
}

pub fn migration_key(id: &str) -> Result<String, ClusterError> {
    checked("tenant", id)?;
    Ok(format!("{MIGRATIONS}{id}"))
}

/// The name after `prefix` in `key`, if `key` is directly under it.
pub fn name_under<'a>(prefix: &str, key: &'a [u8]) -> Option<&'a str> {
    let rest = key.strip_prefix(prefix.as_bytes())?;
    let name = std::str::from_utf8(rest).ok()?;
    valid_name(name).then_some(name)
}

/// A tenant's desired state: what it is (its spec, with its policy) and where it runs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantRecord {
    /// The host that should run it (a `HostRecord` name).
    pub host: String,
    pub spec: VmSpec,
}

impl TenantRecord {
    /// Parses a stored record of tenant `id` and checks it names itself and a valid host.
    pub fn parse(id: &str, value: &[u8]) -> Result<TenantRecord, ClusterError> {
        let record: TenantRecord =
            serde_json::from_slice(value).map_err(|e| ClusterError::BadRecord {
                key: format!("{TENANTS}{id}"),
                reason: e.to_string(),
            })?;
        record.check(id)?;
        Ok(record)
    }

    pub fn check(&self, id: &str) -> Result<(), ClusterError> {
        let bad = |reason: String| ClusterError::BadRecord {
            key: format!("{TENANTS}{id}"),
            reason,
        };
        if self.spec.id != id {
            return Err(bad(format!("its spec's id is {:?}", self.spec.id)));
        }
        if !valid_name(&self.host) {
            return Err(bad(format!(
                "host {:?} is not a valid host name",
                self.host
            )));
        }
        Ok(())
    }
}

impl TenantRecord {
    /// Why this record cannot stand beside `other`, another tenant's (None: it can). Tenants on
    /// different hosts meet at the edge, which holds each tenant's addresses and verdicts by its
    /// tenant number (a hash of its id) and each address by one tenant: a second tenant with
    /// the same number was refused there as a collision while the first held it, and took over
    /// the first one's addresses (and its verdicts' scope) once the first was released for a
    /// migration; a second with the same IP or MAC was refused or stole its frames. A host
    /// refuses such a pair only among its own tenants.
    pub fn conflict_with(&self, other: &TenantRecord) -> Option<String> {
        let (a, b) = (&self.spec, &other.spec);
        if a.id == b.id {
            return None;
        }
        let number = vmm_core::introspect::tenant_id(&a.id);
        if number == vmm_core::introspect::tenant_id(&b.id) {
            return Some(format!(
                "tenant {:?} has the same tenant number ({number}) as {:?}: choose another id",
                a.id, b.id
            ));
        }
        if a.ip == b.ip {
            return Some(format!("tenant {:?} already has ip {}", b.id, b.ip));
        }
        let mac = vmm_core::net_config::parse_mac(&a.mac);
        if mac.is_some() && mac == vmm_core::net_config::parse_mac(&b.mac) {
            return Some(format!("tenant {:?} already has mac {}", b.id, b.mac));
        }
        None
    }
}

/// What a host can take.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    /// Switch ports for tenants.
    pub tenant_ports: usize,
    /// Ports no tenant holds now.
    pub free_ports: usize,
}

/// A host's registration (under its lease).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HostRecord {
    pub name: String,
    /// Its sender id on the edge's verdict channel (the edge flushes that sender's tenants when
    /// this record goes).
    pub sender: u32,
    /// Its REST API socket (on its own machine).
    #[serde(default)]
    pub api_socket: Option<String>,
    pub capacity: Capacity,
    /// The etcd lease the record lives under, and its TTL (s).
    pub lease: i64,
    pub ttl_s: i64,
    /// Wall-clock time (ms since the epoch) of the host's latest heartbeat.
    pub heartbeat_unix_ms: u64,
    /// Where it takes tenants migrating in (`tcp:ADDR:PORT`); `None`: a tenant moved to it is
    /// created anew from its spec.
    #[serde(default)]
    pub migration: Option<String>,
}

/// A tenant on its way between hosts: the target listens at `url` for it (it wrote this under
/// its lease once it listened); the source's agent sends it there.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MigrationRecord {
    pub from: String,
    pub to: String,
    pub url: String,
}

/// An edge's registration (under its lease).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EdgeRecord {
    pub name: String,
    /// Its verdict channel (UDP).
    pub control: String,
    /// Its run's boot id (hex).
    pub boot_id: String,
    pub lease: i64,
}

/// Labels that derive a host key's use-specific keys: the same secret never keys two protocols.
const EDGE_CHANNEL_LABEL: &[u8] = b"vigil/edge-channel/v1";
const MIGRATION_LABEL: &[u8] = b"vigil/migration/v1";
/// Shortest host key accepted (bytes): 256 bits, HMAC-SHA256's strength.
pub const MIN_HOST_KEY: usize = 32;

/// A fresh host key: 32 bytes from the kernel's CSPRNG, as hex.
pub fn new_key_hex() -> Result<String, ClusterError> {
    let mut key = [0u8; MIN_HOST_KEY];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut key))
        .map_err(ClusterError::Random)?;
    Ok(hex::encode(key))
}

/// A host's keys for one use, by id, and which one it signs with now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySet<Id> {
    pub current: Id,
    pub keys: Vec<(Id, Vec<u8>)>,
}

impl<Id: PartialEq + Copy> KeySet<Id> {
    /// The key it signs with now.
    pub fn current_key(&self) -> Option<&[u8]> {
        self.keys
            .iter()
            .find(|(id, _)| *id == self.current)
            .map(|(_, k)| k.as_slice())
    }
}

/// One channel key of a host.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ChannelKey {
    pub id: u32,
    /// At least 64 hex digits.
    pub hex: String,
    /// When it was made (ms since the epoch).
    pub created_unix_ms: u64,
}

impl ChannelKey {
    /// The secret, checked: hex of at least [`MIN_HOST_KEY`] bytes.
    fn secret(&self) -> Result<Vec<u8>, String> {
        let bytes = hex::decode(self.hex.trim()).map_err(|e| format!("key {}: {e}", self.id))?;
        if bytes.len() < MIN_HOST_KEY {
            return Err(format!(
                "key {}: {} bytes (at least {MIN_HOST_KEY})",
                self.id,
                bytes.len()
            ));
        }
        Ok(bytes)
    }

    fn derive(&self, label: &[u8]) -> Result<Vec<u8>, String> {
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.secret()?)
            .map_err(|e| format!("key {}: {e}", self.id))?;
        mac.update(label);
        Ok(mac.finalize().into_bytes().to_vec())
    }
}

/// The channel keys a host may use: the current one signs, the others still verify during a
/// rotation (the newest few are kept). Each is used through keys derived from it, one per
/// protocol: the edge channel's ([`HostKeys::edge_keys`]) and migration's
/// ([`HostKeys::migration_keys`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HostKeys {
    pub current: u32,
    pub keys: Vec<ChannelKey>,
}

/// Keys kept per host across rotations (the current one and those before it).
pub const KEPT_KEYS: usize = 3;

impl HostKeys {
    /// Adds `hex` as a new key with the next id, makes it current, and keeps the newest
    /// [`KEPT_KEYS`]. Returns its id.
    pub fn rotate(&mut self, hex: String, now_unix_ms: u64) -> u32 {
        let id = self.keys.iter().map(|k| k.id).max().unwrap_or(0) + 1;
        self.keys.push(ChannelKey {
            id,
            hex,
            created_unix_ms: now_unix_ms,
        });
        if self.keys.len() > KEPT_KEYS {
            let drop = self.keys.len() - KEPT_KEYS;
            self.keys.drain(..drop);
        }
        self.current = id;
        id
    }

    pub fn get(&self, id: u32) -> Option<&ChannelKey> {
        self.keys.iter().find(|k| k.id == id)
    }

    pub fn current_key(&self) -> Option<&ChannelKey> {
        self.get(self.current)
    }

    /// The keys the edge channel takes for this host, by key id (the wire's ids are 16-bit),
    /// and the current one's id. An error (nothing usable) if any key is malformed or the
    /// current one is missing: a host's keys are used whole or not at all.
    pub fn edge_keys(&self) -> Result<KeySet<u16>, String> {
        let id16 = |id: u32| {
            u16::try_from(id)
                .ok()
                .filter(|id| *id != 0)
                .ok_or_else(|| format!("key id {id} is outside 1..=65535"))
        };
        let mut keys = Vec::with_capacity(self.keys.len());
        for k in &self.keys {
            keys.push((id16(k.id)?, k.derive(EDGE_CHANNEL_LABEL)?));
        }
        self.current_key()
            .ok_or_else(|| format!("the current key {} is not among them", self.current))?;
        Ok(KeySet {
            current: id16(self.current)?,
            keys,
        })
    }

    /// The keys migrations with this host take, by key id, and the current one's id.
    pub fn migration_keys(&self) -> Result<KeySet<u32>, String> {
        let mut keys = Vec::with_capacity(self.keys.len());
        for k in &self.keys {
            keys.push((k.id, k.derive(MIGRATION_LABEL)?));
        }
        self.current_key()
            .ok_or_else(|| format!("the current key {} is not among them", self.current))?;
        Ok(KeySet {
            current: self.current,
            keys,
        })
    }
}

/// What the host agent reports after reconciling a tenant.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantStatus {
    pub host: String,
    /// The etcd revision of the tenant record this applies (its `mod_revision`).
    pub revision: i64,
    /// `running`, or `failed`.
    pub state: String,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What the host did: `create`, `policy`, `recreate`.
    pub action: String,
    /// The switch having applied it, from the agent seeing the record (ms).
    pub applied_ms: f64,
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str) -> serde_json::Value {
        serde_json::json!({"id": id, "kernel": "/k", "mac": "52:54:00:00:00:02",
            "ip": "10.0.0.2", "policy": {"allow": []}})
    }

    #[test]
    fn names_cannot_leave_their_prefix() {
        assert_eq!(tenant_key("web1").unwrap(), "/vigil/tenants/web1");
        for bad in ["", "a/b", "../x", ".hidden", &"z".repeat(33), "a b"] {
            assert!(tenant_key(bad).is_err(), "{bad:?}");
            assert!(host_key(bad).is_err(), "{bad:?}");
        }
        assert_eq!(name_under(HOSTS, b"/vigil/hosts/a"), Some("a"));
        assert_eq!(name_under(HOSTS, b"/vigil/hosts/a/b"), None);
        assert_eq!(name_under(HOSTS, b"/vigil/tenants/a"), None);
    }

    #[test]
    fn records_of_one_tenant_number_ip_or_mac_conflict() {
        let record = |id: &str, ip: &str, mac: &str| TenantRecord {
            host: "a".into(),
            spec: serde_json::from_value(serde_json::json!({"id": id, "kernel": "/k",
                "mac": mac, "ip": ip, "policy": {"allow": []}}))
            .unwrap(),
        };
        let first = record("t439599", "10.0.0.2", "52:54:00:00:00:02");
        // Itself (a move, a new policy) and a tenant of its own: no conflict.
        assert_eq!(first.conflict_with(&first), None);
        let web = record("web", "10.0.0.3", "52:54:00:00:00:03");
        assert_eq!(web.conflict_with(&first), None);
        let same_number = record("t622382", "10.0.0.4", "52:54:00:00:00:04");
        assert!(same_number
            .conflict_with(&first)
            .unwrap()
            .contains("same tenant number"));
        let same_ip = record("db", "10.0.0.2", "52:54:00:00:00:05");
        assert!(same_ip.conflict_with(&first).unwrap().contains("ip"));
        let same_mac = record("db", "10.0.0.5", "52:54:00:00:00:02");
        assert!(same_mac.conflict_with(&first).unwrap().contains("mac"));
    }

    #[test]
    fn tenant_records_must_name_themselves_and_a_host() {
        let good = serde_json::json!({"host": "a", "spec": spec("web")}).to_string();
        let record = TenantRecord::parse("web", good.as_bytes()).unwrap();
        assert_eq!(record.host, "a");
        assert!(TenantRecord::parse("other", good.as_bytes())
            .unwrap_err()
            .to_string()
            .contains("\"web\""));
        let bad_host = serde_json::json!({"host": "a/b", "spec": spec("web")}).to_string();
        assert!(TenantRecord::parse("web", bad_host.as_bytes()).is_err());
        let unknown = serde_json::json!({"host": "a", "spec": spec("web"), "x": 1}).to_string();
        assert!(TenantRecord::parse("web", unknown.as_bytes())
            .unwrap_err()
            .to_string()
            .contains("unknown field"));
        assert!(TenantRecord::parse("web", b"\xff{").is_err());
    }

    #[test]
    fn rotation_numbers_keys_and_keeps_the_newest() {
        let mut keys = HostKeys::default();
        assert!(keys.current_key().is_none());
        for n in 1..=5u32 {
            assert_eq!(keys.rotate(format!("{n:064x}"), u64::from(n)), n);
        }
        assert_eq!(keys.current, 5);
        assert_eq!(keys.current_key().unwrap().hex, format!("{:064x}", 5));
        let ids: Vec<u32> = keys.keys.iter().map(|k| k.id).collect();
        assert_eq!(ids, vec![3, 4, 5]);
        assert!(keys.get(1).is_none());
    }

    #[test]
    fn each_use_gets_its_own_derived_key_and_a_bad_record_gives_none() {
        let mut keys = HostKeys::default();
        keys.rotate("11".repeat(32), 1);
        keys.rotate("22".repeat(32), 2);
        let edge = keys.edge_keys().unwrap();
        let migration = keys.migration_keys().unwrap();
        assert_eq!((edge.current, migration.current), (2, 2));
        assert_eq!(edge.keys.len(), 2);
        // Derived, not the secret itself, and different per use and per key.
        let secret = hex::decode("22".repeat(32)).unwrap();
        let (e, m) = (
            edge.current_key().unwrap(),
            migration.current_key().unwrap(),
        );
        assert!(e != secret.as_slice() && m != secret.as_slice() && e != m);
        assert_ne!(edge.keys[0].1, edge.keys[1].1);
        // Deterministic: both ends derive the same key from the record.
        assert_eq!(keys.edge_keys().unwrap(), edge);
        // A short or non-hex key, or a current id that is not there: unusable whole.
        for bad in ["abcd", "zz"] {
            let mut k = keys.clone();
            k.keys[0].hex = bad.into();
            assert!(
                k.edge_keys().is_err() && k.migration_keys().is_err(),
                "{bad}"
            );
        }
        let mut k = keys.clone();
        k.current = 9;
        assert!(k.edge_keys().is_err() && k.migration_keys().is_err());
        // The wire's key ids are 16-bit and 0 is the shared key's.
        let mut k = keys;
        k.keys[0].id = 70_000;
        assert!(k.edge_keys().is_err());
        assert!(new_key_hex().unwrap().len() == 64);
    }
}
