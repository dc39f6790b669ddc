//! Shared helpers for the server tests: a fake command set, a thread that
//! plays the VMM, and a line-oriented test client.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use qmp::{
    CommandFds, CommandMeta, CommandSet, ErrorClass, MonitorFds, QmpError, QmpServer, ServerConfig,
    VersionInfo,
};

#[path = "../../../tests/common/fd_passing.rs"]
pub mod fd_passing;
use serde_json::{json, Map, Value};

/// A handful of commands that behave like QEMU's with `-M none`.
pub struct FakeCommands;

impl CommandSet for FakeCommands {
    fn lookup(&self, name: &str) -> Option<CommandMeta> {
        match name {
            "query-version" | "query-name" | "query-status" | "block" | "echo" | "fail"
            | "getfd" | "closefd" => Some(CommandMeta { allow_oob: false }),
            "migrate-pause" | "take-fd" => Some(CommandMeta { allow_oob: true }),
            _ => None,
        }
    }

    fn run_oob(
        &self,
        name: &str,
        arguments: Map<String, Value>,
        fds: &MonitorFds,
    ) -> Result<Value, QmpError> {
        match name {
            // Not QEMU's: an out-of-band command that takes a named descriptor, as
            // migrate-recover with fd:NAME does.
            "take-fd" => {
                let fdname = arguments
                    .get("fdname")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                fds.take(fdname).map(|fd| {
                    drop(fd);
                    json!({})
                })
            }
            "migrate-pause" => {
                if let Some(key) = arguments.keys().next() {
                    return Err(QmpError::generic(format!(
                        "Parameter '{key}' is unexpected"
                    )));
                }
                Err(QmpError::generic(
                    "migrate-pause is currently only supported during postcopy-active state",
                ))
            }
            _ => Err(QmpError::new(ErrorClass::CommandNotFound, "unreachable")),
        }
    }
}

/// The version the tests announce.
pub fn version() -> VersionInfo {
    VersionInfo {
        major: 7,
        minor: 2,
        micro: 22,
        package: "skiff-test".into(),
    }
}

/// A unique socket path under the system temp dir.
pub fn sock_path(tag: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    std::env::temp_dir().join(format!("qmp-test-{}-{tag}-{n}.sock", std::process::id()))
}

/// A server plus a thread playing the VMM main loop.
pub struct Harness {
    pub server: QmpServer,
    pub paths: Vec<PathBuf>,
    stop: Arc<AtomicBool>,
    vmm: Option<JoinHandle<()>>,
    /// Names of the commands the VMM executed, in order.
    pub executed: Arc<Mutex<Vec<String>>>,
    /// Receives a message each time `block` starts executing.
    pub block_started: Receiver<()>,
    /// Each message lets one running `block` finish.
    pub release: Sender<()>,
}

impl Harness {
    /// Starts a server on `n` fresh unix sockets.
    pub fn start(n: usize) -> Harness {
        Self::start_with_version(n, version())
    }

