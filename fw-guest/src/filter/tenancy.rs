//! Who is where: the tenant behind each switch port and the tenant owning each address.
//!
//! Both tables are filled by [`vigil_wire::verdict::Op::Attach`] records (and emptied by
//! `FlushTenant`), never by frames: a tenant cannot claim an address or a port by sending from
//! it. The switch role reads the port table (a frame's tenant is its port's); the edge role reads
//! the address table (a frame's tenant is the owner of its cloud-side address).
//!
//! Bounded and allocation-free: [`MAX_PORTS`] ports, [`MAX_ADDRS`] addresses.
//!
//! Tenant 0 is the uplink (switch) or the outside (edge): ports given tenant 0 at boot keep it for
//! good, and no record can give tenant 0 a port or an address. That keeps a control-plane mistake
//! from turning the uplink into a tenant port or a tenant port into a second uplink.

use vigil_wire::boot::{MAX_MMIO_DEVICES, TENANT_UNASSIGNED};
use vigil_wire::verdict::IpVersion;

/// Most switch ports (the boot information's device limit).
pub const MAX_PORTS: usize = MAX_MMIO_DEVICES;
/// Most addresses the table holds (a power of two, as `heapless::FnvIndexMap` requires).
pub const MAX_ADDRS: usize = 256;

const _: () = assert!(MAX_PORTS <= 32, "port change set is a u32 bitmask");

/// The tenant of uplink / outside ports.
pub const UPLINK_TENANT: u32 = 0;

/// Why an attach was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachError {
    /// Port index at or above [`MAX_PORTS`].
    BadPort(u16),
    /// The port is an uplink/outside port (fixed at boot), or the record names tenant 0.
    Reserved,
    /// [`MAX_ADDRS`] addresses are owned already, or the port has [`PORT_ADDRS`] of the family.
    AddressTableFull,
}

/// Addresses of each family one switch port may send from (attached with the port).
pub const PORT_ADDRS: usize = 4;

/// What a tenant port may send as: the MAC and addresses attached with it (zero = none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortIdentity {
    /// The tenant's MAC (all zero: none attached; the port then sends no IP, ARP or NDP).
    pub mac: [u8; 6],
    pub v4: [[u8; 4]; PORT_ADDRS],
    pub v6: [[u8; 16]; PORT_ADDRS],
}

impl PortIdentity {
    const EMPTY: PortIdentity = PortIdentity {
        mac: [0; 6],
        v4: [[0; 4]; PORT_ADDRS],
        v6: [[0; 16]; PORT_ADDRS],
    };

    /// Whether IPv4 `a` is attached to the port.
    #[inline]
    pub fn has_v4(&self, a: [u8; 4]) -> bool {
        a != [0; 4] && self.v4.contains(&a)
    }

    /// Whether IPv6 `a` is attached to the port or is its EUI-64 link-local address (RFC 4291
    /// §2.5.1 / appendix A: fe80::/64 with the MAC's universal/local bit flipped and ff:fe in the
    /// middle).
    #[inline]
    pub fn has_v6(&self, a: &[u8; 16]) -> bool {
        (*a != [0; 16] && self.v6.contains(a)) || (self.mac != [0; 6] && *a == self.link_local())
    }

    /// The port's EUI-64 link-local address.
    pub fn link_local(&self) -> [u8; 16] {
        let m = self.mac;
        [
            0xfe,
            0x80,
            0,
            0,
            0,
            0,
            0,
            0,
            m[0] ^ 2,
            m[1],
            m[2],
            0xff,
            0xfe,
            m[3],
            m[4],
            m[5],
        ]
    }

    /// Whether IPv4 `a` is in the /24 of an attached address (Vigil hands out /24s, see
    /// [`Tenancy::is_subnet_edge_v4`]).
    pub fn on_link_v4(&self, a: [u8; 4]) -> bool {
        self.v4.iter().any(|o| *o != [0; 4] && o[..3] == a[..3])
    }

    /// Whether IPv6 `a` is in the /64 of an attached address.
    pub fn on_link_v6(&self, a: &[u8; 16]) -> bool {
        self.v6.iter().any(|o| *o != [0; 16] && o[..8] == a[..8])
    }

