//! The QMP server: one monitor thread serving every listening address, an
//! in-band request queue drained by the VMM thread, and event broadcast.
//!
//! Threads: the monitor thread ("qmp-monitor") accepts clients, reads and
//! parses their input, answers what needs no VMM (errors, negotiation),
//! runs out-of-band commands, and writes all output. The VMM thread calls
//! [`QmpServer::run_next`] when [`QmpServer::request_event`] is readable, and
//! may call [`QmpServer::emit_event`] at any time.

mod addr;
mod fds;
mod io_thread;
mod monitor;
mod socket;

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread::{self, JoinHandle};
use std::time::SystemTime;

use serde_json::{Map, Value};
use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use addr::{AddrError, ListenAddr};
pub use fds::{CommandFds, MonitorFds};
pub use monitor::QUEUE_MAX;

use crate::command::{CommandResult, CommandSet};
use crate::json::to_line;
use crate::message::{self, VersionInfo};
use monitor::{Monitor, Queued};
use socket::Listener;

/// Runs one in-band command: its name, its arguments, and the descriptors it may use.
pub type Executor<'a> = dyn FnMut(&str, Map<String, Value>, CommandFds) -> CommandResult + 'a;

/// How to start a [`QmpServer`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// One monitor per address.
    pub addrs: Vec<ListenAddr>,
    /// The version shown in the greeting.
    pub version: VersionInfo,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// No address to listen on.
    #[error("no QMP listening address given")]
    NoAddress,
    /// Binding or listening failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The OS error.
        source: io::Error,
    },
    /// Another process is listening on the unix socket path.
    #[error("{0} is in use by another process")]
    InUse(PathBuf),
    /// The unix socket path exists and is not a socket.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Creating the epoll set, eventfds or thread failed.
    #[error("cannot start the QMP monitor thread: {0}")]
    Setup(io::Error),
}

