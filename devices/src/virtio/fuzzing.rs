//! Fuzzing entry points: feed arbitrary bytes to each device as guest memory.
//!
//! Each `fuzz_*` function lays the input over the start of a small guest memory (descriptor
//! tables, available rings and data buffers alike are attacker-controlled), brings the device
//! up through the transport's registers like a driver would, and notifies every queue. The
//! `fuzz/` cargo-fuzz targets call these, and the unit tests replay a corpus through them, so
//! the same code runs with and without libFuzzer. The only expectation is that nothing panics
//! or hangs.

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::path::Path;

use vm_memory::{Bytes, GuestAddress};

use super::block::Block;
use super::mmio::MmioTransport;
use super::net::{LoopbackBackend, Net};
use super::rng::Rng;
use super::{CountingInterrupt, GuestMemory, VirtioDevice, VirtioInterrupt};
use crate::bus::BusDevice;

/// Size of the guest memory used by the fuzz entry points.
pub const FUZZ_MEM_SIZE: usize = 0x4_0000;
/// Size every queue is set up with.
pub const FUZZ_QUEUE_SIZE: u16 = 16;
/// Most input bytes laid over guest memory.
const MAX_INPUT: usize = 0x2_0000;
/// Size of the disk image behind the block fuzzer.
const FUZZ_DISK_SIZE: u64 = 64 * 1024;

/// Where a driver placed one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLayout {
    /// Queue size written to `QueueNum`.
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
}

impl QueueLayout {
    /// The layout the fuzz entry points use for queue `index` (0x400 bytes per queue).
    pub fn fuzz(index: usize) -> Self {
        let base = 0x400 * index as u64;
        Self {
            size: FUZZ_QUEUE_SIZE,
            desc: base,
            avail: base + 0x100,
            used: base + 0x200,
        }
    }
}

fn write_reg(t: &mut impl BusDevice, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

/// Runs the driver side of device initialisation through the register window: ACKNOWLEDGE,
/// DRIVER, accept `features`, FEATURES_OK, set up `queues`, DRIVER_OK.
pub fn drive_to_driver_ok<D: VirtioDevice, I: VirtioInterrupt>(
    t: &mut MmioTransport<D, I>,
    features: u64,
    queues: &[QueueLayout],
) {
    write_reg(t, 0x70, 1);
    write_reg(t, 0x70, 3);
    write_reg(t, 0x24, 0);
    write_reg(t, 0x20, features as u32);
    write_reg(t, 0x24, 1);
    write_reg(t, 0x20, (features >> 32) as u32);
    write_reg(t, 0x70, 0xb);
    for (i, q) in queues.iter().enumerate() {
        write_reg(t, 0x30, i as u32);
        write_reg(t, 0x38, u32::from(q.size));
        write_reg(t, 0x80, q.desc as u32);
        write_reg(t, 0x84, (q.desc >> 32) as u32);
        write_reg(t, 0x90, q.avail as u32);
        write_reg(t, 0x94, (q.avail >> 32) as u32);
        write_reg(t, 0xa0, q.used as u32);
        write_reg(t, 0xa4, (q.used >> 32) as u32);
        write_reg(t, 0x44, 1);
    }
    write_reg(t, 0x70, 0xf);
}

fn fuzz_memory(data: &[u8]) -> Option<GuestMemory> {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), FUZZ_MEM_SIZE)]).ok()?;
    let n = data.len().min(MAX_INPUT);
    mem.write_slice(&data[..n], GuestAddress(0)).ok()?;
    Some(mem)
}

/// Brings `device` up over `data` and notifies each of its queues.
fn run<D: VirtioDevice>(device: D, data: &[u8]) -> Option<MmioTransport<D, CountingInterrupt>> {
    let mem = fuzz_memory(data)?;
    let queues: Vec<QueueLayout> = (0..device.queue_max_sizes().len())
        .map(QueueLayout::fuzz)
        .collect();
    let features = device.device_features();
    let mut t = MmioTransport::new(device, mem, CountingInterrupt::new());
    drive_to_driver_ok(&mut t, features, &queues);
    for i in 0..queues.len() {
        t.notify_queue(i as u32);
    }
    Some(t)
}

/// An anonymous in-memory file of `size` bytes (memfd).
pub fn memfd(size: u64) -> std::io::Result<File> {
    // SAFETY: the name is a valid NUL-terminated string; the returned fd is checked and then
    // owned by the `File`.
    let fd = unsafe { libc::memfd_create(c"skiff-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

/// Fuzzes virtio-blk request parsing and execution (read-write disk if the first byte is even).
pub fn fuzz_block(data: &[u8]) {
    let read_only = data.first().is_some_and(|b| b & 1 == 1);
    let Ok(mut file) = memfd(FUZZ_DISK_SIZE) else {
        return;
    };
    let _ = file.write_all(b"skiff");
    let Ok(block) = Block::new(file, Path::new("fuzz"), read_only, Some("fuzz".into())) else {
        return;
    };
    run(block, data);
}

/// Fuzzes virtio-rng request handling.
pub fn fuzz_rng(data: &[u8]) {
    run(Rng::new(), data);
}

/// Fuzzes virtio-net: TX chains from the input, and RX of a frame taken from the input.
pub fn fuzz_net(data: &[u8]) {
    let backend = LoopbackBackend::new();
    let net = Net::new(backend, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
    let Some(mut t) = run(net, data) else {
        return;
    };
    // Whatever TX put in the loopback comes back on RX; add one frame of our own too.
    let frame_len = data
        .get(1)
        .map_or(0, |&b| usize::from(b) * 8)
        .min(data.len());
    let _ = t.device_mut().backend_mut().inject(&data[..frame_len]);
    t.process_backend();
    t.notify_queue(0);
    t.notify_queue(1);
}