    fn add(&mut self, version: IpVersion, a: &[u8; 16]) -> bool {
        match version {
            IpVersion::V4 => add_to(&mut self.v4, [a[0], a[1], a[2], a[3]]),
            IpVersion::V6 => add_to(&mut self.v6, *a),
        }
    }

    fn remove(&mut self, version: IpVersion, a: &[u8; 16]) {
        match version {
            IpVersion::V4 => remove_from(&mut self.v4, [a[0], a[1], a[2], a[3]]),
            IpVersion::V6 => remove_from(&mut self.v6, *a),
        }
    }
}

fn add_to<const N: usize>(set: &mut [[u8; N]; PORT_ADDRS], a: [u8; N]) -> bool {
    if set.contains(&a) {
        return true;
    }
    match set.iter_mut().find(|s| **s == [0; N]) {
        Some(s) => {
            *s = a;
            true
        }
        None => false,
    }
}

fn remove_from<const N: usize>(set: &mut [[u8; N]; PORT_ADDRS], a: [u8; N]) {
    for s in set.iter_mut().filter(|s| **s == a) {
        *s = [0; N];
    }
}

/// An address as the table keys it: the version keeps `10.0.0.2` apart from `a00:2::`.
type AddrKey = (u8, [u8; 16]);

/// Port and address ownership.
pub struct Tenancy {
    ports: [u32; MAX_PORTS],
    identity: [PortIdentity; MAX_PORTS],
    addrs: heapless::FnvIndexMap<AddrKey, u32, MAX_ADDRS>,
    /// Ports whose tenant changed since the packet loop last asked (bit i = port i).
    changed: u32,
}

impl Default for Tenancy {
    fn default() -> Self {
        Self::new()
    }
}

impl Tenancy {
    /// Every port unassigned, no address owned.
    pub const fn new() -> Tenancy {
        Tenancy {
            ports: [TENANT_UNASSIGNED; MAX_PORTS],
            identity: [PortIdentity::EMPTY; MAX_PORTS],
            addrs: heapless::FnvIndexMap::new(),
            changed: 0,
        }
    }

    /// Boot-time assignment (from `MmioDevice::tenant`); any tenant, 0 included. Out-of-range
    /// ports are ignored.
    pub fn set_boot_port(&mut self, port: usize, tenant: u32) {
        if let Some(slot) = self.ports.get_mut(port) {
            *slot = tenant;
        }
    }

    /// The tenant behind `port` ([`TENANT_UNASSIGNED`] for none or an out-of-range port).
    #[inline]
    pub fn port(&self, port: usize) -> u32 {
        self.ports.get(port).copied().unwrap_or(TENANT_UNASSIGNED)
    }

    /// What tenant port `port` may send as (empty for an uplink, unassigned or out-of-range
    /// port).
    #[inline]
    pub fn identity(&self, port: usize) -> &PortIdentity {
        self.identity.get(port).unwrap_or(&PortIdentity::EMPTY)
    }

    /// The tenant port that `addr` is attached to, with its identity.
    pub fn port_of(&self, version: IpVersion, addr: &[u8; 16]) -> Option<(usize, &PortIdentity)> {
        self.identity
            .iter()
            .enumerate()
            .find(|(_, id)| match version {
                IpVersion::V4 => id.has_v4([addr[0], addr[1], addr[2], addr[3]]),
                IpVersion::V6 => *addr != [0; 16] && id.v6.contains(addr),
            })
    }

    /// The owner of `addr` (IPv4 in the first 4 bytes).
    #[inline]
    pub fn owner(&self, version: IpVersion, addr: &[u8; 16]) -> Option<u32> {
        if self.addrs.is_empty() {
            return None;
        }
        self.addrs.get(&(version as u8, *addr)).copied()
    }

