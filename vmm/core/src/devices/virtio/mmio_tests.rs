//! Tests of the virtio-mmio transport: its registers as a driver (or a hostile guest) writes
//! them, activation, reset, and saving and restoring its state.

use super::*;
use std::sync::Mutex;

/// A device that records what the transport does to it.
#[derive(Default)]
struct Recorder {
    activations: Vec<(usize, u64, bool)>,
    resets: usize,
    config: [u8; 8],
}

struct TestDevice(Arc<Mutex<Recorder>>);

const TEST_FEATURES: u64 = features::VERSION_1 | features::RING_EVENT_IDX | 1 << 5;

impl VirtioDevice for TestDevice {
    fn device_type(&self) -> u32 {
        42
    }
    fn features(&self) -> u64 {
        TEST_FEATURES
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::super::read_config_bytes(&self.0.lock().unwrap().config, offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut r = self.0.lock().unwrap();
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = r.config.get_mut(offset as usize + i) {
                *slot = *b;
            }
        }
    }
    fn activate(&mut self, a: Activation) -> Result<(), VirtioError> {
        self.0.lock().unwrap().activations.push((
            a.queues.len(),
            a.acked_features,
            a.queues[0].event_idx_enabled(),
        ));
        Ok(())
    }
    fn reset(&mut self) {
        self.0.lock().unwrap().resets += 1;
    }
}

const DRIVER_OK_STATUS: u32 =
    status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

fn transport() -> (MmioTransport, Arc<Mutex<Recorder>>) {
    let mem = crate::anonymous_memory(0x10_0000, true).unwrap();
    let rec = Arc::new(Mutex::new(Recorder {
        config: [1, 2, 3, 4, 5, 6, 7, 8],
        ..Default::default()
    }));
    let t = MmioTransport::new(mem, Box::new(TestDevice(rec.clone()))).unwrap();
    (t, rec)
}

fn r(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.mmio_read(offset, &mut b);
    u32::from_le_bytes(b)
}

fn w(t: &mut MmioTransport, offset: u64, value: u32) {
    t.mmio_write(offset, &value.to_le_bytes());
}

/// Programs both queues at valid addresses in the first MiB.
fn set_up_queues(t: &mut MmioTransport) {
    for (q, base) in [(0u32, 0x1000u32), (1, 0x4000)] {
        w(t, reg::QUEUE_SEL, q);
        w(t, reg::QUEUE_NUM, 8);
        w(t, reg::QUEUE_DESC_LOW, base);
        w(t, reg::QUEUE_DESC_HIGH, 0);
        w(t, reg::QUEUE_DRIVER_LOW, base + 0x800);
        w(t, reg::QUEUE_DEVICE_LOW, base + 0x1000);
        w(t, reg::QUEUE_READY, 1);
    }
}

#[test]
fn a_device_readied_for_its_driver_runs_as_if_the_driver_had_set_it_up() {
    let (mut t, rec) = transport();
    let rings = |base: u64, size: u16| QueueRings {
        size,
        desc: base,
        avail: base + 0x800,
        used: base + 0x1000,
    };
    t.ready_for_driver(features::VERSION_1, &[rings(0x1000, 16), rings(0x4000, 8)])
        .unwrap();
    assert!(t.is_active());
    assert_eq!(r(&mut t, reg::STATUS), DRIVER_OK_STATUS);
    assert_eq!(
        rec.lock().unwrap().activations,
        vec![(2, features::VERSION_1, false)]
    );
    w(&mut t, reg::QUEUE_SEL, 1);
    assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
    // The driver may still reset it and start over.
    w(&mut t, reg::STATUS, 0);
    assert!(!t.is_active());
    assert_eq!(rec.lock().unwrap().resets, 1);

    // What a driver could not get, the VMM cannot either: each leaves the device reset.
    let refusals: [(u64, Vec<QueueRings>); 4] = [
        (features::VERSION_1, vec![rings(0x1000, 16)]),
        (
            features::VERSION_1,
            vec![rings(0x1000, 16), rings(0x4000, 16)],
        ),
        (1 << 40, vec![rings(0x1000, 16), rings(0x4000, 8)]),
        (
            features::VERSION_1,
            vec![rings(0x1000, 16), rings(0x10_0000, 8)],
        ),
    ];
    for (wanted, queues) in refusals {
        let (mut t, rec) = transport();
        assert!(matches!(
            t.ready_for_driver(wanted, &queues),
            Err(VirtioError::NotReadied(_))
        ));
        assert!(!t.is_active());
        assert_eq!(r(&mut t, reg::STATUS), 0);
        assert!(rec.lock().unwrap().activations.is_empty());
    }
}

