//! A migration channel from a passed or inherited descriptor (`fd:` URIs): a connected
//! stream socket works like `unix:` or `tcp:` (with a return path), anything else that can
//! be read or written in sequence (a regular file, a pipe, a device) like `file:`.

use std::fs::File;
use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use qmp::{MonitorFds, QmpError};

use super::inherited;
use super::uri::{Channel, MigrationUri, UriError};

/// Gives an `fd:NAME` URI its descriptor (other URIs are left alone): the one the issuing
/// monitor keeps under NAME, which is taken from it, as QEMU does. For an incoming migration
/// (not `outgoing`) a NAME starting with a digit is the number of a descriptor Skiff
/// inherited instead (QEMU's `monitor_fd_param`). Never blocks: it locks the monitor's small
/// table and asks the kernel about the descriptor, so out-of-band `migrate-recover` uses it.
pub fn attach(uri: &MigrationUri, monitor: &MonitorFds, outgoing: bool) -> Result<(), QmpError> {
    let Some(name) = uri.fd_name() else {
        return Ok(());
    };
    let fd = if !outgoing && name.starts_with(|c: char| c.is_ascii_digit()) {
        inherited::take(name).map_err(|e| QmpError::generic(e.to_string()))?
    } else {
        monitor.take(name)?
    };
    uri.attach_fd(fd, outgoing)
        .map_err(|e| QmpError::generic(e.to_string()))
}

/// An integer socket option (level SOL_SOCKET) of `fd`.
pub(crate) fn socket_option(fd: &impl AsRawFd, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is open; `value` and `len` are live and sized as passed.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Whether the socket has a peer.
fn is_connected(fd: &OwnedFd) -> bool {
    // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `fd` is open; `addr` and `len` are live and sized as passed.
    let ret = unsafe {
        libc::getpeername(
            fd.as_raw_fd(),
            (&mut addr as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    ret == 0
}

impl Channel {
    /// A channel over `fd`, named `name` in errors, for the source (`outgoing`) or the
    /// destination. Refuses what cannot carry a stream that way, with the reason.
    pub fn from_fd(fd: OwnedFd, name: &str, outgoing: bool) -> Result<Channel, UriError> {
        let refuse = |reason: String| UriError::Fd {
            name: name.to_string(),
            reason,
        };
        let os = |e: io::Error| refuse(e.to_string());
        let file = File::from(fd);
        let kind = file.metadata().map_err(os)?.file_type();
        let fd = OwnedFd::from(file);
        if std::os::unix::fs::FileTypeExt::is_socket(&kind) {
            if socket_option(&fd, libc::SO_TYPE).map_err(os)? != libc::SOCK_STREAM {
                return Err(refuse("not a stream socket".into()));
            }
            if !is_connected(&fd) {
                return Err(refuse("a socket that is not connected".into()));
            }
            return match socket_option(&fd, libc::SO_DOMAIN).map_err(os)? {
                libc::AF_UNIX => Ok(Channel::unix(UnixStream::from(fd))),
                libc::AF_INET | libc::AF_INET6 => Ok(Channel::tcp(TcpStream::from(fd))),
                family => Err(refuse(format!("a socket of unsupported family {family}"))),
            };
        }
        if kind.is_dir() {
            return Err(refuse("a directory".into()));
        }
        // SAFETY: F_GETFL only reads the open file's status flags.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 {
            return Err(os(io::Error::last_os_error()));
        }
        let mode = flags & libc::O_ACCMODE;
        if outgoing && mode == libc::O_RDONLY {
            return Err(refuse("not open for writing".into()));
        }
        if !outgoing && mode == libc::O_WRONLY {
            return Err(refuse("not open for reading".into()));
        }
        Ok(Channel::File(File::from(fd)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn reason(fd: OwnedFd, outgoing: bool) -> String {
        Channel::from_fd(fd, "x", outgoing).unwrap_err().to_string()
    }

    #[test]
    fn sockets_carry_a_return_path() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut out = Channel::from_fd(a.into(), "x", true).unwrap();
        let mut input = Channel::from_fd(b.into(), "x", false).unwrap();
        assert!(matches!(out, Channel::Unix(_)) && out.has_return_path());
        out.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        input.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert!(matches!(
            Channel::from_fd(tcp.into(), "x", true).unwrap(),
            Channel::Tcp(_)
        ));
        assert_eq!(
            reason(listener.into(), true),
            "file descriptor 'x': a socket that is not connected"
        );
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(
            reason(udp.into(), true),
            "file descriptor 'x': not a stream socket"
        );
    }

    #[test]
    fn files_and_devices_need_the_right_direction() {
        let dir = std::env::temp_dir().join(format!("skiff-fd-channel-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let mut out = Channel::from_fd(File::create(&path).unwrap().into(), "x", true).unwrap();
        assert!(!out.has_return_path());
        out.write_all(b"z").unwrap();
        out.sync().unwrap();
        let mut input = Channel::from_fd(File::open(&path).unwrap().into(), "x", false).unwrap();
        let mut byte = [0u8];
        input.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"z");
        assert_eq!(
            reason(File::create(&path).unwrap().into(), false),
            "file descriptor 'x': not open for reading"
        );
        assert_eq!(
            reason(File::open(&path).unwrap().into(), true),
            "file descriptor 'x': not open for writing"
        );
        assert_eq!(
            reason(File::open(&dir).unwrap().into(), false),
            "file descriptor 'x': a directory"
        );
        // A device (as a pipe) has nothing to sync: that is no error.
        let null = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .unwrap();
        Channel::from_fd(null.into(), "x", true)
            .unwrap()
            .sync()
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
