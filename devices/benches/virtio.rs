//! Host-side throughput of the virtio device models, without KVM.
//!
//! * virtio-blk: 4 KiB reads from an image on tmpfs (`/dev/shm` when present), in batches of
//!   64 requests per notification; reported as requests per second.
//! * virtio-net: 1514-byte frames sent by the guest on TX, looped back by the in-memory back
//!   end and delivered into RX buffers, 64 per batch; reported as packets per second (each
//!   packet crosses the device model twice).
//!
//! Each figure is the median of several rounds. Run with `cargo bench -p devices`.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::fuzzing::{drive_to_driver_ok, QueueLayout};
use devices::virtio::mmio::MmioTransport;
use devices::virtio::net::{LoopbackBackend, Net, RX_QUEUE, TX_QUEUE};
use devices::virtio::{CountingInterrupt, GuestMemory, VirtioDevice};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress};

const QSIZE: u16 = 256;
const BATCH: u16 = 64;
const ROUNDS: usize = 7;
const ROUND_TIME: Duration = Duration::from_millis(300);
const NEXT: u16 = 1;
const WRITE: u16 = 2;

/// Queue `i` at 0x10_0000 * (i + 1): descriptors, then avail at +0x1000, used at +0x2000.
fn layout(i: u64) -> QueueLayout {
    let base = 0x10_0000 * (i + 1);
    QueueLayout {
        size: QSIZE,
        desc: base,
        avail: base + 0x1000,
        used: base + 0x2000,
    }
}

fn write_desc(mem: &GuestMemory, q: &QueueLayout, index: u16, d: Descriptor) {
    let addr = GuestAddress(q.desc + 16 * u64::from(index));
    mem.write_obj(RawDescriptor::from(d), addr).unwrap();
}

/// Makes `heads` available on `q`, after the `avail_idx` already published.
fn publish(
    mem: &GuestMemory,
    q: &QueueLayout,
    avail_idx: &mut u16,
    heads: impl Iterator<Item = u16>,
) {
    for head in heads {
        let slot = u64::from(*avail_idx % QSIZE);
        mem.write_obj(head, GuestAddress(q.avail + 4 + 2 * slot))
            .unwrap();
        *avail_idx = avail_idx.wrapping_add(1);
    }
    mem.write_obj(*avail_idx, GuestAddress(q.avail + 2))
        .unwrap();
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs `batch` until ROUND_TIME has passed, ROUNDS times; returns the median rate per second
/// of the units `batch` reports.
fn measure(mut batch: impl FnMut() -> u64) -> f64 {
    let rates = (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            let mut units = 0;
            while start.elapsed() < ROUND_TIME {
                units += batch();
            }
            units as f64 / start.elapsed().as_secs_f64()
        })
        .collect();
    median(rates)
}

fn activate<D: VirtioDevice>(mem: &GuestMemory, device: D) -> MmioTransport<D, CountingInterrupt> {
    let n = device.queue_max_sizes().len() as u64;
    let features = device.device_features();
    let mut t = MmioTransport::new(device, mem.clone(), CountingInterrupt::new());
    let layouts: Vec<QueueLayout> = (0..n).map(layout).collect();
    drive_to_driver_ok(&mut t, features, &layouts);
    assert!(t.is_activated());
    t
}

fn bench_block(mem: &GuestMemory) -> f64 {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(format!("skiff-bench-{}.img", std::process::id()));
    let mut f = File::create(&path).unwrap();
    f.write_all(&vec![0x42u8; 64 << 20]).unwrap();
    drop(f);
    let block = Block::open(&BlockConfig {
        path: path.clone(),
        read_only: false,
        id: None,
    })
    .unwrap();
    let mut t = activate(mem, block);
    let q = layout(0);
    let data = 0x100_0000u64;
    for r in 0..BATCH {
        let (hdr, buf, status) = (
            data + 0x20_0000 + 32 * u64::from(r),
            data + 0x1000 * u64::from(r),
            data + 0x30_0000 + u64::from(r),
        );
        // IN request for sector 8 * r.
        let mut h = [0u8; 16];
        h[8..].copy_from_slice(&(8 * u64::from(r)).to_le_bytes());
        mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        let i = 3 * r;
        write_desc(mem, &q, i, Descriptor::new(hdr, 16, NEXT, i + 1));
        write_desc(
            mem,
            &q,
            i + 1,
            Descriptor::new(buf, 4096, NEXT | WRITE, i + 2),
        );
        write_desc(mem, &q, i + 2, Descriptor::new(status, 1, WRITE, 0));
    }
    let mut avail = 0u16;
    let rate = measure(|| {
        publish(mem, &q, &mut avail, (0..BATCH).map(|r| 3 * r));
        t.notify_queue(0);
        u64::from(BATCH)
    });
    assert_eq!(t.device().stats().failed_rd_operations, 0);
    assert!(t.device().stats().rd_operations > 0);
    let _ = std::fs::remove_file(&path);
    rate
}

fn bench_net(mem: &GuestMemory) -> f64 {
    let mut t = activate(mem, Net::new(LoopbackBackend::new(), None));
    let (rxq, txq) = (layout(RX_QUEUE as u64), layout(TX_QUEUE as u64));
    let data = 0x100_0000u64;
    let frame = [0x11u8; 1514 + 12];
    for i in 0..BATCH {
        let tx = data + 0x1000 * u64::from(i);
        let rx = data + 0x10_0000 + 0x1000 * u64::from(i);
        mem.write_slice(&frame, GuestAddress(tx)).unwrap();
        write_desc(mem, &txq, i, Descriptor::new(tx, frame.len() as u32, 0, 0));
        write_desc(mem, &rxq, i, Descriptor::new(rx, 2048, WRITE, 0));
    }
    let (mut tx_avail, mut rx_avail) = (0u16, 0u16);
    let rate = measure(|| {
        publish(mem, &rxq, &mut rx_avail, 0..BATCH);
        t.notify_queue(RX_QUEUE as u32);
        publish(mem, &txq, &mut tx_avail, 0..BATCH);
        t.notify_queue(TX_QUEUE as u32);
        t.process_backend();
        u64::from(BATCH)
    });
    let s = t.device().stats().clone();
    assert_eq!(s.rx_dropped + s.tx_dropped, 0, "{s:?}");
    assert_eq!(s.rx_packets, s.tx_packets);
    rate
}

fn main() {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
    let blk = bench_block(&mem);
    println!(
        "virtio-blk: {:>10.0} requests/s (4 KiB reads, tmpfs image, median of {ROUNDS})",
        blk
    );
    let net = bench_net(&mem);
    println!("virtio-net: {:>10.0} packets/s (1514-byte frames, TX -> loopback -> RX, median of {ROUNDS})", net);
}
