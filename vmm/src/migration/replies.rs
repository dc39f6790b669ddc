//! The source's end of the return path: the destination's answers and page requests, read
//! by the migration thread itself between sections and while it waits. (A separate reader
//! thread would add a thread wake-up to every postcopy page request, the latency that
//! matters most once the destination runs.)

use std::collections::VecDeque;
use std::io::{BufReader, Read};
use std::os::fd::AsRawFd;
use std::time::Duration;

use super::stream::{self, Kind, PageRun, StreamError};

/// One answer of the destination.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// Everything up to `End` is loaded.
    Ack,
    /// The destination failed, for this reason.
    Error(String),
    /// Send these pages first.
    RequestPages(PageRun),
    /// The destination's received-page bitmap (recovery).
    RecvBitmap(Vec<u8>),
    /// Postcopy goes on after a recovery.
    ResumeAck,
    /// The destination runs the guest (postcopy switch-over done).
    PostcopyRunning,
    /// The return path ended; why, as a suffix for "the destination closed the connection".
    Closed(String),
}

/// Reads the return path of one connection.
pub struct Replies<R: Read + AsRawFd> {
    input: BufReader<R>,
    /// Decoded answers not handed out yet (one section may carry many page requests).
    pending: VecDeque<Reply>,
    /// Set once the path ended: every later call answers the same.
    closed: Option<String>,
    payload: Vec<u8>,
}

impl<R: Read + AsRawFd> Replies<R> {
    /// Reads `input`, the destination's end of the connection.
    pub fn new(input: R) -> Self {
        Replies {
            input: BufReader::new(input),
            pending: VecDeque::new(),
            closed: None,
            payload: Vec::new(),
        }
    }

    /// The next answer, waiting up to `timeout` for one (`None`: nothing came). An answer
    /// whose first byte arrived is read whole.
    pub fn next(&mut self, timeout: Duration) -> Option<Reply> {
        if let Some(reply) = self.pending.pop_front() {
            return Some(reply);
        }
        if let Some(why) = &self.closed {
            return Some(Reply::Closed(why.clone()));
        }
        if self.input.buffer().is_empty() && !self.readable(timeout) {
            return None;
        }
        self.read_section();
        self.pending.pop_front()
    }

    /// Waits up to `timeout` for input (or the end of it).
    fn readable(&self, timeout: Duration) -> bool {
        let mut fd = libc::pollfd {
            fd: self.input.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // Rounded up: a wait cut to 0 ms would spin.
        let ms = timeout.as_micros().div_ceil(1000);
        let ms = libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX);
        // SAFETY: one live pollfd for the duration of the call.
        let ret = unsafe { libc::poll(&mut fd, 1, ms) };
        // An error (EINTR) reads as "nothing yet": the caller asks again.
        ret > 0
    }

    /// Reads one section and queues what it says.
    fn read_section(&mut self) {
        let reply = match stream::read_section(&mut self.input, &mut self.payload) {
            Ok(Kind::Ack) => Reply::Ack,
            Ok(Kind::Error) => Reply::Error(String::from_utf8_lossy(&self.payload).into_owned()),
            Ok(Kind::RequestPages) => {
                match PageRun::decode_all(Kind::RequestPages, &self.payload) {
                    Ok(runs) => {
                        self.pending
                            .extend(runs.into_iter().map(Reply::RequestPages));
                        return;
                    }
                    Err(e) => Reply::Closed(format!(": {e}")),
                }
            }
            Ok(Kind::RecvBitmap) => Reply::RecvBitmap(std::mem::take(&mut self.payload)),
            Ok(Kind::ResumeAck) => Reply::ResumeAck,
            Ok(Kind::PostcopyRunning) => Reply::PostcopyRunning,
            Ok(kind) => Reply::Closed(format!(": unexpected {kind:?} on the return path")),
            Err(StreamError::Eof) => Reply::Closed(String::new()),
            Err(e) => Reply::Closed(format!(": {e}")),
        };
        if let Reply::Closed(why) = &reply {
            self.closed = Some(why.clone());
        }
        self.pending.push_back(reply);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn answers_are_read_as_they_come_and_the_end_stays() {
        let (mut dest, source) = UnixStream::pair().unwrap();
        let mut replies = Replies::new(source);
        assert_eq!(replies.next(Duration::ZERO), None, "nothing yet");
        let mut runs = Vec::new();
        for addr in [0x1000, 0x5000] {
            PageRun { addr, count: 1 }.encode(&mut runs);
        }
        stream::write_section(&mut dest, Kind::RequestPages, &[&runs]).unwrap();
        stream::write_section(&mut dest, Kind::Ack, &[]).unwrap();
        let request = |addr| Some(Reply::RequestPages(PageRun { addr, count: 1 }));
        assert_eq!(replies.next(Duration::from_secs(5)), request(0x1000));
        assert_eq!(replies.next(Duration::ZERO), request(0x5000));
        assert_eq!(replies.next(Duration::ZERO), Some(Reply::Ack));
        assert_eq!(replies.next(Duration::ZERO), None);
        dest.write_all(&[0xee; 12]).unwrap();
        drop(dest);
        let closed = replies.next(Duration::from_secs(5));
        assert!(
            matches!(&closed, Some(Reply::Closed(why)) if why.contains("unknown section kind")),
            "{closed:?}"
        );
        assert_eq!(replies.next(Duration::ZERO), closed, "closed stays closed");
    }

    #[test]
    fn a_clean_end_is_closed_without_a_reason() {
        let (dest, source) = UnixStream::pair().unwrap();
        let mut replies = Replies::new(source);
        drop(dest);
        assert_eq!(
            replies.next(Duration::from_secs(5)),
            Some(Reply::Closed(String::new()))
        );
    }
}
