//! A small synchronous QMP client over a raw Unix or TCP socket, for tests and benchmarks.
//!
//! It deliberately does as little as possible on its own, so tests see exactly what the server
//! sends: [`QmpClient::connect_unix`] retries until the socket accepts, [`QmpClient::read_line`]
//! returns one CRLF-terminated line (and fails on anything else), [`QmpClient::send_raw`] writes
//! arbitrary bytes. The helpers above those ([`QmpClient::execute`], [`QmpClient::reply_to`],
//! [`QmpClient::wait_event`]) collect events that arrive in between into
//! [`QmpClient::events`].
//!
//! Every read has a deadline; errors are [`ClientError`]s whose text includes the last lines
//! exchanged (see [`QmpClient::transcript`]), so a failing test shows the conversation.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long the convenience helpers wait for one message unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
/// How many lines [`QmpClient::transcript`] keeps.
const TRANSCRIPT_LINES: usize = 40;
/// Longest line shown in a transcript (longer ones are cut).
const TRANSCRIPT_LINE_CHARS: usize = 400;

/// What went wrong talking to the server.
#[derive(Debug)]
pub enum ClientError {
    /// Nothing (or no complete line) arrived before the deadline.
    Timeout {
        waited: Duration,
        transcript: String,
    },
    /// The server closed the connection.
    Eof { partial: String, transcript: String },
    /// A socket error.
    Io {
        error: io::Error,
        transcript: String,
    },
    /// The server sent something that is not a CRLF-terminated JSON object, or not the
    /// expected message.
    Protocol { what: String, transcript: String },
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Timeout { waited, transcript } => write!(
                f,
                "QMP: no message within {:.3} s\n{transcript}",
                waited.as_secs_f64()
            ),
            ClientError::Eof {
                partial,
                transcript,
            } => write!(
                f,
                "QMP: connection closed by the server (unterminated data: {partial:?})\n{transcript}"
            ),
            ClientError::Io { error, transcript } => {
                write!(f, "QMP: socket error: {error}\n{transcript}")
            }
            ClientError::Protocol { what, transcript } => write!(f, "QMP: {what}\n{transcript}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl ClientError {
    /// Whether this is a [`ClientError::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, ClientError::Timeout { .. })
    }

    /// Whether this is a [`ClientError::Eof`].
    pub fn is_eof(&self) -> bool {
        matches!(self, ClientError::Eof { .. })
    }
}

/// Result of the client's operations.
pub type ClientResult<T> = Result<T, ClientError>;

/// The socket under the client.
enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_read_timeout(timeout),
            Conn::Tcp(s) => s.set_read_timeout(timeout),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.write_all(buf),
            Conn::Tcp(s) => s.write_all(buf),
        }
    }

    fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            Conn::Unix(s) => s.as_raw_fd(),
            Conn::Tcp(s) => s.as_raw_fd(),
        }
    }

    fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Write),
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
        }
    }
}

/// A synchronous QMP client over one connection.
pub struct QmpClient {
    conn: Conn,
    /// Bytes received but not yet returned as lines.
    pending: Vec<u8>,
    /// Events received by [`QmpClient::reply_to`] and friends, oldest first, until taken.
    pub events: VecDeque<Value>,
    /// The greeting, once [`QmpClient::read_greeting`] has read it.
    pub greeting: Option<Value>,
    /// The last lines exchanged, `-> ` for sent and `<- ` for received.
    log: VecDeque<String>,
    next_id: u64,
}

impl QmpClient {
    fn from_conn(conn: Conn) -> QmpClient {
        QmpClient {
            conn,
            pending: Vec::new(),
            events: VecDeque::new(),
            greeting: None,
            log: VecDeque::new(),
            next_id: 0,
        }
    }

