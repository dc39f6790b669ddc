use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use crate::bus::BusDevice;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::net::*;
use crate::virtio::test_utils::*;
use crate::virtio::{CountingInterrupt, GuestMemory};

const MAC: MacAddr = [0x52, 0x54, 0, 1, 2, 3];

/// A loopback net device with [`MAC`], activated on `m`.
fn loopback(
    m: &GuestMemory,
) -> (
    MmioTransport<Net<LoopbackBackend>, CountingInterrupt>,
    Vec<MockSplitQueue<'_, GuestMemory>>,
) {
    activated(m, Net::new(LoopbackBackend::new(), Some(MAC)))
}

/// Injects `frames` into the back end, posts each of `bufs` as a one-descriptor receive chain
/// (heads 0, 1, ...) and lets the device deliver.
fn receive(
    t: &mut MmioTransport<Net<LoopbackBackend>, CountingInterrupt>,
    rx: &MockSplitQueue<'_, GuestMemory>,
    frames: &[Vec<u8>],
    bufs: &[(u64, u32, u32)],
) {
    for f in frames {
        t.device_mut().backend_mut().inject(f);
    }
    for (head, buf) in (0..).zip(bufs) {
        add_chain(rx, head, &[*buf]);
    }
    t.process_backend();
}

fn frame(len: usize, fill: u8) -> Vec<u8> {
    let mut f = vec![fill; len];
    f[..VNET_HDR_LEN].fill(0);
    f
}

#[test]
fn config_space_holds_mac_and_link_status() {
    let mut t = MmioTransport::new(
        Net::new(LoopbackBackend::new(), Some(MAC)),
        mem(),
        CountingInterrupt::new(),
    );
    let mut c = [0u8; 8];
    t.read(0x100, &mut c);
    assert_eq!(&c[..6], &MAC);
    assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1);
    let mac = generate_mac();
    assert_eq!(mac[0] & 0x03, 0x02, "locally administered unicast");
    assert_eq!(Net::new(LoopbackBackend::new(), None).mac()[0] & 0x03, 0x02);
}

#[test]
fn tx_loops_back_to_rx() {
    let m = mem();
    let (mut t, vqs) = loopback(&m);
    let (rx, tx) = (&vqs[RX_QUEUE], &vqs[TX_QUEUE]);
    let f = frame(100, 0x5a);
    m.write_slice(&f[..40], GuestAddress(DATA)).unwrap();
    m.write_slice(&f[40..], GuestAddress(DATA + 0x1000))
        .unwrap();
    add_chain(tx, 0, &[(DATA, 40, R), (DATA + 0x1000, 60, R)]);
    t.notify_queue(TX_QUEUE as u32);
    assert_eq!(used_elem(tx, 0), (0, 0));
    assert_eq!(t.device().backend().pending(), 1);
    assert_eq!(t.device().stats().tx_packets, 1);

    // No receive buffer yet: the frame is held.
    t.process_backend();
    assert!(t.device().rx_blocked());
    assert_eq!(used_idx(rx), 0);
    // Posting a buffer delivers it.
    add_chain(rx, 0, &[(DATA + 0x2000, 1526, W)]);
    t.notify_queue(RX_QUEUE as u32);
    assert!(!t.device().rx_blocked());
    assert_eq!(used_elem(rx, 0), (0, 100));
    let mut got = vec![0u8; 100];
    m.read_slice(&mut got, GuestAddress(DATA + 0x2000)).unwrap();
    assert_eq!(&got[12..], &f[12..]);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert_eq!(t.device().stats().rx_packets, 1);
}

#[test]
fn rx_frames_that_do_not_fit_are_dropped() {
    let m = mem();
    let (mut t, vqs) = loopback(&m);
    let rx = &vqs[RX_QUEUE];
    receive(
        &mut t,
        rx,
        &[frame(2000, 1), frame(60, 2)],
        &[(DATA, 1526, W), (DATA + 0x1000, 1526, W)],
    );
    assert_eq!(used_elem(rx, 0), (0, 0));
    assert_eq!(used_elem(rx, 1), (1, 60));
    assert_eq!(t.device().stats().rx_dropped, 1);
}

#[test]
fn malformed_rx_buffers_keep_the_frame_for_the_next_one() {
    let m = mem();
    let (mut t, vqs) = loopback(&m);
    let rx = &vqs[RX_QUEUE];
    receive(
        &mut t,
        rx,
        &[frame(60, 3)],
        &[
            (DATA, 1526, R),        // device-readable receive buffer
            (0x4000_0000, 1526, W), // outside guest RAM
            (DATA + 0x1000, 1526, W),
        ],
    );
    assert_eq!(used_idx(rx), 3);
    assert_eq!(used_elem(rx, 0), (0, 0));
    assert_eq!(used_elem(rx, 1), (1, 0));
    assert_eq!(used_elem(rx, 2), (2, 60));
    assert_eq!(t.device().stats().invalid_chains, 2);
}

#[test]
fn malformed_tx_chains_are_dropped() {
    let m = mem();
    let (mut t, vqs) = loopback(&m);
    let tx = &vqs[TX_QUEUE];
    add_chain(tx, 0, &[(DATA, 60, R), (DATA + 0x100, 60, W)]); // write-only in TX
    add_chain(tx, 2, &[(DATA, 4, R)]); // shorter than the header
    add_chain(tx, 3, &[(DATA, 0x10_0000, R)]); // larger than any frame
    add_chain(tx, 4, &[(u64::MAX - 10, 60, R)]); // wraps the address space
    add_raw(tx, 5, &[(DATA, 60, 1, 5)]); // loop onto itself
    t.notify_queue(TX_QUEUE as u32);
    assert_eq!(used_idx(tx), 5);
    assert_eq!(t.device().stats().tx_dropped, 5);
    assert_eq!(t.device().backend().pending(), 0);
}

#[test]
fn reset_drops_the_held_frame_and_state_round_trips() {
    let m = mem();
    let (mut t, _vqs) = loopback(&m);
    t.device_mut().backend_mut().inject(&frame(60, 3));
    t.process_backend();
    assert!(t.device().rx_blocked());
    let state = t.save_state();
    let json = serde_json::to_string(&state).unwrap();
    let mut t2 = MmioTransport::new(
        Net::new(LoopbackBackend::new(), None),
        m.clone(),
        CountingInterrupt::new(),
    );
    t2.restore_state(&serde_json::from_str(&json).unwrap())
        .unwrap();
    assert_eq!(t2.device().mac(), MAC);
    assert!(t2.is_activated());
    t.write(0x70, &0u32.to_le_bytes());
    assert!(!t.device().rx_blocked());
}
