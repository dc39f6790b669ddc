//! QMP benchmark, Skiff beside QEMU in the same run: `cargo bench -p skiff --bench qmp`.
//!
//! Measured on both, with the same raw-socket client (tests/common/qmp_client.rs):
//! 1. process start to QMP greeting received (the clock starts just before spawn; the client
//!    retries connecting every 50 µs);
//! 2. `query-status` round trip, sequential, median and p99;
//! 3. pipelined `query-status` throughput with 8 requests in flight (OOB negotiated on both,
//!    which is what lets QEMU queue more than one in-band request);
//! 4. `exec-oob migrate-pause` round trip (an error reply: no migration) while the in-band
//!    path is blocked: an in-band `pmemsave` to a FIFO nobody reads blocks the main loop in
//!    open() on both VMMs.
//!
//! QEMU is `qemu-system-x86_64 -M microvm -accel kvm -m 256 -nodefaults -no-user-config
//! -display none -serial none -qmp unix:SOCK,server=on,wait=off`; its columns are skipped (with
//! a note) when it is not installed. Skiff runs an idle tiny guest with 256 MiB.
//!
//! `BENCH_QMP_DEBUG=1` also prints each start-up run's connect and greeting times.
//!
//! Figures, not pass/fail: the machines are shared and noisy, so read medians and ratios. The
//! targets are printed beside the numbers.

#[path = "common/mod.rs"]
mod common;

use std::ffi::CString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::bench::{median, qemu_version, sorted};
use common::guest::write_guest;
use common::qmp_client::QmpClient;
use common::TempDir;

const GREETING_RUNS: usize = 20;
const ROUND_TRIPS: usize = 10_000;
const WARMUP: usize = 500;
const PIPELINED: usize = 10_000;
const IN_FLIGHT: usize = 8;
const OOB_ROUND_TRIPS: usize = 1_000;
const TIMEOUT: Duration = Duration::from_secs(20);

/// Which VMM a measurement runs on.
#[derive(Clone, Copy, PartialEq)]
enum Vmm {
    Skiff,
    Qemu,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Skiff => "skiff",
            Vmm::Qemu => "qemu",
        }
    }

    /// Starts the VMM with a QMP monitor on `socket`.
    fn spawn(self, kernel: &Path, socket: &Path) -> Child {
        let mut cmd = match self {
            Vmm::Skiff => {
                let mut cmd = Command::new(common::skiff_bin());
                cmd.arg("--kernel")
                    .arg(kernel)
                    .args(["--memory", "256M", "--serial", "none", "--qmp"])
                    .arg(format!("unix:{}", socket.display()));
                cmd
            }
            Vmm::Qemu => {
                let mut cmd = Command::new("qemu-system-x86_64");
                cmd.args([
                    "-M",
                    "microvm",
                    "-accel",
                    "kvm",
                    "-m",
                    "256",
                    "-nodefaults",
                    "-no-user-config",
                    "-display",
                    "none",
                    "-serial",
                    "none",
                    "-qmp",
                ])
                .arg(format!("unix:{},server=on,wait=off", socket.display()));
                cmd
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.name()))
    }
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn p99(values: &[f64]) -> f64 {
    let v = sorted(values);
    v[((v.len() as f64 - 1.0) * 0.99).round() as usize]
}

/// Panics with `what` if `r` is an error.
fn must<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Connects (polling every 50 µs), reads the greeting and negotiates OOB.
fn open(socket: &Path) -> QmpClient {
    let mut c = must(
        QmpClient::connect_unix_polling(socket, TIMEOUT, Duration::from_micros(50)),
        "connect",
    );
    must(c.read_greeting(TIMEOUT), "greeting");
    must(c.negotiate_oob(), "qmp_capabilities");
    c
}

/// Measurement 1: process start to greeting, in ms (one sample per fresh process).
fn greeting_ms(vmm: Vmm, kernel: &Path, dir: &TempDir) -> Vec<f64> {
    (0..GREETING_RUNS)
        .map(|i| {
            let socket = dir.join(&format!("{}-greet-{i}.sock", vmm.name()));
            let started = Instant::now();
            let child = vmm.spawn(kernel, &socket);
            let mut c = must(
                QmpClient::connect_unix_polling(&socket, TIMEOUT, Duration::from_micros(50)),
                "connect",
            );
            let connected = started.elapsed().as_secs_f64() * 1e3;
            must(c.read_line(TIMEOUT), "greeting");
            let elapsed = started.elapsed().as_secs_f64() * 1e3;
            if std::env::var_os("BENCH_QMP_DEBUG").is_some() {
                eprintln!(
                    "{} run {i}: connected {connected:.2} ms, greeting {elapsed:.2} ms",
                    vmm.name()
                );
            }
            stop(child);
            let _ = std::fs::remove_file(&socket);
            elapsed
        })
        .collect()
}