fn negotiate(t: &mut MmioTransport, driver_features: u64) {
    w(t, reg::STATUS, status::ACKNOWLEDGE);
    w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w(t, reg::DRIVER_FEATURES_SEL, 0);
    w(t, reg::DRIVER_FEATURES, driver_features as u32);
    w(t, reg::DRIVER_FEATURES_SEL, 1);
    w(t, reg::DRIVER_FEATURES, (driver_features >> 32) as u32);
    w(
        t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
}

#[test]
fn identification_registers() {
    let (mut t, _) = transport();
    assert_eq!(r(&mut t, reg::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(r(&mut t, reg::VERSION), 2);
    assert_eq!(r(&mut t, reg::DEVICE_ID), 42);
    w(&mut t, reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(r(&mut t, reg::DEVICE_FEATURES), (1 << 29) | (1 << 5));
    w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1);
    w(&mut t, reg::DEVICE_FEATURES_SEL, 7);
    assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 0);
    w(&mut t, reg::QUEUE_SEL, 1);
    assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 8);
    w(&mut t, reg::QUEUE_SEL, 2);
    assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0, "no third queue");
    assert_eq!(r(&mut t, reg::SHM_LEN_LOW), u32::MAX);
    // Configuration space at any width, zero past its end.
    let mut b = [0u8; 2];
    t.mmio_read(reg::CONFIG + 1, &mut b);
    assert_eq!(b, [2, 3]);
    let mut b = [0xaau8; 8];
    t.mmio_read(reg::CONFIG + 6, &mut b);
    assert_eq!(b, [7, 8, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn full_negotiation_activates_once_and_reset_returns_to_zero() {
    let (mut t, rec) = transport();
    negotiate(&mut t, features::VERSION_1 | features::RING_EVENT_IDX);
    assert_ne!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
    set_up_queues(&mut t);
    w(&mut t, reg::QUEUE_SEL, 0);
    assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
    let ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
    w(&mut t, reg::STATUS, ok);
    assert_eq!(r(&mut t, reg::STATUS), ok);
    assert!(t.is_active());
    assert_eq!(
        rec.lock().unwrap().activations,
        vec![(2, features::VERSION_1 | features::RING_EVENT_IDX, true)]
    );
    // Queue registers are frozen while running.
    w(&mut t, reg::QUEUE_SEL, 0);
    w(&mut t, reg::QUEUE_READY, 0);
    assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
    // Writing DRIVER_OK again does not activate twice.
    w(&mut t, reg::STATUS, ok);
    assert_eq!(rec.lock().unwrap().activations.len(), 1);

    t.interrupt().signal(super::super::interrupt::USED_BUFFER);
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 1);
    w(&mut t, reg::INTERRUPT_ACK, 1);
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);

    w(&mut t, reg::STATUS, 0);
    assert_eq!(r(&mut t, reg::STATUS), 0);
    assert!(!t.is_active());
    assert_eq!(rec.lock().unwrap().resets, 1);
    w(&mut t, reg::QUEUE_SEL, 0);
    assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
    // And it can be brought up again.
    negotiate(&mut t, features::VERSION_1);
    set_up_queues(&mut t);
    w(&mut t, reg::STATUS, ok);
    assert!(t.is_active());
    assert_eq!(
        rec.lock().unwrap().activations[1],
        (2, features::VERSION_1, false)
    );
}

#[test]
fn features_the_device_lacks_or_legacy_drivers_are_refused() {
    for bad in [features::VERSION_1 | 1 << 7, 1 << 5] {
        let (mut t, _) = transport();
        negotiate(&mut t, bad);
        assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0, "{bad:#x}");
        // DRIVER_OK without FEATURES_OK does not start the device either.
        w(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert!(!t.is_active());
    }
}

#[test]
fn queue_addresses_are_frozen_once_ready() {
    let (mut t, rec) = transport();
    negotiate(&mut t, features::VERSION_1);
    set_up_queues(&mut t);
    w(&mut t, reg::QUEUE_SEL, 1);
    w(&mut t, reg::QUEUE_DEVICE_LOW, 0xfff0_0000);
    w(&mut t, reg::QUEUE_NUM, 2);
    assert_eq!(t.queues[1].used_ring(), 0x5000);
    assert_eq!(t.queues[1].size(), 8);
    w(&mut t, reg::STATUS, DRIVER_OK_STATUS);
    assert!(t.is_active());
    assert_eq!(rec.lock().unwrap().activations.len(), 1);
}

#[test]
fn queues_outside_memory_or_unconfigured_need_reset_instead_of_running() {
    // Queue 0's used ring beyond the 1 MiB of RAM.
    let (mut t, rec) = transport();
    negotiate(&mut t, features::VERSION_1);
    w(&mut t, reg::QUEUE_SEL, 0);
    w(&mut t, reg::QUEUE_NUM, 8);
    w(&mut t, reg::QUEUE_DESC_LOW, 0x1000);
    w(&mut t, reg::QUEUE_DRIVER_LOW, 0x1800);
    w(&mut t, reg::QUEUE_DEVICE_LOW, 0xfff0_0000);
    w(&mut t, reg::QUEUE_READY, 1);
    w(&mut t, reg::QUEUE_SEL, 1);
    w(&mut t, reg::QUEUE_DESC_LOW, 0x4000);
    w(&mut t, reg::QUEUE_DRIVER_LOW, 0x4800);
    w(&mut t, reg::QUEUE_DEVICE_LOW, 0x5000);
    w(&mut t, reg::QUEUE_READY, 1);
    w(&mut t, reg::STATUS, DRIVER_OK_STATUS);
    assert!(!t.is_active());
    assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert_ne!(r(&mut t, reg::INTERRUPT_STATUS) & 2, 0);
    assert!(rec.lock().unwrap().activations.is_empty());

    // A queue the driver never made ready.
    let (mut t, rec) = transport();
    negotiate(&mut t, features::VERSION_1);
    w(&mut t, reg::QUEUE_SEL, 0);
    w(&mut t, reg::QUEUE_DESC_LOW, 0x1000);
    w(&mut t, reg::QUEUE_DRIVER_LOW, 0x1800);
    w(&mut t, reg::QUEUE_DEVICE_LOW, 0x2000);
    w(&mut t, reg::QUEUE_READY, 1);
    w(&mut t, reg::STATUS, DRIVER_OK_STATUS);
    assert!(!t.is_active());
    assert!(rec.lock().unwrap().activations.is_empty());
}

#[test]
fn bad_queue_sizes_are_refused() {
    let (mut t, _) = transport();
    negotiate(&mut t, features::VERSION_1);
    w(&mut t, reg::QUEUE_SEL, 0);
    for bad in [0, 3, 32, 0x1_0010] {
        w(&mut t, reg::QUEUE_NUM, bad);
        assert_eq!(t.queues[0].size(), 16, "{bad}");
    }
    w(&mut t, reg::QUEUE_NUM, 4);
    assert_eq!(t.queues[0].size(), 4);
    // A misaligned descriptor table is refused too.
    w(&mut t, reg::QUEUE_DESC_LOW, 0x1001);
    assert_eq!(t.queues[0].desc_table(), 0);
}

#[test]
fn notify_signals_the_queue_event() {
    let (mut t, _) = transport();
    w(&mut t, reg::QUEUE_NOTIFY, 1);
    assert_eq!(t.queue_events()[1].read().unwrap(), 1);
    assert!(t.queue_events()[0].read().is_err(), "queue 0 not signalled");
    // Out-of-range queue indices are ignored.
    w(&mut t, reg::QUEUE_NOTIFY, 9);
    w(&mut t, reg::QUEUE_NOTIFY, u32::MAX);
}

#[test]
fn any_offset_and_size_is_harmless() {
    let (mut t, _) = transport();
    for offset in (0..0x1000u64).chain([u64::MAX - 8, u64::MAX, 1 << 40]) {
        for len in [0usize, 1, 2, 3, 4, 5, 8, 16] {
            let mut b = vec![0x5au8; len];
            t.mmio_read(offset, &mut b);
            if offset < reg::CONFIG && !(len == 4 && offset % 4 == 0) {
                assert!(b.iter().all(|&x| x == 0), "{offset:#x}/{len}");
            }
            t.mmio_write(offset, &b);
        }
    }
    // Unaligned or odd-sized writes to STATUS did nothing.
    let (mut t, _) = transport();
    t.mmio_write(reg::STATUS, &[1, 0]);
    t.mmio_write(reg::STATUS + 1, &[1, 0, 0, 0]);
    assert_eq!(r(&mut t, reg::STATUS), 0);
}

#[test]
fn a_saved_transport_restores_into_a_fresh_one_and_runs_again() {
    let (mut t, _) = transport();
    negotiate(&mut t, features::VERSION_1);
    set_up_queues(&mut t);
    w(&mut t, reg::STATUS, DRIVER_OK_STATUS);
    let saved = t.save().expect("a transport has state");
    assert!(saved.active && !t.is_active(), "save quiesces the device");
    let (mut fresh, rec) = transport();
    fresh.restore(&saved).unwrap();
    assert!(fresh.is_active());
    assert_eq!(r(&mut fresh, reg::STATUS), DRIVER_OK_STATUS);
    assert_eq!(rec.lock().unwrap().activations.len(), 1);
}

#[test]
fn restore_refuses_a_state_of_another_shape_and_names_why() {
    let (mut t, _) = transport();
    negotiate(&mut t, features::VERSION_1);
    set_up_queues(&mut t);
    w(&mut t, reg::STATUS, DRIVER_OK_STATUS);
    let saved = t.save().unwrap();

    let mut one_queue = saved.clone();
    one_queue.queues.pop();
    let e = transport().0.restore(&one_queue).unwrap_err();
    assert!(matches!(
        e,
        DeviceRestoreError::QueueCount {
            saved: 1,
            present: 2
        }
    ));
    assert_eq!(e.to_string(), "the saved device has 1 queues, this one 2");

    let mut too_big = saved.clone();
    too_big.queues[1].size = 32;
    let e = transport().0.restore(&too_big).unwrap_err();
    assert_eq!(e.to_string(), "a saved queue of 32 entries");

    // A used ring outside guest RAM: the restart cannot read where the device stood.
    let mut lost = saved.clone();
    lost.queues[0].used_ring = 0x4000_0000;
    let e = transport().0.restore(&lost).unwrap_err();
    assert!(
        matches!(e, DeviceRestoreError::UsedRing { index: 0, .. }),
        "{e}"
    );
    assert!(e.to_string().starts_with("queue 0: used ring unreadable: "));
    assert!(std::error::Error::source(&e).is_some());
}

#[test]
fn a_device_without_state_refuses_a_restore() {
    struct Stateless;
    impl MmioDevice for Stateless {
        fn mmio_read(&mut self, _offset: u64, _data: &mut [u8]) {}
        fn mmio_write(&mut self, _offset: u64, _data: &[u8]) {}
    }
    let e = Stateless
        .restore(&crate::snapshot::TransportSnapshot::default())
        .unwrap_err();
    assert!(matches!(e, DeviceRestoreError::NoState));
    assert_eq!(e.to_string(), "this device has no state to restore");
}

/// Log records made on this thread (a process-wide logger that counts per thread, so tests
/// running beside this one do not count).
mod log_count {
    use std::cell::Cell;

    thread_local!(static RECORDS: Cell<usize> = const { Cell::new(0) });

    struct Counter;
    impl log::Log for Counter {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, _: &log::Record) {
            RECORDS.with(|r| r.set(r.get() + 1));
        }
        fn flush(&self) {}
    }

    pub fn records() -> usize {
        static INSTALLED: std::sync::Once = std::sync::Once::new();
        INSTALLED.call_once(|| {
            let _ = log::set_logger(&Counter);
            log::set_max_level(log::LevelFilter::Trace);
        });
        RECORDS.with(Cell::get)
    }
}

