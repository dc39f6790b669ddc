//! The monitor thread: accepts clients, reads and parses input, answers or
//! queues requests, runs out-of-band commands, flushes output.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::monitor::{Queued, OUT_HIGH_WATER};
use super::socket::{Listener, Stream};
use super::Shared;
use crate::json::{to_line, JsonStreamer, Message};
use crate::message;
use crate::session::{self, Action};

const WAKE_TOKEN: u64 = 0;
const READ_CHUNK: usize = 4096;

fn listener_token(i: usize) -> u64 {
    1 + 2 * i as u64
}

fn client_token(i: usize) -> u64 {
    2 + 2 * i as u64
}

/// Monitor-thread-only state of one monitor.
struct Port {
    listener: Listener,
    listener_mask: Option<EventSet>,
    client: Option<Stream>,
    client_mask: Option<EventSet>,
    parser: JsonStreamer,
    /// Bytes read from the client but not fed to the parser yet (reading
    /// stopped at a suspension point).
    pending: Vec<u8>,
    pending_pos: usize,
    /// Descriptors passed (SCM_RIGHTS) and not yet given to a request; see [`Port::owns_fds`].
    fds: Vec<OwnedFd>,
    /// Whether `fds` came with the bytes in `pending` (else with an earlier read).
    fds_with_pending: bool,
}

/// JSON whitespace, which QMP skips between messages.
fn is_json_space(b: &u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

impl Port {
    /// Whether the message just completed at `pending_pos` is the one the waiting descriptors
    /// were sent with. Linux ends a read with the data sent along with descriptors, so they
    /// belong to the last message begun in that read: one it completes with only whitespace
    /// after it, else the next message to complete (begun in that read, or, when the read
    /// held only whitespace, as `qemu.qmp` sends a lone space with them, in a later one).
    fn owns_fds(&self) -> bool {
        !self.fds.is_empty()
            && (!self.fds_with_pending
                || self.pending[self.pending_pos..].iter().all(is_json_space))
    }
}

/// The monitor thread's state.
pub(crate) struct IoThread {
    shared: Arc<Shared>,
    epoll: Epoll,
    ports: Vec<Port>,
}

impl IoThread {
    pub(crate) fn new(
        shared: Arc<Shared>,
        listeners: Vec<Listener>,
        epoll: Epoll,
    ) -> io::Result<Self> {
        epoll.ctl(
            ControlOperation::Add,
            shared.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE_TOKEN),
        )?;
        let ports = listeners
            .into_iter()
            .map(|listener| Port {
                listener,
                listener_mask: None,
                client: None,
                client_mask: None,
                parser: JsonStreamer::new(),
                pending: Vec::new(),
                pending_pos: 0,
                fds: Vec::new(),
                fds_with_pending: false,
            })
            .collect();
        Ok(IoThread {
            shared,
            epoll,
            ports,
        })
    }

    /// The thread body; returns after shutdown.
    pub(crate) fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        while !self.shared.stop.load(Ordering::SeqCst) {
            for i in 0..self.ports.len() {
                self.service(i);
                self.update_interest(i);
            }
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("qmp: epoll_wait failed, monitor thread stops: {e}");
                    break;
                }
            };
            for ev in &events[..n] {
                let token = ev.data();
                let set = ev.event_set();
                if token == WAKE_TOKEN {
                    let _ = self.shared.wake.read();
                    continue;
                }
                let i = ((token - 1) / 2) as usize;
                if i >= self.ports.len() {
                    continue;
                }
                if token == listener_token(i) {
                    self.accept(i);
                } else if set.contains(EventSet::IN) {
                    self.read(i);
                } else if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                    self.disconnect(i, "hang-up");
                }
            }
        }
        for i in 0..self.ports.len() {
            if self.ports[i].client.is_some() {
                self.flush(i);
                self.disconnect(i, "shutdown");
            }
        }
        self.shared.remove_socket_files();
    }

    fn label(&self, i: usize) -> &str {
        &self.shared.monitors[i].label
    }

    fn accept(&mut self, i: usize) {
        if self.ports[i].client.is_some() {
            return;
        }
        let stream = match self.ports[i].listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                log::warn!("qmp: {}: accept failed: {e}", self.label(i));
                return;
            }
        };
        let connection = self.shared.next_connection.fetch_add(1, Ordering::Relaxed);
        log::debug!("qmp: {}: client connected", self.label(i));
        let port = &mut self.ports[i];
        port.parser = JsonStreamer::new();
        port.pending.clear();
        port.pending_pos = 0;
        port.client_mask = None;
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(EventSet::empty(), client_token(i)),
        ) {
            log::warn!("qmp: cannot watch a client: {e}");
            return;
        }
        port.client_mask = Some(EventSet::empty());
        port.client = Some(stream);
        self.shared.monitors[i]
            .lock()
            .connect(connection, &self.shared.greeting);
    }

    fn disconnect(&mut self, i: usize, why: &str) {
        let port = &mut self.ports[i];
        if let Some(stream) = port.client.take() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                stream.as_raw_fd(),
                EpollEvent::default(),
            );
            log::debug!(
                "qmp: {}: client disconnected ({why})",
                self.shared.monitors[i].label
            );
        }
        port.client_mask = None;
        port.parser = JsonStreamer::new();
        port.pending = Vec::new();
        port.pending_pos = 0;
        port.fds = Vec::new();
        self.shared.monitors[i].lock().disconnect();
    }

    fn read(&mut self, i: usize) {
        let port = &mut self.ports[i];
        let Some(stream) = port.client.as_mut() else {
            return;
        };
        if port.pending_pos < port.pending.len() {
            return;
        }
        let mut buf = [0u8; READ_CHUNK];
        let mut fds = Vec::new();
        let result = stream.read(&mut buf, &mut fds);
        if !fds.is_empty() {
            if !port.fds.is_empty() {
                // As QEMU: newly passed descriptors replace those no request took yet.
                log::debug!(
                    "qmp: closing {} unclaimed passed descriptors",
                    port.fds.len()
                );
            }
            port.fds = fds;
            port.fds_with_pending = true;
        } else {
            port.fds_with_pending = false;
        }
        match result {
            Ok(0) => {
                self.flush(i);
                self.disconnect(i, "end of input");
            }
            Ok(n) => {
                port.pending.clear();
                port.pending.extend_from_slice(&buf[..n]);
                port.pending_pos = 0;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                let why = format!("read error: {e}");
                self.disconnect(i, &why);
            }
        }
    }

    /// Writes as much pending output as the socket takes.
    fn flush(&mut self, i: usize) {
        let Some(stream) = self.ports[i].client.as_ref() else {
            return;
        };
        let mut failed = None;
        {
            let mut st = self.shared.monitors[i].lock();
            let mut written = 0;
            while written < st.out.len() {
                match stream.send(&st.out[written..]) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            st.out.drain(..written);
            if st.out.is_empty() && st.out.capacity() > 1 << 16 {
                st.out = Vec::new();
            }
        }
        if let Some(e) = failed {
            let why = format!("write error: {e}");
            self.disconnect(i, &why);
        }
    }

    /// Flushes output and feeds buffered input to the parser until the
    /// monitor is suspended or the input is used up.
    fn service(&mut self, i: usize) {
        if self.ports[i].client.is_none() {
            return;
        }
        self.flush(i);
        loop {
            {
                let st = self.shared.monitors[i].lock();
                if st.suspended() || st.out.len() > OUT_HIGH_WATER {
                    break;
                }
            }
            let port = &mut self.ports[i];
            let mut fed_message = false;
            while port.pending_pos < port.pending.len() {
                let b = port.pending[port.pending_pos];
                port.pending_pos += 1;
                port.parser.feed_byte(b);
                // One byte can finish two messages (e.g. `1}`); both are
                // handled before suspension is looked at again, like QEMU.
                while let Some(msg) = port.parser.next_message() {
                    let fds = if port.owns_fds() {
                        std::mem::take(&mut port.fds)
                    } else {
                        Vec::new()
                    };
                    handle(&self.shared, i, msg, fds);
                    fed_message = true;
                }
                if fed_message {
                    break;
                }
            }
            if !fed_message {
                break;
            }
        }
        let port = &mut self.ports[i];
        if port.pending_pos >= port.pending.len() {
            port.pending.clear();
            port.pending_pos = 0;
        }
        self.flush(i);
    }

    /// Registers what the monitor thread wants to hear about.
    fn update_interest(&mut self, i: usize) {
        let port = &mut self.ports[i];
        let want_listen = if port.client.is_none() {
            EventSet::IN
        } else {
            EventSet::empty()
        };
        if port.listener_mask != Some(want_listen) {
            let op = if port.listener_mask.is_none() {
                ControlOperation::Add
            } else {
                ControlOperation::Modify
            };
            match self.epoll.ctl(
                op,
                port.listener.as_raw_fd(),
                EpollEvent::new(want_listen, listener_token(i)),
            ) {
                Ok(()) => port.listener_mask = Some(want_listen),
                Err(e) => log::error!("qmp: cannot watch a listener: {e}"),
            }
        }
        let Some(stream) = port.client.as_ref() else {
            return;
        };
        let mut want = EventSet::empty();
        {
            let st = self.shared.monitors[i].lock();
            if !st.suspended()
                && st.out.len() <= OUT_HIGH_WATER
                && port.pending_pos >= port.pending.len()
            {
                want |= EventSet::IN;
            }
            if !st.out.is_empty() {
                want |= EventSet::OUT;
            }
        }
        if port.client_mask != Some(want) {
            match self.epoll.ctl(
                ControlOperation::Modify,
                stream.as_raw_fd(),
                EpollEvent::new(want, client_token(i)),
            ) {
                Ok(()) => port.client_mask = Some(want),
                Err(e) => log::error!("qmp: cannot watch a client: {e}"),
            }
        }
    }
}

