//! userfaultfd: demand paging of guest RAM for the destination of a postcopy migration.
//!
//! After LISTEN, every page of guest RAM the destination has not received yet is "missing": a
//! [`Userfault`] registered over the RAM makes any access to such a page block, and queues a
//! fault message for the VMM. The destination's fault thread polls [`Userfault`]'s fd
//! (together with an eventfd to stop it), takes the faulting address with
//! [`Userfault::read_fault`] and asks the source for the page; whoever receives pages places
//! them with [`Userfault::copy`] (or [`Userfault::zero`] for an all-zero page), which maps the
//! whole page atomically and wakes every thread waiting on it. Never write a missing page of
//! a registered range any other way: the writer would fault on it itself.
//!
//! Opening: the `userfaultfd(2)` system call *without* `UFFD_USER_MODE_ONLY`, because KVM
//! touches guest RAM from kernel context (get_user_pages when the vCPU faults) and a
//! user-mode-only fd would not see those faults; that needs `CAP_SYS_PTRACE` (Linux 5.11+) or
//! `vm.unprivileged_userfaultfd=1`. If the call is refused, `/dev/userfaultfd`
//! (`USERFAULTFD_IOC_NEW`) is tried, which only needs access to the device node.
//!
//! Why raw `libc` and not the `userfaultfd` crate: the crate's user-mode-only default is the
//! wrong one for KVM, its `-sys` crate runs bindgen (libclang) unless a kernel-version feature
//! is chosen, it pulls in `nix`, `bitflags` and `cfg-if`, and its `copy` reports EEXIST as an
//! error rather than the "already placed: wake and carry on" postcopy needs. What we use is six
//! ioctls, one `read` and `mincore`, with the structures below taken from
//! `include/uapi/linux/userfaultfd.h`.
//!
//! Checked on our development host (software nested KVM, see
//! `/work/shared/reference/kvm-here.md`) with the integration tests' probe
//! (`tests/common/kvm.rs`, `userfault_probe`): with this fd a vCPU whose page tables, code and
//! data all start missing runs to completion, each page placed by a thread; with a
//! `UFFD_USER_MODE_ONLY` fd no fault reaches the thread and KVM reports the access as an MMIO
//! exit or KVM_EXIT_SHUTDOWN.

