//! Running the `skiff` binary under test: spawn with captured output, stream the output while
//! it runs, hard timeouts (the child is killed), and failure messages that show everything the
//! VMM printed.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::skiff_bin;

/// Bytes read so far from one of the child's output pipes, and whether it reached EOF.
#[derive(Default)]
struct Captured {
    state: Mutex<(Vec<u8>, bool)>,
    changed: Condvar,
}

impl Captured {
    /// Starts a thread copying `pipe` into a new `Captured`.
    fn start(mut pipe: impl Read + Send + 'static) -> (Arc<Captured>, JoinHandle<()>) {
        let captured = Arc::new(Captured::default());
        let sink = Arc::clone(&captured);
        let reader = thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            loop {
                let n = pipe.read(&mut chunk).unwrap_or(0);
                let mut state = sink.state.lock().expect("capture lock");
                if n == 0 {
                    state.1 = true;
                } else {
                    state.0.extend_from_slice(&chunk[..n]);
                }
                sink.changed.notify_all();
                if n == 0 {
                    return;
                }
            }
        });
        (captured, reader)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.state.lock().expect("capture lock").0).into_owned()
    }

    /// Waits until `done(bytes so far)` holds, EOF, or `deadline`. Returns whether it held.
    fn wait_until(&self, deadline: Instant, mut done: impl FnMut(&[u8]) -> bool) -> bool {
        let mut state = self.state.lock().expect("capture lock");
        loop {
            if done(&state.0) {
                return true;
            }
            let now = Instant::now();
            if state.1 || now >= deadline {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .expect("capture lock")
                .0;
        }
    }
}

/// A running `skiff` process. Killed (and reaped) when dropped if still running.
pub struct Skiff {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Arc<Captured>,
    stderr: Arc<Captured>,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
    command: String,
    status: Option<ExitStatus>,
}

