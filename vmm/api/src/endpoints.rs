//! The host's endpoints: one type per endpoint implementing [`Endpoint`], with its request and
//! response types.
//!
//! Owns: what each endpoint takes and answers, and which host action it calls. Must not: parse
//! HTTP or pick status codes (the router and `error` do).

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use trap_handler::policy::PolicySpec;
use vmm_host::{Host, HostError, VmInfo, VmSpec};

use crate::http::Method;

/// One API endpoint.
pub trait Endpoint {
    const METHOD: Method;
    /// Path after `/api/v1/`.
    const PATH: &'static str;
    /// From the JSON body (PUT) or the query string (GET).
    type Request: DeserializeOwned;
    type Response: Serialize;
    fn handle(host: &Arc<Host>, request: Self::Request) -> Result<Self::Response, HostError>;
}

/// A request without parameters (unknown ones are refused).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// A request naming one VM.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmId {
    pub id: String,
}

/// Nothing to say but success (HTTP 204).
#[derive(Debug, Serialize)]
pub struct Done {}

#[derive(Debug, Serialize)]
pub struct Pong {
    pub version: &'static str,
    pub host: String,
    pub uptime_s: u64,
    pub kvm: String,
}

pub struct VmmPing;
impl Endpoint for VmmPing {
    const METHOD: Method = Method::Get;
    const PATH: &'static str = "vmm.ping";
    type Request = NoParams;
    type Response = Pong;
    fn handle(host: &Arc<Host>, _: NoParams) -> Result<Pong, HostError> {
        Ok(Pong {
            version: env!("CARGO_PKG_VERSION"),
            host: host.name().to_string(),
            uptime_s: host.uptime().as_secs(),
            kvm: vmm_core::host_kind::HostKind::detect().to_string(),
        })
    }
}

pub struct VmmShutdown;
impl Endpoint for VmmShutdown {
    const METHOD: Method = Method::Put;
    const PATH: &'static str = "vmm.shutdown";
    type Request = NoParams;
    type Response = Done;
    /// Nothing to do before the answer: its route ([`crate::Handler::Shutdown`]) asks the host
    /// to stop once the answer is out, and [`crate::serve`] then tears it down.
    fn handle(_: &Arc<Host>, _: NoParams) -> Result<Done, HostError> {
        Ok(Done {})
    }
}

pub struct VmCreate;
impl Endpoint for VmCreate {
    const METHOD: Method = Method::Put;
    const PATH: &'static str = "vm.create";
    type Request = VmSpec;
    type Response = VmInfo;
    fn handle(host: &Arc<Host>, spec: VmSpec) -> Result<VmInfo, HostError> {
        host.create(spec)
    }
}

pub struct VmBoot;
impl Endpoint for VmBoot {
    const METHOD: Method = Method::Put;
    const PATH: &'static str = "vm.boot";
    type Request = VmId;
    type Response = VmInfo;
    fn handle(host: &Arc<Host>, r: VmId) -> Result<VmInfo, HostError> {
        host.boot(&r.id)
    }
}

pub struct VmInfoEndpoint;
impl Endpoint for VmInfoEndpoint {
    const METHOD: Method = Method::Get;
    const PATH: &'static str = "vm.info";
    type Request = VmId;
    type Response = VmInfo;
    fn handle(host: &Arc<Host>, r: VmId) -> Result<VmInfo, HostError> {
        host.info(&r.id)
    }
}

pub struct VmList;
impl Endpoint for VmList {
    const METHOD: Method = Method::Get;
    const PATH: &'static str = "vm.list";
    type Request = NoParams;
    type Response = Vec<VmInfo>;
    fn handle(host: &Arc<Host>, _: NoParams) -> Result<Vec<VmInfo>, HostError> {
        Ok(host.list())
    }
}

pub struct VmDelete;
impl Endpoint for VmDelete {
    const METHOD: Method = Method::Put;
    const PATH: &'static str = "vm.delete";
    type Request = VmId;
    type Response = Done;
    fn handle(host: &Arc<Host>, r: VmId) -> Result<Done, HostError> {
        host.delete(&r.id).map(|()| Done {})
    }
}