/// Deals with one parsed message of monitor `i`, and the descriptors that came with it: an
/// in-band command gets them; otherwise they are closed here. An out-of-band command gets
/// the monitor's named descriptors.
fn handle(shared: &Shared, i: usize, msg: Message, fds: Vec<OwnedFd>) {
    let monitor = &shared.monitors[i];
    let (mut session, connection) = {
        let st = monitor.lock();
        (st.session.clone(), st.connection)
    };
    let decision = session::decide(msg, &mut session, &*shared.commands);
    let mut st = monitor.lock();
    if st.connection != connection {
        return;
    }
    st.session = session;
    match decision.action {
        Action::Reply(reply) => {
            if decision.out_of_band || (st.queue.is_empty() && !st.in_flight) {
                st.out.extend_from_slice(&to_line(&reply));
            } else {
                st.queue.push_back(Queued::Reply(reply));
                drop(st);
                shared.signal_requests();
            }
        }
        Action::Execute {
            name,
            arguments,
            id,
        } => {
            st.queue.push_back(Queued::Execute {
                name,
                arguments,
                id,
                fds,
            });
            drop(st);
            shared.signal_requests();
        }
        Action::RunOob {
            name,
            arguments,
            id,
        } => {
            drop(st);
            let result = shared.commands.run_oob(&name, arguments, &monitor.fds);
            let line = to_line(&message::reply(result, id));
            let mut st = monitor.lock();
            if st.connection == connection {
                st.out.extend_from_slice(&line);
            }
        }
    }
}