impl Skiff {
    /// Spawns `skiff ARGS` with stdin, stdout and stderr on pipes.
    pub fn spawn<I, S>(args: I) -> Skiff
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Skiff::spawn_via(&[], args)
    }

    /// Spawns `WRAPPER... skiff ARGS` (e.g. `ip netns exec NS`), which must exec skiff.
    pub fn spawn_via<I, S>(wrapper: &[&str], args: I) -> Skiff
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut cmd = Command::new(program);
                cmd.args(rest).arg(skiff_bin());
                cmd
            }
            None => Command::new(skiff_bin()),
        };
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let command = format!("{cmd:?}");
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command}: {e}"));
        let (stdout, out_reader) = Captured::start(child.stdout.take().expect("piped stdout"));
        let (stderr, err_reader) = Captured::start(child.stderr.take().expect("piped stderr"));
        Skiff {
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
            readers: vec![out_reader, err_reader],
            started,
            command,
            status: None,
        }
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Time since the process was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Writes `data` to the child's stdin (the guest's serial input by default).
    pub fn write_stdin(&mut self, data: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        stdin
            .write_all(data)
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("writing to skiff's stdin: {e}\n{}", self.dump()));
    }

    /// Closes the child's stdin (EOF).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Everything the child wrote to stdout so far (lossy UTF-8).
    pub fn stdout_text(&self) -> String {
        self.stdout.text()
    }

    /// Everything the child wrote to stderr so far (lossy UTF-8).
    pub fn stderr_text(&self) -> String {
        self.stderr.text()
    }

    /// Waits until stdout contains `needle` (returns true), or stdout is closed or `deadline`
    /// passes (returns false).
    pub fn wait_stdout_contains(&self, needle: &str, deadline: Instant) -> bool {
        let needle = needle.as_bytes();
        self.stdout.wait_until(deadline, |out| {
            out.windows(needle.len()).any(|w| w == needle)
        })
    }

    /// Waits until `done(stdout so far)` holds, stdout is closed, or `deadline` passes.
    pub fn wait_stdout(&self, deadline: Instant, done: impl FnMut(&[u8]) -> bool) -> bool {
        self.stdout.wait_until(deadline, done)
    }

    /// The exit status if the child has exited (without blocking).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Kills the child (SIGKILL) if it is still running and reaps it.
    pub fn kill(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    /// A description of the process and everything it printed, for failure messages.
    pub fn dump(&self) -> String {
        format!(
            "command: {}\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- end ---",
            self.command,
            self.stdout_text(),
            self.stderr_text()
        )
    }

    /// Waits up to `timeout` for the child to exit; kills it if it does not. Then collects
    /// all of its output.
    pub fn finish(mut self, timeout: Duration) -> Finished {
        let deadline = Instant::now() + timeout;
        let mut timed_out = false;
        while self.try_status().is_none() {
            if Instant::now() >= deadline {
                timed_out = true;
                self.kill();
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
        let elapsed = self.started.elapsed();
        self.stdin = None;
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        Finished {
            status: self.status,
            timed_out,
            stdout: self.stdout_text(),
            stderr: self.stderr_text(),
            elapsed,
            command: self.command.clone(),
        }
    }
}

impl Drop for Skiff {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `skiff` process that has ended (or was killed at its timeout).
#[derive(Debug)]
pub struct Finished {
    /// Exit status (`None` only if it could not be collected).
    pub status: Option<ExitStatus>,
    /// Whether the process was killed because it ran past its timeout.
    pub timed_out: bool,
    /// All of stdout (lossy UTF-8).
    pub stdout: String,
    /// All of stderr (lossy UTF-8).
    pub stderr: String,
    /// From spawn to exit.
    pub elapsed: Duration,
    /// The command line, for messages.
    pub command: String,
}

impl Finished {
    /// The exit code, if the process exited normally (not by a signal) and was not killed.
    pub fn code(&self) -> Option<i32> {
        if self.timed_out {
            return None;
        }
        self.status.and_then(|s| s.code())
    }

    /// A description of how the process ended and everything it printed.
    pub fn dump(&self) -> String {
        let how = match (self.timed_out, self.status) {
            (true, _) => "killed at its timeout".to_string(),
            (false, Some(s)) => match (s.code(), s.signal()) {
                (Some(code), _) => format!("exited with status {code}"),
                (None, Some(sig)) => format!("killed by signal {sig}"),
                _ => format!("{s}"),
            },
            (false, None) => "status unknown".to_string(),
        };
        format!(
            "command: {}\n{how} after {:.3} s\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- end ---",
            self.command,
            self.elapsed.as_secs_f64(),
            self.stdout,
            self.stderr
        )
    }

    /// Panics (with [`Finished::dump`]) unless the process exited with status `code`.
    pub fn assert_exit(&self, code: i32) {
        assert_eq!(
            self.code(),
            Some(code),
            "expected skiff to exit with status {code}\n{}",
            self.dump()
        );
    }

    /// Panics (with [`Finished::dump`]) unless stdout is exactly `expected`.
    pub fn assert_stdout(&self, expected: &str) {
        assert_eq!(
            self.stdout,
            expected,
            "unexpected guest serial output\n{}",
            self.dump()
        );
    }

    /// Panics unless the process exited on its own: non-zero status, exactly one non-empty
    /// line on stderr, and no Rust panic message.
    pub fn assert_clean_error(&self) {
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert!(
            !self.timed_out && matches!(self.code(), Some(c) if c != 0),
            "expected a non-zero exit status\n{}",
            self.dump()
        );
        assert!(
            !self.stderr.contains("panicked"),
            "skiff panicked\n{}",
            self.dump()
        );
        assert_eq!(
            lines.len(),
            1,
            "expected exactly one line on stderr\n{}",
            self.dump()
        );
    }
}

/// Runs `skiff ARGS` with `stdin` written to its standard input, waiting at most `timeout`
/// (then the process is killed and `timed_out` is set).
///
/// Stdin stays open (as a terminal would) until the process has ended.
pub fn run<I, S>(args: I, stdin: &[u8], timeout: Duration) -> Finished
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut skiff = Skiff::spawn(args);
    if !stdin.is_empty() {
        skiff.write_stdin(stdin);
    }
    skiff.finish(timeout)
}

/// Runs the guest ELF at `kernel` with `extra` arguments after `--kernel PATH`.
pub fn run_guest(kernel: &Path, extra: &[&str], timeout: Duration) -> Finished {
    let mut args: Vec<&OsStr> = vec![OsStr::new("--kernel"), kernel.as_os_str()];
    args.extend(extra.iter().map(OsStr::new));
    run(args, b"", timeout)
}

/// Connects to the Unix socket at `path`, retrying (the server may not be listening yet)
/// until `timeout`.
pub fn connect_unix(path: &Path, timeout: Duration) -> std::io::Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return Ok(stream),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Reads from `stream` until `done(bytes so far)` holds, EOF, an error, or `deadline`.
/// Returns the bytes read.
pub fn read_until(
    stream: &mut UnixStream,
    deadline: Instant,
    mut done: impl FnMut(&[u8]) -> bool,
) -> Vec<u8> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    while !done(&got) {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let _ = stream.set_read_timeout(Some((deadline - now).max(Duration::from_millis(1))));
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(_) => break,
        }
    }
    got
}

/// Prints (to stderr) how long a test took when dropped; create one at the top of a test.
pub struct TestTimer {
    name: &'static str,
    started: Instant,
}

impl TestTimer {
    /// Starts timing test `name`.
    pub fn start(name: &'static str) -> TestTimer {
        TestTimer {
            name,
            started: Instant::now(),
        }
    }
}

impl Drop for TestTimer {
    fn drop(&mut self) {
        eprintln!(
            "[time] {}: {:.3} s",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// Resident memory of `pid` in KiB: (total, resident part of the guest RAM mapping), the
/// guest RAM mapping being the anonymous one of exactly `guest_ram_kib`.
pub fn resident_kib(pid: u32, guest_ram_kib: u64) -> Option<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut total, mut guest, mut size) = (0u64, 0u64, 0u64);
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("Size:") => size = words.next()?.parse().ok()?,
            Some("Rss:") => {
                let rss: u64 = words.next()?.parse().ok()?;
                total += rss;
                if size == guest_ram_kib {
                    guest += rss;
                }
            }
            _ => {}
        }
    }
    Some((total, guest))
}
