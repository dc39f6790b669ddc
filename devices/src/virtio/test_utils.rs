//! Helpers for the device unit tests: guest memory, mock queues and a driver.

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::{Descriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;

use super::fuzzing::{drive_to_driver_ok, QueueLayout};
use super::mmio::MmioTransport;
use super::{CountingInterrupt, GuestMemory, VirtioDevice};

/// Size of the test guest memory.
pub const MEM_SIZE: usize = 0x100_0000;
/// Size of the test queues.
pub const QSIZE: u16 = 16;
/// Start of the data area (buffers) in test memory.
pub const DATA: u64 = 0x10_0000;

/// A readable descriptor.
pub const R: u32 = 0;
/// A device-writable descriptor.
pub const W: u32 = VRING_DESC_F_WRITE;

pub fn mem() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// Queue `i` lives at 0x1_0000 * (i + 1).
pub fn mock_queues(mem: &GuestMemory, n: usize) -> Vec<MockSplitQueue<'_, GuestMemory>> {
    (0..n)
        .map(|i| MockSplitQueue::create(mem, GuestAddress(0x1_0000 * (i as u64 + 1)), QSIZE))
        .collect()
}

pub fn layout(vq: &MockSplitQueue<'_, GuestMemory>) -> QueueLayout {
    QueueLayout {
        size: QSIZE,
        desc: vq.desc_table_addr().0,
        avail: vq.avail_addr().0,
        used: vq.used_addr().0,
    }
}

/// Creates a transport on `device` and brings it to DRIVER_OK with all offered features.
pub fn activated<'m, D: VirtioDevice>(
    mem: &'m GuestMemory,
    device: D,
) -> (
    MmioTransport<D, CountingInterrupt>,
    Vec<MockSplitQueue<'m, GuestMemory>>,
) {
    let features = device.device_features();
    activated_with(mem, device, features)
}

/// Like [`activated`], accepting only `features`.
pub fn activated_with<'m, D: VirtioDevice>(
    mem: &'m GuestMemory,
    device: D,
    features: u64,
) -> (
    MmioTransport<D, CountingInterrupt>,
    Vec<MockSplitQueue<'m, GuestMemory>>,
) {
    let n = device.queue_max_sizes().len();
    let vqs = mock_queues(mem, n);
    let layouts: Vec<QueueLayout> = vqs.iter().map(layout).collect();
    let mut t = MmioTransport::new(device, mem.clone(), CountingInterrupt::new());
    drive_to_driver_ok(&mut t, features, &layouts);
    assert!(t.is_activated(), "status {:#x}", t.status());
    (t, vqs)
}

/// Adds one chain of `(addr, len, flags)` descriptors at descriptor index `at`, linked in order.
pub fn add_chain(vq: &MockSplitQueue<'_, GuestMemory>, at: u16, descs: &[(u64, u32, u32)]) {
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| {
            let last = i + 1 == descs.len();
            let flags = if last {
                flags
            } else {
                flags | VRING_DESC_F_NEXT
            };
            RawDescriptor::from(Descriptor::new(addr, len, flags as u16, at + i as u16 + 1))
        })
        .collect();
    vq.add_desc_chains(&raw, at).unwrap();
}

/// Adds raw descriptors (flags and next untouched) at `at`, the first one made available.
pub fn add_raw(vq: &MockSplitQueue<'_, GuestMemory>, at: u16, descs: &[(u64, u32, u32, u16)]) {
    for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
        vq.desc_table()
            .store(
                at + i as u16,
                RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next)),
            )
            .unwrap();
    }
    let idx = vq.avail().idx().load();
    vq.avail()
        .ring()
        .ref_at(usize::from(idx % QSIZE))
        .unwrap()
        .store(at);
    vq.avail().idx().store(idx.wrapping_add(1));
}

/// The used ring's index.
pub fn used_idx(vq: &MockSplitQueue<'_, GuestMemory>) -> u16 {
    vq.used().idx().load()
}

/// Used element `i`: (head, len).
pub fn used_elem(vq: &MockSplitQueue<'_, GuestMemory>, i: u16) -> (u32, u32) {
    let e: VirtqUsedElem = vq
        .used()
        .ring()
        .ref_at(usize::from(i % QSIZE))
        .unwrap()
        .load();
    (e.id(), e.len())
}
