//! Configuration of one network interface: `tap=NAME[,netns=NS][,mac=MAC][,tenant=ID]`, or a
//! VXLAN endpoint `vxlan=PEER:PORT[,local=ADDR:PORT][,vni=N][,mac=MAC][,tenant=ID]` (a switch's
//! uplink to the edge) or `local=ADDR:PORT[,vni=N]` (an edge's cloud port, which learns its
//! peers). `tenant=` applies to the firewall micro-VM's switch ports: the tenant behind the port
//! (0, the default, is the uplink).
//!
//! Owns: parsing and validating the `--net` syntax into a [`NetConfig`].
//! Must not: open devices or sockets (the VM builder does, from a validated config).

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use crate::devices::vxlan::{PeerTrust, MAX_VNI};

/// Linux's IFNAMSIZ less the terminating NUL.
const MAX_IFNAME: usize = 15;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub backend: NetBackend,
    /// Guest MAC address.
    pub mac: [u8; 6],
    /// For a switch port of the firewall micro-VM: the tenant behind it (0: the uplink).
    pub tenant: u32,
}

/// What carries an interface's frames on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetBackend {
    /// A TAP device (created if it does not exist), in a network namespace or the VMM's own.
    Tap { name: String, netns: Option<String> },
    /// A VXLAN endpoint bound at `local`, flooding to `peer` until it learns better.
    Vxlan {
        local: SocketAddr,
        peer: Option<SocketAddr>,
        vni: u32,
        /// Who may send to it (set by code, never parsed: an edge node's hosts).
        trust: Trust,
    },
}

/// The [`PeerTrust`] a VXLAN endpoint takes frames by, if any; equal when it is the same set.
#[derive(Clone, Default)]
pub struct Trust(pub Option<std::sync::Arc<PeerTrust>>);

impl PartialEq for Trust {
    fn eq(&self, other: &Trust) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }
}

impl Eq for Trust {}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(t) => t.fmt(f),
            None => f.write_str("any sender"),
        }
    }
}

impl fmt::Display for NetBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetBackend::Tap { name, netns: None } => write!(f, "tap {name}"),
            NetBackend::Tap {
                name,
                netns: Some(ns),
            } => write!(f, "tap {name} in netns {ns}"),
            NetBackend::Vxlan {
                local, peer, vni, ..
            } => {
                write!(f, "vxlan vni {vni} at {local}")?;
                if let Some(peer) = peer {
                    write!(f, " to {peer}")?;
                }
                Ok(())
            }
        }
    }
}

/// What is wrong with a `--net` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetConfigError {
    NotKeyValue(String),
    BadInterfaceName(String),
    BadNamespace(String),
    BadMac(String),
    BadTenant(String),
    BadAddress(String),
    BadVni(String),
    UnknownKey(String),
    NoBackend,
    MixedBackends,
}

impl NetConfigError {
    fn reason(&self) -> String {
        match self {
            NetConfigError::NotKeyValue(item) => format!("`{item}` is not key=value"),
            NetConfigError::BadInterfaceName(v) => format!("`{v}` is not a valid interface name"),
            NetConfigError::BadNamespace(v) => format!("`{v}` is not a valid namespace name"),
            NetConfigError::BadMac(v) => format!("`{v}` is not a unicast MAC address"),
            NetConfigError::BadTenant(v) => {
                format!("`{v}` is not a tenant id (0 to 4294967295)")
            }
            NetConfigError::BadAddress(v) => {
                format!("`{v}` is not an address:port (e.g. 10.0.0.1:4789)")
            }
            NetConfigError::BadVni(v) => format!("`{v}` is not a VNI (0 to {MAX_VNI})"),
            NetConfigError::UnknownKey(k) => format!("unknown key `{k}`"),
            NetConfigError::NoBackend => "one of tap=, vxlan= or local= is required".into(),
            NetConfigError::MixedBackends => {
                "tap= (with netns=) and vxlan=/local=/vni= do not mix".into()
            }
        }
    }
}

impl fmt::Display for NetConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bad --net value: {} (expected tap=NAME[,netns=NS][,mac=52:54:00:12:34:56][,tenant=N] \
             or vxlan=PEER:PORT[,local=ADDR:PORT][,vni=N][,mac=..][,tenant=N] or local=ADDR:PORT[,vni=N])",
            self.reason()
        )
    }
}