/// State shared by the handles and the monitor thread.
pub(crate) struct Shared {
    pub(crate) monitors: Vec<Monitor>,
    pub(crate) commands: Arc<dyn CommandSet>,
    pub(crate) greeting: Vec<u8>,
    /// Wakes the monitor thread (new output, resumed input, shutdown).
    pub(crate) wake: EventFd,
    /// Readable while in-band requests wait.
    pub(crate) requests: EventFd,
    /// Next monitor the dispatcher looks at (round-robin).
    rr: Mutex<usize>,
    /// Held while `run_next` runs, so requests execute one at a time.
    dispatching: Mutex<()>,
    pub(crate) stop: AtomicBool,
    pub(crate) next_connection: AtomicU64,
    pub(crate) socket_paths: Vec<PathBuf>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Shared {
    pub(crate) fn wake(&self) {
        if let Err(e) = self.wake.write(1) {
            log::error!("qmp: cannot wake the monitor thread: {e}");
        }
    }

    pub(crate) fn signal_requests(&self) {
        if let Err(e) = self.requests.write(1) {
            log::error!("qmp: cannot signal queued requests: {e}");
        }
    }

    fn remove_socket_files(&self) {
        for path in &self.socket_paths {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => log::warn!("qmp: cannot remove {}: {e}", path.display()),
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Shuts the server down when the last handle goes away.
struct Owner(Arc<Shared>);

impl Drop for Owner {
    fn drop(&mut self) {
        shutdown(&self.0);
    }
}

/// A running QMP server. Cloning gives another handle to the same server;
/// the server shuts down on [`QmpServer::shutdown`] or when the last handle
/// is dropped.
#[derive(Clone)]
pub struct QmpServer {
    shared: Arc<Shared>,
    _owner: Arc<Owner>,
}

impl std::fmt::Debug for QmpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let labels: Vec<&str> = self
            .shared
            .monitors
            .iter()
            .map(|m| m.label.as_str())
            .collect();
        f.debug_struct("QmpServer")
            .field("monitors", &labels)
            .finish()
    }
}

impl QmpServer {
    /// Binds every address (unix socket file created with mode 0600, a stale socket file replaced, refuse if another process is listening there), spawns ONE monitor thread named "qmp-monitor" that reads and parses every monitor's input (epoll over all listeners/clients plus a wake eventfd).
    pub fn start(
        config: ServerConfig,
        commands: Arc<dyn CommandSet>,
    ) -> Result<QmpServer, ServerError> {
        if config.addrs.is_empty() {
            return Err(ServerError::NoAddress);
        }
        let mut listeners = Vec::new();
        let mut socket_paths = Vec::new();
        let mut monitors = Vec::new();
        let cleanup = |paths: &[PathBuf]| {
            for p in paths {
                let _ = std::fs::remove_file(p);
            }
        };
        for addr in &config.addrs {
            let listener = match addr {
                ListenAddr::Unix(path) => socket::bind_unix(path).map(|(l, p)| {
                    socket_paths.push(p);
                    Listener::Unix(l)
                }),
                ListenAddr::Tcp(hostport) => socket::bind_tcp(hostport).map(Listener::Tcp),
            };
            match listener {
                Ok(l) => listeners.push(l),
                Err(e) => {
                    cleanup(&socket_paths);
                    return Err(e);
                }
            }
            monitors.push(Monitor::new(addr.to_string()));
        }
        let setup = || -> io::Result<(EventFd, EventFd, Epoll)> {
            Ok((
                EventFd::new(EFD_NONBLOCK)?,
                EventFd::new(EFD_NONBLOCK)?,
                Epoll::new()?,
            ))
        };
        let (wake, requests, epoll) = match setup() {
            Ok(x) => x,
            Err(e) => {
                cleanup(&socket_paths);
                return Err(ServerError::Setup(e));
            }
        };
        let greeting = to_line(&message::greeting(&config.version, &["oob"]));
        let shared = Arc::new(Shared {
            monitors,
            commands,
            greeting,
            wake,
            requests,
            rr: Mutex::new(0),
            dispatching: Mutex::new(()),
            stop: AtomicBool::new(false),
            next_connection: AtomicU64::new(1),
            socket_paths,
            thread: Mutex::new(None),
        });
        let io = match io_thread::IoThread::new(shared.clone(), listeners, epoll) {
            Ok(io) => io,
            Err(e) => {
                shared.remove_socket_files();
                return Err(ServerError::Setup(e));
            }
        };
        let handle = thread::Builder::new()
            .name("qmp-monitor".into())
            .stack_size(8 << 20)
            .spawn(move || io.run());
        match handle {
            Ok(h) => *lock(&shared.thread) = Some(h),
            Err(e) => {
                shared.remove_socket_files();
                return Err(ServerError::Setup(e));
            }
        }
        Ok(QmpServer {
            _owner: Arc::new(Owner(shared.clone())),
            shared,
        })
    }

    /// Readable (EventFd) whenever in-band requests wait; the VMM main loop polls it.
    pub fn request_event(&self) -> &EventFd {
        &self.shared.requests
    }

    /// Runs at most ONE queued in-band request (round-robin across monitors, one each, like QEMU's dispatcher): calls `exec` for commands, with the descriptors that came with the command and its monitor's named ones; requests that already failed parsing/validation are answered in their place in the queue without calling `exec`. Sends the response to the right client (dropped if that client disconnected meanwhile). Returns false when nothing was queued. Called by the VMM with its big lock held.
    pub fn run_next(&self, exec: &mut Executor<'_>) -> bool {
        let shared = &*self.shared;
        // One request at a time; a nested call (from inside `exec`) finds nothing.
        let _dispatching = match shared.dispatching.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return false,
        };
        // Clear the event first: a request queued after this point sets it again.
        let _ = shared.requests.read();
        let n = shared.monitors.len();
        let popped = {
            let mut rr = lock(&shared.rr);
            let mut found = None;
            for k in 0..n {
                let i = (*rr + k) % n;
                let mut st = shared.monitors[i].lock();
                if let Some(item) = st.queue.pop_front() {
                    st.in_flight = true;
                    found = Some((i, st.connection, item));
                    *rr = (i + 1) % n;
                    break;
                }
            }
            found
        };
        let Some((i, connection, item)) = popped else {
            return false;
        };
        // Taking a request out may resume reading (OOB: queue no longer full).
        shared.wake();
        let reply = match item {
            Queued::Reply(reply) => reply,
            Queued::Execute {
                name,
                arguments,
                id,
                fds,
            } => {
                let fds = CommandFds::new(fds, shared.monitors[i].fds.clone());
                message::reply(exec(&name, arguments, fds), id)
            }
        };
        let line = to_line(&reply);
        {
            let mut st = shared.monitors[i].lock();
            st.in_flight = false;
            if st.connection == connection {
                st.out.extend_from_slice(&line);
            } else {
                log::debug!(
                    "qmp: {}: client left, reply dropped",
                    shared.monitors[i].label
                );
            }
        }
        if shared.monitors.iter().any(|m| !m.lock().queue.is_empty()) {
            shared.signal_requests();
        }
        shared.wake();
        true
    }

    /// Broadcasts an event with a wall-clock timestamp to every monitor that finished negotiation (data absent when None).
    pub fn emit_event(&self, name: &str, data: Option<Map<String, Value>>) {
        let line = to_line(&message::event(name, data, SystemTime::now()));
        let mut sent = false;
        for m in &self.shared.monitors {
            let mut st = m.lock();
            if st.wants_events() {
                st.out.extend_from_slice(&line);
                sent = true;
            }
        }
        if sent {
            self.shared.wake();
        }
    }

    /// Stops the monitor thread, closes clients, removes socket files.
    pub fn shutdown(&self) {
        shutdown(&self.shared);
    }
}

fn shutdown(shared: &Shared) {
    shared.stop.store(true, Ordering::SeqCst);
    shared.wake();
    let handle = lock(&shared.thread).take();
    if let Some(handle) = handle {
        if handle.thread().id() == thread::current().id() {
            // Called from a command on the monitor thread: it exits on its own.
            return;
        }
        if handle.join().is_err() {
            log::error!("qmp: the monitor thread panicked");
        }
    }
    for m in &shared.monitors {
        m.lock().disconnect();
    }
    shared.remove_socket_files();
}