/// Measurement 2: sequential query-status round trips, in µs.
fn round_trips_us(c: &mut QmpClient) -> Vec<f64> {
    let request = br#"{"execute": "query-status"}"#;
    for _ in 0..WARMUP {
        must(c.send_raw(request), "send");
        must(c.read_line(TIMEOUT), "reply");
    }
    (0..ROUND_TRIPS)
        .map(|_| {
            let started = Instant::now();
            must(c.send_raw(request), "send");
            let line = must(c.read_line(TIMEOUT), "reply");
            let elapsed = started.elapsed().as_secs_f64() * 1e6;
            assert!(
                line.starts_with(r#"{"return": {"status": "running""#),
                "{line}"
            );
            elapsed
        })
        .collect()
}

/// Measurement 3: pipelined query-status, `IN_FLIGHT` outstanding: commands per second.
fn pipelined_per_s(c: &mut QmpClient) -> f64 {
    let request = br#"{"execute": "query-status"}"#;
    let started = Instant::now();
    let mut sent = 0;
    while sent < IN_FLIGHT {
        must(c.send_raw(request), "send");
        sent += 1;
    }
    for _ in 0..PIPELINED {
        let line = must(c.read_line(TIMEOUT), "reply");
        assert!(line.starts_with(r#"{"return""#), "{line}");
        if sent < PIPELINED {
            must(c.send_raw(request), "send");
            sent += 1;
        }
    }
    PIPELINED as f64 / started.elapsed().as_secs_f64()
}

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: `c` is a valid NUL-terminated path.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo: {}", std::io::Error::last_os_error());
}

/// Waits until a thread of `pid` is blocked opening a FIFO.
fn wait_fifo_open_blocked(pid: u32) {
    let deadline = Instant::now() + TIMEOUT;
    let tasks = PathBuf::from(format!("/proc/{pid}/task"));
    while Instant::now() < deadline {
        let blocked = std::fs::read_dir(&tasks)
            .map(|entries| {
                entries.flatten().any(|t| {
                    std::fs::read_to_string(t.path().join("wchan"))
                        .is_ok_and(|w| w.trim() == "wait_for_partner")
                })
            })
            .unwrap_or(false);
        if blocked {
            return;
        }
        thread::sleep(Duration::from_micros(200));
    }
    panic!("process {pid} never blocked opening the FIFO");
}

/// Measurement 4: `exec-oob migrate-pause` round trips while the main loop is blocked in
/// pmemsave's open() of a FIFO, in µs. Unblocks it afterwards and checks the pmemsave reply.
fn oob_blocked_us(c: &mut QmpClient, pid: u32, dir: &TempDir, tag: &str) -> Vec<f64> {
    let fifo = dir.join(&format!("{tag}.fifo"));
    mkfifo(&fifo);
    must(
        c.send(&json!({"execute": "pmemsave", "id": "block",
            "arguments": {"val": 0, "size": 4096, "filename": fifo.display().to_string()}})),
        "send pmemsave",
    );
    wait_fifo_open_blocked(pid);
    let samples = (0..OOB_ROUND_TRIPS)
        .map(|i| {
            let started = Instant::now();
            must(
                c.send_raw(format!(r#"{{"exec-oob": "migrate-pause", "id": {i}}}"#).as_bytes()),
                "send",
            );
            let line = must(c.read_line(TIMEOUT), "OOB reply");
            let elapsed = started.elapsed().as_secs_f64() * 1e6;
            assert!(
                line.starts_with(&format!(r#"{{"id": {i}, "error""#)),
                "{tag}: unexpected {line}"
            );
            elapsed
        })
        .collect();
    // Unblock: read the FIFO, then the pmemsave reply must come.
    let (tx, rx) = mpsc::channel();
    let path = fifo.clone();
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let n = std::fs::File::open(&path).and_then(|mut f| f.read_to_end(&mut bytes));
        let _ = tx.send(n.map(|_| bytes.len()));
    });
    let n = rx
        .recv_timeout(TIMEOUT)
        .expect("FIFO drained")
        .expect("FIFO read");
    assert_eq!(n, 4096, "{tag}: pmemsave wrote {n} bytes");
    let reply = must(c.reply_to(&json!("block"), TIMEOUT), "pmemsave reply");
    assert_eq!(
        reply.get("return"),
        Some(&Value::Object(Default::default()))
    );
    samples
}

/// Everything measured on one VMM.
struct Figures {
    greeting_ms: Vec<f64>,
    rtt_us: Vec<f64>,
    pipelined: f64,
    oob_us: Vec<f64>,
}

fn measure(vmm: Vmm, kernel: &Path, dir: &TempDir) -> Figures {
    eprintln!("measuring {}...", vmm.name());
    let greeting_ms = greeting_ms(vmm, kernel, dir);
    let socket = dir.join(&format!("{}.sock", vmm.name()));
    let child = vmm.spawn(kernel, &socket);
    let pid = child.id();
    let mut c = open(&socket);
    let rtt_us = round_trips_us(&mut c);
    let pipelined = pipelined_per_s(&mut c);
    let oob_us = oob_blocked_us(&mut c, pid, dir, vmm.name());
    drop(c);
    stop(child);
    Figures {
        greeting_ms,
        rtt_us,
        pipelined,
        oob_us,
    }
}

/// One table row: a figure for each VMM, lower or higher being better, and the target.
fn row(
    label: &str,
    unit: &str,
    ours: f64,
    theirs: Option<f64>,
    higher_is_better: bool,
    absolute: Option<(f64, &str)>,
) {
    let fmt = |v: f64| {
        if v >= 1000.0 {
            format!("{v:.0} {unit}")
        } else if v >= 10.0 {
            format!("{v:.1} {unit}")
        } else {
            format!("{v:.2} {unit}")
        }
    };
    let (theirs_text, ratio_text, beats) = match theirs {
        Some(t) => {
            let ratio = ours / t;
            let beats = if higher_is_better { ours > t } else { ours < t };
            (fmt(t), format!("{ratio:.3}"), Some(beats))
        }
        None => ("n/a".to_string(), "n/a".to_string(), None),
    };
    let mut target = Vec::new();
    let mut met = true;
    if let Some((limit, text)) = absolute {
        target.push(text.to_string());
        met &= if higher_is_better {
            ours > limit
        } else {
            ours < limit
        };
    }
    target.push(if higher_is_better {
        "> qemu".to_string()
    } else {
        "< qemu".to_string()
    });
    if let Some(b) = beats {
        met &= b;
    }
    println!(
        "  {label:<54} {:>12} {:>12} {:>10}   {:<16} {}",
        fmt(ours),
        theirs_text,
        ratio_text,
        target.join(", "),
        if met { "met" } else { "MISSED" }
    );
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects nothing here.
    let dir = TempDir::new("bench-qmp");
    let kernel = write_guest(dir.path(), "idle.elf", |a| a.halt_forever());
    let qemu = qemu_version();

    let skiff = measure(Vmm::Skiff, &kernel, &dir);
    let theirs = qemu.as_ref().map(|_| measure(Vmm::Qemu, &kernel, &dir));

    println!();
    println!("QMP benchmark: skiff (this build) vs {}", {
        qemu.as_deref()
            .map(|v| format!("{v} -M microvm -accel kvm -m 256"))
            .unwrap_or_else(|| "QEMU (not installed: QEMU columns skipped)".to_string())
    });
    println!(
        "  {:<54} {:>12} {:>12} {:>10}   {:<16} result",
        "metric", "skiff", "qemu", "skiff/qemu", "target"
    );
    let q = theirs.as_ref();
    row(
        &format!("start -> greeting, median of {GREETING_RUNS}"),
        "ms",
        median(&skiff.greeting_ms),
        q.map(|f| median(&f.greeting_ms)),
        false,
        Some((5.0, "< 5 ms")),
    );
    row(
        &format!("query-status round trip, median of {ROUND_TRIPS}"),
        "µs",
        median(&skiff.rtt_us),
        q.map(|f| median(&f.rtt_us)),
        false,
        Some((50.0, "< 50 µs")),
    );
    row(
        &format!("query-status round trip, p99 of {ROUND_TRIPS}"),
        "µs",
        p99(&skiff.rtt_us),
        q.map(|f| p99(&f.rtt_us)),
        false,
        None,
    );
    row(
        &format!("pipelined query-status, {IN_FLIGHT} in flight"),
        "cmd/s",
        skiff.pipelined,
        q.map(|f| f.pipelined),
        true,
        None,
    );
    row(
        &format!("OOB round trip, main loop blocked, median of {OOB_ROUND_TRIPS}"),
        "µs",
        median(&skiff.oob_us),
        q.map(|f| median(&f.oob_us)),
        false,
        None,
    );
    row(
        &format!("OOB round trip, main loop blocked, p99 of {OOB_ROUND_TRIPS}"),
        "µs",
        p99(&skiff.oob_us),
        q.map(|f| p99(&f.oob_us)),
        false,
        None,
    );
    println!();
    println!("  distributions (µs): p50 / p90 / p99 / p99.9 / max");
    let dist = |name: &str, v: &[f64]| {
        let v = sorted(v);
        let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
        println!(
            "    {name:<34} {:.1} / {:.1} / {:.1} / {:.1} / {:.1}",
            at(0.5),
            at(0.9),
            at(0.99),
            at(0.999),
            v[v.len() - 1]
        );
    };
    dist("skiff query-status round trip", &skiff.rtt_us);
    dist("skiff OOB, main loop blocked", &skiff.oob_us);
    if let Some(f) = q {
        dist("qemu query-status round trip", &f.rtt_us);
        dist("qemu OOB, main loop blocked", &f.oob_us);
    }
    if qemu.is_none() {
        println!("  note: qemu-system-x86_64 not found; install Debian's qemu-system-x86 for the comparison");
    }
}
