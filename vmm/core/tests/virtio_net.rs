//! virtio-net over a real TAP device in a real network namespace (needs root).
//!
//! The test plays the guest with `GuestDriver` (descriptor chains in guest memory, register
//! writes to the transport) and the outside world with a raw AF_PACKET socket opened inside the
//! namespace: a frame the "guest" transmits must appear on the TAP interface there, and a frame
//! sent out of that interface must land in a receive buffer. The namespace is removed on drop,
//! even if the test fails.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_core::devices::tap::{Tap, TapError};
use vmm_core::devices::virtio::driver::{wait_until, Buffer, GuestDriver};
use vmm_core::devices::virtio::mmio::MmioTransport;
use vmm_core::devices::virtio::mmio::QueueRings;
use vmm_core::devices::virtio::net::{Net, NetCounters, NET_HDR_LEN, RX_QUEUE, TX_QUEUE};
use vmm_core::devices::virtio::status;
use vmm_core::GuestMemoryMmap;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
/// IEEE 802 "local experimental" EtherType: nothing else in the namespace sends it.
const ETHERTYPE: u16 = 0x88b5;
const RAM: usize = 4 << 20;
const DATA: u64 = 0x10_0000;
const WAIT: Duration = Duration::from_secs(10);

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed");
}

/// A network namespace, removed on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn create(name: &str) -> Netns {
        // A namespace left behind by a killed run.
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["netns", "add", name]);
        Netns { name: name.into() }
    }

    /// Runs `f` on a thread inside the namespace; descriptors it opens stay usable anywhere.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open netns");
            // SAFETY: setns on this thread only, with a valid namespace descriptor.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
            f()
        })
        .join()
        .expect("namespace thread")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A raw packet socket bound to one interface, with a receive timeout.
struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    /// Must run inside the interface's namespace.
    fn bind(ifname: &str) -> PacketSocket {
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: plain libc calls with valid arguments; results checked.
        unsafe {
            let ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
            assert!(ifindex > 0, "no interface {ifname}");
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                i32::from((libc::ETH_P_ALL as u16).to_be()),
            );
            assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
            let fd = OwnedFd::from_raw_fd(fd);
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            sll.sll_ifindex = ifindex;
            let rc = libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(rc, 0, "bind: {}", io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 1,
                tv_usec: 0,
            };
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
            PacketSocket { fd, ifindex }
        }
    }

    /// Sends `frame` out of the interface (toward whoever reads the TAP).
    fn send(&self, frame: &[u8]) {
        // SAFETY: sockaddr_ll zeroed then filled; buffer and lengths valid.
        unsafe {
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = self.ifindex;
            sll.sll_halen = 6;
            sll.sll_addr[..6].copy_from_slice(&frame[..6]);
            let n = libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(
                n,
                frame.len() as isize,
                "sendto: {}",
                io::Error::last_os_error()
            );
        }
    }

    /// The next frame with our EtherType, skipping the namespace's own traffic.
    fn recv_ours(&self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            // SAFETY: reading into a buffer we own, of its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 14 && buf[12..14] == ETHERTYPE.to_be_bytes() {
                return Some(buf[..n as usize].to_vec());
            }
        }
        None
    }
}

fn frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

struct Guest {
    mem: GuestMemoryMmap,
    driver: GuestDriver,
    counters: Arc<NetCounters>,
    _transport: Arc<Mutex<MmioTransport>>,
}

fn guest_with(tap: Tap) -> Guest {
    let mem = vmm_core::anonymous_memory(RAM, true).unwrap();
    let net = Net::new(Box::new(tap), MAC);
    let counters = net.counters();
    let transport = Arc::new(Mutex::new(
        MmioTransport::new(mem.clone(), Box::new(net)).unwrap(),
    ));
    let mut driver = GuestDriver::new(mem.clone(), transport.clone());
    let s = driver.init(
        u64::MAX,
        &[QueueRings::at(0x1_0000, 64), QueueRings::at(0x2_0000, 64)],
    );
    assert_ne!(s & status::DRIVER_OK, 0, "status {s:#x}");
    Guest {
        mem,
        driver,
        counters,
        _transport: transport,
    }
}

