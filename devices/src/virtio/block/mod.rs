//! virtio-blk over a raw image file.
//!
//! One request queue. Supported requests: read, write, flush (`fsync`), get-id, and, on
//! writable images, write-zeroes (`FALLOC_FL_ZERO_RANGE`, falling back to writing zeroes) and
//! discard (`FALLOC_FL_PUNCH_HOLE`, only offered when the host file system supports it).
//!
//! Statuses follow what Linux's driver expects: a write to a read-only disk, an out-of-range
//! sector, a misaligned length or a host I/O error complete with `VIRTIO_BLK_S_IOERR`; unknown
//! request types and requests for features that were not negotiated complete with
//! `VIRTIO_BLK_S_UNSUPP`. A chain without room for the status byte cannot be answered and is
//! returned with a used length of 0. Requests run synchronously, so none is in flight when the
//! state is saved.

mod file;
pub mod request;

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;

pub use file::{DiskError, DiskFile};
use request::{
    byte_range, RequestHeader, RequestType, Segment, HEADER_LEN, SECTOR_SHIFT, SECTOR_SIZE,
    SEGMENT_LEN, WRITE_ZEROES_FLAG_UNMAP,
};

use super::chain::{collect_chain, ChainError, Segments};
use super::{process_chains, GuestMemory, Queue, VirtioDevice, VirtioError, BASE_FEATURES};

/// Size of the request queue.
pub const BLOCK_QUEUE_SIZE: u16 = 256;
/// Most segments in one discard or write-zeroes request (advertised in the config space).
pub const MAX_DISCARD_SEGMENTS: u32 = 16;
/// Most sectors in one discard or write-zeroes segment (advertised in the config space).
pub const MAX_DISCARD_SECTORS: u32 = u32::MAX >> SECTOR_SHIFT;
/// Length of the configuration space this device exposes (`struct virtio_blk_config` up to
/// `write_zeroes_may_unmap` and its padding).
pub const CONFIG_LEN: usize = 60;

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// Path of the image.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The image could not be set up.
    #[error(transparent)]
    Disk(#[from] DiskError),
}

/// Per-disk counters, named after QEMU's `BlockDeviceStats` for `query-blockstats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockStats {
    /// Bytes read.
    pub rd_bytes: u64,
    /// Bytes written.
    pub wr_bytes: u64,
    /// Bytes discarded or zeroed.
    pub unmap_bytes: u64,
    /// Completed reads.
    pub rd_operations: u64,
    /// Completed writes (including write-zeroes).
    pub wr_operations: u64,
    /// Completed flushes.
    pub flush_operations: u64,
    /// Completed discards.
    pub unmap_operations: u64,
    /// Reads that failed.
    pub failed_rd_operations: u64,
    /// Writes (and write-zeroes) that failed.
    pub failed_wr_operations: u64,
    /// Flushes that failed.
    pub failed_flush_operations: u64,
    /// Discards that failed.
    pub failed_unmap_operations: u64,
    /// Malformed or unsupported requests.
    pub invalid_operations: u64,
    /// Time spent reading, in nanoseconds.
    pub rd_total_time_ns: u64,
    /// Time spent writing, in nanoseconds.
    pub wr_total_time_ns: u64,
    /// Time spent flushing, in nanoseconds.
    pub flush_total_time_ns: u64,
}

/// How to open a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// Path of the raw image.
    pub path: PathBuf,
    /// Open read-only and offer `VIRTIO_BLK_F_RO`.
    pub read_only: bool,
    /// The ID string (`--disk id=`), at most 20 bytes are used; `None` derives one from the
    /// image's device and inode numbers.
    pub id: Option<String>,
}

/// Migration state of a disk: what the destination must match, and the driver's features.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Whether the disk is read-only.
    pub read_only: bool,
    /// The ID string.
    pub id: String,
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// The outcome of one request: status byte and bytes written into the driver's buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Completion {
    status: u8,
    written: u32,
}

