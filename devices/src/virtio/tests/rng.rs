use vm_memory::{Bytes, GuestAddress};

use crate::virtio::rng::{Rng, MAX_BYTES_PER_REQUEST};
use crate::virtio::test_utils::*;

#[test]
fn fills_writable_buffers() {
    let m = mem();
    let (mut t, vqs) = activated(&m, Rng::new());
    add_chain(&vqs[0], 0, &[(DATA, 64, W), (DATA + 0x1000, 64, W)]);
    t.notify_queue(0);
    assert_eq!(used_elem(&vqs[0], 0), (0, 128));
    let mut buf = [0u8; 64];
    m.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert_ne!(buf, [0u8; 64]);
    assert_eq!(t.device().bytes_served(), 128);
    assert_eq!(t.interrupt().count(), 1);
}

#[test]
fn readable_descriptors_and_bad_chains_get_nothing() {
    let m = mem();
    let (mut t, vqs) = activated(&m, Rng::new());
    add_chain(&vqs[0], 0, &[(DATA, 64, R)]);
    add_chain(&vqs[0], 2, &[(0x2000_0000, 64, W)]);
    t.notify_queue(0);
    assert_eq!(used_idx(&vqs[0]), 2);
    assert_eq!(used_elem(&vqs[0], 0), (0, 0));
    assert_eq!(used_elem(&vqs[0], 1), (2, 0));
    let mut buf = [0u8; 64];
    m.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert_eq!(buf, [0u8; 64]);
}

#[test]
fn huge_requests_are_capped() {
    let m = mem();
    let (mut t, vqs) = activated(&m, Rng::new());
    add_chain(&vqs[0], 0, &[(DATA, 0x40_0000, W)]);
    t.notify_queue(0);
    assert_eq!(used_elem(&vqs[0], 0), (0, MAX_BYTES_PER_REQUEST as u32));
}