    /// Whether IPv4 `addr` is the network (`.0`) or broadcast (`.255`) address of the /24 around
    /// an owned address. The edge knows its tenants' addresses but not their prefix lengths; Vigil
    /// hands out tenant subnets as /24s, so that is the subnet assumed. Only addresses ending in 0
    /// or 255 pay the walk (at most [`MAX_ADDRS`] entries).
    pub fn is_subnet_edge_v4(&self, addr: [u8; 4]) -> bool {
        if addr[3] != 0 && addr[3] != 255 {
            return false;
        }
        // IPv4 addresses sit in the first 4 bytes of the key (`vigil_wire::verdict::v4`).
        self.addrs
            .keys()
            .any(|(v, a)| *v == IpVersion::V4 as u8 && a[..3] == addr[..3])
    }

    /// Whether `addr` is the gateway of a subnet around an owned address: `.1` of its /24, `::1`
    /// of its /64 (the addresses Vigil's subnets give their gateway, which the switch resolves
    /// for a tenant), and owned by no tenant. What the edge expects on its outside. Only such
    /// addresses pay the walk (at most [`MAX_ADDRS`] entries).
    pub fn is_gateway(&self, version: IpVersion, addr: &[u8; 16]) -> bool {
        let (host, prefix) = match version {
            IpVersion::V4 => (addr[3] == 1, 3),
            IpVersion::V6 => (addr[8..15] == [0; 7] && addr[15] == 1, 8),
        };
        host && self.owner(version, addr).is_none()
            && self
                .addrs
                .keys()
                .any(|(v, a)| *v == version as u8 && a[..prefix] == addr[..prefix])
    }

    /// Number of owned addresses.
    pub fn addresses(&self) -> usize {
        self.addrs.len()
    }

    /// Ports whose tenant changed since the last call (bit i = port i); clears the set. The packet
    /// loop forgets what it learned on them (MAC addresses).
    pub fn take_port_changes(&mut self) -> u32 {
        core::mem::take(&mut self.changed)
    }

    /// Apply an attach: `tenant` behind `port` and owner of `addr`. Tenant
    /// [`TENANT_UNASSIGNED`] detaches the port and releases the address. Either part may be
    /// absent; nothing changes when a part is refused.
    pub fn attach(
        &mut self,
        tenant: u32,
        port: Option<u16>,
        addr: Option<(IpVersion, [u8; 16])>,
    ) -> Result<(), AttachError> {
        self.attach_with_mac(tenant, port, addr, None)
    }

    /// [`Tenancy::attach`], also recording what the port may send as: with a port, the address
    /// joins the port's identity ([`PortIdentity`]) and `mac` (if any) becomes its MAC. A port
    /// that changes tenant (or is detached) starts with an empty identity.
    pub fn attach_with_mac(
        &mut self,
        tenant: u32,
        port: Option<u16>,
        addr: Option<(IpVersion, [u8; 16])>,
        mac: Option<[u8; 6]>,
    ) -> Result<(), AttachError> {
        if tenant == UPLINK_TENANT {
            return Err(AttachError::Reserved);
        }
        let port = match port {
            None => None,
            Some(p) if usize::from(p) >= MAX_PORTS => return Err(AttachError::BadPort(p)),
            Some(p) if self.ports[usize::from(p)] == UPLINK_TENANT => {
                return Err(AttachError::Reserved)
            }
            Some(p) => Some(usize::from(p)),
        };
        if let (Some(p), Some((version, a))) = (port, addr) {
            // Checked first so that a refusal changes nothing.
            let mut id = self.identity[p];
            if self.ports[p] != tenant {
                id = PortIdentity::EMPTY;
            }
            if tenant != TENANT_UNASSIGNED && !id.add(version, &a) {
                return Err(AttachError::AddressTableFull);
            }
        }
        if let Some((version, a)) = addr {
            let key = (version as u8, a);
            if tenant == TENANT_UNASSIGNED {
                self.addrs.remove(&key);
            } else if self.addrs.insert(key, tenant).is_err() {
                // Last writer wins for an address already owned; only a new one can overflow.
                return Err(AttachError::AddressTableFull);
            }
            // An address has one port: taken from any other (or released).
            for (i, id) in self.identity.iter_mut().enumerate() {
                if port != Some(i) || tenant == TENANT_UNASSIGNED {
                    id.remove(version, &a);
                }
            }
        }
        if let Some(p) = port {
            if self.ports[p] != tenant {
                self.ports[p] = tenant;
                self.identity[p] = PortIdentity::EMPTY;
                self.changed |= 1 << p;
            }
            if tenant != TENANT_UNASSIGNED {
                if let Some((version, a)) = addr {
                    self.identity[p].add(version, &a);
                }
                if let Some(m) = mac.filter(|m| *m != [0; 6]) {
                    self.identity[p].mac = m;
                }
            }
        }
        Ok(())
    }