    /// Starts a server announcing `version`.
    pub fn start_with_version(n: usize, version: VersionInfo) -> Harness {
        let paths: Vec<PathBuf> = (0..n).map(|i| sock_path(&format!("m{i}"))).collect();
        let config = ServerConfig {
            addrs: paths
                .iter()
                .map(|p| qmp::ListenAddr::Unix(p.clone()))
                .collect(),
            version: version.clone(),
        };
        let server = QmpServer::start(config, Arc::new(FakeCommands)).expect("start");
        let stop = Arc::new(AtomicBool::new(false));
        let executed = Arc::new(Mutex::new(Vec::new()));
        let (started_tx, block_started) = channel();
        let (release, release_rx) = channel::<()>();
        let vmm = {
            let server = server.clone();
            let stop = stop.clone();
            let executed = executed.clone();
            std::thread::spawn(move || {
                let mut exec = |name: &str,
                                args: Map<String, Value>,
                                mut fds: CommandFds|
                 -> Result<Value, QmpError> {
                    executed.lock().unwrap().push(name.to_string());
                    match name {
                        "block" => {
                            let _ = started_tx.send(());
                            let _ = release_rx.recv_timeout(Duration::from_secs(20));
                            Ok(json!({}))
                        }
                        "echo" => Ok(Value::Object(args)),
                        "getfd" | "closefd" => {
                            let fdname = args.get("fdname").and_then(Value::as_str).unwrap_or("");
                            let result = if name == "getfd" {
                                fds.getfd(fdname)
                            } else {
                                fds.monitor().closefd(fdname)
                            };
                            result.map(|()| json!({}))
                        }
                        "fail" => Err(QmpError::generic("it failed")),
                        "take-fd" => FakeCommands.run_oob(name, args, fds.monitor()),
                        "migrate-pause" => Err(QmpError::generic(
                            "migrate-pause is currently only supported during postcopy-active state",
                        )),
                        "query-name" | "query-status" | "query-version" if !args.is_empty() => {
                            let key = qmp::json::ghash::first_unexpected(&args, &[]).unwrap_or("");
                            Err(QmpError::generic(format!("Parameter '{key}' is unexpected")))
                        }
                        "query-name" => Ok(json!({})),
                        "query-status" => Ok(json!({"running": true, "singlestep": false, "status": "running"})),
                        "query-version" => Ok(version.to_value()),
                        _ => Err(QmpError::generic("unexpected")),
                    }
                };
                while !stop.load(Ordering::SeqCst) {
                    let fd = std::os::fd::AsRawFd::as_raw_fd(server.request_event());
                    poll_readable(fd, 50);
                    while server.run_next(&mut exec) {}
                }
            })
        };
        Harness {
            server,
            paths,
            stop,
            vmm: Some(vmm),
            executed,
            block_started,
            release,
        }
    }

    /// Connects to monitor `i` and reads the greeting.
    pub fn connect(&self, i: usize) -> Client {
        let mut c = Client::connect(&self.paths[i]);
        let g = c.line();
        assert!(g.starts_with("{\"QMP\": "), "greeting {g}");
        c
    }

    /// Connects and negotiates (optionally with OOB).
    pub fn negotiated(&self, i: usize, oob: bool) -> Client {
        let mut c = self.connect(i);
        if oob {
            c.send(r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#);
        } else {
            c.send(r#"{"execute":"qmp_capabilities"}"#);
        }
        assert_eq!(c.line(), "{\"return\": {}}");
        c
    }

    /// Waits until a `block` command is executing.
    pub fn wait_block_started(&self) {
        self.block_started
            .recv_timeout(Duration::from_secs(10))
            .expect("block did not start");
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for _ in 0..4 {
            let _ = self.release.send(());
        }
        if let Some(h) = self.vmm.take() {
            let _ = h.join();
        }
        self.server.shutdown();
    }
}

/// Waits up to `timeout_ms` for `fd` to become readable.
fn poll_readable(fd: i32, timeout_ms: i32) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for the duration of the call.
    unsafe {
        libc::poll(&mut pfd, 1, timeout_ms);
    }
}

/// A line-oriented test client.
pub struct Client {
    pub stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    /// Connects without reading anything.
    pub fn connect(path: &Path) -> Client {
        let stream = UnixStream::connect(path).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Client { stream, reader }
    }

    /// Sends raw bytes.
    pub fn send_bytes(&mut self, b: &[u8]) {
        self.stream.write_all(b).expect("send");
    }

    /// Sends text.
    pub fn send(&mut self, s: &str) {
        self.send_bytes(s.as_bytes());
    }

    /// Reads one message line; checks the CRLF and strips it.
    pub fn line(&mut self) -> String {
        let mut buf = Vec::new();
        self.reader.read_until(b'\n', &mut buf).expect("read");
        assert!(
            buf.ends_with(b"\r\n"),
            "not CRLF-terminated: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.truncate(buf.len() - 2);
        String::from_utf8(buf).expect("ASCII output")
    }

    /// Reads one message as JSON.
    pub fn msg(&mut self) -> Value {
        serde_json::from_str(&self.line()).expect("valid JSON")
    }

    /// Asserts nothing arrives within `ms` milliseconds.
    pub fn expect_silence(&mut self, ms: u64) {
        self.stream
            .set_read_timeout(Some(Duration::from_millis(ms)))
            .unwrap();
        let mut buf = Vec::new();
        let r = self.reader.read_until(b'\n', &mut buf);
        assert!(
            buf.is_empty() && r.is_err(),
            "unexpected output: {:?}",
            String::from_utf8_lossy(&buf)
        );
        self.stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
    }
}
