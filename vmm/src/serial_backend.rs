//! COM1's back-ends on the event loop: the VMM's stdin, or a listening unix socket with one
//! client at a time. Input is fed to the UART's receive FIFO only as fast as the guest drains
//! it: when the FIFO is full the source is left unread until the UART says it has room.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::vm::{Vm, VmAction};
use api::ShutdownCause;

/// Ctrl-A: with a terminal on stdin, Ctrl-A then `x` ends the VMM (as in QEMU's stdio mux).
const ESCAPE_BYTE: u8 = 0x01;
const ESCAPE_QUIT: u8 = b'x';

const TOKEN_SOURCE: u32 = 0;
const TOKEN_LISTENER: u32 = 1;
const TOKEN_INPUT_READY: u32 = 2;

/// Where input comes from.
enum Source {
    /// Standard input; `tty` when it is a terminal (raw mode, escape sequence active).
    Stdin { tty: bool, escape_pending: bool },
    /// A unix socket server and its current client.
    Socket {
        listener: UnixListener,
        path: PathBuf,
        client: Option<UnixStream>,
    },
}

/// The event-loop subscriber serving COM1's input (and, for sockets, its client attachment).
pub struct SerialBackend {
    vm: Arc<Vm>,
    source: Source,
    input_ready: EventFd,
    /// The source is registered for reads (false while the FIFO is full or after EOF).
    reading: bool,
    /// Stdin reached end of file or failed: no more input from it.
    closed: bool,
}