    /// Forget every port and address of `tenant` (not tenant 0's boot ports); returns how many
    /// ports and addresses were released.
    pub fn flush(&mut self, tenant: u32) -> (usize, usize) {
        let mut ports = 0;
        if tenant != UPLINK_TENANT && tenant != TENANT_UNASSIGNED {
            for (i, t) in self.ports.iter_mut().enumerate() {
                if *t == tenant {
                    *t = TENANT_UNASSIGNED;
                    self.identity[i] = PortIdentity::EMPTY;
                    self.changed |= 1 << i;
                    ports += 1;
                }
            }
        }
        let before = self.addrs.len();
        self.addrs.retain(|_, owner| *owner != tenant);
        (ports, before - self.addrs.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_wire::verdict::v4;

    #[test]
    fn attach_detach_flush() {
        let mut t = Tenancy::new();
        t.set_boot_port(0, 0);
        t.set_boot_port(1, 7);
        assert_eq!(t.port(2), TENANT_UNASSIGNED);
        assert_eq!(t.port(99), TENANT_UNASSIGNED);
        let a = (IpVersion::V4, v4([10, 0, 0, 2]));
        t.attach(9, Some(2), Some(a)).unwrap();
        assert_eq!(t.port(2), 9);
        assert_eq!(t.take_port_changes(), 1 << 2);
        assert_eq!(t.take_port_changes(), 0);
        assert_eq!(t.owner(IpVersion::V4, &a.1), Some(9));
        // The same bytes as IPv6 are another address.
        assert_eq!(t.owner(IpVersion::V6, &a.1), None);
        // The uplink is fixed; tenant 0 gets nothing; ports are bounded.
        assert_eq!(t.attach(9, Some(0), None), Err(AttachError::Reserved));
        assert_eq!(t.attach(0, Some(3), None), Err(AttachError::Reserved));
        assert_eq!(
            t.attach(9, Some(MAX_PORTS as u16), None),
            Err(AttachError::BadPort(MAX_PORTS as u16))
        );
        assert_eq!(t.flush(0), (0, 0));
        assert_eq!(t.port(0), 0);
        // Flush releases ports and addresses of that tenant only.
        t.attach(9, Some(3), None).unwrap();
        assert_eq!(t.flush(9), (2, 1));
        assert_eq!(
            (t.port(2), t.port(3), t.port(1)),
            (TENANT_UNASSIGNED, TENANT_UNASSIGNED, 7)
        );
        assert_eq!(t.take_port_changes(), (1 << 2) | (1 << 3));
        assert_eq!(t.owner(IpVersion::V4, &a.1), None);
        // Detach through TENANT_UNASSIGNED.
        t.attach(5, Some(4), Some(a)).unwrap();
        t.attach(TENANT_UNASSIGNED, Some(4), Some(a)).unwrap();
        assert_eq!(t.port(4), TENANT_UNASSIGNED);
        assert_eq!(t.addresses(), 0);
    }

    #[test]
    fn address_table_is_bounded() {
        let mut t = Tenancy::new();
        for n in 0..MAX_ADDRS as u32 {
            let addr = v4((0x0a00_0000 + n).to_be_bytes());
            t.attach(1 + n % 3, None, Some((IpVersion::V4, addr)))
                .unwrap();
        }
        let extra = (IpVersion::V4, v4([192, 168, 0, 1]));
        assert_eq!(
            t.attach(1, None, Some(extra)),
            Err(AttachError::AddressTableFull)
        );
        // Re-owning an existing address still works when full.
        let first = v4([10, 0, 0, 0]);
        t.attach(8, None, Some((IpVersion::V4, first))).unwrap();
        assert_eq!(t.owner(IpVersion::V4, &first), Some(8));
        assert_eq!(t.flush(8), (0, 1));
        t.attach(1, None, Some(extra)).unwrap();
    }
}
