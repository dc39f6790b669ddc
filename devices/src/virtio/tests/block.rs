use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use crate::bus::BusDevice;
use crate::virtio::block::{Block, BlockConfig, CONFIG_LEN};
use crate::virtio::fuzzing::memfd;
use crate::virtio::mmio::{MmioTransport, MmioTransportState};
use crate::virtio::test_utils::*;
use crate::virtio::{CountingInterrupt, GuestMemory, VirtioDevice};

const DISK_SIZE: u64 = 1 << 20;
const HDR: u64 = DATA;
const BUF: u64 = DATA + 0x1000;
const STATUS: u64 = DATA + 0x100;

/// A temporary image on tmpfs when available (hole punching), removed on drop.
struct TempImage(PathBuf);

impl TempImage {
    fn new(tag: &str) -> Self {
        let dir = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!("skiff-blk-{}-{tag}", std::process::id()));
        let mut f = File::create(&path).unwrap();
        let pattern: Vec<u8> = (0..DISK_SIZE).map(|i| (i / 512) as u8).collect();
        f.write_all(&pattern).unwrap();
        Self(path)
    }

    fn block(&self, read_only: bool) -> Block {
        Block::open(&BlockConfig {
            path: self.0.clone(),
            read_only,
            id: Some("disk0".into()),
        })
        .unwrap()
    }

    fn contents(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut f = File::open(&self.0).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        let mut v = vec![0; len];
        f.read_exact(&mut v).unwrap();
        v
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn header(m: &GuestMemory, addr: u64, ty: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&ty.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    m.write_slice(&h, GuestAddress(addr)).unwrap();
}

fn status(m: &GuestMemory) -> u8 {
    m.read_obj::<u8>(GuestAddress(STATUS)).unwrap()
}

/// Submits `header + data + status` and returns (used len, status).
fn request(
    t: &mut MmioTransport<Block, CountingInterrupt>,
    vq: &MockSplitQueue<'_, GuestMemory>,
    m: &GuestMemory,
    ty: u32,
    sector: u64,
    data: Option<(u32, u32)>,
) -> (u32, u8) {
    m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    header(m, HDR, ty, sector);
    let at = (used_idx(vq) % 5) * 3;
    let mut descs = vec![(HDR, 16, R)];
    if let Some((len, flags)) = data {
        descs.push((BUF, len, flags));
    }
    descs.push((STATUS, 1, W));
    add_chain(vq, at, &descs);
    let before = used_idx(vq);
    t.notify_queue(0);
    assert_eq!(used_idx(vq), before.wrapping_add(1));
    (used_elem(vq, before).1, status(m))
}

/// A request for [`requests`]: type, sector, and the data buffer (length, flags) if any.
type Req = (u32, u64, Option<(u32, u32)>);

/// Submits each of `reqs` in turn ([`request`]) and returns their (used len, status).
fn requests(
    t: &mut MmioTransport<Block, CountingInterrupt>,
    vq: &MockSplitQueue<'_, GuestMemory>,
    m: &GuestMemory,
    reqs: &[Req],
) -> Vec<(u32, u8)> {
    reqs.iter()
        .map(|&(ty, sector, data)| request(t, vq, m, ty, sector, data))
        .collect()
}

/// Like [`requests`], returning only the statuses.
fn statuses(
    t: &mut MmioTransport<Block, CountingInterrupt>,
    vq: &MockSplitQueue<'_, GuestMemory>,
    m: &GuestMemory,
    reqs: &[Req],
) -> Vec<u8> {
    requests(t, vq, m, reqs).into_iter().map(|r| r.1).collect()
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn config_space_and_features() {
    let img = TempImage::new("config");
    let m = mem();
    let mut t = MmioTransport::new(img.block(false), m, CountingInterrupt::new());
    let mut cap = [0u8; 8];
    t.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SIZE / 512);
    let mut all = [0u8; CONFIG_LEN];
    t.read(0x100, &mut all);
    assert_eq!(&all[..8], &cap);
    let f = t.device().device_features();
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    let ro = img.block(true);
    assert_ne!(ro.device_features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(ro.device_features() & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    assert_eq!(ro.device_features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(ro.capacity_sectors(), DISK_SIZE / 512);
}

#[test]
fn read_write_flush_get_id() {
    let img = TempImage::new("rw");
    let m = mem();
    let (mut t, vqs) = activated(&m, img.block(false));
    let vq = &vqs[0];

    assert_eq!(
        request(&mut t, vq, &m, VIRTIO_BLK_T_IN, 3, Some((1024, W))),
        (1025, OK)
    );
    let mut buf = vec![0u8; 1024];
    m.read_slice(&mut buf, GuestAddress(BUF)).unwrap();
    assert!(buf[..512].iter().all(|&b| b == 3) && buf[512..].iter().all(|&b| b == 4));

    m.write_slice(&[0xab; 512], GuestAddress(BUF)).unwrap();
    assert_eq!(
        request(&mut t, vq, &m, VIRTIO_BLK_T_OUT, 10, Some((512, R))),
        (1, OK)
    );
    assert_eq!(img.contents(10 * 512, 512), vec![0xab; 512]);

    assert_eq!(
        request(&mut t, vq, &m, VIRTIO_BLK_T_FLUSH, 0, None),
        (1, OK)
    );

    assert_eq!(
        request(&mut t, vq, &m, VIRTIO_BLK_T_GET_ID, 0, Some((20, W))),
        (21, OK)
    );
    let mut id = [0u8; 20];
    m.read_slice(&mut id, GuestAddress(BUF)).unwrap();
    assert_eq!(&id[..6], b"disk0\0");

    let s = t.device().stats();
    assert_eq!((s.rd_operations, s.rd_bytes), (1, 1024));
    assert_eq!((s.wr_operations, s.wr_bytes), (1, 512));
    assert_eq!(s.flush_operations, 1);
}

#[test]
fn data_split_across_descriptors_and_indirect_tables() {
    let img = TempImage::new("split");
    let m = mem();
    let (mut t, vqs) = activated(&m, img.block(false));
    let vq = &vqs[0];
    header(&m, HDR, VIRTIO_BLK_T_IN, 1);
    add_chain(
        vq,
        0,
        &[
            (HDR, 8, R),
            (HDR + 8, 8, R),
            (BUF, 100, W),
            (BUF + 0x800, 412, W),
            (STATUS, 1, W),
        ],
    );
    t.notify_queue(0);
    assert_eq!(used_elem(vq, 0), (0, 513));
    assert_eq!(status(&m), OK);
    let mut b = [0u8; 412];
    m.read_slice(&mut b, GuestAddress(BUF + 0x800)).unwrap();
    assert!(b.iter().all(|&x| x == 1));

    // The same request through an indirect table.
    let table = DATA + 0x8000;
    let descs = [
        Descriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1),
        Descriptor::new(BUF, 512, (VRING_DESC_F_NEXT | W) as u16, 2),
        Descriptor::new(STATUS, 1, W as u16, 0),
    ];
    for (i, d) in descs.iter().enumerate() {
        m.write_obj(RawDescriptor::from(*d), GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    header(&m, HDR, VIRTIO_BLK_T_IN, 2);
    add_raw(vq, 5, &[(table, 48, VRING_DESC_F_INDIRECT, 0)]);
    t.notify_queue(0);
    assert_eq!(used_elem(vq, 1), (5, 513));
    let mut b = [0u8; 512];
    m.read_slice(&mut b, GuestAddress(BUF)).unwrap();
    assert!(b.iter().all(|&x| x == 2));
}

#[test]
fn read_only_disk_refuses_writes() {
    let img = TempImage::new("ro");
    let m = mem();
    let (mut t, vqs) = activated(&m, img.block(true));
    m.write_slice(&[0xcd; 512], GuestAddress(BUF)).unwrap();
    assert_eq!(
        request(&mut t, &vqs[0], &m, VIRTIO_BLK_T_OUT, 0, Some((512, R))),
        (1, IOERR)
    );
    assert_eq!(img.contents(0, 512), vec![0; 512]);
    // Discard and write-zeroes were not offered; reads and flushes still work.
    assert_eq!(
        requests(
            &mut t,
            &vqs[0],
            &m,
            &[
                (VIRTIO_BLK_T_DISCARD, 0, Some((16, R))),
                (VIRTIO_BLK_T_WRITE_ZEROES, 0, Some((16, R))),
                (VIRTIO_BLK_T_IN, 0, Some((512, W))),
                (VIRTIO_BLK_T_FLUSH, 0, None),
            ]
        ),
        [(1, UNSUPP), (1, UNSUPP), (513, OK), (1, OK)]
    );
    assert_eq!(t.device().stats().failed_wr_operations, 1);
}

fn segment(m: &GuestMemory, sector: u64, n: u32, flags: u32) {
    let mut s = [0u8; 16];
    s[..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&n.to_le_bytes());
    s[12..].copy_from_slice(&flags.to_le_bytes());
    m.write_slice(&s, GuestAddress(BUF)).unwrap();
}

#[test]
fn discard_and_write_zeroes() {
    let img = TempImage::new("discard");
    let m = mem();
    let block = img.block(false);
    let discard = block.device_features() & (1 << VIRTIO_BLK_F_DISCARD) != 0;
    let (mut t, vqs) = activated(&m, block);
    let vq = &vqs[0];

    segment(&m, 8, 8, 0);
    let expect = if discard { OK } else { UNSUPP };
    assert_eq!(
        request(&mut t, vq, &m, VIRTIO_BLK_T_DISCARD, 0, Some((16, R))),
        (1, expect)
    );
    if discard {
        assert_eq!(img.contents(8 * 512, 4096), vec![0; 4096]);
    }
    // Discard with the unmap flag (or any reserved flag) is unsupported.
    segment(&m, 8, 8, 1);
    assert_eq!(
        request(&mut t, vq, &m, VIRTIO_BLK_T_DISCARD, 0, Some((16, R))).1,
        UNSUPP
    );

    for unmap in [0, 1] {
        let sector = 32 + 16 * u64::from(unmap);
        segment(&m, sector, 4, unmap);
        assert_eq!(
            request(&mut t, vq, &m, VIRTIO_BLK_T_WRITE_ZEROES, 0, Some((16, R))),
            (1, OK)
        );
        assert_eq!(img.contents(sector * 512, 2048), vec![0; 2048]);
        assert_eq!(
            img.contents((sector + 4) * 512, 1),
            vec![(sector + 4) as u8]
        );
    }
    // Out of range, malformed payloads.
    segment(&m, DISK_SIZE / 512 - 1, 2, 0);
    assert_eq!(
        request(&mut t, vq, &m, VIRTIO_BLK_T_WRITE_ZEROES, 0, Some((16, R))).1,
        IOERR
    );
    segment(&m, u64::MAX, u32::MAX, 0);
    assert_eq!(
        statuses(
            &mut t,
            vq,
            &m,
            &[
                (VIRTIO_BLK_T_WRITE_ZEROES, 0, Some((16, R))),
                (VIRTIO_BLK_T_WRITE_ZEROES, 0, Some((15, R))),
                (VIRTIO_BLK_T_WRITE_ZEROES, 0, None),
            ]
        ),
        [IOERR, UNSUPP, UNSUPP]
    );
}

#[test]
fn features_not_negotiated_are_unsupported() {
    let img = TempImage::new("nofeat");
    let m = mem();
    let block = img.block(false);
    let f =
        block.device_features() & !(1 << VIRTIO_BLK_F_WRITE_ZEROES) & !(1 << VIRTIO_BLK_F_DISCARD);
    let (mut t, vqs) = activated_with(&m, block, f);
    segment(&m, 0, 1, 0);
    assert_eq!(
        statuses(
            &mut t,
            &vqs[0],
            &m,
            &[
                (VIRTIO_BLK_T_WRITE_ZEROES, 0, Some((16, R))),
                (VIRTIO_BLK_T_DISCARD, 0, Some((16, R))),
                (2, 0, None),
                (0xdead, 0, None),
            ]
        ),
        [UNSUPP; 4]
    );
    assert_eq!(img.contents(0, 1), vec![0]);
}

#[test]
fn out_of_range_and_misaligned_io_fail() {
    let img = TempImage::new("range");
    let m = mem();
    let (mut t, vqs) = activated(&m, img.block(false));
    let vq = &vqs[0];
    let last = DISK_SIZE / 512 - 1;
    assert_eq!(
        statuses(
            &mut t,
            vq,
            &m,
            &[
                (VIRTIO_BLK_T_IN, last, Some((512, W))),
                (VIRTIO_BLK_T_IN, last, Some((1024, W))),
                (VIRTIO_BLK_T_OUT, last + 1, Some((512, R))),
                (VIRTIO_BLK_T_IN, u64::MAX, Some((512, W))),
                (VIRTIO_BLK_T_IN, u64::MAX / 512, Some((512, W))),
                (VIRTIO_BLK_T_IN, 0, Some((100, W))),
                (VIRTIO_BLK_T_OUT, 0, Some((511, R))),
                // Direction mismatches: read data in a device-readable buffer, write data in
                // a device-writable one.
                (VIRTIO_BLK_T_IN, 0, Some((512, R))),
                (VIRTIO_BLK_T_OUT, 0, Some((512, W))),
            ]
        ),
        [OK, IOERR, IOERR, IOERR, IOERR, IOERR, IOERR, IOERR, IOERR]
    );
    assert_eq!(img.contents(0, 512), vec![0; 512]);
}

#[test]
fn host_io_errors_become_ioerr() {
    // The image shrinks under the device: reads past the new end fail with EOF.
    let file = memfd(DISK_SIZE).unwrap();
    let shrink = file.try_clone().unwrap();
    let block = Block::new(file, Path::new("memfd"), false, None).unwrap();
    let m = mem();
    let (mut t, vqs) = activated(&m, block);
    shrink.set_len(4096).unwrap();
    assert_eq!(
        request(&mut t, &vqs[0], &m, VIRTIO_BLK_T_IN, 100, Some((512, W))).1,
        IOERR
    );
    assert_eq!(t.device().stats().failed_rd_operations, 1);
    // A file opened read-only underneath a writable disk: writes fail with EBADF.
    let img = TempImage::new("ebadf");
    let ro = OpenOptions::new().read(true).open(&img.0).unwrap();
    let block = Block::new(ro, &img.0, false, None).unwrap();
    let (mut t, vqs) = activated(&m, block);
    assert_eq!(
        request(&mut t, &vqs[0], &m, VIRTIO_BLK_T_OUT, 0, Some((512, R))).1,
        IOERR
    );
    assert_eq!(t.device().stats().failed_wr_operations, 1);
}

#[test]
fn malformed_chains_never_crash() {
    let img = TempImage::new("malformed");
    let m = mem();
    let (mut t, vqs) = activated(&m, img.block(false));
    let vq = &vqs[0];
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    // No writable status byte at all.
    add_chain(vq, 0, &[(HDR, 16, R), (BUF, 512, R)]);
    // A loop: 3 -> 4 -> 3.
    add_raw(
        vq,
        3,
        &[
            (HDR, 16, VRING_DESC_F_NEXT, 4),
            (BUF, 512, VRING_DESC_F_NEXT | W, 3),
        ],
    );
    // Buffer outside guest RAM.
    add_chain(
        vq,
        5,
        &[(HDR, 16, R), (0x4000_0000, 512, W), (STATUS, 1, W)],
    );
    // Length that overflows the guest address space.
    add_chain(
        vq,
        8,
        &[(HDR, 16, R), (u64::MAX - 100, 512, W), (STATUS, 1, W)],
    );
    // Next index past the queue size.
    add_raw(vq, 11, &[(HDR, 16, VRING_DESC_F_NEXT, 200)]);
    // Readable after writable.
    add_chain(vq, 12, &[(HDR, 16, R), (STATUS, 1, W), (BUF, 16, R)]);
    t.notify_queue(0);
    assert_eq!(used_idx(vq), 6);
    for i in 0..6 {
        assert_eq!(used_elem(vq, i).1, 0, "chain {i}");
    }
    // Header too short: answered with IOERR.
    add_chain(vq, 0, &[(HDR, 8, R), (STATUS, 1, W)]);
    t.notify_queue(0);
    assert_eq!(used_elem(vq, 6), (0, 1));
    assert_eq!(status(&m), IOERR);
    assert_eq!(t.device().stats().invalid_operations, 7);

    // A bogus available index (more than a queue ahead) is ignored without hanging.
    vq.avail().idx().store(used_idx(vq).wrapping_add(100));
    t.notify_queue(0);
    assert_eq!(used_idx(vq), 7);
}

#[test]
fn save_restore_moves_the_disk_state() {
    let img = TempImage::new("migrate");
    let m = mem();
    let (mut t, vqs) = activated(&m, img.block(false));
    assert_eq!(
        request(&mut t, &vqs[0], &m, VIRTIO_BLK_T_IN, 1, Some((512, W))).1,
        OK
    );
    let state = t.save_state();
    let json = serde_json::to_string(&state).unwrap();
    let state: MmioTransportState<_> = serde_json::from_str(&json).unwrap();
    let mut t2 = MmioTransport::new(img.block(false), m.clone(), CountingInterrupt::new());
    t2.restore_state(&state).unwrap();
    assert_eq!(
        request(&mut t2, &vqs[0], &m, VIRTIO_BLK_T_IN, 2, Some((512, W))),
        (513, OK)
    );
    assert_eq!(t2.save_state().device, state.device);
    // A disk of another size, or read-only, is refused.
    let mut t3 = MmioTransport::new(img.block(true), m.clone(), CountingInterrupt::new());
    assert!(t3.restore_state(&state).is_err());
    let small = memfd(4096).unwrap();
    let mut t4 = MmioTransport::new(
        Block::new(small, Path::new("small"), false, None).unwrap(),
        m.clone(),
        CountingInterrupt::new(),
    );
    assert!(t4.restore_state(&state).is_err());
}