use std::fs::OpenOptions;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Size of the pages this module places and reports (x86_64 base pages; hugetlbfs is not
/// supported).
pub const PAGE_SIZE: usize = 4096;
/// [`PAGE_SIZE`] as a `u64`, for host addresses.
const PAGE_SIZE_U64: u64 = PAGE_SIZE as u64;

// ioctl request encoding (include/uapi/asm-generic/ioctl.h).
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = 8;
const IOC_SIZESHIFT: u32 = 16;
const IOC_DIRSHIFT: u32 = 30;
const IOC_SIZEMASK: libc::c_ulong = (1 << 14) - 1;
const IOC_NONE: u32 = 0;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// An ioctl request number: direction, type, number and argument size.
const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> libc::c_ulong {
    ((dir as libc::c_ulong) << IOC_DIRSHIFT)
        | ((ty as libc::c_ulong) << IOC_TYPESHIFT)
        | ((nr as libc::c_ulong) << IOC_NRSHIFT)
        | ((size as libc::c_ulong) << IOC_SIZESHIFT)
}

/// The userfaultfd API version asked for in the handshake.
const UFFD_API: u64 = 0xaa;
/// ioctl type of the userfaultfd ioctls.
const UFFDIO: u32 = 0xaa;
// ioctl numbers, also the bit positions in the `ioctls` masks the kernel returns.
const UFFDIO_REGISTER_NR: u32 = 0x00;
const UFFDIO_UNREGISTER_NR: u32 = 0x01;
const UFFDIO_WAKE_NR: u32 = 0x02;
const UFFDIO_COPY_NR: u32 = 0x03;
const UFFDIO_ZEROPAGE_NR: u32 = 0x04;
const UFFDIO_API_NR: u32 = 0x3f;

/// `UFFDIO_API`: version and feature handshake, required once per fd before anything else.
const UFFDIO_API: libc::c_ulong = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    UFFDIO_API_NR,
    size_of::<UffdioApi>(),
);
/// `UFFDIO_REGISTER`: start tracking missing pages of a range.
const UFFDIO_REGISTER: libc::c_ulong = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    UFFDIO_REGISTER_NR,
    size_of::<UffdioRegister>(),
);
/// `UFFDIO_UNREGISTER`: stop tracking a range (waiters retry as normal faults).
const UFFDIO_UNREGISTER: libc::c_ulong = ioc(
    IOC_READ,
    UFFDIO,
    UFFDIO_UNREGISTER_NR,
    size_of::<UffdioRange>(),
);
/// `UFFDIO_WAKE`: wake threads waiting on a range.
const UFFDIO_WAKE: libc::c_ulong = ioc(IOC_READ, UFFDIO, UFFDIO_WAKE_NR, size_of::<UffdioRange>());
/// `UFFDIO_COPY`: atomically map copies of the given bytes over missing pages.
const UFFDIO_COPY: libc::c_ulong = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    UFFDIO_COPY_NR,
    size_of::<UffdioCopy>(),
);
/// `UFFDIO_ZEROPAGE`: atomically map zero pages over missing pages.
const UFFDIO_ZEROPAGE: libc::c_ulong = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    UFFDIO_ZEROPAGE_NR,
    size_of::<UffdioZeropage>(),
);
/// ioctl type of `/dev/userfaultfd`.
const USERFAULTFD_IOC: u32 = 0xaa;
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`: a new userfaultfd, flags by value.
const USERFAULTFD_IOC_NEW: libc::c_ulong = ioc(IOC_NONE, USERFAULTFD_IOC, 0x00, 0);
/// The device node offering userfaultfds to whoever may open it (Linux 6.1+).
const USERFAULTFD_DEVICE: &str = "/dev/userfaultfd";

/// Flags of the new fd: close on exec, and `read` returns EAGAIN instead of blocking.
const OPEN_FLAGS: libc::c_int = libc::O_CLOEXEC | libc::O_NONBLOCK;
/// `UFFDIO_REGISTER_MODE_MISSING`: report accesses to pages not mapped yet.
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// `mode` of `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` that wakes the waiters (no `_MODE_DONTWAKE`).
const PLACE_AND_WAKE: u64 = 0;
/// `UFFD_EVENT_PAGEFAULT`: the only event we expect (no event features are requested).
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// ioctls the handshake must offer.
const API_IOCTLS: u64 = (1 << UFFDIO_REGISTER_NR) | (1 << UFFDIO_UNREGISTER_NR);
/// ioctls a registered range must offer (what QEMU's postcopy requires too).
const RANGE_IOCTLS: u64 = (1 << UFFDIO_COPY_NR) | (1 << UFFDIO_ZEROPAGE_NR) | (1 << UFFDIO_WAKE_NR);
/// Consecutive EAGAINs without progress (the address space is changing) before giving up.
const MAX_EAGAIN_RETRIES: u32 = 10_000;
/// `mincore` vector bit: the page is resident.
const MINCORE_RESIDENT: u8 = 1;
/// Printed with open failures.
const PERMISSION_HINT: &str = "kernel-mode faults (KVM) need root / CAP_SYS_PTRACE or \
     sysctl vm.unprivileged_userfaultfd=1, or read-write access to /dev/userfaultfd";

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_copy`; `copy` receives the bytes placed or a negative errno.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffdio_zeropage`; `zeropage` receives the bytes placed or a negative errno.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg`: an event header and a 24-byte union; for a page fault the union holds
/// `flags`, `address`, `feat.ptid`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    arg: [u64; 3],
}

/// Index of the faulting address in [`UffdMsg::arg`].
const MSG_PAGEFAULT_ADDRESS: usize = 1;

const _: () = {
    assert!(size_of::<UffdioApi>() == 24);
    assert!(size_of::<UffdioRange>() == 16);
    assert!(size_of::<UffdioRegister>() == 32);
    assert!(size_of::<UffdioCopy>() == 40);
    assert!(size_of::<UffdioZeropage>() == 32);
    assert!(size_of::<UffdMsg>() == 32);
};

