//! Listening sockets and client connections, all non-blocking.

use std::fs;
use std::io::{self, Read};
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
    /// Reads what is available.
    pub(crate) fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
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
