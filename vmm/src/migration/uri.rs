//! Migration addresses (`unix:PATH`, `tcp:HOST:PORT`, `file:PATH[,offset=N]`, `fd:NAME`) and
//! the channels and listeners behind them.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use api::{InetSocketAddress, SocketAddress, SocketAddressType, UnixSocketAddress};

/// Where a migration goes or comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUri {
    /// A unix socket.
    Unix(PathBuf),
    /// A TCP address, `host:port`.
    Tcp(String),
    /// A file (a snapshot), read or written from `offset`.
    File {
        /// The file.
        path: PathBuf,
        /// Where the stream starts in it.
        offset: u64,
    },
    /// A descriptor passed to the monitor (`getfd`) or inherited: a connected stream socket,
    /// or a file or pipe.
    Fd(FdUri),
}

/// The descriptor of an `fd:NAME` URI. Parsing gives only the name; the command that got
/// the URI attaches the descriptor ([`MigrationUri::attach_fd`]), and the first connect or
/// listen takes it.
#[derive(Debug, Clone)]
pub struct FdUri {
    name: String,
    channel: Arc<Mutex<Option<Channel>>>,
}

impl FdUri {
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Channel>> {
        self.channel.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The channel, taken out.
    fn take(&self) -> Result<Channel, UriError> {
        self.slot().take().ok_or_else(|| UriError::Fd {
            name: self.name.clone(),
            reason: "no descriptor attached, or it was used already".into(),
        })
    }
}

impl PartialEq for FdUri {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && Arc::ptr_eq(&self.channel, &other.channel)
    }
}

impl Eq for FdUri {}

