//! Listening sockets and client connections, all non-blocking.

use std::fs;
use std::io::{self, Read};
use std::mem::size_of;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::ServerError;

/// A bound, listening socket.
#[derive(Debug)]
pub(crate) enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// One connected client.
#[derive(Debug)]
pub(crate) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Listener {
    /// Accepts one pending connection, if any.
    pub(crate) fn accept(&self) -> io::Result<Stream> {
        let stream = match self {
            Listener::Unix(l) => Stream::Unix(l.accept()?.0),
            Listener::Tcp(l) => Stream::Tcp(l.accept()?.0),
        };
        match &stream {
            Stream::Unix(s) => s.set_nonblocking(true)?,
            Stream::Tcp(s) => s.set_nonblocking(true)?,
        }
        Ok(stream)
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }
}

impl Stream {
    /// Reads what is available. On a unix socket, descriptors passed with SCM_RIGHTS are
    /// appended to `fds` (close-on-exec).
    pub(crate) fn read(&mut self, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => recv_with_fds(s, buf, fds),
            Stream::Tcp(s) => s.read(buf),
        }
    }

    /// Writes without raising SIGPIPE when the peer is gone.
    pub(crate) fn send(&self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: the fd is a valid open socket owned by `self`, and `buf`
        // is a valid readable region of `buf.len()` bytes.
        let n = unsafe {
            libc::send(
                self.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n.unsigned_abs())
        }
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }
}

/// Most descriptors taken from one read; the kernel closes any beyond (and flags it).
const MAX_FDS_PER_READ: usize = 16;

/// Bytes for one SCM_RIGHTS message of [`MAX_FDS_PER_READ`] descriptors.
// SAFETY: CMSG_SPACE only computes a size.
const CONTROL_LEN: usize =
    unsafe { libc::CMSG_SPACE((MAX_FDS_PER_READ * size_of::<libc::c_int>()) as u32) } as usize;

/// A control buffer, aligned for cmsghdr.
#[repr(C)]
struct FdControl {
    _align: [libc::cmsghdr; 0],
    bytes: [u8; CONTROL_LEN],
}

/// `recvmsg` on a unix stream: data into `buf`, passed descriptors into `fds`.
fn recv_with_fds(stream: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut control = FdControl {
        _align: [],
        bytes: [0; CONTROL_LEN],
    };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data; all zeroes is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.bytes.as_mut_ptr().cast();
    msg.msg_controllen = CONTROL_LEN;
    // SAFETY: the socket is open and owned by `stream`; `msg` points at `iov` (the live
    // `buf`) and at the live control buffer, whose sizes it gives.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `msg` was filled in by recvmsg; the CMSG macros stay within its control
    // buffer.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: a non-null header from CMSG_FIRSTHDR/CMSG_NXTHDR lies within the buffer.
        let header = unsafe { std::ptr::read_unaligned(cmsg) };
        if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN only computes a size.
            let payload = header.cmsg_len as usize - unsafe { libc::CMSG_LEN(0) } as usize;
            // SAFETY: CMSG_DATA points at the header's payload, inside the buffer.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<libc::c_int>();
            for k in 0..payload / size_of::<libc::c_int>() {
                // SAFETY: `k` indexes an int of the payload; the kernel installed that
                // descriptor for this process, and nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(k))) });
            }
        }
        // SAFETY: as above; `cmsg` is a header of `msg`.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        log::warn!(
            "qmp: more than {MAX_FDS_PER_READ} descriptors came at once; the rest were closed"
        );
    }
    Ok(n.unsigned_abs())
}

fn bind_error(addr: &str, source: io::Error) -> ServerError {
    ServerError::Bind {
        addr: addr.into(),
        source,
    }
}

/// Removes a stale socket file at `path`; refuses when something listens
/// there or the path is not a socket.
fn clear_stale(path: &Path, addr: &str) -> Result<(), ServerError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(bind_error(addr, e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ServerError::NotASocket(path.into()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ServerError::InUse(path.into())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            log::info!("removing stale socket {}", path.display());
            fs::remove_file(path).map_err(|e| bind_error(addr, e))
        }
        Err(e) => Err(bind_error(addr, e)),
    }
}

/// Binds a unix socket with mode 0600 and a backlog of one, like QEMU.
pub(crate) fn bind_unix(path: &Path) -> Result<(UnixListener, PathBuf), ServerError> {
    let addr = format!("unix:{}", path.display());
    clear_stale(path, &addr)?;
    let bytes = path.as_os_str().as_encoded_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= sun.sun_path.len() || bytes.contains(&0) {
        return Err(bind_error(
            &addr,
            io::Error::from(io::ErrorKind::InvalidInput),
        ));
    }
    sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in sun.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(bind_error(&addr, io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Linux creates the socket file with the socket inode's mode, so setting
    // it before bind(2) leaves no window with wider permissions.
    // SAFETY: fchmod on a valid fd; failure is harmless (chmod follows).
    unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `sun` is a valid sockaddr_un and `len` does not exceed its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(sun).cast(),
            len as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(bind_error(&addr, io::Error::last_os_error()));
    }
    let created = path.to_path_buf();
    if let Err(e) = fs::set_permissions(path, fs::Permissions::from_mode(0o600)) {
        let _ = fs::remove_file(path);
        return Err(bind_error(&addr, e));
    }
    // SAFETY: listen(2) on a valid, bound socket.
    if unsafe { libc::listen(fd.as_raw_fd(), 1) } < 0 {
        let err = io::Error::last_os_error();
        let _ = fs::remove_file(path);
        return Err(bind_error(&addr, err));
    }
    Ok((UnixListener::from(fd), created))
}

/// Binds a TCP socket.
pub(crate) fn bind_tcp(hostport: &str) -> Result<TcpListener, ServerError> {
    let addr = format!("tcp:{hostport}");
    let listener = TcpListener::bind(hostport).map_err(|e| bind_error(&addr, e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| bind_error(&addr, e))?;
    Ok(listener)
}
