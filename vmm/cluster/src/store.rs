//! The cluster's desired state in etcd, read and written from blocking code: the `vigil cluster`
//! commands, the tests and the benchmark.
//!
//! Owns: [`Store`] (an etcd client and a small runtime of its own) and the compare-and-swap
//! updates of tenant records. Must not: act on hosts (the agents do).

use std::future::Future;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Txn, TxnOp, WatchOptions,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::keys::{self, EdgeRecord, HostKeys, HostRecord, TenantRecord, TenantStatus};
use crate::ClusterError;

/// How long one request to etcd may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Compare-and-swap attempts before an update gives up.
const CAS_TRIES: usize = 16;

/// A key and its value, as stored.
type KeyValue = (Vec<u8>, Vec<u8>);

/// A connection to the cluster's etcd.
pub struct Store {
    rt: tokio::runtime::Runtime,
    client: Client,
    endpoints: String,
}

pub(crate) fn connect_options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(REQUEST_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT)
}

pub(crate) async fn connect(endpoints: &[String]) -> Result<Client, ClusterError> {
    let joined = endpoints.join(",");
    match tokio::time::timeout(
        REQUEST_TIMEOUT,
        Client::connect(endpoints, Some(connect_options())),
    )
    .await
    {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(source)) => Err(ClusterError::Etcd {
            endpoints: joined,
            source,
        }),
        Err(_) => Err(ClusterError::Timeout {
            endpoints: joined,
            secs: REQUEST_TIMEOUT.as_secs(),
        }),
    }
}

pub(crate) fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Records are plain data: serializing them cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

pub(crate) fn from_json<T: DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T, ClusterError> {
    serde_json::from_slice(value).map_err(|e| ClusterError::BadRecord {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

/// `host`'s channel keys, a first one made if it has none. Two hosts racing to make it agree
/// on one: the put is a compare-and-swap on the key not existing.
pub(crate) async fn ensure_host_keys(
    client: &mut Client,
    endpoints: &str,
    host: &str,
) -> Result<HostKeys, ClusterError> {
    let key = keys::keys_key(host)?;
    let etcd = |source| ClusterError::Etcd {
        endpoints: endpoints.into(),
        source,
    };
    for _ in 0..CAS_TRIES {
        let resp = client.get(key.as_str(), None).await.map_err(etcd)?;
        if let Some(kv) = resp.kvs().first() {
            return from_json(kv.key(), kv.value());
        }
        let mut made = HostKeys::default();
        made.rotate(keys::new_key_hex()?, keys::now_unix_ms());
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), to_json(&made), None)]);
        if client.txn(txn).await.map_err(etcd)?.succeeded() {
            return Ok(made);
        }
    }
    Err(ClusterError::Contended { key })
}