/// Errors parsing, connecting or listening.
#[derive(Debug, thiserror::Error)]
pub enum UriError {
    /// Not a URI this build knows.
    #[error("unknown migration protocol: {0}")]
    Protocol(String),
    /// A URI of a known kind with a bad address.
    #[error("invalid migration URI '{uri}': {reason}")]
    Invalid {
        /// The URI.
        uri: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// `fd:N` with N not a descriptor number (QEMU's text).
    #[error("Invalid file descriptor number '{0}'")]
    FdNumber(String),
    /// The descriptor of `fd:NAME` cannot carry a migration.
    #[error("file descriptor '{name}': {reason}")]
    Fd {
        /// The name (or number) in the URI.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// Connecting, binding or opening failed.
    #[error("Failed to {what} '{addr}': {source}")]
    Io {
        /// connect to, listen on, open.
        what: &'static str,
        /// The address.
        addr: String,
        /// The OS error.
        source: io::Error,
    },
}

impl MigrationUri {
    /// Parses QEMU's legacy URI syntax.
    pub fn parse(uri: &str) -> Result<MigrationUri, UriError> {
        let invalid = |reason| UriError::Invalid {
            uri: uri.to_string(),
            reason,
        };
        if let Some(path) = uri.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(invalid("empty socket path"));
            }
            return Ok(MigrationUri::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = uri.strip_prefix("tcp:") {
            let valid = addr
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !valid {
                return Err(invalid("expected tcp:HOST:PORT"));
            }
            return Ok(MigrationUri::Tcp(addr.to_string()));
        }
        if let Some(spec) = uri.strip_prefix("file:") {
            let (path, offset) = match spec.rsplit_once(",offset=") {
                Some((path, offset)) => (
                    path,
                    parse_offset(offset).ok_or_else(|| invalid("bad offset"))?,
                ),
                None => (spec, 0),
            };
            if path.is_empty() {
                return Err(invalid("empty file name"));
            }
            return Ok(MigrationUri::File {
                path: PathBuf::from(path),
                offset,
            });
        }
        if let Some(name) = uri.strip_prefix("fd:") {
            return Ok(MigrationUri::Fd(FdUri {
                name: name.to_string(),
                channel: Arc::default(),
            }));
        }
        let scheme = uri.split(':').next().unwrap_or(uri);
        Err(UriError::Protocol(scheme.to_string()))
    }

    /// Whether the destination can answer over this kind of channel (sockets can, files
    /// cannot); postcopy needs it. An `fd:` URI can once a socket is attached.
    pub fn has_return_path(&self) -> bool {
        match self {
            MigrationUri::File { .. } => false,
            MigrationUri::Fd(fd) => fd.slot().as_ref().is_some_and(Channel::has_return_path),
            _ => true,
        }
    }

    /// The name of an `fd:NAME` URI, whose descriptor must be attached before use.
    pub fn fd_name(&self) -> Option<&str> {
        match self {
            MigrationUri::Fd(fd) => Some(&fd.name),
            _ => None,
        }
    }

    /// Attaches the descriptor of an `fd:NAME` URI (a no-op for other URIs), after checking
    /// that it can carry the stream in that direction (`outgoing`: the source's).
    pub fn attach_fd(&self, fd: OwnedFd, outgoing: bool) -> Result<(), UriError> {
        if let MigrationUri::Fd(uri) = self {
            *uri.slot() = Some(Channel::from_fd(fd, &uri.name, outgoing)?);
        }
        Ok(())
    }

    /// Connects to the destination (source side). A file is created or truncated.
    pub fn connect(&self) -> Result<Channel, UriError> {
        match self {
            MigrationUri::Unix(path) => {
                UnixStream::connect(path)
                    .map(Channel::unix)
                    .map_err(|source| UriError::Io {
                        what: "connect to",
                        addr: path.display().to_string(),
                        source,
                    })
            }
            MigrationUri::Tcp(addr) => {
                let stream = TcpStream::connect(addr).map_err(|source| UriError::Io {
                    what: "connect to",
                    addr: addr.clone(),
                    source,
                })?;
                Ok(Channel::tcp(stream))
            }
            MigrationUri::File { path, offset } => {
                let io_err = |source| UriError::Io {
                    what: "open",
                    addr: path.display().to_string(),
                    source,
                };
                let mut file = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(*offset == 0)
                    .open(path)
                    .map_err(io_err)?;
                file.seek(SeekFrom::Start(*offset)).map_err(io_err)?;
                Ok(Channel::File(file))
            }
            MigrationUri::Fd(fd) => fd.take(),
        }
    }

    /// Starts listening (destination side). A file is opened for reading.
    pub fn listen(&self) -> Result<Listener, UriError> {
        match self {
            MigrationUri::Unix(path) => {
                // A stale socket file from an earlier run would make bind fail.
                if std::fs::symlink_metadata(path)
                    .map(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                    .unwrap_or(false)
                {
                    let _ = std::fs::remove_file(path);
                }
                let io_err = |source| UriError::Io {
                    what: "listen on",
                    addr: path.display().to_string(),
                    source,
                };
                let listener = UnixListener::bind(path).map_err(io_err)?;
                let inode = std::fs::symlink_metadata(path).map_err(io_err)?.ino();
                Ok(Listener::Unix(listener, path.clone(), inode))
            }
            MigrationUri::Tcp(addr) => {
                let io_err = |source| UriError::Io {
                    what: "listen on",
                    addr: addr.clone(),
                    source,
                };
                let addrs: Vec<_> = addr.to_socket_addrs().map_err(io_err)?.collect();
                TcpListener::bind(&addrs[..])
                    .map(Listener::Tcp)
                    .map_err(io_err)
            }
            MigrationUri::File { path, offset } => {
                let io_err = |source| UriError::Io {
                    what: "open",
                    addr: path.display().to_string(),
                    source,
                };
                let mut file = File::open(path).map_err(io_err)?;
                file.seek(SeekFrom::Start(*offset)).map_err(io_err)?;
                Ok(Listener::Open(Some(Channel::File(file))))
            }
            MigrationUri::Fd(fd) => Ok(Listener::Open(Some(fd.take()?))),
        }
    }
}

fn parse_offset(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// A connected migration channel.
#[derive(Debug)]
pub enum Channel {
    /// A unix socket.
    Unix(UnixStream),
    /// A TCP connection.
    Tcp(TcpStream),
    /// A file.
    File(File),
}

/// Socket buffer size asked for: lets both sides run without waiting for each other on
/// every 1 MiB section.
const SOCKET_BUFFER: libc::c_int = 4 << 20;

/// Socket buffer size in postcopy: the background stream may queue no more than about
/// one section ahead of a requested page (4 MiB queued at 1 GiB/s would hold a
/// requested page back for 4 ms).
const POSTCOPY_SOCKET_BUFFER: libc::c_int = 128 << 10;

/// Sets a socket's send and receive buffer sizes (as root beyond `net.core.[rw]mem_max`;
/// the kernel doubles the value for its bookkeeping); best effort.
fn set_buffers(fd: std::os::fd::RawFd, bytes: libc::c_int) {
    for (force, plain) in [
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
    ] {
        for option in [force, plain] {
            // SAFETY: `fd` is an open socket owned by the caller; the value is a live c_int
            // whose size is passed.
            let ret = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    option,
                    (&bytes as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if ret == 0 {
                break;
            }
        }
    }
}

impl Channel {
    /// A channel over a connected unix socket, tuned for bulk transfer.
    pub fn unix(stream: UnixStream) -> Channel {
        set_buffers(stream.as_raw_fd(), SOCKET_BUFFER);
        Channel::Unix(stream)
    }

    /// A channel over a connected TCP socket, tuned for bulk transfer and with Nagle's
    /// algorithm off: page requests are small and urgent.
    pub fn tcp(stream: TcpStream) -> Channel {
        let _ = stream.set_nodelay(true);
        set_buffers(stream.as_raw_fd(), SOCKET_BUFFER);
        Channel::Tcp(stream)
    }

    /// Tunes a socket for postcopy, where the latency of a requested page matters more
    /// than bulk throughput: small buffers, so that little background data queues ahead
    /// of it. Files are left alone.
    pub fn tune_for_postcopy(&self) {
        if !matches!(self, Channel::File(_)) {
            set_buffers(self.as_raw_fd(), POSTCOPY_SOCKET_BUFFER);
        }
    }

    /// A second handle on the same channel (for the return path, and to shut it down from
    /// another thread).
    pub fn try_clone(&self) -> io::Result<Channel> {
        Ok(match self {
            Channel::Unix(s) => Channel::Unix(s.try_clone()?),
            Channel::Tcp(s) => Channel::Tcp(s.try_clone()?),
            Channel::File(f) => Channel::File(f.try_clone()?),
        })
    }

    /// Whether the other side can answer.
    pub fn has_return_path(&self) -> bool {
        !matches!(self, Channel::File(_))
    }

    /// Breaks the connection in both directions: blocked reads and writes on every handle
    /// fail at once. Does not block. Files are left alone.
    pub fn shutdown(&self) {
        let result = match self {
            Channel::Unix(s) => s.shutdown(Shutdown::Both),
            Channel::Tcp(s) => s.shutdown(Shutdown::Both),
            Channel::File(_) => Ok(()),
        };
        if let Err(e) = result {
            log::debug!("migration channel shutdown: {e}");
        }
    }

    /// Bytes written to a socket that the peer has not taken yet (kernel buffer overhead
    /// included); 0 for a file.
    pub fn unsent(&self) -> io::Result<usize> {
        if matches!(self, Channel::File(_)) {
            return Ok(0);
        }
        let mut queued: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (TIOCOUTQ) on a live socket writes one c_int to the live
        // `queued`.
        let ret = unsafe { libc::ioctl(self.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(usize::try_from(queued).unwrap_or(0))
    }

    /// Makes a file's contents durable (no-op for sockets, and for pipes and devices, which
    /// hold nothing to flush).
    pub fn sync(&self) -> io::Result<()> {
        match self {
            Channel::File(f) => match f.sync_data() {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
                other => other,
            },
            _ => Ok(()),
        }
    }
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Channel::Unix(s) => s.as_raw_fd(),
            Channel::Tcp(s) => s.as_raw_fd(),
            Channel::File(f) => f.as_raw_fd(),
        }
    }
}

impl Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Channel::Unix(s) => s.read(buf),
            Channel::Tcp(s) => s.read(buf),
            Channel::File(f) => f.read(buf),
        }
    }
}

impl Write for Channel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Channel::Unix(s) => s.write(buf),
            Channel::Tcp(s) => s.write(buf),
            Channel::File(f) => f.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Channel::Unix(s) => s.write_vectored(bufs),
            Channel::Tcp(s) => s.write_vectored(bufs),
            Channel::File(f) => f.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A listening endpoint of an incoming migration.
#[derive(Debug)]
pub enum Listener {
    /// A unix socket, its path and the path's inode. The socket file is removed when the
    /// listener is dropped, unless another listener has been bound at that path since.
    Unix(UnixListener, PathBuf, u64),
    /// A TCP socket.
    Tcp(TcpListener),
    /// A channel open already (a file, or a descriptor passed with `fd:`), handed out once.
    Open(Option<Channel>),
}

impl Listener {
    /// Waits for the source.
    pub fn accept(&mut self) -> io::Result<Channel> {
        match self {
            Listener::Unix(l, _, _) => l.accept().map(|(s, _)| Channel::unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| Channel::tcp(s)),
            Listener::Open(channel) => channel.take().ok_or_else(|| {
                io::Error::new(io::ErrorKind::UnexpectedEof, "the channel was already used")
            }),
        }
    }

    /// Where it listens, as query-migrate's `socket-address` reports it.
    pub fn socket_address(&self) -> Option<SocketAddress> {
        match self {
            Listener::Unix(_, path, _) => Some(SocketAddress {
                r#type: SocketAddressType::Unix,
                inet: None,
                unix: Some(UnixSocketAddress {
                    path: path.display().to_string(),
                }),
            }),
            Listener::Tcp(l) => l.local_addr().ok().map(|a| SocketAddress {
                r#type: SocketAddressType::Inet,
                inet: Some(InetSocketAddress {
                    host: a.ip().to_string(),
                    port: a.port().to_string(),
                }),
                unix: None,
            }),
            Listener::Open(_) => None,
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path, inode) = self {
            // A retried `migrate-recover` may have bound a new listener at the same path.
            let ours = std::fs::symlink_metadata(&*path).is_ok_and(|m| m.ino() == *inode);
            if ours {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

impl AsRawFd for Listener {
    /// The listening socket (for poll), or the open channel.
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Unix(l, _, _) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Open(Some(c)) => c.as_raw_fd(),
            Listener::Open(None) => -1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_uris() {
        assert_eq!(
            MigrationUri::parse("unix:/tmp/m.sock").unwrap(),
            MigrationUri::Unix("/tmp/m.sock".into())
        );
        assert_eq!(
            MigrationUri::parse("tcp:127.0.0.1:4444").unwrap(),
            MigrationUri::Tcp("127.0.0.1:4444".into())
        );
        assert_eq!(
            MigrationUri::parse("file:/tmp/snap,offset=0x1000").unwrap(),
            MigrationUri::File {
                path: "/tmp/snap".into(),
                offset: 4096
            }
        );
    }

    #[test]
    fn bad_uris_say_why() {
        assert_eq!(
            MigrationUri::parse("exec:cat").unwrap_err().to_string(),
            "unknown migration protocol: exec"
        );
        assert!(MigrationUri::parse("tcp:nohost").is_err());
        assert!(MigrationUri::parse("tcp:h:99999").is_err());
        assert!(MigrationUri::parse("unix:").is_err());
        assert!(MigrationUri::parse("file:x,offset=zz").is_err());
        assert!(MigrationUri::parse("nonsense").is_err());
    }

    #[test]
    fn fd_uris_take_their_descriptor_once() {
        let uri = MigrationUri::parse("fd:mig").unwrap();
        assert_eq!(uri.fd_name(), Some("mig"));
        assert_eq!(MigrationUri::parse("fd:").unwrap().fd_name(), Some(""));
        assert_eq!(MigrationUri::parse("unix:/x").unwrap().fd_name(), None);
        assert!(!uri.has_return_path(), "nothing attached yet");
        assert_eq!(
            uri.connect().unwrap_err().to_string(),
            "file descriptor 'mig': no descriptor attached, or it was used already"
        );
        let (a, mut b) = UnixStream::pair().unwrap();
        uri.attach_fd(a.into(), true).unwrap();
        assert!(uri.has_return_path());
        // A clone shares the descriptor: whichever connects first takes it.
        let mut out = uri.clone().connect().unwrap();
        assert!(uri.connect().is_err());
        out.write_all(b"ok").unwrap();
        let mut buf = [0u8; 2];
        b.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ok");
        // The destination side: the attached channel is handed out once by its listener.
        let incoming = MigrationUri::parse("fd:in").unwrap();
        incoming.attach_fd(b.into(), false).unwrap();
        let mut listener = incoming.listen().unwrap();
        assert!(listener.socket_address().is_none());
        listener.accept().unwrap();
        assert!(listener.accept().is_err());
    }

    /// A unix socket URI in a new directory, its listener, and one connection (connecting
    /// side, accepted side).
    fn unix_connection(tag: &str) -> (PathBuf, MigrationUri, Listener, Channel, Channel) {
        let dir = std::env::temp_dir().join(format!("skiff-uri-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let uri = MigrationUri::Unix(dir.join("s"));
        let mut listener = uri.listen().unwrap();
        let out = uri.connect().unwrap();
        let input = listener.accept().unwrap();
        (dir, uri, listener, out, input)
    }

    #[test]
    fn unix_listen_connect_and_shutdown() {
        let (dir, uri, listener, mut out, mut input) = unix_connection("shutdown");
        out.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        input.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        input.try_clone().unwrap().shutdown();
        assert_eq!(input.read(&mut buf).unwrap(), 0);
        drop(listener);
        assert!(!dir.join("s").exists());
        // Binding again at a path in use replaces the old listener, whose drop then leaves
        // the new socket file alone.
        let old = uri.listen().unwrap();
        let new = uri.listen().unwrap();
        drop(old);
        assert!(dir.join("s").exists());
        let mut new = new;
        let _client = uri.connect().unwrap();
        new.accept().unwrap();
        drop(new);
        assert!(!dir.join("s").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn send_buffer(channel: &Channel) -> libc::c_int {
        super::super::fd_channel::socket_option(channel, libc::SO_SNDBUF).unwrap()
    }

    #[test]
    fn both_ends_are_tuned_and_tell_what_the_peer_has_not_taken() {
        let (dir, _uri, _listener, out, mut input) = unix_connection("tuned");
        // The connecting side sends the stream: a send buffer smaller than a section would
        // make both sides wait for each other on every section. (Root gets the full size;
        // others get what net.core.wmem_max allows, at least the default.)
        let default = 212_992;
        assert!(send_buffer(&out) >= default && send_buffer(&input) >= default);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(send_buffer(&out) >= SOCKET_BUFFER, "{}", send_buffer(&out));
        }
        out.try_clone().unwrap().write_all(&[7u8; 1000]).unwrap();
        assert!(out.unsent().unwrap() >= 1000, "queued until read");
        let mut taken = [0u8; 1000];
        input.read_exact(&mut taken).unwrap();
        assert_eq!(out.unsent().unwrap(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn postcopy_shrinks_what_may_queue_ahead_of_a_requested_page() {
        let (dir, _uri, _listener, out, _input) = unix_connection("postcopy-tuned");
        out.tune_for_postcopy();
        // The kernel doubles the value asked for, for its own bookkeeping.
        assert_eq!(send_buffer(&out), 2 * POSTCOPY_SOCKET_BUFFER);
        // The queue is bounded: a non-blocking writer stops near the buffer size.
        let writer = out.try_clone().unwrap();
        let Channel::Unix(stream) = &writer else {
            panic!("a unix channel");
        };
        stream.set_nonblocking(true).unwrap();
        let mut queued = 0;
        let chunk = [1u8; 4096];
        while let Ok(n) = (&*stream).write(&chunk) {
            queued += n;
            assert!(queued <= 4 << 20, "more than 4 MiB queued");
        }
        assert!(
            queued < 2 * POSTCOPY_SOCKET_BUFFER as usize,
            "{queued} bytes queued"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
