//! The raw-file back end of virtio-blk: positioned I/O straight into or out of guest memory,
//! fsync, and hole punching / zeroing where the host file supports them.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;

use vm_memory::bitmap::{AtomicBitmap, Bitmap, BS};
use vm_memory::{GuestAddress, GuestMemoryBackend, VolatileSlice};

use super::super::GuestMemory;

/// Largest chunk written when zeroing a range by hand.
const ZERO_CHUNK: usize = 64 * 1024;
/// Source of the zeroes written when the file cannot zero a range itself.
static ZEROES: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];

/// Which way [`DiskFile::transfer`] moves data.
#[derive(Clone, Copy, Debug)]
enum Direction {
    /// From the file into guest memory (`pread64`).
    ToGuest,
    /// From guest memory into the file (`pwrite64`).
    FromGuest,
}

impl Direction {
    /// The error of a transfer that moved nothing: end of file, or a write of zero bytes.
    fn stalled(self) -> io::ErrorKind {
        match self {
            Direction::ToGuest => io::ErrorKind::UnexpectedEof,
            Direction::FromGuest => io::ErrorKind::WriteZero,
        }
    }
}

/// Errors of the disk file.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The file's size could not be determined.
    #[error("cannot determine the disk size: {0}")]
    Size(#[source] io::Error),
    /// An I/O call failed.
    #[error("disk I/O failed: {0}")]
    Io(#[from] io::Error),
    /// A guest buffer could not be mapped.
    #[error("guest buffer at {0:#x} is not in guest memory")]
    GuestMemory(u64),
}

/// An open raw disk image.
#[derive(Debug)]
pub struct DiskFile {
    file: File,
    size: u64,
    punch_hole: bool,
    zero_range: bool,
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let offset =
        libc::off64_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let len =
        libc::off64_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        // SAFETY: fallocate only acts on the fd, which `file` keeps open for the call.
        let ret = unsafe { libc::fallocate64(file.as_raw_fd(), mode, offset, len) };
        if ret == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn is_unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENODEV)
    )
}