impl Store {
    /// Connects to etcd (`http://HOST:PORT`, comma-separated endpoints are all tried).
    pub fn connect(endpoints: &[String]) -> Result<Store, ClusterError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| ClusterError::Runtime {
                what: "client runtime",
                source,
            })?;
        let client = rt.block_on(connect(endpoints))?;
        Ok(Store {
            rt,
            client,
            endpoints: endpoints.join(","),
        })
    }

    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// Runs one request against etcd within [`REQUEST_TIMEOUT`].
    fn call<T, F>(&self, f: impl FnOnce(Client) -> F) -> Result<T, ClusterError>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        let client = self.client.clone();
        // The timer is made inside the runtime (it needs its clock).
        match self
            .rt
            .block_on(async { tokio::time::timeout(REQUEST_TIMEOUT, f(client)).await })
        {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(ClusterError::Etcd {
                endpoints: self.endpoints.clone(),
                source,
            }),
            Err(_) => Err(ClusterError::Timeout {
                endpoints: self.endpoints.clone(),
                secs: REQUEST_TIMEOUT.as_secs(),
            }),
        }
    }

    /// The value and mod revision of `key`.
    fn get_raw(&self, key: &str) -> Result<Option<(Vec<u8>, i64)>, ClusterError> {
        let key = key.to_string();
        let resp = self.call(|mut c| async move { c.get(key, None).await })?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
    }

    fn list_raw(&self, prefix: &str) -> Result<Vec<KeyValue>, ClusterError> {
        let prefix = prefix.to_string();
        let resp = self.call(|mut c| async move {
            c.get(prefix, Some(GetOptions::new().with_prefix())).await
        })?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
            .collect())
    }

    /// Writes a tenant's desired state; returns the revision of the write. Refused when another
    /// tenant's record has its tenant number, IP or MAC ([`TenantRecord::conflict_with`]):
    /// checked against every record as of one revision, and written only if no record changed
    /// since (one transaction), so two writers cannot each pass the check of the other.
    pub fn put_tenant(&self, record: &TenantRecord) -> Result<i64, ClusterError> {
        record.check(&record.spec.id)?;
        let key = keys::tenant_key(&record.spec.id)?;
        let value = to_json(record);
        for _ in 0..CAS_TRIES {
            let resp = self.call(|mut c| async move {
                c.get(keys::TENANTS, Some(GetOptions::new().with_prefix()))
                    .await
            })?;
            let revision = resp.header().map_or(0, |h| h.revision());
            for kv in resp.kvs() {
                // A record nobody can read names nothing to compare. Its tenant, if one runs,
                // keeps the spec it had (the agents leave it alone): a host refuses a collision
                // with it there (409), and the edge refuses one across hosts.
                let Some(other) = keys::name_under(keys::TENANTS, kv.key())
                    .and_then(|id| TenantRecord::parse(id, kv.value()).ok())
                else {
                    continue;
                };
                if let Some(reason) = record.conflict_with(&other) {
                    return Err(ClusterError::Conflict { key, reason });
                }
            }
            let (k, v) = (key.clone(), value.clone());
            let resp = self.call(|mut c| async move {
                c.txn(
                    Txn::new()
                        .when([
                            Compare::mod_revision(keys::TENANTS, CompareOp::Less, revision + 1)
                                .with_prefix(),
                        ])
                        .and_then([TxnOp::put(k, v, None)]),
                )
                .await
            })?;
            if resp.succeeded() {
                return Ok(resp.header().map_or(0, |h| h.revision()));
            }
        }
        Err(ClusterError::Contended { key })
    }

    /// A tenant's record and its mod revision.
    pub fn tenant(&self, id: &str) -> Result<Option<(TenantRecord, i64)>, ClusterError> {
        let key = keys::tenant_key(id)?;
        self.get_raw(&key)?
            .map(|(value, rev)| Ok((TenantRecord::parse(id, &value)?, rev)))
            .transpose()
    }

    /// Every tenant record (a bad one is an error naming its key).
    pub fn tenants(&self) -> Result<Vec<TenantRecord>, ClusterError> {
        self.list_raw(keys::TENANTS)?
            .iter()
            .filter_map(|(k, v)| keys::name_under(keys::TENANTS, k).map(|id| (id, v)))
            .map(|(id, v)| TenantRecord::parse(id, v))
            .collect()
    }

    /// Changes a tenant's record by `change`, atomically (compare-and-swap on its revision);
    /// returns the revision of the write.
    pub fn update_tenant(
        &self,
        id: &str,
        change: impl Fn(&mut TenantRecord),
    ) -> Result<i64, ClusterError> {
        let key = keys::tenant_key(id)?;
        for _ in 0..CAS_TRIES {
            let (mut record, rev) = self
                .tenant(id)?
                .ok_or_else(|| ClusterError::NotFound { key: key.clone() })?;
            change(&mut record);
            record.check(id)?;
            let value = to_json(&record);
            let k = key.clone();
            let resp = self.call(|mut c| async move {
                c.txn(
                    Txn::new()
                        .when([Compare::mod_revision(k.clone(), CompareOp::Equal, rev)])
                        .and_then([TxnOp::put(k, value, None)]),
                )
                .await
            })?;
            if resp.succeeded() {
                return Ok(resp.header().map_or(0, |h| h.revision()));
            }
        }
        Err(ClusterError::Contended { key })
    }

    /// Deletes a tenant's desired state (its host deletes it); whether it existed.
    pub fn delete_tenant(&self, id: &str) -> Result<bool, ClusterError> {
        let key = keys::tenant_key(id)?;
        let resp = self.call(|mut c| async move { c.delete(key, None).await })?;
        Ok(resp.deleted() > 0)
    }

    /// The hosts registered now (their leases live).
    pub fn hosts(&self) -> Result<Vec<HostRecord>, ClusterError> {
        self.list_raw(keys::HOSTS)?
            .iter()
            .map(|(k, v)| from_json(k, v))
            .collect()
    }

    pub fn edges(&self) -> Result<Vec<EdgeRecord>, ClusterError> {
        self.list_raw(keys::EDGES)?
            .iter()
            .map(|(k, v)| from_json(k, v))
            .collect()
    }

    pub fn status(&self, id: &str) -> Result<Option<TenantStatus>, ClusterError> {
        let key = keys::status_key(id)?;
        self.get_raw(&key)?
            .map(|(v, _)| from_json(key.as_bytes(), &v))
            .transpose()
    }

    /// Waits until the host agent reports tenant `id` reconciled at `revision` or later (or
    /// failed there); `None` if `limit` passed first.
    pub fn wait_status(
        &self,
        id: &str,
        revision: i64,
        limit: Duration,
    ) -> Result<Option<TenantStatus>, ClusterError> {
        let key = keys::status_key(id)?;
        let deadline = Instant::now() + limit;
        let done = |s: &TenantStatus| s.revision >= revision;
        // Watch first, then read: a report that lands between the two is in the watch.
        let k = key.clone();
        let mut stream =
            self.call(|mut c| async move { c.watch(k, Some(WatchOptions::new())).await })?;
        if let Some(status) = self.status(id)?.filter(done) {
            return Ok(Some(status));
        }
        let endpoints = self.endpoints.clone();
        self.rt.block_on(async move {
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let message = match tokio::time::timeout(left, stream.message()).await {
                    Err(_) => return Ok(None),
                    Ok(Err(source)) => return Err(ClusterError::Etcd { endpoints, source }),
                    Ok(Ok(None)) => return Ok(None),
                    Ok(Ok(Some(m))) => m,
                };
                for event in message.events() {
                    if event.event_type() != EventType::Put {
                        continue;
                    }
                    if let Some(kv) = event.kv() {
                        let status: TenantStatus = from_json(kv.key(), kv.value())?;
                        if done(&status) {
                            return Ok(Some(status));
                        }
                    }
                }
            }
        })
    }

    pub fn host_keys(&self, host: &str) -> Result<Option<HostKeys>, ClusterError> {
        let key = keys::keys_key(host)?;
        self.get_raw(&key)?
            .map(|(v, _)| from_json(key.as_bytes(), &v))
            .transpose()
    }

    /// `host`'s channel keys, a first one made if it has none.
    pub fn ensure_host_keys(&self, host: &str) -> Result<HostKeys, ClusterError> {
        let host = host.to_string();
        let endpoints = self.endpoints.clone();
        let mut client = self.client.clone();
        match self.rt.block_on(async {
            tokio::time::timeout(
                REQUEST_TIMEOUT,
                ensure_host_keys(&mut client, &endpoints, &host),
            )
            .await
        }) {
            Ok(result) => result,
            Err(_) => Err(ClusterError::Timeout {
                endpoints: self.endpoints.clone(),
                secs: REQUEST_TIMEOUT.as_secs(),
            }),
        }
    }

    /// Every host's channel keys, by host (a malformed record is an error naming its key).
    pub fn all_host_keys(&self) -> Result<Vec<(String, HostKeys)>, ClusterError> {
        let mut all = Vec::new();
        for (k, v) in self.list_raw(keys::KEYS)? {
            if let Some(host) = keys::name_under(keys::KEYS, &k) {
                all.push((host.to_string(), from_json(&k, &v)?));
            }
        }
        Ok(all)
    }

    /// Adds a new channel key (`hex`) for `host` and makes it current (compare-and-swap);
    /// returns its key id.
    pub fn rotate_host_key(&self, host: &str, hex: &str) -> Result<u32, ClusterError> {
        let key = keys::keys_key(host)?;
        for _ in 0..CAS_TRIES {
            let current = self.get_raw(&key)?;
            let (mut keys, compare) = match &current {
                Some((v, rev)) => (
                    from_json::<HostKeys>(key.as_bytes(), v)?,
                    Compare::mod_revision(key.clone(), CompareOp::Equal, *rev),
                ),
                None => (
                    HostKeys::default(),
                    Compare::version(key.clone(), CompareOp::Equal, 0),
                ),
            };
            let id = keys.rotate(hex.to_string(), keys::now_unix_ms());
            let value = to_json(&keys);
            let k = key.clone();
            let resp = self.call(|mut c| async move {
                c.txn(
                    Txn::new()
                        .when([compare])
                        .and_then([TxnOp::put(k, value, None)]),
                )
                .await
            })?;
            if resp.succeeded() {
                return Ok(id);
            }
        }
        Err(ClusterError::Contended { key })
    }
}