    /// Connects to the Unix socket at `path`, retrying every `poll` while it does not exist
    /// or refuses connections, until `timeout`. Reads nothing.
    pub fn connect_unix_polling(
        path: &Path,
        timeout: Duration,
        poll: Duration,
    ) -> io::Result<QmpClient> {
        let deadline = Instant::now() + timeout;
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => return Ok(QmpClient::from_conn(Conn::Unix(stream))),
                Err(e)
                    if Instant::now() < deadline
                        && matches!(
                            e.kind(),
                            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                        ) =>
                {
                    thread::sleep(poll)
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("connecting to {}: {e}", path.display()),
                    ))
                }
            }
        }
    }

    /// Connects to the Unix socket at `path`, retrying every millisecond until `timeout`.
    /// Reads nothing.
    pub fn connect_unix(path: &Path, timeout: Duration) -> io::Result<QmpClient> {
        QmpClient::connect_unix_polling(path, timeout, Duration::from_millis(1))
    }

    /// Connects to `addr` (`host:port`) over TCP, retrying every millisecond while it refuses
    /// connections, until `timeout`. Reads nothing.
    pub fn connect_tcp(addr: &str, timeout: Duration) -> io::Result<QmpClient> {
        let deadline = Instant::now() + timeout;
        loop {
            match TcpStream::connect(addr) {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    return Ok(QmpClient::from_conn(Conn::Tcp(stream)));
                }
                Err(e)
                    if Instant::now() < deadline
                        && e.kind() == io::ErrorKind::ConnectionRefused =>
                {
                    thread::sleep(Duration::from_millis(1))
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("connecting to {addr}: {e}"),
                    ))
                }
            }
        }
    }

    /// The Unix stream under the client (panics for TCP connections).
    pub fn unix_stream(&self) -> &UnixStream {
        match &self.conn {
            Conn::Unix(s) => s,
            Conn::Tcp(_) => panic!("not a Unix socket connection"),
        }
    }

    /// Bytes this client sent that the server has not read yet (`SIOCOUTQ`: on a Unix stream
    /// socket, sent data stays charged to the sender until the receiver reads it).
    pub fn unread_by_server(&self) -> io::Result<usize> {
        let mut queued: libc::c_int = 0;
        // SAFETY: TIOCOUTQ (== SIOCOUTQ) writes one c_int through the pointer, which is valid.
        let rc = unsafe { libc::ioctl(self.conn.raw_fd(), libc::TIOCOUTQ, &mut queued) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(usize::try_from(queued).unwrap_or(0))
    }

    /// Waits until the server has read everything this client sent (see
    /// [`QmpClient::unread_by_server`]), polling every 100 µs until `timeout`.
    pub fn wait_consumed(&mut self, timeout: Duration) -> ClientResult<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let unread = self.unread_by_server().map_err(|error| ClientError::Io {
                error,
                transcript: self.transcript(),
            })?;
            if unread == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.protocol(format!(
                    "the server left {unread} sent bytes unread for {:.3} s",
                    timeout.as_secs_f64()
                )));
            }
            thread::sleep(Duration::from_micros(100));
        }
    }

    /// The last lines exchanged, for failure messages.
    pub fn transcript(&self) -> String {
        let mut text = String::from("--- QMP transcript (last lines) ---\n");
        for line in &self.log {
            text.push_str(line);
            text.push('\n');
        }
        if !self.pending.is_empty() {
            let pending = String::from_utf8_lossy(&self.pending);
            let shown: String = pending.chars().take(TRANSCRIPT_LINE_CHARS).collect();
            text.push_str(&format!(
                "(received, not yet read: {} bytes: {shown:?}{})\n",
                self.pending.len(),
                if shown.len() < pending.len() {
                    "..."
                } else {
                    ""
                }
            ));
        }
        text.push_str("--- end of transcript ---");
        text
    }

    fn note(&mut self, dir: &str, bytes: &[u8]) {
        let mut text = String::from_utf8_lossy(bytes).into_owned();
        if text.chars().count() > TRANSCRIPT_LINE_CHARS {
            text = text.chars().take(TRANSCRIPT_LINE_CHARS).collect::<String>() + "...";
        }
        if self.log.len() == TRANSCRIPT_LINES {
            self.log.pop_front();
        }
        self.log.push_back(format!("{dir} {}", text.trim_end()));
    }

    fn protocol(&self, what: impl Into<String>) -> ClientError {
        ClientError::Protocol {
            what: what.into(),
            transcript: self.transcript(),
        }
    }

    /// Sends `bytes` unchanged.
    pub fn send_raw(&mut self, bytes: &[u8]) -> ClientResult<()> {
        self.note("->", bytes);
        self.conn.write_all(bytes).map_err(|error| ClientError::Io {
            error,
            transcript: self.transcript(),
        })
    }

    /// Passes `fd` to the server (SCM_RIGHTS) on a lone space byte, as `qemu.qmp`'s
    /// `send_fd_scm` does; a `getfd` sent next takes it. Unix connections only.
    pub fn send_fd(&mut self, fd: std::os::fd::RawFd) -> ClientResult<()> {
        self.note("->", b" (with a descriptor)");
        super::fd_passing::send_with_fds(self.unix_stream(), b" ", &[fd])
            .map(drop)
            .map_err(|error| ClientError::Io {
                error,
                transcript: self.transcript(),
            })
    }

    /// Sends `message` as compact JSON followed by `\n`.
    pub fn send(&mut self, message: &Value) -> ClientResult<()> {
        let mut bytes = serde_json::to_vec(message).expect("serializable JSON");
        bytes.push(b'\n');
        self.send_raw(&bytes)
    }

    /// Closes the sending half of the connection (the server sees EOF).
    pub fn shutdown_write(&mut self) -> ClientResult<()> {
        self.conn.shutdown_write().map_err(|error| ClientError::Io {
            error,
            transcript: self.transcript(),
        })
    }

    /// Reads one line; it must end in `\r\n`. Returns it without the line ending.
    pub fn read_line(&mut self, timeout: Duration) -> ClientResult<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                self.note("<-", &line);
                if !line.ends_with(b"\r\n") {
                    return Err(self.protocol(format!(
                        "line not terminated by CRLF: {:?}",
                        String::from_utf8_lossy(&line)
                    )));
                }
                let text = String::from_utf8(line[..line.len() - 2].to_vec())
                    .map_err(|_| self.protocol("line is not UTF-8"))?;
                return Ok(text);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Timeout {
                    waited: timeout,
                    transcript: self.transcript(),
                });
            }
            let wait = (deadline - now).max(Duration::from_micros(100));
            self.conn
                .set_read_timeout(Some(wait))
                .map_err(|error| ClientError::Io {
                    error,
                    transcript: self.transcript(),
                })?;
            let mut chunk = [0u8; 65536];
            match self.conn.read(&mut chunk) {
                Ok(0) => {
                    return Err(ClientError::Eof {
                        partial: String::from_utf8_lossy(&self.pending).into_owned(),
                        transcript: self.transcript(),
                    })
                }
                Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(error) => {
                    return Err(ClientError::Io {
                        error,
                        transcript: self.transcript(),
                    })
                }
            }
        }
    }

    /// Reads one message (a line holding a JSON object).
    pub fn read_message(&mut self, timeout: Duration) -> ClientResult<Value> {
        let line = self.read_line(timeout)?;
        let value: Value = serde_json::from_str(&line)
            .map_err(|e| self.protocol(format!("line is not JSON ({e}): {line:?}")))?;
        if !value.is_object() {
            return Err(self.protocol(format!("message is not a JSON object: {line}")));
        }
        Ok(value)
    }

    /// Waits until the connection is closed by the server; any message that arrives first is
    /// an error.
    pub fn expect_eof(&mut self, timeout: Duration) -> ClientResult<()> {
        match self.read_line(timeout) {
            Err(ClientError::Eof { partial, .. }) if partial.is_empty() => Ok(()),
            Err(e) => Err(e),
            Ok(line) => Err(self.protocol(format!("expected EOF, got {line}"))),
        }
    }

    /// Asserts that nothing arrives for `quiet` (a negative check: it always waits that long).
    pub fn expect_silence(&mut self, quiet: Duration) -> ClientResult<()> {
        match self.read_line(quiet) {
            Err(ClientError::Timeout { .. }) => Ok(()),
            Err(e) => Err(e),
            Ok(line) => Err(self.protocol(format!(
                "expected no message for {:.3} s, got {line}",
                quiet.as_secs_f64()
            ))),
        }
    }

    /// Reads the greeting line and checks its shape (`{"QMP": {"version": {...},
    /// "capabilities": [...]}}`).
    pub fn read_greeting(&mut self, timeout: Duration) -> ClientResult<Value> {
        let greeting = self.read_message(timeout)?;
        let ok = greeting["QMP"]["version"].is_object()
            && greeting["QMP"]["capabilities"].is_array()
            && greeting.as_object().map(|o| o.len()) == Some(1);
        if !ok {
            return Err(self.protocol(format!("not a QMP greeting: {greeting}")));
        }
        self.greeting = Some(greeting.clone());
        Ok(greeting)
    }

    /// A fresh id, unique within this client.
    pub fn fresh_id(&mut self) -> Value {
        self.next_id += 1;
        json!(format!("c{}", self.next_id))
    }

    /// Reads messages until the reply (a message without `event`) whose `id` equals `id`.
    /// Events met on the way go to [`QmpClient::events`]; a reply with another id is an
    /// error (replies must come in order).
    pub fn reply_to(&mut self, id: &Value, timeout: Duration) -> ClientResult<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = self.read_message(left)?;
            if message.get("event").is_some() {
                self.events.push_back(message);
                continue;
            }
            if message.get("id") == Some(id) {
                return Ok(message);
            }
            return Err(self.protocol(format!("expected the reply with id {id}, got {message}")));
        }
    }

    /// Sends `{"execute": name, "arguments": args, "id": <fresh>}` (no `arguments` member
    /// when `args` is null) and returns the whole reply.
    pub fn execute_raw(&mut self, name: &str, args: Value) -> ClientResult<Value> {
        let id = self.fresh_id();
        let mut request = json!({"execute": name, "id": id});
        if !args.is_null() {
            request["arguments"] = args;
        }
        self.send(&request)?;
        self.reply_to(&id, DEFAULT_TIMEOUT)
    }

    /// Runs a command that must succeed and returns its `return` value.
    pub fn execute(&mut self, name: &str, args: Value) -> ClientResult<Value> {
        let reply = self.execute_raw(name, args)?;
        match reply.get("return") {
            Some(value) if reply.get("error").is_none() => Ok(value.clone()),
            _ => Err(self.protocol(format!("{name} failed: {reply}"))),
        }
    }

    /// Runs a command that must fail and returns `(class, desc)` of its error.
    pub fn execute_err(&mut self, name: &str, args: Value) -> ClientResult<(String, String)> {
        let reply = self.execute_raw(name, args)?;
        match (
            reply["error"]["class"].as_str(),
            reply["error"]["desc"].as_str(),
        ) {
            (Some(class), Some(desc)) if reply.get("return").is_none() => {
                Ok((class.to_string(), desc.to_string()))
            }
            _ => Err(self.protocol(format!("expected {name} to fail, got {reply}"))),
        }
    }

    /// `qmp_capabilities` without arguments; must return `{}`.
    pub fn negotiate(&mut self) -> ClientResult<()> {
        let reply = self.execute("qmp_capabilities", Value::Null)?;
        if reply != json!({}) {
            return Err(self.protocol(format!("qmp_capabilities returned {reply}")));
        }
        Ok(())
    }

    /// `qmp_capabilities` with `{"enable": ["oob"]}`; must return `{}`.
    pub fn negotiate_oob(&mut self) -> ClientResult<()> {
        let reply = self.execute("qmp_capabilities", json!({"enable": ["oob"]}))?;
        if reply != json!({}) {
            return Err(self.protocol(format!("qmp_capabilities returned {reply}")));
        }
        Ok(())
    }

    /// Returns the first collected event named `name` (removing it and every event before
    /// it), reading more messages if needed. A reply arriving meanwhile is an error.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> ClientResult<Value> {
        let deadline = Instant::now() + timeout;
        while let Some(event) = self.events.pop_front() {
            if event["event"] == name {
                return Ok(event);
            }
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = self.read_message(left)?;
            if message.get("event").is_none() {
                return Err(
                    self.protocol(format!("expected event {name}, got the reply {message}"))
                );
            }
            if message["event"] == name {
                return Ok(message);
            }
        }
    }

    /// Connects to `path` (retrying until `timeout`), reads the greeting and negotiates
    /// (with OOB if `oob`).
    pub fn open_unix(path: &Path, oob: bool, timeout: Duration) -> ClientResult<QmpClient> {
        let mut client =
            QmpClient::connect_unix(path, timeout).map_err(|error| ClientError::Io {
                error,
                transcript: String::new(),
            })?;
        client.read_greeting(timeout)?;
        if oob {
            client.negotiate_oob()?;
        } else {
            client.negotiate()?;
        }
        Ok(client)
    }
}

/// Checks the shape of an event: `{"timestamp": {"seconds", "microseconds"}, "event": name}`
/// plus `data` exactly when `data` is `Some`. Returns a description of what is wrong.
pub fn check_event(event: &Value, name: &str, data: Option<&Value>) -> Result<(), String> {
    let ts = &event["timestamp"];
    let ok_ts = ts["seconds"].as_i64().is_some_and(|s| s > 1_000_000_000)
        && ts["microseconds"]
            .as_i64()
            .is_some_and(|u| (0..1_000_000).contains(&u))
        && ts.as_object().map(|o| o.len()) == Some(2);
    if !ok_ts {
        return Err(format!("bad timestamp in {event}"));
    }
    if event["event"] != name {
        return Err(format!("expected event {name}, got {event}"));
    }
    let expected_len = if data.is_some() { 3 } else { 2 };
    if event.as_object().map(|o| o.len()) != Some(expected_len) || event.get("data") != data {
        return Err(format!(
            "event {name}: expected data {}, got {event}",
            data.map_or("absent".to_string(), |d| d.to_string())
        ));
    }
    Ok(())
}