/// Errors of the userfaultfd layer.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// Neither the system call nor the device node gave a userfaultfd.
    #[error(
        "cannot create a userfaultfd: userfaultfd(2): {syscall}; {USERFAULTFD_DEVICE}: {device} \
         ({PERMISSION_HINT})"
    )]
    Open {
        /// Why the system call failed.
        syscall: io::Error,
        /// Why the device node failed.
        device: io::Error,
    },
    /// The `UFFDIO_API` handshake was refused.
    #[error("userfaultfd API handshake (UFFDIO_API) failed: {0}")]
    Api(io::Error),
    /// The kernel does not offer an ioctl we need.
    #[error("userfaultfd {what}: the kernel offers ioctls {offered:#x}, {missing:#x} missing")]
    MissingIoctls {
        /// Where they were expected.
        what: &'static str,
        /// The mask the kernel returned.
        offered: u64,
        /// The bits we need and did not get.
        missing: u64,
    },
    /// A range is not made of whole pages.
    #[error("range {addr:#x}+{len:#x} is not page aligned")]
    Unaligned {
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
    },
    /// A userfaultfd ioctl on a range failed.
    #[error("{op} of {addr:#x}+{len:#x} failed: {source}")]
    Range {
        /// The ioctl (`UFFDIO_REGISTER`, `UFFDIO_COPY`, ...).
        op: &'static str,
        /// Start of the range (for COPY/ZEROPAGE: of the part not yet placed).
        addr: u64,
        /// Length of the range.
        len: u64,
        /// The OS error.
        source: io::Error,
    },
    /// Reading a fault message failed.
    #[error("reading the userfaultfd failed: {0}")]
    Read(io::Error),
    /// The kernel returned a partial fault message.
    #[error("short read of {0} bytes from the userfaultfd")]
    ShortRead(usize),
    /// `mincore` failed (e.g. ENOMEM: part of the range is not mapped).
    #[error("mincore of {addr:#x}+{len:#x} failed: {source}")]
    Mincore {
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
        /// The OS error.
        source: io::Error,
    },
}

/// A userfaultfd handling missing-page faults of registered private anonymous memory.
///
/// All methods take `&self` and may be called from several threads at once (a fault thread
/// reading faults while other threads place pages).
#[derive(Debug)]
pub struct Userfault {
    fd: OwnedFd,
}

impl Userfault {
    /// Opens a non-blocking, close-on-exec userfaultfd able to see kernel-mode (KVM) faults,
    /// and does the API handshake.
    pub fn new() -> Result<Userfault, UffdError> {
        let uffd = Userfault { fd: open_fd()? };
        uffd.handshake()?;
        Ok(uffd)
    }

    fn handshake(&self) -> Result<(), UffdError> {
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        self.ioctl(UFFDIO_API, &mut api).map_err(UffdError::Api)?;
        require_ioctls("handshake", api.ioctls, API_IOCTLS)
    }