impl std::error::Error for NetConfigError {}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// A name under /run/netns: no path separators, not `.` or `..`.
fn valid_netns(name: &str) -> bool {
    name.len() <= 64
        && name != "."
        && name != ".."
        && !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in mac.iter_mut() {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    if parts.next().is_some() || mac[0] & 1 == 1 {
        // Trailing parts, or a multicast address that no NIC may own.
        return None;
    }
    Some(mac)
}

impl FromStr for NetConfig {
    type Err = NetConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut tap = None;
        let mut netns = None;
        let mut mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        let mut tenant = 0;
        let mut peer = None;
        let mut local = None;
        let mut vni = None;
        let socket_addr = |value: &str| -> Result<SocketAddr, NetConfigError> {
            value
                .parse()
                .map_err(|_| NetConfigError::BadAddress(value.to_string()))
        };
        for item in text.split(',') {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| NetConfigError::NotKeyValue(item.to_string()))?;
            match key {
                "tap" if valid_name(value) => tap = Some(value.to_string()),
                "tap" => return Err(NetConfigError::BadInterfaceName(value.to_string())),
                "netns" if valid_netns(value) => netns = Some(value.to_string()),
                "netns" => return Err(NetConfigError::BadNamespace(value.to_string())),
                "mac" => {
                    mac =
                        parse_mac(value).ok_or_else(|| NetConfigError::BadMac(value.to_string()))?
                }
                "tenant" => {
                    tenant = value
                        .parse()
                        .map_err(|_| NetConfigError::BadTenant(value.to_string()))?
                }
                "vxlan" => peer = Some(socket_addr(value)?),
                "local" => local = Some(socket_addr(value)?),
                "vni" => {
                    vni = Some(
                        value
                            .parse::<u32>()
                            .ok()
                            .filter(|v| *v <= MAX_VNI)
                            .ok_or_else(|| NetConfigError::BadVni(value.to_string()))?,
                    )
                }
                other => return Err(NetConfigError::UnknownKey(other.to_string())),
            }
        }
        let backend = match (tap, peer.is_some() || local.is_some()) {
            (Some(name), false) if vni.is_none() => NetBackend::Tap { name, netns },
            (None, true) if netns.is_none() => NetBackend::Vxlan {
                local: local.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
                peer,
                vni: vni.unwrap_or(1),
                trust: Trust::default(),
            },
            (None, false) => return Err(NetConfigError::NoBackend),
            _ => return Err(NetConfigError::MixedBackends),
        };
        Ok(NetConfig {
            backend,
            mac,
            tenant,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_fields() {
        let c: NetConfig = "tap=vt0,netns=outside,mac=52:54:00:aa:bb:cc"
            .parse()
            .unwrap();
        assert_eq!(
            c.backend,
            NetBackend::Tap {
                name: "vt0".into(),
                netns: Some("outside".into())
            }
        );
        assert_eq!(c.mac, [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
        assert_eq!(c.tenant, 0);
        let port: NetConfig = "tap=p1,tenant=42".parse().unwrap();
        assert_eq!(port.tenant, 42);
        let uplink: NetConfig = "vxlan=192.168.50.1:4789,vni=9".parse().unwrap();
        assert_eq!(
            uplink.backend,
            NetBackend::Vxlan {
                local: "0.0.0.0:0".parse().unwrap(),
                peer: Some("192.168.50.1:4789".parse().unwrap()),
                vni: 9,
                trust: Trust::default(),
            }
        );
        let cloud: NetConfig = "local=0.0.0.0:4789,tenant=1".parse().unwrap();
        assert!(matches!(
            cloud.backend,
            NetBackend::Vxlan { peer: None, .. }
        ));
    }

    #[test]
    fn rejects_bad_input() {
        for bad in [
            "",
            "netns=x",
            "tap=",
            "tap=this-name-is-far-too-long",
            "tap=a/b",
            "tap=vt0,mac=01:00:5e:00:00:01",
            "tap=vt0,mac=52:54:00",
            "tap=vt0,color=blue",
            "tap=vt0,netns=../etc",
            "tap=vt0,netns=..",
            "tap=vt0,tenant=-1",
            "tap=vt0,tenant=x",
            "vxlan=10.0.0.1",
            "vxlan=10.0.0.1:4789,vni=16777216",
            "tap=vt0,vxlan=10.0.0.1:4789",
            "local=0.0.0.0:4789,netns=x",
            "tap=vt0,vni=3",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn errors_say_what_is_wrong_and_what_is_expected() {
        let e = "tap=vt0,color=blue".parse::<NetConfig>().unwrap_err();
        assert_eq!(e, NetConfigError::UnknownKey("color".into()));
        assert!(e
            .to_string()
            .starts_with("bad --net value: unknown key `color` (expected tap=NAME"));
        assert_eq!(
            "tap=vt0,vni=3".parse::<NetConfig>().unwrap_err(),
            NetConfigError::MixedBackends
        );
        assert_eq!(
            "mac=52:54:00:00:00:01".parse::<NetConfig>().unwrap_err(),
            NetConfigError::NoBackend
        );
    }
}
