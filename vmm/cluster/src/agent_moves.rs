//! The host agent's part in a tenant's move between hosts: whether the new host takes
//! migrations, listening for a tenant that runs elsewhere, sending one whose new host listens,
//! and the moves in progress (a leaving tenant deleted after its wait, an arriving one adopted
//! and held to its record, or created from its spec).
//!
//! Owns: the `leaving` and `arriving` tables' transitions. Must not: act on a tenant other than
//! through `Agent::act` or `Host::send_migration`.

use std::time::Instant;

use etcd_client::{Client, PutOptions};

use super::{delete_own, Agent, ARRIVE_WAIT, LEAVE_WAIT};
use crate::keys::{self, HostRecord, TenantStatus};
use crate::reconcile::{plan, Action};
use crate::store::{to_json, REQUEST_TIMEOUT};

impl Agent {
    /// Whether host `name` is registered (alive) and takes tenants by migration.
    pub(super) async fn takes_migrations(&self, client: &mut Client, name: &str) -> bool {
        let Ok(key) = keys::host_key(name) else {
            return false;
        };
        let Ok(Ok(resp)) = tokio::time::timeout(REQUEST_TIMEOUT, client.get(key, None)).await
        else {
            return false;
        };
        resp.kvs()
            .first()
            .and_then(|kv| serde_json::from_slice::<HostRecord>(kv.value()).ok())
            .is_some_and(|h| h.migration.is_some())
    }