impl DiskFile {
    /// Wraps an open image; `writable` says whether it was opened for writing (only then is
    /// hole punching probed).
    pub fn new(mut file: File, writable: bool) -> Result<Self, DiskError> {
        let size = file.seek(SeekFrom::End(0)).map_err(DiskError::Size)?;
        // Punching a hole past the end of the file (size kept) changes nothing, so it is a
        // side-effect-free probe of the file system's support.
        let punch_hole = writable
            && fallocate(
                &file,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                size,
                1,
            )
            .is_ok();
        Ok(Self {
            file,
            size,
            punch_hole,
            zero_range: writable,
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether ranges can be deallocated (discard, write-zeroes with unmap).
    pub fn supports_punch_hole(&self) -> bool {
        self.punch_hole
    }

    /// A stable identifier for the image: device and inode numbers.
    pub fn default_serial(&self) -> String {
        match self.file.metadata() {
            Ok(m) => format!("{:x}-{:x}", m.dev(), m.ino()),
            Err(_) => String::from("skiff-disk"),
        }
    }

    /// Calls `f` on each host slice of the guest range `addr..addr + len`.
    fn for_each_slice(
        mem: &GuestMemory,
        addr: GuestAddress,
        len: usize,
        mut f: impl FnMut(&VolatileSlice<'_, BS<'_, AtomicBitmap>>) -> Result<(), DiskError>,
    ) -> Result<(), DiskError> {
        for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
            let slice = slice.map_err(|_| DiskError::GuestMemory(addr.0))?;
            f(&slice)?;
        }
        Ok(())
    }

    /// Reads `len` bytes at file `offset` into guest memory at `addr`.
    pub fn read_to_guest(
        &self,
        mem: &GuestMemory,
        offset: u64,
        addr: GuestAddress,
        len: usize,
    ) -> Result<(), DiskError> {
        self.transfer(Direction::ToGuest, mem, offset, addr, len)
    }

    /// Writes `len` bytes from guest memory at `addr` to file `offset`.
    pub fn write_from_guest(
        &self,
        mem: &GuestMemory,
        offset: u64,
        addr: GuestAddress,
        len: usize,
    ) -> Result<(), DiskError> {
        self.transfer(Direction::FromGuest, mem, offset, addr, len)
    }

    /// Moves `len` bytes between file `offset` and guest memory at `addr`, one host slice at
    /// a time; guest pages read into are marked dirty.
    fn transfer(
        &self,
        dir: Direction,
        mem: &GuestMemory,
        offset: u64,
        addr: GuestAddress,
        len: usize,
    ) -> Result<(), DiskError> {
        let mut pos = offset;
        Self::for_each_slice(mem, addr, len, |slice| {
            let done = match dir {
                Direction::ToGuest => {
                    let guard = slice.ptr_guard_mut();
                    // SAFETY: the guard keeps `guard.len()` bytes of mapped guest memory valid
                    // for writes at `as_ptr()` while it lives.
                    unsafe { self.transfer_all(dir, guard.as_ptr(), guard.len(), pos)? };
                    slice.bitmap().mark_dirty(0, guard.len());
                    guard.len()
                }
                Direction::FromGuest => {
                    let guard = slice.ptr_guard();
                    // SAFETY: the guard keeps `guard.len()` bytes of mapped guest memory valid
                    // for reads at `as_ptr()` while it lives; they are only read.
                    unsafe { self.transfer_all(dir, guard.as_ptr().cast_mut(), guard.len(), pos)? };
                    guard.len()
                }
            };
            pos += done as u64;
            Ok(())
        })
    }

    /// Moves all `len` bytes at `ptr` to or from file position `pos` (`pread64`/`pwrite64`),
    /// continuing after short transfers and `EINTR`.
    ///
    /// # Safety
    ///
    /// `len` bytes at `ptr` must stay mapped for the call: writable for
    /// [`Direction::ToGuest`], readable for [`Direction::FromGuest`] (which only reads them).
    /// Guest memory is shared with the guest, which is why it is only accessed through this
    /// raw pointer and never as a Rust reference.
    unsafe fn transfer_all(
        &self,
        dir: Direction,
        ptr: *mut u8,
        len: usize,
        pos: u64,
    ) -> Result<(), DiskError> {
        let fd = self.file.as_raw_fd();
        let mut done = 0usize;
        while done < len {
            let at = libc::off64_t::try_from(pos + done as u64)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: the caller keeps `len` bytes at `ptr` mapped (writable for `ToGuest`);
            // `done < len` keeps the range inside them.
            let ret = unsafe {
                let buf = ptr.add(done);
                match dir {
                    Direction::ToGuest => libc::pread64(fd, buf.cast(), len - done, at),
                    Direction::FromGuest => libc::pwrite64(fd, buf.cast(), len - done, at),
                }
            };
            match ret {
                0 => return Err(io::Error::from(dir.stalled()).into()),
                n if n < 0 => {
                    let err = io::Error::last_os_error();
                    if err.kind() != io::ErrorKind::Interrupted {
                        return Err(err.into());
                    }
                }
                n => done += usize::try_from(n).unwrap_or(0),
            }
        }
        Ok(())
    }

    /// Makes all written data durable (`fsync`).
    pub fn flush(&self) -> Result<(), DiskError> {
        self.file.sync_all().map_err(DiskError::Io)
    }

    /// Deallocates a byte range; reads of it return zeroes afterwards.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        fallocate(
            &self.file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
        .map_err(DiskError::Io)
    }

    /// Zeroes a byte range, without deallocating it unless `may_unmap`.
    pub fn write_zeroes(
        &mut self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> Result<(), DiskError> {
        if len == 0 {
            return Ok(());
        }
        if may_unmap && self.punch_hole {
            return self.punch_hole(offset, len);
        }
        if self.zero_range {
            match fallocate(
                &self.file,
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Ok(()) => return Ok(()),
                Err(e) if is_unsupported(&e) => {
                    log::debug!(
                        "virtio-blk: FALLOC_FL_ZERO_RANGE unsupported ({e}); writing zeroes"
                    );
                    self.zero_range = false;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from(len - done)
                .unwrap_or(ZERO_CHUNK)
                .min(ZERO_CHUNK);
            let at = libc::off64_t::try_from(offset + done)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: ZEROES is a static buffer of ZERO_CHUNK >= n readable bytes.
            let ret =
                unsafe { libc::pwrite64(self.file.as_raw_fd(), ZEROES.as_ptr().cast(), n, at) };
            if ret < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err.into());
            }
            if ret == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero).into());
            }
            done += u64::try_from(ret).unwrap_or(0);
        }
        Ok(())
    }
}
