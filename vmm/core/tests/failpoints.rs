//! A panic on one VM's vCPU thread or on its virtio-net device thread stops that VM, with the
//! panic as its reason, and nothing else: three switch micro-VMs run in this one process, the
//! failpoints (vmm/core/src/failpoints.rs) aim at two of them, the third keeps forwarding.
//! Real KVM VMs and real socket-pair links; the failpoints are the only thing made up.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vigil_wire::boot::Role;
use vmm_core::config::{LinkConfig, VmConfig};
use vmm_core::host_kind::HostKind;
use vmm_core::vcpu::StopReason;
use vmm_core::vm::Vm;

mod common;
use common::fw_guest_elf;

const TENANT: u32 = 7;
const TENANT_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];

/// A switch micro-VM named `name` with an uplink and one tenant port; the test's ends of both.
fn switch(name: &str) -> (Vm, UnixDatagram, UnixDatagram) {
    // Socket links: the test injects and reads frames with plain send/recv.
    let (uplink_test, uplink_vm) = LinkConfig::socket_pair(0, [0x02, 0, 0, 0, 0, 1]).unwrap();
    let (tenant_test, tenant_vm) = LinkConfig::socket_pair(TENANT, [0x02, 0, 0, 0, 0, 2]).unwrap();
    let config = VmConfig::micro_vm(name, fw_guest_elf(), Role::Switch)
        .with_links(vec![uplink_vm, tenant_vm]);
    let vm = Vm::create(&config, HostKind::detect()).unwrap();
    (vm, uplink_test, tenant_test)
}

/// A broadcast ARP request from the tenant: the switch floods it to the uplink.
fn arp_request() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&TENANT_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&TENANT_MAC);
    f.extend_from_slice(&[10, 0, 0, 2]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[10, 0, 0, 1]);
    f
}

/// Sends the ARP request from the tenant end until it comes out of the uplink, or `limit`.
fn forwards(tenant: &UnixDatagram, uplink: &UnixDatagram, limit: Duration) -> bool {
    let frame = arp_request();
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        let _ = tenant.send(&frame);
        let mut poll = libc::pollfd {
            fd: uplink.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut poll, 1, 50) } > 0 {
            if let Ok(n) = uplink.recv(&mut buf) {
                if buf[..n] == frame[..] {
                    return true;
                }
            }
        }
    }
    false
}

#[test]
fn a_panicking_vcpu_or_device_thread_stops_only_its_vm() {
    if std::fs::metadata("/dev/kvm").is_err() {
        eprintln!("no /dev/kvm: skipped");
        return;
    }
    // Read once, at the first failpoint this process reaches: set before any VM runs.
    std::env::set_var(
        "VIGIL_FAILPOINTS",
        "vcpu.exit@fp-vcpu-vcpu=panic;device.net@fp-dev-net=panic",
    );
    let (steady, steady_uplink, steady_tenant) = switch("fp-ok");
    let steady_stop = steady.stop_handle();
    let steady = std::thread::spawn(move || steady.run(Some(Duration::from_secs(120))));
    assert!(
        forwards(&steady_tenant, &steady_uplink, Duration::from_secs(30)),
        "the steady switch forwards"
    );

    // The vCPU panics on its first exit: the VM stops with the panic, the process goes on.
    let (vm, _uplink, _tenant) = switch("fp-vcpu");
    let outcome = vm.run(Some(Duration::from_secs(60))).unwrap();
    match &outcome.stop {
        StopReason::Crashed(why) => assert!(
            why.contains("vCPU 0 panicked") && why.contains("failpoint vcpu.exit (fp-vcpu-vcpu0)"),
            "{why}"
        ),
        other => panic!("{other:?}"),
    }

    // The device thread panics when the first frame wakes it: the VM stops, with why.
    let (vm, uplink, tenant) = switch("fp-dev");
    let running = std::thread::spawn(move || vm.run(Some(Duration::from_secs(60))));
    assert!(
        !forwards(&tenant, &uplink, Duration::from_secs(5)),
        "a switch whose device thread died forwards nothing"
    );
    let outcome = running.join().unwrap().unwrap();
    match &outcome.stop {
        StopReason::Crashed(why) => assert!(
            why.contains("virtio-net device thread fp-dev-net")
                && why.contains("panicked: failpoint device.net"),
            "{why}"
        ),
        other => panic!("{other:?}"),
    }

    // The third VM never noticed.
    assert!(
        forwards(&steady_tenant, &steady_uplink, Duration::from_secs(10)),
        "the steady switch still forwards"
    );
    steady_stop.store(true, Ordering::Release);
    let outcome = steady.join().unwrap().unwrap();
    assert_eq!(outcome.stop, StopReason::Requested);
}