    /// The live host that runs tenant `id` now, by its report, if another than this one.
    pub(super) async fn running_elsewhere(&self, client: &mut Client, id: &str) -> Option<String> {
        let key = keys::status_key(id).ok()?;
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, client.get(key, None))
            .await
            .ok()?
            .ok()?;
        let status: TenantStatus = serde_json::from_slice(resp.kvs().first()?.value()).ok()?;
        if status.host == self.config.name || status.state != "running" {
            return None;
        }
        let host = keys::host_key(&status.host).ok()?;
        let alive = tokio::time::timeout(REQUEST_TIMEOUT, client.get(host, None))
            .await
            .ok()?
            .ok()?;
        (!alive.kvs().is_empty()).then_some(status.host)
    }

    /// Listens for tenant `id` at `url` and says so in etcd, for its host `from` to send it.
    pub(super) async fn listen(
        &self,
        client: &mut Client,
        id: &str,
        from: &str,
        url: &str,
        lease: i64,
    ) -> Result<(), String> {
        let host = self.host.clone();
        let at = url.to_string();
        tokio::task::spawn_blocking(move || host.receive_migration(&at))
            .await
            .map_err(|e| format!("listening panicked: {e}"))?
            .map_err(|e| e.to_string())?;
        let record = keys::MigrationRecord {
            from: from.into(),
            to: self.config.name.clone(),
            url: url.into(),
        };
        let key = keys::migration_key(id).map_err(|e| e.to_string())?;
        client
            .put(
                key,
                to_json(&record),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    pub(super) async fn migration_record(
        &self,
        client: &mut Client,
        id: &str,
    ) -> Option<keys::MigrationRecord> {
        let key = keys::migration_key(id).ok()?;
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, client.get(key, None))
            .await
            .ok()?
            .ok()?;
        serde_json::from_slice(resp.kvs().first()?.value()).ok()
    }

    /// This host's migration record of `id`, gone (only its own: under its lease).
    pub(super) async fn drop_migration_record(&self, client: &mut Client, id: &str, lease: i64) {
        if let Ok(key) = keys::migration_key(id) {
            delete_own(client, key, lease).await;
        }
    }

    /// The target of a tenant leaving here listens for it (`record`): send it there. Once it
    /// runs there, it is gone from here; if it fails, it is deleted here (the record says it
    /// runs elsewhere) and the target creates it from its spec when its wait ends.
    pub(super) async fn migration_ready(
        &mut self,
        client: &mut Client,
        id: &str,
        record: Option<keys::MigrationRecord>,
        lease: i64,
    ) {
        let Some(record) = record else { return };
        let Some((to, since)) = self.leaving.get(id).cloned() else {
            return;
        };
        if record.from != self.config.name || record.to != to {
            return;
        }
        self.leaving.remove(id);
        self.emit(
            "cluster_migration_started",
            serde_json::json!({"vm": id, "to": to, "url": record.url,
                "waited_ms": since.elapsed().as_secs_f64() * 1e3}),
        );
        let (host, owned, url) = (self.host.clone(), id.to_string(), record.url.clone());
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            host.send_migration(&owned, &url, vmm_host::MigrationOptions::default())
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(format!("the migration panicked: {e}")));
        match result {
            Ok(summary) => {
                self.applied.remove(id);
                self.forget_status(client, id, lease).await;
                self.emit(
                    "cluster_migrated",
                    serde_json::json!({"vm": id, "to": to,
                        "ms": started.elapsed().as_secs_f64() * 1e3, "migration": summary}),
                );
            }
            Err(error) => {
                self.emit(
                    "cluster_migration_failed",
                    serde_json::json!({"vm": id, "to": to, "error": error,
                        "then": "deleted here; the new host creates it from its spec"}),
                );
                self.act(client, id, 0, Action::Delete, lease).await;
            }
        }
    }

    /// Moves in progress: a tenant leaving whose new host never listened is deleted here; one
    /// arriving that runs here now is adopted; one that never came is created from its spec.
    pub(super) async fn moves(&mut self, client: &mut Client, lease: i64) {
        let stale: Vec<String> = self
            .leaving
            .iter()
            .filter(|(_, (_, since))| since.elapsed() > LEAVE_WAIT)
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            if let Some((to, _)) = self.leaving.remove(&id) {
                self.emit(
                    "cluster_migration_failed",
                    serde_json::json!({"vm": id, "to": to,
                        "error": "the new host did not listen for it in time",
                        "then": "deleted here; the new host creates it from its spec"}),
                );
            }
            self.act(client, &id, 0, Action::Delete, lease).await;
        }
        let ids: Vec<String> = self.arriving.keys().cloned().collect();
        for id in ids {
            let running = self
                .host
                .info(&id)
                .is_ok_and(|i| i.state == vmm_host::VmState::Running);
            let Some(waiting) = self.arriving.get(&id) else {
                continue;
            };
            let why = if running {
                None
            } else if waiting.since.elapsed() > ARRIVE_WAIT {
                Some("it did not arrive in time")
            } else if !self.is_registered(client, &waiting.from.clone()).await {
                // Its host died (its lease expired) or left before sending it.
                Some("the host that ran it is gone")
            } else {
                continue;
            };
            let Some(waiting) = self.arriving.remove(&id) else {
                continue;
            };
            self.drop_migration_record(client, &id, lease).await;
            let (me, rec) = (&self.config.name, Some(&waiting.record));
            let action = match why {
                // It runs the spec its source sent, which the record may no longer be (a policy
                // changed during the move): what differs is applied, not just reported.
                None => match self.host.spec(&id).map(|r| (plan(me, Some(&r), rec), r)) {
                    Ok((Action::Confirm, _)) | Err(_) => Action::Adopt(waiting.record.spec),
                    Ok((change, running)) => {
                        self.applied.insert(id.clone(), running);
                        change
                    }
                },
                Some(why) => {
                    self.emit(
                        "cluster_migration_failed",
                        serde_json::json!({"vm": id, "from": waiting.from, "error": why,
                            "then": "created here from its spec"}),
                    );
                    Action::Create(waiting.record.spec)
                }
            };
            self.act(client, &id, waiting.revision, action, lease).await;
        }
    }

    /// Whether host `name` is registered now (its lease alive). An unanswered etcd says yes:
    /// the caller waits rather than act on a guess.
    pub(super) async fn is_registered(&self, client: &mut Client, name: &str) -> bool {
        let Ok(key) = keys::host_key(name) else {
            return false;
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, client.get(key, None)).await {
            Ok(Ok(resp)) => !resp.kvs().is_empty(),
            _ => true,
        }
    }

    /// This host's report of `id`, gone (only its own: under its lease).
    pub(super) async fn forget_status(&self, client: &mut Client, id: &str, lease: i64) {
        if let Ok(key) = keys::status_key(id) {
            delete_own(client, key, lease).await;
        }
    }
}
