//! Seed inputs for every target: well-formed sessions (attachments, verdicts and a TCP handshake
//! through the filter; signed datagrams; API requests; a driver that transmits and receives), so
//! the fuzzers start past the first checks. `scripts/fuzz` writes them into `fuzz/corpus/` before
//! the first run; the replay test runs them too.

use vigil_wire::verdict::{v4, Direction, IpVersion, Protocol, Rule, VerdictRepr};

const TENANT_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];
const GW_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
const TENANT: [u8; 4] = [10, 0, 0, 2];
const SERVER: [u8; 4] = [10, 77, 0, 1];

/// The seeds of target `name` (none for an unknown name).
pub fn seeds(name: &str) -> Vec<Vec<u8>> {
    match name {
        "filter_switch" => vec![filter_session(false), filter_session_udp(false)],
        "filter_edge" => vec![filter_session(true), filter_session_udp(true)],
        "verdict_ring" => vec![ring_seed()],
        "edge_channel" => vec![channel_seed()],
        "http_api" => http_seeds(),
        "vxlan" => vec![vxlan_seed()],
        "btf" => vec![btf_seed()],
        "kallsyms" => vec![kallsyms_seed(false), kallsyms_seed(true)],
        "attribution" => vec![attribution_seed()],
        "virtio_net" => vec![virtio_seed()],
        _ => Vec::new(),
    }
}

fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
    let total = (20 + l4.len()) as u16;
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    let sum = checksum(&p);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(l4);
    p
}

fn checksum(b: &[u8]) -> u16 {
    let mut s: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn tcp(sport: u16, dport: u16, seq: u32, ack: u32, flags: u8) -> Vec<u8> {
    let mut t = sport.to_be_bytes().to_vec();
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&ack.to_be_bytes());
    t.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t
}

fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = sport.to_be_bytes().to_vec();
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

fn arp_request(sender_mac: [u8; 6], sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&sender_mac);
    a.extend_from_slice(&sender);
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target);
    eth([0xff; 6], sender_mac, 0x0806, &a)
}

fn push_frame(out: &mut Vec<u8>, control: u8, frame: &[u8]) {
    out.push(0);
    out.push(control);
    out.extend_from_slice(&(frame.len() as u16).to_le_bytes());
    out.extend_from_slice(frame);
}

fn push_record(out: &mut Vec<u8>, v: &VerdictRepr) {
    out.push(1);
    out.extend_from_slice(&v.to_bytes());
}

fn connect_rule(proto: Protocol, port: u16) -> Rule {
    Rule {
        local_addr: v4(TENANT),
        remote_addr: v4(SERVER),
        remote_prefix: 32,
        remote_port_min: port,
        remote_port_max: port,
        ..Rule::any(Direction::Egress, IpVersion::V4, Protocol::Tcp)
    }
    .with_protocol(proto)
}

trait WithProtocol {
    fn with_protocol(self, p: Protocol) -> Self;
}

impl WithProtocol for Rule {
    fn with_protocol(mut self, p: Protocol) -> Rule {
        self.protocol = p;
        self
    }
}

/// Tenant 1 on switch port 1 (its MAC and address), a verdict to the server's port 443, a
/// handshake, data, FIN; ARP both ways. Edge: the same tenant by address, frames from the cloud.
fn filter_session(edge: bool) -> Vec<u8> {
    let mut s = vec![0u8];
    let port = if edge { None } else { Some(1) };
    push_record(
        &mut s,
        &VerdictRepr::attach_with_mac(
            1,
            1,
            port,
            Some((IpVersion::V4, v4(TENANT))),
            Some(TENANT_MAC),
        ),
    );
    push_record(
        &mut s,
        &VerdictRepr::add(1, 2, 0, connect_rule(Protocol::Tcp, 443)),
    );
    // Switch: port 1 is the tenant, port 0 the uplink. Edge: bit 0 from the cloud, bit 1 to it.
    let (out, back) = if edge { (1, 2) } else { (1, 0) };
    let f = |src, dst, seg: Vec<u8>| eth(dst, src, 0x0800, &seg);
    let c2s = |seq, ack, flags| {
        f(
            TENANT_MAC,
            GW_MAC,
            ipv4(TENANT, SERVER, 6, &tcp(40000, 443, seq, ack, flags)),
        )
    };
    let s2c = |seq, ack, flags| {
        f(
            GW_MAC,
            TENANT_MAC,
            ipv4(SERVER, TENANT, 6, &tcp(443, 40000, seq, ack, flags)),
        )
    };
    push_frame(&mut s, out, &arp_request(TENANT_MAC, TENANT, SERVER));
    push_frame(&mut s, out, &c2s(1000, 0, 0x02));
    push_frame(&mut s, back, &s2c(5000, 1001, 0x12));
    push_frame(&mut s, out, &c2s(1001, 5001, 0x10));
    push_frame(&mut s, out | 0x10, &c2s(1001, 5001, 0x18));
    push_frame(&mut s, back, &s2c(5001, 1001, 0x11));
    push_frame(&mut s, out, &c2s(1001, 5002, 0x11));
    s.extend_from_slice(&[2, 64, 4, 0x10, 0x0e]);
    s
}