pub struct VmPause;
impl Endpoint for VmPause {
    const METHOD: Method = Method::Put;
    const PATH: &'static str = "vm.pause";
    type Request = VmId;
    type Response = VmInfo;
    fn handle(host: &Arc<Host>, r: VmId) -> Result<VmInfo, HostError> {
        host.pause(&r.id)
    }
}

pub struct VmResume;
impl Endpoint for VmResume {
    const METHOD: Method = Method::Put;
    const PATH: &'static str = "vm.resume";
    type Request = VmId;
    type Response = VmInfo;
    fn handle(host: &Arc<Host>, r: VmId) -> Result<VmInfo, HostError> {
        host.resume(&r.id)
    }
}

/// `vm.snapshot` / `vm.send-migration`: a VM and where its state goes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDestination {
    pub id: String,
    /// `file:///dir` (snapshot).
    pub destination_url: String,
}

/// `vm.send-migration`: a VM, the target host, and whether RAM is copied while it runs.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmMigration {
    pub id: String,
    /// `tcp:HOST:PORT`: where the target's vm.receive-migration listens.
    pub destination_url: String,
    /// Pre-copy (default): dirty-page rounds while the VM runs, then a short pause. Where KVM
    /// cannot log dirty pages it falls back to stop-and-copy (the reply says so).
    #[serde(default = "yes")]
    pub precopy: bool,
    /// Check every page at the target against the source's, during the pause (for tests: it
    /// lengthens the downtime by two passes over RAM).
    #[serde(default)]
    pub verify: bool,
}

fn yes() -> bool {
    true
}

/// `vm.restore`: where a snapshot is.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSource {
    pub source_url: String,
}

/// `vm.receive-migration`: where to listen for the source host (`tcp:HOST:PORT`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmReceiver {
    pub receiver_url: String,
}

pub struct VmSnapshot;
impl Endpoint for VmSnapshot {
    const METHOD: Method = Method::Put;
    const PATH: &'static str = "vm.snapshot";
    type Request = VmDestination;
    type Response = serde_json::Value;
    fn handle(host: &Arc<Host>, r: VmDestination) -> Result<serde_json::Value, HostError> {
        host.snapshot(&r.id, &r.destination_url)
    }
}

pub struct VmRestore;
impl Endpoint for VmRestore {
    const METHOD: Method = Method::Put;
    const PATH: &'static str = "vm.restore";
    type Request = VmSource;
    type Response = VmInfo;
    fn handle(host: &Arc<Host>, r: VmSource) -> Result<VmInfo, HostError> {
        host.restore(&r.source_url)
    }
}

pub struct VmSendMigration;
impl Endpoint for VmSendMigration {
    const METHOD: Method = Method::Put;
    const PATH: &'static str = "vm.send-migration";
    type Request = VmMigration;
    type Response = serde_json::Value;
    fn handle(host: &Arc<Host>, r: VmMigration) -> Result<serde_json::Value, HostError> {
        let options = vmm_host::MigrationOptions {
            precopy: r.precopy,
            verify: r.verify,
        };
        host.send_migration(&r.id, &r.destination_url, options)
    }
}

pub struct VmReceiveMigration;
impl Endpoint for VmReceiveMigration {
    const METHOD: Method = Method::Put;
    const PATH: &'static str = "vm.receive-migration";
    type Request = VmReceiver;
    type Response = Done;
    fn handle(host: &Arc<Host>, r: VmReceiver) -> Result<Done, HostError> {
        host.receive_migration(&r.receiver_url).map(|()| Done {})
    }
}

pub struct VmPolicyGet;
impl Endpoint for VmPolicyGet {
    const METHOD: Method = Method::Get;
    const PATH: &'static str = "vm.policy";
    type Request = VmId;
    type Response = PolicySpec;
    fn handle(host: &Arc<Host>, r: VmId) -> Result<PolicySpec, HostError> {
        host.policy(&r.id)
    }
}

/// `PUT vm.policy`: the VM and its new policy.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyReplace {
    pub id: String,
    pub policy: PolicySpec,
}

pub struct VmPolicyPut;
impl Endpoint for VmPolicyPut {
    const METHOD: Method = Method::Put;
    const PATH: &'static str = "vm.policy";
    type Request = PolicyReplace;
    type Response = Done;
    fn handle(host: &Arc<Host>, r: PolicyReplace) -> Result<Done, HostError> {
        host.replace_policy(&r.id, r.policy).map(|()| Done {})
    }
}