    /// Starts reporting accesses to missing pages of `addr..addr + len` (page aligned).
    ///
    /// Fails with [`UffdError::MissingIoctls`] (and leaves the range unregistered) unless the
    /// kernel offers `UFFDIO_COPY`, `UFFDIO_ZEROPAGE` and `UFFDIO_WAKE` on it.
    ///
    /// # Safety
    ///
    /// Until it is unregistered, any thread can fill the missing pages of the range with
    /// arbitrary bytes through [`Userfault::copy`], and any access to a missing page blocks
    /// until a page is placed. The range must be private anonymous memory whose contents only
    /// raw-pointer users look at (guest RAM), never memory behind Rust references or
    /// allocator-owned memory.
    pub unsafe fn register(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        check_range(addr, len)?;
        let mut reg = UffdioRegister {
            range: UffdioRange { start: addr, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        self.ioctl(UFFDIO_REGISTER, &mut reg)
            .map_err(range_error("UFFDIO_REGISTER", addr, len))?;
        if let Err(e) = require_ioctls("registered range", reg.ioctls, RANGE_IOCTLS) {
            self.unregister(addr, len)?;
            return Err(e);
        }
        log::debug!("userfaultfd: registered {addr:#x}+{len:#x}");
        Ok(())
    }

    /// Stops reporting faults in `addr..addr + len`; threads waiting there retry as ordinary
    /// faults (a missing page then reads as zeroes).
    pub fn unregister(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        check_range(addr, len)?;
        let mut range = UffdioRange { start: addr, len };
        self.ioctl(UFFDIO_UNREGISTER, &mut range)
            .map_err(range_error("UFFDIO_UNREGISTER", addr, len))
    }

    /// Places `src` (whole pages) at `dst` and wakes the threads waiting on those pages.
    ///
    /// Pages already present are left as they are (EEXIST: someone placed them first) and
    /// their waiters are woken; partial progress (EAGAIN) is retried from where it stopped.
    pub fn copy(&self, dst: u64, src: &[u8]) -> Result<(), UffdError> {
        check_range(dst, src.len() as u64)?;
        self.place("UFFDIO_COPY", dst, src.len(), |at, done| {
            let rest = &src[done..];
            let mut arg = UffdioCopy {
                dst: at,
                src: rest.as_ptr() as u64,
                len: rest.len() as u64,
                mode: PLACE_AND_WAKE,
                copy: 0,
            };
            (self.ioctl(UFFDIO_COPY, &mut arg), arg.copy)
        })
    }

    /// Maps zero pages over the missing pages of `dst..dst + len` (page aligned) and wakes
    /// their waiters, with the same EEXIST and EAGAIN handling as [`Userfault::copy`].
    pub fn zero(&self, dst: u64, len: u64) -> Result<(), UffdError> {
        check_range(dst, len)?;
        // x86_64: usize is 64 bits wide.
        let total = len as usize;
        self.place("UFFDIO_ZEROPAGE", dst, total, |at, done| {
            let mut arg = UffdioZeropage {
                range: UffdioRange {
                    start: at,
                    len: (total - done) as u64,
                },
                mode: PLACE_AND_WAKE,
                zeropage: 0,
            };
            (self.ioctl(UFFDIO_ZEROPAGE, &mut arg), arg.zeropage)
        })
    }

    /// Wakes the threads waiting on `addr..addr + len` (page aligned), e.g. after a page was
    /// placed with `_MODE_DONTWAKE` or found already present.
    pub fn wake(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        check_range(addr, len)?;
        let mut range = UffdioRange { start: addr, len };
        self.ioctl(UFFDIO_WAKE, &mut range)
            .map_err(range_error("UFFDIO_WAKE", addr, len))
    }

    /// The next faulting address (rounded down to its page), or `None` if no fault is queued.
    ///
    /// Never blocks; poll [`AsRawFd::as_raw_fd`] for readability to wait. A fault whose page
    /// another thread has placed meanwhile may still be reported (placing it again is a
    /// harmless EEXIST), or may be gone (`None`). Events other than page faults are logged
    /// and skipped.
    pub fn read_fault(&self) -> Result<Option<u64>, UffdError> {
        loop {
            let Some(msg) = self.read_msg()? else {
                return Ok(None);
            };
            if msg.event == UFFD_EVENT_PAGEFAULT {
                return Ok(Some(msg.arg[MSG_PAGEFAULT_ADDRESS] & !(PAGE_SIZE_U64 - 1)));
            }
            log::warn!("userfaultfd: skipping unexpected event {:#x}", msg.event);
        }
    }

    fn read_msg(&self) -> Result<Option<UffdMsg>, UffdError> {
        let mut msg = UffdMsg::default();
        loop {
            // SAFETY: reads at most size_of::<UffdMsg>() bytes into `msg`, a plain-old-data
            // struct for which any byte pattern is valid.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    std::ptr::addr_of_mut!(msg).cast(),
                    size_of::<UffdMsg>(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(None),
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(UffdError::Read(e)),
                }
            }
            let n = n.unsigned_abs();
            if n != size_of::<UffdMsg>() {
                return Err(UffdError::ShortRead(n));
            }
            return Ok(Some(msg));
        }
    }

    /// Runs the COPY/ZEROPAGE-like ioctl `op` (named `name`) until all `total` bytes from
    /// `dst` are placed. `op(at, done)` places the bytes from offset `done` at `at` and returns
    /// the ioctl's result and the kernel's progress field (bytes placed, or a negative errno).
    fn place(
        &self,
        name: &'static str,
        dst: u64,
        total: usize,
        mut op: impl FnMut(u64, usize) -> (io::Result<()>, i64),
    ) -> Result<(), UffdError> {
        let mut done = 0;
        let mut retries = 0;
        while done < total {
            let at = dst + done as u64;
            let (result, progress) = op(at, done);
            let Err(err) = result else {
                return Ok(());
            };
            match usize::try_from(progress) {
                // Partial placement (the kernel says EAGAIN): continue after it.
                Ok(placed) if placed > 0 => done += placed,
                _ => match err.raw_os_error() {
                    Some(libc::EEXIST) => {
                        // Placed by someone else first; its waiters may still be asleep if
                        // that was a DONTWAKE placement, so wake them and skip the page.
                        self.wake(at, PAGE_SIZE_U64)?;
                        done += PAGE_SIZE;
                    }
                    Some(libc::EAGAIN) if retries < MAX_EAGAIN_RETRIES => {
                        retries += 1;
                        std::thread::yield_now();
                        continue;
                    }
                    _ => return Err(range_error(name, at, (total - done) as u64)(err)),
                },
            }
            retries = 0;
        }
        Ok(())
    }

    /// Issues userfaultfd ioctl `request` with a pointer to `arg`.
    fn ioctl<T>(&self, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
        debug_assert_eq!(
            (request >> IOC_SIZESHIFT) & IOC_SIZEMASK,
            size_of::<T>() as libc::c_ulong,
            "ioctl {request:#x} called with the wrong argument type"
        );
        // SAFETY: every request used in this module takes a pointer to the `#[repr(C)]`
        // structure whose size is encoded in it (checked above in debug builds), and `arg` is
        // valid for reads and writes of that structure for the duration of the call.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), request, std::ptr::from_mut(arg)) };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

impl AsRawFd for Userfault {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Whether each page of `addr..addr + len` (page aligned, mapped) is present, without
/// faulting any in.
///
/// For private anonymous memory a page is present once it was written, read (the shared zero
/// page), or placed with [`Userfault::copy`] / [`Userfault::zero`]; pages discarded with
/// `MADV_DONTNEED` are absent again. A swapped-out page also reads as absent.
pub fn page_resident(addr: u64, len: u64) -> Result<Vec<bool>, UffdError> {
    check_range(addr, len)?;
    // x86_64: usize is 64 bits wide.
    let len_bytes = len as usize;
    let mut vec = vec![0u8; len_bytes / PAGE_SIZE];
    // SAFETY: mincore only inspects the page tables of the range and writes one byte per
    // page into `vec`, which has exactly that many.
    let ret = unsafe { libc::mincore(addr as *mut libc::c_void, len_bytes, vec.as_mut_ptr()) };
    if ret != 0 {
        return Err(UffdError::Mincore {
            addr,
            len,
            source: io::Error::last_os_error(),
        });
    }
    Ok(vec.iter().map(|b| b & MINCORE_RESIDENT != 0).collect())
}

/// Opens a userfaultfd with the system call, or failing that through the device node.
fn open_fd() -> Result<OwnedFd, UffdError> {
    let syscall = match open_with_syscall() {
        Ok(fd) => return Ok(fd),
        Err(e) => e,
    };
    log::debug!("userfaultfd(2) failed ({syscall}); trying {USERFAULTFD_DEVICE}");
    let device = match open_with_device() {
        Ok(fd) => return Ok(fd),
        Err(e) => e,
    };
    Err(UffdError::Open { syscall, device })
}

fn open_with_syscall() -> io::Result<OwnedFd> {
    // SAFETY: userfaultfd(2) takes one flags argument and returns a new fd or -1.
    let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, OPEN_FLAGS) };
    owned_fd(ret)
}

fn open_with_device() -> io::Result<OwnedFd> {
    let device = OpenOptions::new()
        .read(true)
        .write(true)
        .open(USERFAULTFD_DEVICE)?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the new fd's flags by value and returns a new fd or -1.
    let ret = unsafe { libc::ioctl(device.as_raw_fd(), USERFAULTFD_IOC_NEW, OPEN_FLAGS) };
    owned_fd(libc::c_long::from(ret))
}

/// Takes ownership of a new fd returned by a system call (or of its errno, if negative).
fn owned_fd(ret: libc::c_long) -> io::Result<OwnedFd> {
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(ret).map_err(|_| io::Error::other("fd number out of range"))?;
    // SAFETY: the kernel just created `fd` for us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Fails unless `offered` has every bit of `required`.
fn require_ioctls(what: &'static str, offered: u64, required: u64) -> Result<(), UffdError> {
    let missing = required & !offered;
    if missing != 0 {
        return Err(UffdError::MissingIoctls {
            what,
            offered,
            missing,
        });
    }
    Ok(())
}

/// Fails unless `addr` and `len` are page multiples.
fn check_range(addr: u64, len: u64) -> Result<(), UffdError> {
    if addr % PAGE_SIZE_U64 != 0 || len % PAGE_SIZE_U64 != 0 {
        return Err(UffdError::Unaligned { addr, len });
    }
    Ok(())
}

/// Maps an OS error of range ioctl `op` to [`UffdError::Range`].
fn range_error(op: &'static str, addr: u64, len: u64) -> impl FnOnce(io::Error) -> UffdError {
    move |source| UffdError::Range {
        op,
        addr,
        len,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::thread::{self, JoinHandle};
    use std::time::{Duration, Instant};

    /// How long a test waits for a fault before failing.
    const FAULT_TIMEOUT: Duration = Duration::from_secs(5);

    /// A private anonymous mapping of some pages, unmapped on drop.
    struct Mapping {
        addr: u64,
        len: usize,
    }

    impl Mapping {
        fn new(pages: usize) -> Mapping {
            let len = pages * PAGE_SIZE;
            // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(ptr, libc::MAP_FAILED, "mmap failed");
            Mapping {
                addr: ptr as u64,
                len,
            }
        }

        fn page(&self, index: usize) -> u64 {
            self.addr + (index * PAGE_SIZE) as u64
        }

        fn len(&self) -> u64 {
            self.len as u64
        }

        /// Copies out `len` bytes at `addr` (must be present, or faults are being served).
        fn read(addr: u64, len: usize) -> Vec<u8> {
            let mut out = vec![0u8; len];
            // SAFETY: callers pass a range inside a live Mapping.
            unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, out.as_mut_ptr(), len) };
            out
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: unmaps exactly what `new` mapped; no reader thread outlives the test.
            unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
        }
    }

    /// A page of `byte`s.
    fn pattern(byte: u8) -> Vec<u8> {
        vec![byte; PAGE_SIZE]
    }

    /// `pages` pages, page `i` filled with `first + i`.
    fn patterns(first: u8, pages: usize) -> Vec<u8> {
        (0..pages)
            .flat_map(|i| pattern(first.wrapping_add(i as u8)))
            .collect()
    }

    fn registered(pages: usize) -> (Userfault, Mapping) {
        let map = Mapping::new(pages);
        let uffd = Userfault::new().unwrap();
        // SAFETY: the mapping is only accessed through raw pointers by these tests.
        unsafe { uffd.register(map.addr, map.len()) }.unwrap();
        (uffd, map)
    }

    /// A thread copying out `addr..addr + len` (blocking on missing pages).
    fn spawn_reader(addr: u64, len: usize) -> JoinHandle<Vec<u8>> {
        thread::spawn(move || Mapping::read(addr, len))
    }

    /// Whether the fd becomes readable within `timeout`.
    fn readable(uffd: &Userfault, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap();
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        n == 1
    }

    /// The next fault, waiting up to [`FAULT_TIMEOUT`].
    fn wait_fault(uffd: &Userfault) -> u64 {
        let deadline = Instant::now() + FAULT_TIMEOUT;
        loop {
            if let Some(addr) = uffd.read_fault().unwrap() {
                return addr;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no fault within {FAULT_TIMEOUT:?}");
            readable(uffd, left.min(Duration::from_millis(100)));
        }
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xaa00);
    }

    #[test]
    fn device_node_fallback_opens_too() {
        // We run as root here, so both ways must work.
        let fd = open_with_device().unwrap();
        let uffd = Userfault { fd };
        uffd.handshake().unwrap();
    }

    #[test]
    fn copy_serves_a_blocked_reader() {
        let (uffd, map) = registered(1);
        // Start mid-page: the reported address is still the page's.
        let reader = spawn_reader(map.addr + 100, 8);
        assert_eq!(wait_fault(&uffd), map.addr);
        uffd.copy(map.addr, &pattern(0x5a)).unwrap();
        assert_eq!(reader.join().unwrap(), vec![0x5a; 8]);
        assert_eq!(Mapping::read(map.addr, PAGE_SIZE), pattern(0x5a));
    }

    #[test]
    fn zero_serves_a_blocked_reader() {
        let (uffd, map) = registered(2);
        let reader = spawn_reader(map.page(1), PAGE_SIZE);
        assert_eq!(wait_fault(&uffd), map.page(1));
        assert_eq!(page_resident(map.addr, map.len()).unwrap(), [false, false]);
        uffd.zero(map.page(1), PAGE_SIZE_U64).unwrap();
        assert_eq!(reader.join().unwrap(), pattern(0));
        assert_eq!(page_resident(map.addr, map.len()).unwrap(), [false, true]);
    }

    #[test]
    fn placing_a_present_page_again_is_ok_and_keeps_it() {
        let (uffd, map) = registered(1);
        uffd.copy(map.addr, &pattern(1)).unwrap();
        uffd.copy(map.addr, &pattern(2)).unwrap();
        uffd.zero(map.addr, PAGE_SIZE_U64).unwrap();
        assert_eq!(Mapping::read(map.addr, PAGE_SIZE), pattern(1));
    }

    #[test]
    fn copy_over_a_partly_present_range_fills_only_the_holes() {
        let (uffd, map) = registered(16);
        // Pages 8..12 present; then 4..16 copied in one call: 4..8 placed (the kernel stops
        // at page 8 with EAGAIN), 8..12 skipped (EEXIST), 12..16 placed.
        uffd.copy(map.page(8), &patterns(0x80, 4)).unwrap();
        uffd.copy(map.page(4), &patterns(0x40, 12)).unwrap();
        let got = Mapping::read(map.page(4), 12 * PAGE_SIZE);
        let mut want = patterns(0x40, 4);
        want.extend(patterns(0x80, 4));
        want.extend(patterns(0x48, 4));
        assert!(got == want, "holes filled wrongly");
        let resident = page_resident(map.addr, map.len()).unwrap();
        assert_eq!(resident, (0..16).map(|i| i >= 4).collect::<Vec<_>>());
    }

    #[test]
    fn zero_over_a_partly_present_range_fills_only_the_holes() {
        let (uffd, map) = registered(4);
        uffd.copy(map.page(1), &pattern(9)).unwrap();
        uffd.zero(map.addr, map.len()).unwrap();
        let mut want = pattern(0);
        want.extend(pattern(9));
        want.extend(patterns(0, 2).iter().map(|_| 0));
        assert!(Mapping::read(map.addr, map.len) == want);
    }

    #[test]
    fn unregistered_memory_no_longer_faults() {
        let (uffd, map) = registered(2);
        uffd.unregister(map.addr, map.len()).unwrap();
        assert_eq!(Mapping::read(map.addr, map.len), vec![0; map.len]);
        assert_eq!(uffd.read_fault().unwrap(), None);
    }

    #[test]
    fn unregister_wakes_a_blocked_reader() {
        let (uffd, map) = registered(1);
        let reader = spawn_reader(map.addr, PAGE_SIZE);
        assert!(readable(&uffd, FAULT_TIMEOUT));
        uffd.unregister(map.addr, map.len()).unwrap();
        assert_eq!(reader.join().unwrap(), pattern(0));
    }

    #[test]
    fn many_pages_each_fault_once() {
        const PAGES: usize = 64;
        let (uffd, map) = registered(PAGES);
        let reader = spawn_reader(map.addr, map.len);
        let mut served = Vec::new();
        while served.len() < PAGES {
            let addr = wait_fault(&uffd);
            let index = ((addr - map.addr) / PAGE_SIZE_U64) as usize;
            uffd.copy(addr, &pattern(index as u8)).unwrap();
            served.push(index);
        }
        assert!(reader.join().unwrap() == patterns(0, PAGES));
        assert_eq!(served, (0..PAGES).collect::<Vec<_>>());
        assert_eq!(uffd.read_fault().unwrap(), None);
    }

    #[test]
    fn a_fault_placed_by_another_thread_first_is_harmless() {
        let (uffd, map) = registered(1);
        let uffd = Arc::new(uffd);
        let reader = spawn_reader(map.addr, PAGE_SIZE);
        // The fault is queued but not read yet; another thread places the page.
        assert!(readable(&uffd, FAULT_TIMEOUT));
        let placer = {
            let uffd = Arc::clone(&uffd);
            let addr = map.addr;
            thread::spawn(move || uffd.copy(addr, &pattern(0xaa)))
        };
        placer.join().unwrap().unwrap();
        assert_eq!(reader.join().unwrap(), pattern(0xaa));
        // The message may or may not still be queued; serving it again changes nothing.
        if let Some(addr) = uffd.read_fault().unwrap() {
            assert_eq!(addr, map.addr);
            uffd.copy(addr, &pattern(0xbb)).unwrap();
        }
        assert_eq!(Mapping::read(map.addr, PAGE_SIZE), pattern(0xaa));
    }

    #[test]
    fn wake_without_a_waiter_is_ok() {
        let (uffd, map) = registered(1);
        uffd.wake(map.addr, map.len()).unwrap();
    }

    #[test]
    fn unaligned_ranges_are_refused() {
        let (uffd, map) = registered(2);
        assert!(matches!(
            uffd.copy(map.addr + 1, &pattern(0)),
            Err(UffdError::Unaligned { .. })
        ));
        assert!(matches!(
            uffd.copy(map.addr, &[0; 100]),
            Err(UffdError::Unaligned { .. })
        ));
        assert!(matches!(
            uffd.zero(map.addr, 100),
            Err(UffdError::Unaligned { .. })
        ));
        assert!(matches!(
            page_resident(map.addr + 8, PAGE_SIZE_U64),
            Err(UffdError::Unaligned { .. })
        ));
    }

    #[test]
    fn page_resident_sees_touched_pages_only() {
        let map = Mapping::new(4);
        for index in [1, 3] {
            // SAFETY: inside the mapping, not registered with any userfaultfd.
            unsafe { std::ptr::write_volatile(map.page(index) as *mut u8, 1) };
        }
        assert_eq!(
            page_resident(map.addr, map.len()).unwrap(),
            [false, true, false, true]
        );
        assert!(matches!(
            page_resident(0, PAGE_SIZE_U64),
            Err(UffdError::Mincore { .. })
        ));
    }

    /// Fault round trip as the faulting thread sees it (first access of a missing page until
    /// it returns), with a thread polling the fd, reading the fault and placing the page with
    /// UFFDIO_COPY. Run with `cargo test -p skiff --lib uffd -- --ignored --nocapture`.
    #[test]
    #[ignore = "benchmark: prints the fault-to-placement latency"]
    fn bench_fault_latency() {
        const PAGES: usize = 10_000;
        let (uffd, map) = registered(PAGES);
        let uffd = Arc::new(uffd);
        let stop = Arc::new(AtomicBool::new(false));
        let server = {
            let (uffd, stop) = (Arc::clone(&uffd), Arc::clone(&stop));
            thread::spawn(move || {
                let page = pattern(0x77);
                let mut serve_ns = Vec::with_capacity(PAGES);
                while !stop.load(Ordering::Relaxed) {
                    if !readable(&uffd, Duration::from_millis(10)) {
                        continue;
                    }
                    while let Some(addr) = uffd.read_fault().unwrap() {
                        let start = Instant::now();
                        uffd.copy(addr, &page).unwrap();
                        serve_ns.push(start.elapsed().as_nanos() as u64);
                    }
                }
                serve_ns
            })
        };
        let base = map.addr;
        let reader = thread::spawn(move || {
            (0..PAGES)
                .map(|i| {
                    let addr = (base + (i * PAGE_SIZE) as u64) as *const u8;
                    let start = Instant::now();
                    // SAFETY: inside the live mapping; blocks until the page is placed.
                    let byte = unsafe { std::ptr::read_volatile(addr) };
                    assert_eq!(byte, 0x77);
                    start.elapsed().as_nanos() as u64
                })
                .collect::<Vec<u64>>()
        });
        let started = Instant::now();
        let mut fault_ns = reader.join().unwrap();
        let total = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        let mut serve_ns = server.join().unwrap();
        let pct = |v: &mut Vec<u64>, p: usize| {
            v.sort_unstable();
            v[(v.len() - 1) * p / 100] as f64 / 1000.0
        };
        eprintln!(
            "uffd fault round trip over {PAGES} faults: median {:.1} µs, p90 {:.1} µs, \
             p99 {:.1} µs, max {:.1} µs; {:.0} faults/s",
            pct(&mut fault_ns, 50),
            pct(&mut fault_ns, 90),
            pct(&mut fault_ns, 99),
            pct(&mut fault_ns, 100),
            PAGES as f64 / total.as_secs_f64()
        );
        eprintln!(
            "UFFDIO_COPY of one page (place + wake): median {:.1} µs, p99 {:.1} µs ({} calls)",
            pct(&mut serve_ns, 50),
            pct(&mut serve_ns, 99),
            serve_ns.len()
        );
    }
}
