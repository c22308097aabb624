//! Configuration of one network interface: `tap=NAME[,netns=NS][,mac=MAC][,tenant=ID]`.
//! `tenant=` applies to the firewall micro-VM's switch ports: the tenant behind the port (0, the
//! default, is the uplink).

use std::fmt;
use std::str::FromStr;

/// Linux's IFNAMSIZ less the terminating NUL.
const MAX_IFNAME: usize = 15;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Host TAP device the interface is backed by (created if it does not exist).
    pub tap: String,
    /// Network namespace the TAP lives in (None: the VMM's own).
    pub netns: Option<String>,
    /// Guest MAC address.
    pub mac: [u8; 6],
    /// For a switch port of the firewall micro-VM: the tenant behind it (0: the uplink).
    pub tenant: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfigError(String);

impl fmt::Display for NetConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bad --net value: {} (expected tap=NAME[,netns=NS][,mac=52:54:00:12:34:56][,tenant=N])",
            self.0
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
        for item in text.split(',') {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| NetConfigError(format!("`{item}` is not key=value")))?;
            match key {
                "tap" if valid_name(value) => tap = Some(value.to_string()),
                "tap" => {
                    return Err(NetConfigError(format!(
                        "`{value}` is not a valid interface name"
                    )))
                }
                "netns" if valid_netns(value) => netns = Some(value.to_string()),
                "netns" => {
                    return Err(NetConfigError(format!(
                        "`{value}` is not a valid namespace name"
                    )))
                }
                "mac" => {
                    mac = parse_mac(value).ok_or_else(|| {
                        NetConfigError(format!("`{value}` is not a unicast MAC address"))
                    })?
                }
                "tenant" => {
                    tenant = value.parse().map_err(|_| {
                        NetConfigError(format!("`{value}` is not a tenant id (0 to 4294967295)"))
                    })?
                }
                other => return Err(NetConfigError(format!("unknown key `{other}`"))),
            }
        }
        let tap = tap.ok_or_else(|| NetConfigError("tap= is required".into()))?;
        Ok(NetConfig {
            tap,
            netns,
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
        assert_eq!(c.tap, "vt0");
        assert_eq!(c.netns.as_deref(), Some("outside"));
        assert_eq!(c.mac, [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
        assert_eq!(c.tenant, 0);
        let port: NetConfig = "tap=p1,tenant=42".parse().unwrap();
        assert_eq!(port.tenant, 42);
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
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad} was accepted");
        }
    }
}