/// Binds a unix socket for the serial port, replacing a stale socket file.
pub fn bind_socket(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() && UnixStream::connect(path).is_err() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

impl SerialBackend {
    /// Serves stdin. `tty` selects the Ctrl-A x escape.
    pub fn stdin(vm: Arc<Vm>, input_ready: EventFd, tty: bool) -> Self {
        SerialBackend {
            vm,
            source: Source::Stdin {
                tty,
                escape_pending: false,
            },
            input_ready,
            reading: false,
            closed: false,
        }
    }

    /// Serves a listening unix socket.
    pub fn socket(
        vm: Arc<Vm>,
        input_ready: EventFd,
        listener: UnixListener,
        path: PathBuf,
    ) -> Self {
        SerialBackend {
            vm,
            source: Source::Socket {
                listener,
                path,
                client: None,
            },
            input_ready,
            reading: false,
            closed: false,
        }
    }

    fn source_fd(&self) -> Option<i32> {
        match &self.source {
            Source::Stdin { .. } => Some(libc::STDIN_FILENO),
            Source::Socket { client, .. } => client.as_ref().map(|c| c.as_raw_fd()),
        }
    }

    fn start_reading(&mut self, ops: &mut EventOps) {
        if self.reading || self.closed {
            return;
        }
        if let Some(fd) = self.source_fd() {
            match ops.add(Events::with_data_raw(fd, TOKEN_SOURCE, EventSet::IN)) {
                Ok(()) => self.reading = true,
                Err(e) => {
                    // A regular file or /dev/null on stdin cannot be polled: no input then.
                    log::debug!("serial input not polled: {e:?}");
                    self.closed = true;
                }
            }
        }
    }

    fn stop_reading(&mut self, ops: &mut EventOps) {
        if !self.reading {
            return;
        }
        if let Some(fd) = self.source_fd() {
            let _ = ops.remove(Events::with_data_raw(fd, TOKEN_SOURCE, EventSet::IN));
        }
        self.reading = false;
    }

    /// Strips the stdin escape sequence from `bytes`; returns true if the user asked to quit.
    fn filter_escape(&mut self, bytes: &mut Vec<u8>) -> bool {
        let Source::Stdin {
            tty: true,
            escape_pending,
        } = &mut self.source
        else {
            return false;
        };
        let mut out = Vec::with_capacity(bytes.len());
        for &b in bytes.iter() {
            if *escape_pending {
                *escape_pending = false;
                match b {
                    ESCAPE_QUIT => return true,
                    ESCAPE_BYTE => out.push(ESCAPE_BYTE),
                    other => out.extend_from_slice(&[ESCAPE_BYTE, other]),
                }
            } else if b == ESCAPE_BYTE {
                *escape_pending = true;
            } else {
                out.push(b);
            }
        }
        *bytes = out;
        false
    }

    fn read_input(&mut self, ops: &mut EventOps) {
        let mut machine = self.vm.lock();
        let Some(serial) = machine.serial_mut() else {
            return;
        };
        let room = serial.fifo_capacity();
        if room == 0 {
            drop(machine);
            self.stop_reading(ops);
            return;
        }
        let mut buf = vec![0u8; room];
        let result = match &mut self.source {
            Source::Stdin { .. } => std::io::stdin().lock().read(&mut buf),
            Source::Socket {
                client: Some(client),
                ..
            } => client.read(&mut buf),
            Source::Socket { client: None, .. } => return,
        };
        drop(machine);
        match result {
            Ok(0) => self.source_closed(ops),
            Ok(n) => {
                buf.truncate(n);
                if self.filter_escape(&mut buf) {
                    log::info!("quit requested from the terminal (Ctrl-A x)");
                    let mut machine = self.vm.lock();
                    self.vm.request(
                        &mut machine,
                        VmAction::Shutdown {
                            guest: false,
                            reason: ShutdownCause::HostUi,
                            code: 0,
                        },
                    );
                    return;
                }
                if let Some(serial) = self.vm.lock().serial_mut() {
                    serial.enqueue_input(&buf);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                log::info!("serial input closed: {e}");
                self.source_closed(ops);
            }
        }
    }

    fn source_closed(&mut self, ops: &mut EventOps) {
        self.stop_reading(ops);
        match &mut self.source {
            Source::Stdin { .. } => self.closed = true,
            Source::Socket {
                listener, client, ..
            } => {
                *client = None;
                if let Some(serial) = self.vm.lock().serial_mut() {
                    let _ = serial.output_mut().set_socket_client(None);
                }
                if let Err(e) = ops.add(Events::with_data(&*listener, TOKEN_LISTENER, EventSet::IN))
                {
                    log::error!("cannot listen for serial clients again: {e:?}");
                }
                log::info!("serial socket client disconnected");
            }
        }
    }

    fn accept(&mut self, ops: &mut EventOps) {
        let Source::Socket {
            listener, client, ..
        } = &mut self.source
        else {
            return;
        };
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    log::warn!("serial socket accept failed: {e}");
                }
                return;
            }
        };
        let output = stream.try_clone();
        let attached = match output {
            Ok(output) => self
                .vm
                .lock()
                .serial_mut()
                .map(|serial| serial.output_mut().set_socket_client(Some(output))),
            Err(e) => Some(Err(e)),
        };
        if let Some(Err(e)) = attached {
            log::warn!("cannot attach serial socket client: {e}");
            return;
        }
        if let Err(e) = stream.set_nonblocking(true) {
            log::warn!("cannot make the serial client non-blocking: {e}");
        }
        // One client at a time: stop accepting until this one leaves.
        let _ = ops.remove(Events::with_data(&*listener, TOKEN_LISTENER, EventSet::IN));
        *client = Some(stream);
        log::info!("serial socket client connected");
        self.start_reading(ops);
    }
}

impl Drop for SerialBackend {
    fn drop(&mut self) {
        if let Source::Socket { path, .. } = &self.source {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl MutEventSubscriber for SerialBackend {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_SOURCE => {
                if events.event_set().intersects(EventSet::IN) {
                    self.read_input(ops);
                } else {
                    self.source_closed(ops);
                }
            }
            TOKEN_LISTENER => self.accept(ops),
            TOKEN_INPUT_READY => {
                let _ = self.input_ready.read();
                self.start_reading(ops);
            }
            other => log::warn!("serial back-end: unexpected event token {other}"),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.input_ready,
            TOKEN_INPUT_READY,
            EventSet::IN,
        )) {
            log::error!("cannot watch the serial FIFO: {e:?}");
        }
        match &self.source {
            Source::Stdin { .. } => self.start_reading(ops),
            Source::Socket { listener, .. } => {
                if let Err(e) = ops.add(Events::with_data(listener, TOKEN_LISTENER, EventSet::IN)) {
                    log::error!("cannot listen for serial clients: {e:?}");
                }
            }
        }
    }
}