#[test]
fn tap_in_a_namespace_carries_frames_both_ways() {
    let ns = Netns::create(&format!("vigil-vnet{}", std::process::id()));
    let ifname = "vnet0";
    let tap = Tap::open(ifname, Some(&ns.name)).expect("open the TAP in the namespace");
    assert_eq!(tap.name(), ifname);
    // It was created in the namespace, not in ours.
    let there = Command::new("ip")
        .args(["-n", &ns.name, "link", "show", ifname])
        .output()
        .unwrap();
    assert!(there.status.success(), "{ifname} is not in the namespace");
    let here = Command::new("ip")
        .args(["link", "show", ifname])
        .output()
        .unwrap();
    assert!(
        !here.status.success(),
        "{ifname} leaked into the host namespace"
    );
    ip(&["-n", &ns.name, "link", "set", ifname, "up"]);
    let outside = ns.run(move || PacketSocket::bind(ifname));

    let mut g = guest_with(tap);

    // Guest → outside.
    let peer = [0x02, 0, 0, 0, 0, 0x01];
    let out = frame(peer, MAC, b"from the guest, through TX and the TAP");
    g.mem
        .write_slice(&[0u8; NET_HDR_LEN], GuestAddress(DATA))
        .unwrap();
    g.mem
        .write_slice(&out, GuestAddress(DATA + NET_HDR_LEN as u64))
        .unwrap();
    g.driver.publish(
        TX_QUEUE,
        &[Buffer {
            addr: DATA,
            len: (NET_HDR_LEN + out.len()) as u32,
            device_writes: false,
        }],
    );
    g.driver.notify(TX_QUEUE);
    let seen = outside
        .recv_ours(WAIT)
        .expect("the frame reached the namespace");
    assert_eq!(seen, out);
    assert!(g.driver.wait_used(TX_QUEUE, 1, WAIT));
    g.driver.take_used(TX_QUEUE);

    // Outside → guest. Several buffers: the namespace may send its own frames too.
    for i in 0..8u64 {
        g.driver.publish(
            RX_QUEUE,
            &[Buffer {
                addr: DATA + 0x1_0000 + i * 0x1000,
                len: 2048,
                device_writes: true,
            }],
        );
    }
    g.driver.notify(RX_QUEUE);
    let inbound = frame(MAC, peer, b"from the outside, through the TAP and RX");
    outside.send(&inbound);
    let mut found = false;
    let deadline = Instant::now() + WAIT;
    while !found && Instant::now() < deadline {
        if !g.driver.wait_used(RX_QUEUE, 1, Duration::from_millis(500)) {
            continue;
        }
        for (head, len) in g.driver.take_used(RX_QUEUE) {
            let addr = DATA + 0x1_0000 + u64::from(head) * 0x1000;
            let mut got = vec![0u8; len as usize];
            g.mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
            if got.len() > NET_HDR_LEN && got[NET_HDR_LEN..] == inbound[..] {
                assert_eq!(&got[10..12], &[1, 0], "num_buffers");
                found = true;
            }
        }
    }
    assert!(
        found,
        "the frame sent in the namespace never reached an RX buffer"
    );
    let s = g.counters.snapshot();
    assert_eq!(s.tx_frames, 1);
    assert_eq!(s.tx_bytes, out.len() as u64);
    assert!(s.rx_frames >= 1);
    assert_eq!(
        s.tx_link_errors + s.rx_link_errors + s.queue_errors,
        0,
        "{s:?}"
    );

    // With the link down, the TAP refuses frames and the device counts them.
    ip(&["-n", &ns.name, "link", "set", ifname, "down"]);
    g.driver.publish(
        TX_QUEUE,
        &[Buffer {
            addr: DATA,
            len: (NET_HDR_LEN + out.len()) as u32,
            device_writes: false,
        }],
    );
    g.driver.notify(TX_QUEUE);
    assert!(g.driver.wait_used(TX_QUEUE, 1, WAIT));
    assert!(wait_until(WAIT, || g.counters.snapshot().tx_link_errors == 1));
    drop(g);
    drop(ns);
}