impl Completion {
    fn status(status: u32) -> Self {
        Self {
            status: u8::try_from(status).unwrap_or(u8::MAX),
            written: 0,
        }
    }
}

/// The virtio block device.
#[derive(Debug)]
pub struct Block {
    disk: DiskFile,
    path: PathBuf,
    read_only: bool,
    id: String,
    features: u64,
    acked_features: u64,
    descs: Vec<Descriptor>,
    stats: BlockStats,
}

impl Block {
    /// Opens the image described by `config`.
    pub fn open(config: &BlockConfig) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .open(&config.path)
            .map_err(|source| BlockError::Open {
                path: config.path.clone(),
                source,
            })?;
        Self::new(file, &config.path, config.read_only, config.id.clone())
    }

    /// Wraps an already open image (`path` is only reported, e.g. by `query-block`).
    pub fn new(
        file: File,
        path: &Path,
        read_only: bool,
        id: Option<String>,
    ) -> Result<Self, BlockError> {
        let disk = DiskFile::new(file, !read_only)?;
        let mut id = id.unwrap_or_else(|| disk.default_serial());
        truncate_utf8(&mut id, VIRTIO_BLK_ID_BYTES as usize);
        let mut features = BASE_FEATURES | (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_SEG_MAX);
        if read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
            if disk.supports_punch_hole() {
                features |= 1 << VIRTIO_BLK_F_DISCARD;
            }
        }
        if disk.size() % SECTOR_SIZE != 0 {
            log::warn!(
                "virtio-blk: {} is not a multiple of 512 bytes; the tail is not visible",
                path.display()
            );
        }
        Ok(Self {
            disk,
            path: path.to_path_buf(),
            read_only,
            id,
            features,
            acked_features: 0,
            descs: Vec::with_capacity(usize::from(BLOCK_QUEUE_SIZE)),
            stats: BlockStats::default(),
        })
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the disk is read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The ID string returned by GET_ID.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.disk.size() >> SECTOR_SHIFT
    }

    /// The I/O counters.
    pub fn stats(&self) -> &BlockStats {
        &self.stats
    }

    fn capacity_bytes(&self) -> u64 {
        self.capacity_sectors() << SECTOR_SHIFT
    }

    fn acked(&self, bit: u32) -> bool {
        self.acked_features & (1 << bit) != 0
    }

    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..8].copy_from_slice(&self.capacity_sectors().to_le_bytes());
        // seg_max: the ring minus the header and status descriptors.
        let seg_max = u32::from(BLOCK_QUEUE_SIZE) - 2;
        c[12..16].copy_from_slice(&seg_max.to_le_bytes());
        // num_queues
        c[34..36].copy_from_slice(&1u16.to_le_bytes());
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
        // discard_sector_alignment: one 4 KiB page.
        c[44..48].copy_from_slice(&8u32.to_le_bytes());
        c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
        c[56] = u8::from(self.disk.supports_punch_hole());
        c
    }

    /// Handles one chain; returns the used length.
    fn handle_chain(&mut self, chain: DescriptorChain<&GuestMemory>, mem: &GuestMemory) -> u32 {
        let mut descs = std::mem::take(&mut self.descs);
        let used = self.handle_collected(chain, mem, &mut descs);
        self.descs = descs;
        used
    }

    fn handle_collected(
        &mut self,
        chain: DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
        descs: &mut Vec<Descriptor>,
    ) -> u32 {
        let parsed = match collect_chain(chain, mem, descs) {
            Ok(p) => p,
            Err(e) => {
                log::warn!("virtio-blk: malformed request: {e}");
                self.stats.invalid_operations += 1;
                return 0;
            }
        };
        let readable = parsed.readable(descs);
        let writable = parsed.writable(descs);
        let Some(status_offset) = writable.len().checked_sub(1) else {
            log::warn!("virtio-blk: request without a status byte");
            self.stats.invalid_operations += 1;
            return 0;
        };
        let completion = self.execute(mem, readable, writable, status_offset);
        if completion.status != VIRTIO_BLK_S_OK as u8 {
            log::debug!(
                "virtio-blk: request completed with status {}",
                completion.status
            );
        }
        if let Err(e) = writable.write_at(mem, status_offset, &[completion.status]) {
            log::warn!("virtio-blk: cannot write the status byte: {e}");
            return 0;
        }
        completion.written.saturating_add(1)
    }

    /// Runs the request; `data_in_len` is the room for data in the writable part.
    fn execute(
        &mut self,
        mem: &GuestMemory,
        readable: Segments<'_>,
        writable: Segments<'_>,
        data_in_len: u64,
    ) -> Completion {
        let mut hdr = [0u8; HEADER_LEN];
        if readable.read_at(mem, 0, &mut hdr).is_err() {
            log::warn!("virtio-blk: request without a complete header");
            self.stats.invalid_operations += 1;
            return Completion::status(VIRTIO_BLK_S_IOERR);
        }
        let header = RequestHeader::parse(&hdr);
        let data_out_len = readable.len() - HEADER_LEN as u64;
        let misdirected = match header.request_type {
            RequestType::In | RequestType::GetId => data_out_len != 0,
            RequestType::Out => data_in_len != 0,
            _ => false,
        };
        if misdirected {
            log::debug!(
                "virtio-blk: {:?} request with data buffers of the wrong direction",
                header.request_type
            );
            self.stats.invalid_operations += 1;
            return Completion::status(VIRTIO_BLK_S_IOERR);
        }
        match header.request_type {
            RequestType::In => self.read(mem, header.sector, writable, data_in_len),
            RequestType::Out => self.write(mem, header.sector, readable, data_out_len),
            RequestType::Flush => self.flush(),
            RequestType::GetId => self.get_id(mem, writable, data_in_len),
            RequestType::Discard if self.acked(VIRTIO_BLK_F_DISCARD) => {
                self.discard_or_zero(mem, readable, data_out_len, false)
            }
            RequestType::WriteZeroes if self.acked(VIRTIO_BLK_F_WRITE_ZEROES) => {
                self.discard_or_zero(mem, readable, data_out_len, true)
            }
            other => {
                log::debug!("virtio-blk: unsupported request {other:?}");
                self.stats.invalid_operations += 1;
                Completion::status(VIRTIO_BLK_S_UNSUPP)
            }
        }
    }

    fn read(&mut self, mem: &GuestMemory, sector: u64, out: Segments<'_>, len: u64) -> Completion {
        let Some((offset, len)) = self.check_io(sector, len) else {
            self.stats.failed_rd_operations += 1;
            return Completion::status(VIRTIO_BLK_S_IOERR);
        };
        let start = Instant::now();
        let mut pos = offset;
        let result = out.for_each_range(0, len, |addr, n| {
            self.disk.read_to_guest(mem, pos, addr, n)?;
            pos += n as u64;
            Ok::<(), IoFailure>(())
        });
        self.stats.rd_total_time_ns += elapsed_ns(start);
        match result {
            Ok(()) => {
                self.stats.rd_operations += 1;
                self.stats.rd_bytes += len;
                Completion {
                    status: VIRTIO_BLK_S_OK as u8,
                    // `len` fits: it is at most the chain's length, which is below 4 GiB.
                    written: u32::try_from(len).unwrap_or(u32::MAX),
                }
            }
            Err(e) => {
                log::warn!(
                    "virtio-blk: read of {} at sector {sector} failed: {e}",
                    self.path.display()
                );
                self.stats.failed_rd_operations += 1;
                Completion::status(VIRTIO_BLK_S_IOERR)
            }
        }
    }

    fn write(
        &mut self,
        mem: &GuestMemory,
        sector: u64,
        input: Segments<'_>,
        len: u64,
    ) -> Completion {
        if self.read_only {
            log::debug!("virtio-blk: write to read-only disk refused");
            self.stats.failed_wr_operations += 1;
            return Completion::status(VIRTIO_BLK_S_IOERR);
        }
        let Some((offset, len)) = self.check_io(sector, len) else {
            self.stats.failed_wr_operations += 1;
            return Completion::status(VIRTIO_BLK_S_IOERR);
        };
        let start = Instant::now();
        let mut pos = offset;
        let result = input.for_each_range(HEADER_LEN as u64, len, |addr, n| {
            self.disk.write_from_guest(mem, pos, addr, n)?;
            pos += n as u64;
            Ok::<(), IoFailure>(())
        });
        self.stats.wr_total_time_ns += elapsed_ns(start);
        match result {
            Ok(()) => {
                self.stats.wr_operations += 1;
                self.stats.wr_bytes += len;
                Completion::status(VIRTIO_BLK_S_OK)
            }
            Err(e) => {
                log::warn!(
                    "virtio-blk: write of {} at sector {sector} failed: {e}",
                    self.path.display()
                );
                self.stats.failed_wr_operations += 1;
                Completion::status(VIRTIO_BLK_S_IOERR)
            }
        }
    }

    /// Checks a read/write range: whole sectors, inside the disk. Returns `(offset, len)`.
    fn check_io(&self, sector: u64, len: u64) -> Option<(u64, u64)> {
        if len % SECTOR_SIZE != 0 {
            log::debug!("virtio-blk: data length {len} is not a multiple of 512");
            return None;
        }
        let range = byte_range(sector, len, self.capacity_bytes());
        if range.is_none() {
            log::debug!("virtio-blk: sector {sector} + {len} bytes is past the end of the disk");
        }
        range
    }

    fn flush(&mut self) -> Completion {
        if self.read_only {
            self.stats.flush_operations += 1;
            return Completion::status(VIRTIO_BLK_S_OK);
        }
        let start = Instant::now();
        let result = self.disk.flush();
        self.stats.flush_total_time_ns += elapsed_ns(start);
        match result {
            Ok(()) => {
                self.stats.flush_operations += 1;
                Completion::status(VIRTIO_BLK_S_OK)
            }
            Err(e) => {
                log::warn!("virtio-blk: flush of {} failed: {e}", self.path.display());
                self.stats.failed_flush_operations += 1;
                Completion::status(VIRTIO_BLK_S_IOERR)
            }
        }
    }

    fn get_id(&mut self, mem: &GuestMemory, out: Segments<'_>, room: u64) -> Completion {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let bytes = self.id.as_bytes();
        let n = bytes.len().min(id.len());
        id[..n].copy_from_slice(&bytes[..n]);
        let len = usize::try_from(room).unwrap_or(usize::MAX).min(id.len());
        match out.write_at(mem, 0, &id[..len]) {
            Ok(()) => Completion {
                status: VIRTIO_BLK_S_OK as u8,
                written: len as u32,
            },
            Err(e) => {
                log::warn!("virtio-blk: cannot write the ID: {e}");
                Completion::status(VIRTIO_BLK_S_IOERR)
            }
        }
    }

    fn discard_or_zero(
        &mut self,
        mem: &GuestMemory,
        input: Segments<'_>,
        len: u64,
        zero: bool,
    ) -> Completion {
        let count = len / SEGMENT_LEN as u64;
        let result = if len % SEGMENT_LEN as u64 != 0
            || count == 0
            || count > u64::from(MAX_DISCARD_SEGMENTS)
        {
            log::debug!("virtio-blk: discard/write-zeroes payload of {len} bytes is malformed");
            Err(VIRTIO_BLK_S_UNSUPP)
        } else {
            (0..count).try_for_each(|i| {
                let mut raw = [0u8; SEGMENT_LEN];
                let at = HEADER_LEN as u64 + i * SEGMENT_LEN as u64;
                input
                    .read_at(mem, at, &mut raw)
                    .map_err(|_| VIRTIO_BLK_S_IOERR)?;
                self.apply_segment(Segment::parse(&raw), zero)
            })
        };
        match (result, zero) {
            (Ok(()), true) => {
                self.stats.wr_operations += 1;
                Completion::status(VIRTIO_BLK_S_OK)
            }
            (Ok(()), false) => {
                self.stats.unmap_operations += 1;
                Completion::status(VIRTIO_BLK_S_OK)
            }
            (Err(status), true) => {
                self.stats.failed_wr_operations += 1;
                Completion::status(status)
            }
            (Err(status), false) => {
                self.stats.failed_unmap_operations += 1;
                Completion::status(status)
            }
        }
    }

    fn apply_segment(&mut self, seg: Segment, zero: bool) -> Result<(), u32> {
        let allowed_flags = if zero { WRITE_ZEROES_FLAG_UNMAP } else { 0 };
        if seg.flags & !allowed_flags != 0 {
            log::debug!("virtio-blk: segment flags {:#x} not supported", seg.flags);
            return Err(VIRTIO_BLK_S_UNSUPP);
        }
        if seg.num_sectors > MAX_DISCARD_SECTORS {
            return Err(VIRTIO_BLK_S_IOERR);
        }
        let bytes = u64::from(seg.num_sectors) << SECTOR_SHIFT;
        let Some((offset, len)) = byte_range(seg.sector, bytes, self.capacity_bytes()) else {
            log::debug!(
                "virtio-blk: segment at sector {} is past the end of the disk",
                seg.sector
            );
            return Err(VIRTIO_BLK_S_IOERR);
        };
        let result = if zero {
            self.disk
                .write_zeroes(offset, len, seg.flags & WRITE_ZEROES_FLAG_UNMAP != 0)
        } else {
            self.disk.punch_hole(offset, len)
        };
        match result {
            Ok(()) => {
                self.stats.unmap_bytes += len;
                Ok(())
            }
            Err(e) => {
                log::warn!(
                    "virtio-blk: discard/write-zeroes on {} failed: {e}",
                    self.path.display()
                );
                Err(VIRTIO_BLK_S_IOERR)
            }
        }
    }
}