/// A UDP verdict, a datagram each way, an inbound datagram to a port nobody opened.
fn filter_session_udp(edge: bool) -> Vec<u8> {
    let mut s = vec![2u8];
    let port = if edge { None } else { Some(2) };
    push_record(
        &mut s,
        &VerdictRepr::attach_with_mac(
            2,
            1,
            port,
            Some((IpVersion::V4, v4(TENANT))),
            Some(TENANT_MAC),
        ),
    );
    push_record(
        &mut s,
        &VerdictRepr::add(2, 2, 5000, connect_rule(Protocol::Udp, 53)),
    );
    let (out, back) = if edge { (1, 2) } else { (2, 0) };
    push_frame(
        &mut s,
        out,
        &eth(
            GW_MAC,
            TENANT_MAC,
            0x0800,
            &ipv4(TENANT, SERVER, 17, &udp(5353, 53, b"query")),
        ),
    );
    push_frame(
        &mut s,
        back,
        &eth(
            TENANT_MAC,
            GW_MAC,
            0x0800,
            &ipv4(SERVER, TENANT, 17, &udp(53, 5353, b"answer")),
        ),
    );
    push_frame(
        &mut s,
        back,
        &eth(
            TENANT_MAC,
            GW_MAC,
            0x0800,
            &ipv4(SERVER, TENANT, 17, &udp(53, 9999, b"closed")),
        ),
    );
    s.push(3);
    s.push(2);
    s
}

fn ring_seed() -> Vec<u8> {
    let mut s = vec![1u8, 2, 3];
    for (i, v) in [
        VerdictRepr::attach(1, 1, Some(1), Some((IpVersion::V4, v4(TENANT)))),
        VerdictRepr::add(1, 2, 0, connect_rule(Protocol::Tcp, 443)),
        VerdictRepr::flush_tenant(1, 3),
    ]
    .iter()
    .enumerate()
    {
        let _ = i;
        s.extend_from_slice(&v.to_bytes());
    }
    s.push(0);
    s
}

fn channel_seed() -> Vec<u8> {
    let mut s = Vec::new();
    for (seq, v) in [
        (
            1u16,
            VerdictRepr::attach(1, 1, None, Some((IpVersion::V4, v4(TENANT)))),
        ),
        (
            2,
            VerdictRepr::add(1, 2, 0, connect_rule(Protocol::Tcp, 443)),
        ),
        (
            2,
            VerdictRepr::add(1, 2, 0, connect_rule(Protocol::Tcp, 443)),
        ),
    ] {
        s.push(1);
        s.push(0);
        s.extend_from_slice(&seq.to_le_bytes());
        s.push(1); // epoch
        s.extend_from_slice(&7u16.to_le_bytes());
        s.push(1);
        s.extend_from_slice(&v.to_bytes());
        s.extend_from_slice(&0u16.to_le_bytes());
        s.push(0);
    }
    // A forgery: the first datagram again with one bit of its tag flipped.
    let first = s[..s.len() / 3].to_vec();
    let n = first.len();
    s.extend_from_slice(&first[..n - 3]);
    s.extend_from_slice(&(60u16).to_le_bytes());
    s.push(1);
    s
}