#[test]
fn tap_errors_name_their_cause() {
    assert!(matches!(
        Tap::open("vigil-name-too-long", None),
        Err(TapError::BadName(_))
    ));
    let err = Tap::open("vnet1", Some("vigil-missing-namespace")).unwrap_err();
    assert!(matches!(err, TapError::NoNetns { .. }), "{err}");
    // Two opens of one single-queue TAP: the second is refused as busy.
    let ns = Netns::create(&format!("vigil-vbusy{}", std::process::id()));
    let first = Tap::open("vnet2", Some(&ns.name)).unwrap();
    let second = Tap::open("vnet2", Some(&ns.name)).unwrap_err();
    assert!(matches!(second, TapError::Busy { .. }), "{second}");
    drop(first);
    // A persistent TAP made beforehand with `ip tuntap` (as the tenant tests do) attaches.
    ip(&[
        "-n", &ns.name, "tuntap", "add", "dev", "vpers0", "mode", "tap",
    ]);
    let persistent = Tap::open("vpers0", Some(&ns.name)).expect("attach to a persistent TAP");
    drop(persistent);
    // An interface of that name that is no TAP.
    let lo = Tap::open("lo", Some(&ns.name)).unwrap_err();
    assert!(matches!(lo, TapError::Attach { .. }), "{lo}");
    assert!(lo.to_string().contains("\"lo\""), "{lo}");
}