#[test]
fn a_guest_repeating_refused_register_writes_cannot_flood_the_hosts_log() {
    let (mut t, rec) = transport();
    let before = log_count::records();
    negotiate(&mut t, features::VERSION_1);
    // Misaligned ring addresses (virtio-queue's setters log each refusal), 10,000 times.
    for n in 0..10_000u32 {
        w(&mut t, reg::QUEUE_SEL, n % 2);
        w(&mut t, reg::QUEUE_DESC_LOW, 0x1001);
        w(&mut t, reg::QUEUE_DRIVER_LOW, 0x1801);
        w(&mut t, reg::QUEUE_DEVICE_LOW, 0x2002);
    }
    // A queue outside RAM, and DRIVER_OK again and again (each refused activation was logged,
    // and virtio-queue's validity check logged one more line).
    for _ in 0..10_000 {
        w(&mut t, reg::STATUS, 0);
        negotiate(&mut t, features::VERSION_1);
        set_up_queues(&mut t);
        w(&mut t, reg::QUEUE_SEL, 1);
        w(&mut t, reg::QUEUE_READY, 0);
        w(&mut t, reg::QUEUE_DESC_LOW, 0x10_0000);
        w(&mut t, reg::QUEUE_READY, 1);
        w(&mut t, reg::STATUS, DRIVER_OK_STATUS);
        assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    }
    assert!(!t.is_active());
    assert!(rec.lock().unwrap().activations.is_empty());
    let logged = log_count::records() - before;
    // One line per power of two of refused activations: 14 for 10,000.
    assert!(logged <= 16, "{logged} log records");
    // A misaligned address is refused and leaves the one before: the device runs on it.
    w(&mut t, reg::STATUS, 0);
    negotiate(&mut t, features::VERSION_1);
    set_up_queues(&mut t);
    w(&mut t, reg::QUEUE_SEL, 1);
    w(&mut t, reg::QUEUE_READY, 0);
    w(&mut t, reg::QUEUE_DESC_LOW, 0x10_0008);
    w(&mut t, reg::QUEUE_READY, 1);
    w(&mut t, reg::STATUS, DRIVER_OK_STATUS);
    assert!(t.is_active());
    assert_eq!(rec.lock().unwrap().activations.len(), 1);
}