/// Why a data transfer failed: a chain shorter than announced, or the disk.
#[derive(Debug, thiserror::Error)]
enum IoFailure {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error(transparent)]
    Disk(#[from] DiskError),
}

fn elapsed_ns(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Truncates `s` to at most `max` bytes on a character boundary.
fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

impl VirtioDevice for Block {
    type State = BlockState;

    const DEVICE_TYPE: u32 = VIRTIO_ID_BLOCK;
    const QUEUE_MAX_SIZES: &'static [u16] = &[BLOCK_QUEUE_SIZE];

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn activate(&mut self, acked_features: u64) -> Result<(), VirtioError> {
        self.acked_features = acked_features;
        Ok(())
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        let Some(queue) = queues.get_mut(index) else {
            return false;
        };
        process_chains(queue, mem, |chain| self.handle_chain(chain, mem))
    }

    fn reset(&mut self) {
        self.acked_features = 0;
    }

    fn save_state(&self) -> BlockState {
        BlockState {
            capacity_sectors: self.capacity_sectors(),
            read_only: self.read_only,
            id: self.id.clone(),
            acked_features: self.acked_features,
        }
    }

    fn restore_state(&mut self, state: &BlockState) -> Result<(), VirtioError> {
        if state.capacity_sectors != self.capacity_sectors() || state.read_only != self.read_only {
            return Err(VirtioError::InvalidState(format!(
                "disk {} has {} sectors (read-only: {}), the saved disk had {} (read-only: {})",
                self.path.display(),
                self.capacity_sectors(),
                self.read_only,
                state.capacity_sectors,
                state.read_only
            )));
        }
        if state.acked_features & !self.features != 0 {
            return Err(VirtioError::InvalidState(format!(
                "saved features {:#x} not offered by disk {}",
                state.acked_features,
                self.path.display()
            )));
        }
        self.id = state.id.clone();
        truncate_utf8(&mut self.id, VIRTIO_BLK_ID_BYTES as usize);
        self.acked_features = state.acked_features;
        Ok(())
    }
}

/// Copies `config[offset..]` into `data`, zero-filling past the end.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}