/// The fast paths through KVM on this host: a guest's 32-bit write of a queue index to
/// QueueNotify signals that queue's eventfd inside KVM (no exit to us), any other value exits as
/// MMIO; and the interrupt eventfd, as an irqfd, raises the device's GSI through the in-kernel
/// IOAPIC into the local APIC. Skipped where /dev/kvm is absent.
#[test]
fn kvm_notify_and_interrupt_paths() {
    use kvm_bindings::{kvm_segment, kvm_userspace_memory_region, KVM_IRQCHIP_IOAPIC};
    use kvm_ioctls::{Kvm, VcpuExit};
    use vmm_core::devices::MmioDeviceInfo;
    use vmm_core::layout::{virtio_mmio_window, VIRTIO_FIRST_GSI};

    let Ok(kvm) = Kvm::new() else {
        eprintln!("no /dev/kvm: skipped");
        return;
    };
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    let mem = vmm_core::anonymous_memory(RAM, true).unwrap();
    let host = mem.get_host_address(GuestAddress(0)).unwrap();
    // SAFETY: the region is mapped for as long as `mem` lives, which outlives the VM here.
    unsafe {
        vm.set_user_memory_region(kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: RAM as u64,
            userspace_addr: host as u64,
            flags: 0,
        })
        .unwrap();
    }
    let (base, size) = virtio_mmio_window(0);
    let info = MmioDeviceInfo {
        base,
        size,
        gsi: VIRTIO_FIRST_GSI,
    };
    let (link, _peer) = std::os::unix::net::UnixDatagram::pair().unwrap();
    link.set_nonblocking(true).unwrap();
    let transport =
        MmioTransport::new(mem.clone(), Box::new(Net::new(Box::new(link), MAC))).unwrap();
    transport.register_with_kvm(&vm, &info).unwrap();

    // mov eax, base+0x50; mov dword [eax], 1; mov dword [eax], 7; out 0x80, al; hlt
    let notify = (base + 0x50) as u32;
    let mut code = vec![0xb8];
    code.extend_from_slice(&notify.to_le_bytes());
    code.extend_from_slice(&[0xc7, 0x00, 1, 0, 0, 0]);
    code.extend_from_slice(&[0xc7, 0x00, 7, 0, 0, 0]);
    code.extend_from_slice(&[0xe6, 0x80, 0xf4]);
    mem.write_slice(&code, GuestAddress(0x1000)).unwrap();

    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    let cs = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x8,
        type_: 0xb,
        present: 1,
        db: 1,
        s: 1,
        g: 1,
        ..Default::default()
    };
    let ds = kvm_segment {
        selector: 0x10,
        type_: 0x3,
        ..cs
    };
    (sregs.cs, sregs.ds, sregs.es, sregs.ss) = (cs, ds, ds, ds);
    sregs.cr0 = 0x11;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = 0x1000;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();

    let mut mmio_writes = Vec::new();
    loop {
        match vcpu.run().unwrap() {
            VcpuExit::MmioWrite(addr, data) => mmio_writes.push((addr, data.to_vec())),
            VcpuExit::IoOut(0x80, _) => break,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    // Only the write KVM could not match came to userspace.
    assert_eq!(mmio_writes, vec![(base + 0x50, vec![7, 0, 0, 0])]);
    assert_eq!(
        transport.queue_events()[1].read().unwrap(),
        1,
        "queue 1 notified in KVM"
    );
    assert!(
        transport.queue_events()[0].read().is_err(),
        "queue 0 untouched"
    );

    // Interrupt path: IOAPIC pin GSI → vector 0x30, fixed, edge, physical destination 0; a
    // software-enabled local APIC; then the device raises its line.
    let mut chip = kvm_bindings::kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).unwrap();
    // SAFETY: chip_id selects the IOAPIC member of the union.
    unsafe {
        chip.chip.ioapic.redirtbl[info.gsi as usize].bits = 0x30;
    }
    vm.set_irqchip(&chip).unwrap();
    let mut lapic = vcpu.get_lapic().unwrap();
    // Spurious-interrupt vector register (offset 0xf0): APIC software enable (bit 8).
    lapic.regs[0xf1] |= 1;
    vcpu.set_lapic(&lapic).unwrap();
    transport
        .interrupt()
        .signal(vmm_core::devices::virtio::interrupt::USED_BUFFER);
    // irqfd injection runs on a kernel worker: poll the LAPIC's IRR (offset 0x200 + 0x10 *
    // (vector / 32), bit vector % 32) until it shows vector 0x30.
    let delivered = wait_until(WAIT, || {
        let lapic = vcpu.get_lapic().unwrap();
        let irr = u32::from_le_bytes(
            lapic.regs[0x210..0x214]
                .iter()
                .map(|&b| b as u8)
                .collect::<Vec<_>>()
                .try_into()
                .unwrap(),
        );
        irr & (1 << (0x30 % 32)) != 0
    });
    assert!(
        delivered,
        "the irqfd on GSI {} never reached the local APIC",
        info.gsi
    );
}