fn http_seeds() -> Vec<Vec<u8>> {
    let spec = r#"{"id":"t1","kernel":"/k","mac":"52:54:00:00:00:02","ip":"10.0.0.2","memory_mib":256,"vcpus":1,"policy":{"allow":[{"op":"connect","exe":"/bin/busybox","protocol":"tcp","cidr":"10.77.0.1/32","ports":"8080"},{"op":"bind","comm":"nginx","ports":"443"}]}}"#;
    let policy = r#"{"id":"t1","policy":{"allow":[{"op":"listen","exe":"/usr/sbin/nginx"},{"op":"connect","cidr":"::/0","ports":"1-65535","protocol":"udp"}]}}"#;
    let put = |path: &str, body: &str| {
        format!(
            "PUT /api/v1/{path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    let mut pipelined = b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec();
    pipelined.extend_from_slice(
        b"GET /api/v1/vm.info?id=t%31&x=y+z HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\n\r\n",
    );
    pipelined.extend_from_slice(&put("vm.boot", r#"{"id":"t1"}"#));
    pipelined.extend_from_slice(b"DELETE /nowhere HTTP/1.0\r\n\r\n");
    vec![
        put("vm.create", spec),
        put("vm.policy", policy),
        pipelined,
        put(
            "vm.snapshot",
            r#"{"id":"t1","destination_url":"file:///tmp/s"}"#,
        ),
    ]
}

fn vxlan_seed() -> Vec<u8> {
    let mut s = vec![0u8];
    let frame = eth(
        [0xff; 6],
        TENANT_MAC,
        0x0800,
        &ipv4(TENANT, SERVER, 17, &udp(1, 2, b"x")),
    );
    let mut d = vec![0x08, 0, 0, 0, 0, 0, 7, 0];
    d.extend_from_slice(&frame);
    s.extend_from_slice(&(d.len() as u16).to_le_bytes());
    s.extend_from_slice(&d);
    s.push(1);
    let mut other = d.clone();
    other[6] = 8;
    s.extend_from_slice(&(other.len() as u16).to_le_bytes());
    s.extend_from_slice(&other);
    s
}

/// A BTF blob: int, a pointer, an array, `task_struct { int pid; char comm[16]; struct cred
/// *cred; }`, `cred { int uid; }` and a typedef.
fn btf_seed() -> Vec<u8> {
    let mut strings = vec![0u8];
    let mut name = |s: &str| {
        let off = strings.len() as u32;
        strings.extend_from_slice(s.as_bytes());
        strings.push(0);
        off
    };
    let (int, chr, task, pid, comm, cred_n, cred, uid, td) = (
        name("int"),
        name("char"),
        name("task_struct"),
        name("pid"),
        name("comm"),
        name("cred"),
        name("cred"),
        name("uid"),
        name("pid_t"),
    );
    let mut t = Vec::new();
    let mut ty = |name: u32, kind: u32, vlen: u32, size_or_type: u32, extra: &[u32]| {
        for w in [name, (kind << 24) | vlen, size_or_type]
            .iter()
            .chain(extra)
        {
            t.extend_from_slice(&w.to_le_bytes());
        }
    };
    ty(int, 1, 0, 4, &[(1 << 24) | 32]); // 1: int
    ty(chr, 1, 0, 1, &[8]); // 2: char
    ty(0, 3, 0, 0, &[2, 1, 16]); // 3: char[16]
    ty(cred, 4, 1, 8, &[uid, 1, 0]); // 4: struct cred
    ty(0, 2, 0, 4, &[]); // 5: struct cred *
    ty(task, 4, 3, 32, &[pid, 1, 0, comm, 3, 32, cred_n, 5, 192]); // 6: task_struct
    ty(td, 8, 0, 1, &[]); // 7: pid_t
    let mut b = Vec::new();
    b.extend_from_slice(&0xeb9fu16.to_le_bytes());
    b.extend_from_slice(&[1, 0]);
    for w in [
        24u32,
        0,
        t.len() as u32,
        t.len() as u32,
        strings.len() as u32,
    ] {
        b.extend_from_slice(&w.to_le_bytes());
    }
    b.extend_from_slice(&t);
    b.extend_from_slice(&strings);
    b
}

/// A process and a socket on the synthetic guest's heap, at the committed profile's offsets: a
/// task (pid, comm, itself as parent and leader, a cred with uid 1000, an mm whose exe_file is a
/// file whose dentry is named "curl"), a TCP socket with its sock, and an AF_INET sockaddr.
fn attribution_seed() -> Vec<u8> {
    let profile: trap_handler::profile::KernelProfile =
        serde_json::from_str(include_str!("kernel-profile.json")).expect("kernel profile");
    let (task, cred, mm, file, dentry, name, socket, sockaddr, sock) = (
        0u64, 0x6000, 0x10000, 0x11000, 0x12000, 0x12800, 0x8000, 0x9000, 0xa000,
    );
    let mut s = vec![0u8]; // connect
    s.extend_from_slice(&((socket / 8) as u16).to_le_bytes());
    s.extend_from_slice(&((sockaddr / 8) as u16).to_le_bytes());
    s.push(16);
    s.extend_from_slice(&((task / 8) as u16).to_le_bytes());
    let mut write = |offset: u64, bytes: &[u8]| {
        s.push(0);
        s.extend_from_slice(&((offset / 2) as u16).to_le_bytes());
        s.push(bytes.len() as u8);
        s.extend_from_slice(bytes);
    };
    let ptr = |off: u64| (0xaaaa_0000_0000_0000u64 | off).to_le_bytes();
    let t = &profile.task_struct;
    write(task + t.pid.offset, &42u32.to_le_bytes());
    write(task + t.tgid.offset, &42u32.to_le_bytes());
    write(task + t.comm.offset, b"curl\0\0\0\0");
    for f in [&t.real_parent, &t.parent, &t.group_leader] {
        write(task + f.offset, &ptr(task));
    }
    write(task + t.cred.offset, &ptr(cred));
    write(task + t.real_cred.offset, &ptr(cred));
    write(task + t.mm.offset, &ptr(mm));
    write(cred + profile.cred.uid.offset, &1000u32.to_le_bytes());
    write(mm + profile.mm_struct.exe_file.offset, &ptr(file));
    let path = file + profile.file.f_path.offset;
    write(path + profile.path.dentry.offset, &ptr(dentry));
    // The root mount: its own parent, mounted on and rooted at the dentry.
    let mount = 0x13000;
    let vfsmount = mount + profile.mount.mnt.offset;
    write(path + profile.path.mnt.offset, &ptr(vfsmount));
    write(mount + profile.mount.mnt_parent.offset, &ptr(mount));
    write(mount + profile.mount.mnt_mountpoint.offset, &ptr(dentry));
    write(
        vfsmount + profile.mount.vfsmount_mnt_root.offset,
        &ptr(dentry),
    );
    write(dentry + profile.dentry.d_parent.offset, &ptr(dentry));
    let qstr = dentry + profile.dentry.d_name.offset;
    write(qstr + profile.qstr.len.offset, &4u32.to_le_bytes());
    write(qstr + profile.qstr.name.offset, &ptr(name));
    write(name, b"curl\0\0\0\0");
    write(socket + profile.socket.type_.offset, &1u16.to_le_bytes());
    write(socket + profile.socket.sk.offset, &ptr(sock));
    write(sock + profile.sock.skc_family.offset, &2u16.to_le_bytes());
    write(sock + profile.sock.sk_protocol.offset, &6u16.to_le_bytes());
    write(sockaddr, &[2, 0, 0x1f, 0x90, 10, 77, 0, 1]); // AF_INET 10.77.0.1:8080
    s
}

fn virtio_seed() -> Vec<u8> {
    // Normal init with 16-entry queues, EVENT_IDX.
    let mut s = vec![0b1111u8];
    let mut desc = |q: u8, index: u8, addr: u16, len: u16, flags: u8, next: u8| {
        s.push(3);
        s.push((index << 1) | q);
        s.extend_from_slice(&addr.to_le_bytes());
        s.extend_from_slice(&len.to_le_bytes());
        s.push(flags);
        s.push(next);
    };
    desc(1, 0, 0x5000, 12 + 60, 0, 0); // TX: one frame
    desc(0, 0, 0x8000, 2048, 2, 0); // RX: one device-writable buffer
    s.extend_from_slice(&[2, 0x0c, 0x50, 14]);
    s.extend_from_slice(&[0xff; 6]);
    s.extend_from_slice(&TENANT_MAC);
    s.extend_from_slice(&[0x08, 0]);
    s.extend_from_slice(&[4, 1, 0, 5]); // publish TX head 0, notify
    s.extend_from_slice(&[4, 0, 0]); // publish RX head 0
    s.push(6);
    let frame = eth(
        TENANT_MAC,
        GW_MAC,
        0x0800,
        &ipv4(SERVER, TENANT, 17, &udp(1, 2, b"hello")),
    );
    s.extend_from_slice(&(frame.len() as u16).to_le_bytes());
    s.extend_from_slice(&frame);
    s
}

/// kallsyms tables in the 6.1 order (offsets, relative base, count, names, markers, optionally
/// seqs_of_names, token table, token index), names stored one token per byte except that token 1
/// stands for "sec_".
fn kallsyms_seed(with_seqs: bool) -> Vec<u8> {
    let relbase: u64 = 0xffff_ffff_8100_0000;
    let mut syms: Vec<(String, u64)> = vec![
        ("Afixed_percpu_data".into(), 0),
        ("Acurrent_task".into(), 0x1fb80),
    ];
    // More than 512 names: the markers (one per 256 names) need three entries to be found.
    for i in 0..520u64 {
        let name = [b'T', b'a' + (i / 26 % 26) as u8, b'a' + (i % 26) as u8];
        syms.push((String::from_utf8_lossy(&name).into(), relbase + 0x40 * i));
    }
    syms.push(("Tsecurity_socket_connect".into(), relbase + 0x10_0000));
    let refs: Vec<(&str, u64)> = syms.iter().map(|(n, a)| (n.as_str(), *a)).collect();
    trap_handler::kallsyms::encode_synthetic_tables(&refs, relbase, with_seqs)
}
