use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};

use crate::bus::BusDevice;
use crate::virtio::fuzzing::drive_to_driver_ok;
use crate::virtio::mmio::*;
use crate::virtio::rng::Rng;
use crate::virtio::test_utils::*;
use crate::virtio::{CountingInterrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use virtio_queue::QueueT;

fn rd(t: &mut impl BusDevice, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn wr(t: &mut impl BusDevice, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn transport() -> MmioTransport<Rng, CountingInterrupt> {
    MmioTransport::new(Rng::new(), mem(), CountingInterrupt::new())
}

/// One rng request of 8 bytes at descriptor 0.
fn rng_request(vq: &virtio_queue::mock::MockSplitQueue<'_, crate::virtio::GuestMemory>, at: u16) {
    add_chain(vq, at, &[(DATA, 8, W)]);
}

#[test]
fn identification_registers() {
    let mut t = transport();
    assert_eq!(rd(&mut t, 0x0), MMIO_MAGIC_VALUE);
    assert_eq!(rd(&mut t, 0x4), 2);
    assert_eq!(rd(&mut t, 0x8), 4);
    assert_eq!(rd(&mut t, 0xc), MMIO_VENDOR_ID);
    assert_eq!(rd(&mut t, 0x10), Rng::new().device_features() as u32);
    wr(&mut t, 0x14, 1);
    assert_eq!(rd(&mut t, 0x10), 1, "VERSION_1 is bit 32");
    wr(&mut t, 0x14, 7);
    assert_eq!(rd(&mut t, 0x10), 0);
    assert_eq!(rd(&mut t, 0x34), 256);
    wr(&mut t, 0x30, 5);
    assert_eq!(rd(&mut t, 0x34), 0, "missing queue has max 0");
    assert_eq!(rd(&mut t, 0xb0), u32::MAX, "no shared memory");
    // Non-32-bit and unaligned register accesses read as 0 and are ignored on write.
    let mut b = [0xffu8; 2];
    t.read(0, &mut b);
    assert_eq!(b, [0, 0]);
    let mut b = [0xffu8; 4];
    t.read(2, &mut b);
    assert_eq!(b, [0; 4]);
    t.write(0x70, &[1]);
    assert_eq!(t.status(), 0);
    // Config space reads past the end are zero.
    let mut b = [0xffu8; 8];
    t.read(0x100, &mut b);
    assert_eq!(b, [0; 8]);
}

#[test]
fn features_ok_requires_version_1_and_offered_features() {
    let mut t = transport();
    wr(&mut t, 0x70, 1);
    wr(&mut t, 0x70, 3);
    // Legacy driver: no VERSION_1.
    wr(&mut t, 0x24, 0);
    wr(&mut t, 0x20, 0);
    wr(&mut t, 0x70, 0xb);
    assert_eq!(t.status() & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    // A feature that is not offered.
    wr(&mut t, 0x24, 1);
    wr(&mut t, 0x20, 1 | 0x8000_0000);
    wr(&mut t, 0x70, 0xb);
    assert_eq!(t.status() & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    wr(&mut t, 0x20, 1);
    wr(&mut t, 0x70, 0xb);
    assert_eq!(t.status(), 0xb);
    assert_eq!(t.driver_features(), VIRTIO_F_VERSION_1);
    // Features are frozen after FEATURES_OK.
    wr(&mut t, 0x20, 3);
    assert_eq!(t.driver_features(), VIRTIO_F_VERSION_1);
}

#[test]
fn status_bits_out_of_order_or_cleared_are_ignored() {
    let mut t = transport();
    wr(&mut t, 0x70, 4); // DRIVER_OK first
    assert_eq!(t.status(), 0);
    wr(&mut t, 0x70, 2); // DRIVER without ACKNOWLEDGE
    assert_eq!(t.status(), 0);
    wr(&mut t, 0x70, 3);
    assert_eq!(t.status(), 3);
    wr(&mut t, 0x70, 1); // clearing DRIVER
    assert_eq!(t.status(), 3);
    wr(&mut t, 0x70, 0x83); // FAILED
    assert_eq!(t.status(), 0x83);
    assert!(!t.is_activated());
}

#[test]
fn queue_setup_outside_the_setup_phase_is_ignored() {
    let m = mem();
    let mut t = MmioTransport::new(Rng::new(), m.clone(), CountingInterrupt::new());
    wr(&mut t, 0x38, 4);
    wr(&mut t, 0x44, 1);
    assert!(!t.queues()[0].ready());
    let vqs = mock_queues(&m, 1);
    drive_to_driver_ok(&mut t, Rng::new().device_features(), &[layout(&vqs[0])]);
    assert!(t.is_activated());
    let desc = t.queues()[0].desc_table();
    wr(&mut t, 0x80, 0x5000);
    wr(&mut t, 0x44, 0);
    assert_eq!(t.queues()[0].desc_table(), desc);
    assert!(t.queues()[0].ready());
}

#[test]
fn queue_size_not_power_of_two_needs_reset() {
    let m = mem();
    let vqs = mock_queues(&m, 1);
    for bad in [3u32, 0, 512, 0x1_0010] {
        let mut t = MmioTransport::new(Rng::new(), m.clone(), CountingInterrupt::new());
        let l = layout(&vqs[0]);
        wr(&mut t, 0x70, 1);
        wr(&mut t, 0x70, 3);
        wr(&mut t, 0x24, 1);
        wr(&mut t, 0x20, 1);
        wr(&mut t, 0x70, 0xb);
        wr(&mut t, 0x30, 0);
        wr(&mut t, 0x38, bad);
        wr(&mut t, 0x80, l.desc as u32);
        wr(&mut t, 0x90, l.avail as u32);
        wr(&mut t, 0xa0, l.used as u32);
        wr(&mut t, 0x44, 1);
        wr(&mut t, 0x70, 0xf);
        assert!(!t.is_activated(), "size {bad}");
        assert_ne!(t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert_ne!(rd(&mut t, 0x60) & INT_CONFIG_CHANGE, 0);
        // Notifications are ignored; a reset recovers.
        rng_request(&vqs[0], 0);
        t.notify_queue(0);
        assert_eq!(used_idx(&vqs[0]), 0);
        wr(&mut t, 0x70, 0);
        assert_eq!(t.status(), 0);
    }
}

#[test]
fn misaligned_or_outside_ram_rings_need_reset() {
    let m = mem();
    let vqs = mock_queues(&m, 1);
    let mut l = layout(&vqs[0]);
    l.used += 1; // misaligned
    let mut t = MmioTransport::new(Rng::new(), m.clone(), CountingInterrupt::new());
    drive_to_driver_ok(&mut t, Rng::new().device_features(), &[l]);
    assert!(!t.is_activated());
    let mut l = layout(&vqs[0]);
    l.desc = 0x1_0000_0000; // beyond guest RAM
    let mut t = MmioTransport::new(Rng::new(), m.clone(), CountingInterrupt::new());
    drive_to_driver_ok(&mut t, Rng::new().device_features(), &[l]);
    assert!(!t.is_activated());
    assert_ne!(t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
}

#[test]
fn notifications_before_driver_ok_are_ignored_then_picked_up() {
    let m = mem();
    let vqs = mock_queues(&m, 1);
    let mut t = MmioTransport::new(Rng::new(), m.clone(), CountingInterrupt::new());
    rng_request(&vqs[0], 0);
    wr(&mut t, QUEUE_NOTIFY_OFFSET, 0);
    t.notify_queue(0);
    assert_eq!(used_idx(&vqs[0]), 0);
    drive_to_driver_ok(&mut t, Rng::new().device_features(), &[layout(&vqs[0])]);
    // The buffer made available before DRIVER_OK is processed at activation.
    assert_eq!(used_idx(&vqs[0]), 1);
    assert_eq!(t.interrupt().count(), 1);
    assert_eq!(rd(&mut t, 0x60), INT_USED_BUFFER);
    wr(&mut t, 0x64, INT_USED_BUFFER);
    assert_eq!(rd(&mut t, 0x60), 0);
    // Notifications for unknown queues are ignored.
    t.notify_queue(1);
    t.notify_queue(u32::MAX);
    wr(&mut t, QUEUE_NOTIFY_OFFSET, 0);
    assert_eq!(t.interrupt().count(), 1);
}

#[test]
fn reset_at_any_moment() {
    let m = mem();
    let vqs = mock_queues(&m, 1);
    // Reset after every step of the initialisation sequence, then initialise fully.
    for step in 0..6 {
        let mut t = MmioTransport::new(Rng::new(), m.clone(), CountingInterrupt::new());
        let seq: [(u64, u32); 6] = [
            (0x70, 1),
            (0x70, 3),
            (0x20, 1),
            (0x70, 0xb),
            (0x44, 1),
            (0x70, 0xf),
        ];
        for &(off, v) in &seq[..step] {
            if off == 0x20 {
                wr(&mut t, 0x24, 1);
            }
            wr(&mut t, off, v);
        }
        wr(&mut t, 0x70, 0);
        assert_eq!(t.status(), 0);
        assert!(!t.queues()[0].ready());
        assert_eq!(t.driver_features(), 0);
        drive_to_driver_ok(&mut t, Rng::new().device_features(), &[layout(&vqs[0])]);
        assert!(t.is_activated());
    }
    // Reset of a running device: notifications are ignored afterwards.
    let (mut t, vqs) = activated(&m, Rng::new());
    wr(&mut t, 0x70, 0);
    rng_request(&vqs[0], 0);
    t.notify_queue(0);
    assert_eq!(used_idx(&vqs[0]), 0);
    assert_eq!(t.status() & VIRTIO_CONFIG_S_DRIVER_OK, 0);
}

#[test]
fn config_change_bumps_generation_and_interrupts() {
    let mut t = transport();
    assert_eq!(rd(&mut t, 0xfc), 0);
    t.signal_config_change();
    assert_eq!(rd(&mut t, 0xfc), 1);
    assert_eq!(rd(&mut t, 0x60), INT_CONFIG_CHANGE);
    assert_eq!(t.interrupt().count(), 1);
}

#[test]
fn save_and_restore_round_trip() {
    let m = mem();
    let (mut t, vqs) = activated(&m, Rng::new());
    rng_request(&vqs[0], 0);
    t.notify_queue(0);
    let state = t.save_state();
    let json = serde_json::to_string(&state).unwrap();
    let restored: MmioTransportState<_> = serde_json::from_str(&json).unwrap();
    assert_eq!(restored, state);
    let mut t2 = MmioTransport::new(Rng::new(), m.clone(), CountingInterrupt::new());
    t2.restore_state(&restored).unwrap();
    assert!(t2.is_activated());
    assert_eq!(t2.save_state(), state);
    // The restored device continues where the source stopped.
    rng_request(&vqs[0], 1);
    t2.notify_queue(0);
    assert_eq!(used_idx(&vqs[0]), 2);
    assert_eq!(used_elem(&vqs[0], 1), (1, 8));
}

#[test]
fn restore_rejects_bad_states() {
    let m = mem();
    let (t, _vqs) = activated(&m, Rng::new());
    let good = t.save_state();
    let mut t2 = MmioTransport::new(Rng::new(), m.clone(), CountingInterrupt::new());
    let mut s = good.clone();
    s.device_type = 1;
    assert!(matches!(
        t2.restore_state(&s),
        Err(MmioError::DeviceType { .. })
    ));
    let mut s = good.clone();
    s.queues[0].size = 3;
    assert!(matches!(t2.restore_state(&s), Err(MmioError::Queues(_))));
    let mut s = good.clone();
    s.queues[0].desc_table = 0x1_0000_0000;
    assert!(t2.restore_state(&s).is_err());
    let mut s = good.clone();
    s.queues.pop();
    assert!(t2.restore_state(&s).is_err());
    let mut s = good.clone();
    s.driver_features |= 1 << 40;
    assert!(matches!(
        t2.restore_state(&s),
        Err(MmioError::Features { .. })
    ));
    assert!(!t2.is_activated());
    assert_eq!(t2.status(), 0);
}