/// Throughput of the device's data path over a real TAP, without a guest: the host-side driver
/// keeps the queues full. Not a default test (timing varies with the machine):
/// `cargo test --release -p vmm-core --test virtio_net throughput -- --ignored --nocapture`.
#[test]
#[ignore = "measurement"]
fn throughput() {
    const FRAMES: u64 = 100_000;
    const LEN: usize = 1514;
    const Q: u16 = 256;
    let ns = Netns::create(&format!("vigil-vperf{}", std::process::id()));
    let tap = Tap::open("vperf0", Some(&ns.name)).unwrap();
    ip(&["-n", &ns.name, "link", "set", "vperf0", "up"]);
    let outside = ns.run(|| PacketSocket::bind("vperf0"));
    let mem = vmm_core::anonymous_memory(16 << 20, true).unwrap();
    let net = Net::new(Box::new(tap), MAC);
    let counters = net.counters();
    let transport = Arc::new(Mutex::new(
        MmioTransport::new(mem.clone(), Box::new(net)).unwrap(),
    ));
    let mut driver = GuestDriver::new(mem.clone(), transport.clone());
    driver.init(
        u64::MAX,
        &[QueueRings::at(0x1_0000, Q), QueueRings::at(0x2_0000, Q)],
    );
    let f = frame([2, 0, 0, 0, 0, 1], MAC, &[0x5a; LEN - 14]);
    mem.write_slice(&[0u8; NET_HDR_LEN], GuestAddress(DATA))
        .unwrap();
    mem.write_slice(&f, GuestAddress(DATA + 12)).unwrap();
    let chain = [Buffer {
        addr: DATA,
        len: (NET_HDR_LEN + LEN) as u32,
        device_writes: false,
    }];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < FRAMES {
        for _ in 0..Q {
            driver.publish(TX_QUEUE, &chain);
        }
        driver.notify(TX_QUEUE);
        assert!(driver.wait_used(TX_QUEUE, Q, WAIT));
        driver.take_used(TX_QUEUE);
        sent += u64::from(Q);
    }
    let tx = start.elapsed();
    let s = counters.snapshot();
    eprintln!(
        "TX to TAP: {} frames of {LEN} B in {:?}: {:.0} frames/s, {:.2} Gbit/s, {} interrupts, {} link errors",
        s.tx_frames,
        tx,
        s.tx_frames as f64 / tx.as_secs_f64(),
        s.tx_bytes as f64 * 8.0 / tx.as_secs_f64() / 1e9,
        s.interrupts,
        s.tx_link_errors
    );

    // RX: a sender in the namespace sends bursts of BURST frames, each after the previous one
    // was received (the TAP's own queue would drop a faster stream; that is the kernel's
    // accounting, not the device's).
    const BURST: u64 = 128;
    let rx_frames = 50_000 / BURST * BURST;
    for i in 0..u64::from(Q) {
        driver.publish(
            RX_QUEUE,
            &[Buffer {
                addr: 0x40_0000 + i * 0x800,
                len: 0x800,
                device_writes: true,
            }],
        );
    }
    driver.notify(RX_QUEUE);
    let inbound = frame(MAC, [2, 0, 0, 0, 0, 1], &[0xa5; LEN - 14]);
    let (ack_tx, ack_rx) = std::sync::mpsc::channel::<()>();
    let sender = std::thread::spawn(move || {
        for _ in 0..rx_frames / BURST {
            for _ in 0..BURST {
                outside.send(&inbound);
            }
            if ack_rx.recv().is_err() {
                return;
            }
        }
    });
    let start = Instant::now();
    let mut got = 0u64;
    let mut burst = 0u64;
    while got < rx_frames {
        if !driver.wait_used(RX_QUEUE, 1, WAIT) {
            break;
        }
        for (head, _) in driver.take_used(RX_QUEUE) {
            got += 1;
            burst += 1;
            driver.publish_head(RX_QUEUE, head as u16);
        }
        driver.notify(RX_QUEUE);
        if burst >= BURST {
            burst -= BURST;
            let _ = ack_tx.send(());
        }
    }
    let rx = start.elapsed();
    drop(ack_tx);
    sender.join().unwrap();
    let s = counters.snapshot();
    eprintln!(
        "RX from TAP: {got} of {rx_frames} frames in {:?}: {:.0} frames/s, {:.2} Gbit/s; waits for buffers {}",
        rx,
        got as f64 / rx.as_secs_f64(),
        got as f64 * LEN as f64 * 8.0 / rx.as_secs_f64() / 1e9,
        s.rx_waits_for_buffers,
    );
    // The namespace may add a frame of its own (IPv6 router solicitation).
    assert!(got >= rx_frames);
}
