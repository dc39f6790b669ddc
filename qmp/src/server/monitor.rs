//! The state of one monitor shared between the monitor thread and the VMM
//! thread: session, in-band queue, output buffer.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::{Mutex, MutexGuard};

use serde_json::{Map, Value};

use super::fds::MonitorFds;
use crate::session::{Mode, Session};

/// Most in-band requests waiting per monitor once OOB is enabled (QEMU's
/// `QMP_REQ_QUEUE_LEN_MAX`); queueing the last one suspends reading.
pub const QUEUE_MAX: usize = 8;

/// Past this much unsent output the monitor stops taking input from its
/// client until the client reads.
pub(crate) const OUT_HIGH_WATER: usize = 1 << 20;

/// An in-band request waiting for the dispatcher.
#[derive(Debug)]
pub(crate) enum Queued {
    /// Already answered (a parse or validation error, ...): sent in its turn.
    Reply(Value),
    /// A command for the VMM to run.
    Execute {
        name: String,
        arguments: Map<String, Value>,
        id: Option<Value>,
        /// Descriptors that came with the request (SCM_RIGHTS).
        fds: Vec<OwnedFd>,
    },
}

/// Mutable monitor state, behind the monitor's mutex.
#[derive(Debug)]
pub(crate) struct MonitorState {
    /// The current connection, 0 when no client is connected.
    pub(crate) connection: u64,
    /// The protocol state of the current connection.
    pub(crate) session: Session,
    /// In-band requests in arrival order.
    pub(crate) queue: VecDeque<Queued>,
    /// Whether the dispatcher is running one of this monitor's requests.
    pub(crate) in_flight: bool,
    /// Bytes waiting to be written to the client.
    pub(crate) out: Vec<u8>,
}

impl MonitorState {
    fn new() -> Self {
        MonitorState {
            connection: 0,
            session: Session::new(true),
            queue: VecDeque::new(),
            in_flight: false,
            out: Vec::new(),
        }
    }

    /// Whether reading input is suspended by the queue: without OOB one
    /// request at a time (queued or running); with OOB while the queue is full.
    pub(crate) fn suspended(&self) -> bool {
        if self.session.oob_enabled {
            self.queue.len() >= QUEUE_MAX
        } else {
            !self.queue.is_empty() || self.in_flight
        }
    }

    /// Whether events go to this monitor's client.
    pub(crate) fn wants_events(&self) -> bool {
        self.connection != 0 && self.session.mode == Mode::Command
    }

    /// Starts a new connection: negotiation mode, greeting queued for output.
    pub(crate) fn connect(&mut self, connection: u64, greeting: &[u8]) {
        self.connection = connection;
        self.session = Session::new(true);
        self.queue.clear();
        self.out.clear();
        self.out.extend_from_slice(greeting);
    }

    /// Ends the connection: queued requests are dropped without replies.
    /// A request already running keeps `in_flight` until it finishes.
    pub(crate) fn disconnect(&mut self) {
        self.connection = 0;
        self.session = Session::new(true);
        self.queue.clear();
        self.out = Vec::new();
    }
}

/// One monitor: a listening address and its shared state.
#[derive(Debug)]
pub(crate) struct Monitor {
    /// The address, for log messages.
    pub(crate) label: String,
    state: Mutex<MonitorState>,
    /// Descriptors kept by `getfd`; they outlive connections, as in QEMU.
    pub(crate) fds: MonitorFds,
}

impl Monitor {
    pub(crate) fn new(label: String) -> Self {
        Monitor {
            label,
            state: Mutex::new(MonitorState::new()),
            fds: MonitorFds::default(),
        }
    }

    /// Locks the state; a poisoned lock is recovered (the state stays usable).
    pub(crate) fn lock(&self) -> MutexGuard<'_, MonitorState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}
