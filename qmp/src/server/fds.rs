//! Descriptors passed to a monitor with SCM_RIGHTS: those that came with a command, and the
//! named ones `getfd` keeps for later commands (QEMU's per-monitor descriptor list).

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::QmpError;

/// The named descriptors of one monitor (`getfd`). As in QEMU they belong to the monitor, not
/// to a client connection: they stay across reconnections and are closed with the server.
/// Clones share the table. In-band commands reach it through [`CommandFds::monitor`],
/// out-of-band ones are given it directly: using it only locks a small map for a moment, so
/// out-of-band handlers may (QEMU's `monitor_cur()` fd list, which its out-of-band
/// `migrate-recover` uses too).
#[derive(Debug, Clone, Default)]
pub struct MonitorFds {
    named: Arc<Mutex<HashMap<String, OwnedFd>>>,
}

impl MonitorFds {
    fn named(&self) -> MutexGuard<'_, HashMap<String, OwnedFd>> {
        self.named.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `closefd`: closes the descriptor kept under `name`.
    pub fn closefd(&self, name: &str) -> Result<(), QmpError> {
        // The descriptor, taken out of the table, is closed here.
        self.named()
            .remove(name)
            .map(drop)
            .ok_or_else(|| QmpError::generic(format!("File descriptor named '{name}' not found")))
    }

    /// Takes the descriptor kept under `name` out of the monitor (as QEMU's migration does
    /// with `fd:NAME`): the caller owns it from now on.
    pub fn take(&self, name: &str) -> Result<OwnedFd, QmpError> {
        self.named().remove(name).ok_or_else(|| {
            QmpError::generic(format!("File descriptor named '{name}' has not been found"))
        })
    }
}

/// What an in-band command may use of descriptor passing: the descriptors that came with it
/// and its monitor's named descriptors. Received descriptors that the command does not take
/// are closed when this is dropped.
#[derive(Debug)]
pub struct CommandFds {
    received: Vec<OwnedFd>,
    monitor: MonitorFds,
}

impl CommandFds {
    pub(crate) fn new(received: Vec<OwnedFd>, monitor: MonitorFds) -> Self {
        CommandFds { received, monitor }
    }

    /// The issuing monitor's named descriptors.
    pub fn monitor(&self) -> &MonitorFds {
        &self.monitor
    }

    /// `getfd`: keeps the first descriptor that came with the command under `name`. One
    /// already kept under that name is replaced and closed.
    pub fn getfd(&mut self, name: &str) -> Result<(), QmpError> {
        if self.received.is_empty() {
            return Err(QmpError::generic(
                "No file descriptor supplied via SCM_RIGHTS",
            ));
        }
        let fd = self.received.remove(0);
        if name.starts_with(|c: char| c.is_ascii_digit()) {
            // A name starting with a digit would read as a descriptor number in `fd:` URIs.
            drop(fd);
            return Err(QmpError::generic(
                "Parameter 'fdname' expects a name not starting with a digit",
            ));
        }
        let old = self.monitor.named().insert(name.to_string(), fd);
        drop(old);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{ErrorKind, Read, Write};
    use std::os::unix::net::UnixStream;

    // Whether a descriptor was closed is told by its socket's peer (descriptor numbers are
    // reused at once by the tests running alongside).

    /// A socket pair: the end to pass, and the end kept.
    fn pipe() -> (OwnedFd, UnixStream) {
        let (passed, kept) = UnixStream::pair().unwrap();
        (passed.into(), kept)
    }

    /// Whether every copy of `kept`'s peer is closed.
    fn reader_gone(mut kept: &UnixStream) -> bool {
        matches!(kept.write_all(b"x"), Err(e) if e.kind() == ErrorKind::BrokenPipe)
    }

    #[test]
    fn getfd_keeps_replaces_and_closefd_closes() {
        let table = MonitorFds::default();
        let (r1, w1) = pipe();
        let (r2, w2) = pipe();
        CommandFds::new(vec![r1], table.clone()).getfd("a").unwrap();
        assert!(!reader_gone(&w1));
        // The same name again: the new descriptor replaces the old one, which is closed.
        CommandFds::new(vec![r2], table.clone()).getfd("a").unwrap();
        assert!(reader_gone(&w1));
        assert!(!reader_gone(&w2));
        table.closefd("a").unwrap();
        assert!(reader_gone(&w2));
        assert_eq!(
            table.closefd("a").unwrap_err().desc,
            "File descriptor named 'a' not found"
        );
    }

    #[test]
    fn getfd_errors_are_qemus_and_close_what_came() {
        let table = MonitorFds::default();
        assert_eq!(
            CommandFds::new(Vec::new(), table.clone())
                .getfd("a")
                .unwrap_err()
                .desc,
            "No file descriptor supplied via SCM_RIGHTS"
        );
        let (r1, w1) = pipe();
        let (r2, w2) = pipe();
        let mut cmd = CommandFds::new(vec![r1, r2], table.clone());
        assert_eq!(
            cmd.getfd("1a").unwrap_err().desc,
            "Parameter 'fdname' expects a name not starting with a digit"
        );
        assert!(reader_gone(&w1), "the refused descriptor is closed");
        assert!(!reader_gone(&w2));
        drop(cmd);
        assert!(reader_gone(&w2), "a descriptor no command took is closed");
        assert!(table.named().is_empty());
    }

    #[test]
    fn take_hands_the_descriptor_over_once() {
        let table = MonitorFds::default();
        let (r, mut w) = pipe();
        CommandFds::new(vec![r], table.clone()).getfd("").unwrap();
        // A clone is the same table (as an out-of-band handler gets it).
        let monitor = table.clone();
        let mut taken = UnixStream::from(monitor.take("").unwrap());
        w.write_all(b"y").unwrap();
        let mut byte = [0u8];
        taken.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"y");
        assert_eq!(
            table.take("").unwrap_err().desc,
            "File descriptor named '' has not been found"
        );
        assert_eq!(
            monitor.closefd("").unwrap_err().desc,
            "File descriptor named '' not found"
        );
    }
}