#[test]
fn a_used_ring_on_a_page_the_write_traps_guard_needs_reset_instead_of_running() {
    // A root guest re-activating its device with the used ring on its own hooked kernel text:
    // the device would write used entries there, past the read-only memslot.
    let configure = |t: &mut MmioTransport| {
        negotiate(t, features::VERSION_1);
        for (queue, base) in [(0, 0x1000), (1, 0x4000)] {
            w(t, reg::QUEUE_SEL, queue);
            w(t, reg::QUEUE_NUM, 8);
            w(t, reg::QUEUE_DESC_LOW, base);
            w(t, reg::QUEUE_DRIVER_LOW, base + 0x800);
            w(t, reg::QUEUE_DEVICE_LOW, base + 0x1000);
            w(t, reg::QUEUE_READY, 1);
        }
        w(t, reg::STATUS, DRIVER_OK_STATUS);
    };
    // Queue 1's used ring is at 0x5000.
    let (t, rec) = transport();
    let mut t = t.with_device_writes(DeviceWrites::guarding(&[0x5000]));
    configure(&mut t);
    assert!(!t.is_active());
    assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert!(rec.lock().unwrap().activations.is_empty());
    // The same rings beside a guarded page (its descriptors and avail ring only read): runs.
    let (t, rec) = transport();
    let mut t = t.with_device_writes(DeviceWrites::guarding(&[0x4000, 0x6000]));
    configure(&mut t);
    assert!(t.is_active());
    assert_eq!(rec.lock().unwrap().activations.len(), 1);
}
