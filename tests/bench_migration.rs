//! Migration benchmark, Skiff beside QEMU in the same run: `cargo bench -p skiff --bench migration`.
//!
//! Every migration runs both sides on this machine over a Unix socket: the destination is
//! started first with `--incoming unix:PATH` (QEMU: `-incoming unix:PATH`), then the source,
//! and the source's QMP gets `migrate {"uri": "unix:PATH"}`; `query-migrate` is polled every
//! millisecond until `completed`. Reported, as QEMU reports them on the source: `total-time`
//! and `downtime` (ms) and `ram.transferred` (bytes on the wire for RAM); the destination must
//! be `running` afterwards. Medians over several runs, each on fresh processes.
//!
//! Throughput is given two ways:
//! - **RAM GiB/s** = guest RAM size / `total-time`: how fast the guest's memory moves. For an
//!   idle guest most pages are zero and a VMM that detects them (QEMU does) sends a few bytes
//!   per page, so this can exceed a plain copy.
//! - **wire GiB/s** = `ram.transferred` / `total-time`: bytes actually sent per second.
//!
//! Guests:
//! - **idle**: almost all RAM untouched. Skiff runs a tiny guest that halts; QEMU
//!   (`-M microvm -accel kvm -nodefaults`) runs with no kernel: its qboot firmware finds nothing
//!   to boot and idles. Both keep their RAM nearly all zero pages: a like-for-like comparison
//!   of idle guests, but mostly a test of zero-page handling, not of copying.
//! - **filled**: the first byte of every 4 KiB page from 4 MiB to the end of RAM is non-zero,
//!   so no page there can be skipped as zero. Skiff runs a tiny guest that writes them (about
//!   4 instructions per page, 0.6 s for 256 MiB at the ~0.4 M emulated instructions per second
//!   here) and prints `F`; QEMU's RAM is a `memory-backend-file` (`share=on`) on /dev/shm
//!   pre-filled with the same content, since QEMU cannot boot our tiny ELF. This is the
//!   honest throughput comparison.
//!
//! QEMU runs with its defaults (`max-bandwidth` 128 MiB/s in 7.2, `downtime-limit` 300 ms;
//! both are printed from `query-migrate-parameters`) and unthrottled (`max-bandwidth` set to
//! 100 GiB/s). The baseline is a plain copy of the same number of bytes over a Unix socket pair
//! between two threads: 1 MiB `write`s from a pre-faulted heap buffer, `read`s into another
//! pre-faulted buffer.
//!
//! A row that could not be measured reads `not measured: <error>`, never a made-up figure.
//! The postcopy page request round trip is described at [`postcopy_page_round_trip`];
//! `cargo bench -p skiff --bench migration -- round-trip` measures only that.
//!
//! Figures, not pass/fail: the machines are shared and noisy, so read medians and ratios. The
//! targets are printed beside the numbers.

#[path = "common/mod.rs"]
mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use serde_json::{json, Value};

use common::bench::{median, qemu_version};
use common::guest::write_guest;
use common::qmp_client::QmpClient;
use common::TempDir;

/// Migrations per idle row.
const RUNS: usize = 5;
/// Migrations per filled row (QEMU's default 128 MiB/s makes a filled 1 GiB take 8 s).
const FILLED_RUNS: usize = 3;
/// Copies per memcpy-over-socket row.
const COPY_RUNS: usize = 5;
/// How long freed memory rests before a fresh-memory copy. Where Linux runs in a VM with
/// free page reporting (virtio-balloon, as on the machines here), memory free for more than
/// two seconds is handed back to the host, and the next first touch of it faults in the host
/// too: several times slower than touching memory freed a moment ago.
const FREED_MEMORY_SETTLE: Duration = Duration::from_secs(3);
/// Write size of the socket copy baseline.
const CHUNK: usize = 1 << 20;
/// QEMU's `max-bandwidth` for the unthrottled rows, bytes per second.
const UNTHROTTLED_BPS: u64 = 100 << 30;
/// Waiting for a QMP socket, a reply, the incoming socket, the destination to run.
const QMP_TIMEOUT: Duration = Duration::from_secs(20);
/// A whole migration (QEMU's tests wait 120 s).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the source runs before `migrate`.
const SETTLE: Duration = Duration::from_millis(500);
/// Filled guests: the first byte of every page from here to the end of RAM is non-zero.
const FILL_START: u64 = 0x40_0000;
/// The byte written there.
const FILL_BYTE: u8 = 0x5a;
/// Page size of the fill.
const PAGE: u64 = 4096;
/// Target: Skiff's throughput at least this many times QEMU's with default settings.
const TARGET_VS_QEMU: f64 = 2.0;
/// Target: Skiff's throughput at least this fraction of the plain socket copy ("within 2x").
const TARGET_VS_COPY: f64 = 0.5;
/// Target: downtime of an idle 256 MiB guest, ms.
const TARGET_DOWNTIME_MS: f64 = 10.0;
/// Target: postcopy page request round trip, µs.
const TARGET_PAGE_RTT_US: f64 = 100.0;

const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;

/// A guest RAM size.
#[derive(Clone, Copy)]
struct Size {
    label: &'static str,
    bytes: u64,
    /// `--memory` / `-m` argument.
    arg: &'static str,
}

const SIZES: [Size; 2] = [
    Size {
        label: "256 MiB",
        bytes: 256 << 20,
        arg: "256M",
    },
    Size {
        label: "1 GiB",
        bytes: 1 << 30,
        arg: "1G",
    },
];

/// Which VMM.
#[derive(Clone, Copy, PartialEq)]
enum Vmm {
    Skiff,
    Qemu,
}

/// What the guest's RAM holds (see the module documentation).
#[derive(Clone, Copy, PartialEq)]
enum Ram {
    Idle,
    Filled,
}

impl Ram {
    fn label(self) -> &'static str {
        match self {
            Ram::Idle => "idle",
            Ram::Filled => "filled",
        }
    }
}

/// QEMU's migration bandwidth setting (Skiff always runs with its defaults), and whether the
/// destination preallocates its RAM before the migration starts (Skiff `--mem-prealloc`,
/// QEMU `prealloc=on`), so it loads RAM without first-touch page faults.
#[derive(Clone, Copy, PartialEq)]
enum Bandwidth {
    Default,
    Unthrottled,
    /// Unthrottled, destination RAM preallocated.
    Prealloc,
}

/// One migration as the source reported it.
struct Sample {
    total_ms: f64,
    downtime_ms: f64,
    transferred: u64,
    /// From sending `migrate` to seeing `completed` (1 ms polling), for comparison.
    wall_ms: f64,
}

/// A process of the benchmark, killed and reaped when dropped. Its stdout and stderr go to
/// `log`, shown when it fails.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, log: PathBuf) -> Result<Proc, String> {
        let out = File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
        Ok(Proc { child, log })
    }

    /// `Some(description)` if the process has exited: its status and the first line it
    /// printed.
    fn exited(&mut self) -> Option<String> {
        let status = self.child.try_wait().ok().flatten()?;
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let first = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.contains("warning: host doesn't support"))
            .unwrap_or("(nothing printed)");
        Some(format!("exited ({status}): {first}"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first line of an error (QMP client errors carry a transcript after it).
fn first_line(text: impl std::fmt::Display) -> String {
    text.to_string().lines().next().unwrap_or("").to_string()
}

/// Connects to `proc`'s QMP socket and negotiates; fails early if the process exits.
fn open_qmp(proc: &mut Proc, socket: &Path) -> Result<QmpClient, String> {
    let deadline = Instant::now() + QMP_TIMEOUT;
    loop {
        if let Some(how) = proc.exited() {
            return Err(how);
        }
        if let Ok(mut c) = QmpClient::connect_unix_polling(socket, Duration::ZERO, Duration::ZERO) {
            c.read_greeting(QMP_TIMEOUT).map_err(first_line)?;
            c.negotiate().map_err(first_line)?;
            return Ok(c);
        }
        if Instant::now() >= deadline {
            return Err(format!("no QMP socket at {}", socket.display()));
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// Waits until `path` exists (the destination listening), failing early if `proc` exits.
fn wait_path(proc: &mut Proc, path: &Path) -> Result<(), String> {
    let deadline = Instant::now() + QMP_TIMEOUT;
    while !path.exists() {
        if let Some(how) = proc.exited() {
            return Err(how);
        }
        if Instant::now() >= deadline {
            return Err(format!("never listened on {}", path.display()));
        }
        thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// The tiny guests Skiff runs.
struct Guests {
    idle: PathBuf,
    /// One per size (the fill loop's end is an immediate).
    filled: Vec<PathBuf>,
}

fn build_guests(dir: &TempDir) -> Guests {
    let idle = write_guest(dir.path(), "idle.elf", |a| a.halt_forever());
    let filled = SIZES
        .iter()
        .map(|size| {
            write_guest(dir.path(), &format!("filled-{}.elf", size.arg), |a| {
                let mut next = a.create_label();
                a.mov(rax, FILL_START)?;
                a.mov(rcx, size.bytes)?;
                a.set_label(&mut next)?;
                a.mov(byte_ptr(rax), u32::from(FILL_BYTE))?;
                a.add(rax, PAGE as i32)?;
                a.cmp(rax, rcx)?;
                a.jb(next)?;
                a.print("F")?;
                a.halt_forever()
            })
        })
        .collect();
    Guests { idle, filled }
}

/// Where QEMU's file-backed RAM goes (tmpfs if there is one).
fn shm_dir(dir: &TempDir) -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        dir.path().to_path_buf()
    }
}

/// Writes `size` bytes of filled RAM (see [`FILL_BYTE`]) to `path`.
fn write_filled_file(path: &Path, size: u64) -> Result<(), String> {
    let mut file = File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut chunk = vec![0u8; CHUNK];
    let zero = vec![0u8; CHUNK];
    for i in (0..CHUNK).step_by(PAGE as usize) {
        chunk[i] = FILL_BYTE;
    }
    let mut at = 0u64;
    while at < size {
        let block = if at >= FILL_START { &chunk } else { &zero };
        file.write_all(block)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        at += CHUNK as u64;
    }
    Ok(())
}

/// Starts one side of a migration. `incoming`: the destination's migration socket.
/// How one side of a migration is started.
#[derive(Clone, Copy, Default)]
struct SideOptions {
    /// The destination: listens for the migration.
    incoming: bool,
    /// Started stopped (-S).
    paused: bool,
    /// RAM preallocated at start-up.
    prealloc: bool,
}

const SOURCE: SideOptions = SideOptions {
    incoming: false,
    paused: false,
    prealloc: false,
};

fn spawn_side(
    vmm: Vmm,
    size: Size,
    ram: Ram,
    guests: &Guests,
    paths: &RunPaths,
    opts: SideOptions,
) -> Result<Proc, String> {
    let SideOptions {
        incoming,
        paused,
        prealloc,
    } = opts;
    let side = if incoming { "dst" } else { "src" };
    let qmp = paths.qmp(side);
    let log = paths.dir.join(format!("{side}.log"));
    // The command, and its option for the incoming migration address.
    let (mut cmd, incoming_flag) = match vmm {
        Vmm::Skiff => {
            let mut cmd = Command::new(common::skiff_bin());
            let kernel = match ram {
                Ram::Idle => &guests.idle,
                Ram::Filled => {
                    let i = SIZES.iter().position(|s| s.bytes == size.bytes);
                    &guests.filled[i.expect("a known size")]
                }
            };
            cmd.arg("--kernel")
                .arg(kernel)
                .args(["--memory", size.arg, "--serial"])
                .arg(format!(
                    "file:{}",
                    paths.dir.join(format!("{side}.serial")).display()
                ))
                .arg("--qmp")
                .arg(format!("unix:{}", qmp.display()));
            if prealloc {
                cmd.arg("--mem-prealloc");
            }
            (cmd, "--incoming")
        }
        Vmm::Qemu => {
            let mut cmd = Command::new("qemu-system-x86_64");
            cmd.args(["-M", "microvm", "-accel", "kvm", "-m", size.arg])
                .args(["-nodefaults", "-no-user-config", "-display", "none"])
                .args(["-serial", "none", "-qmp"])
                .arg(format!("unix:{},server=on,wait=off", qmp.display()));
            if ram == Ram::Filled {
                let file = paths.ram_file(side);
                if !incoming {
                    write_filled_file(&file, size.bytes)?;
                }
                cmd.arg("-object")
                    .arg(format!(
                        "memory-backend-file,id=ram,size={},mem-path={},share=on,prealloc={}",
                        size.arg,
                        file.display(),
                        if prealloc { "on" } else { "off" }
                    ))
                    .args(["-machine", "memory-backend=ram"]);
            } else if prealloc {
                cmd.arg("-mem-prealloc");
            }
            (cmd, "-incoming")
        }
    };
    if incoming {
        cmd.arg(incoming_flag)
            .arg(format!("unix:{}", paths.migration.display()));
    }
    if paused {
        cmd.arg("-S");
    }
    Proc::spawn(cmd, log)
}

/// The files of one migration run.
struct RunPaths {
    dir: PathBuf,
    shm: PathBuf,
    tag: String,
    migration: PathBuf,
}

impl RunPaths {
    fn new(dir: &TempDir, shm: PathBuf, tag: String) -> RunPaths {
        let run_dir = dir.join(&tag);
        std::fs::create_dir_all(&run_dir).expect("run directory");
        RunPaths {
            migration: run_dir.join("mig.sock"),
            dir: run_dir,
            shm,
            tag,
        }
    }

    fn qmp(&self, side: &str) -> PathBuf {
        self.dir.join(format!("{side}-qmp.sock"))
    }

    fn ram_file(&self, side: &str) -> PathBuf {
        self.shm.join(format!(
            "skiff-bench-migration-{}-{}-{side}.ram",
            std::process::id(),
            self.tag
        ))
    }
}

impl Drop for RunPaths {
    fn drop(&mut self) {
        for side in ["src", "dst"] {
            let _ = std::fs::remove_file(self.ram_file(side));
        }
    }
}

/// Waits until the Skiff filled guest has printed `F` (its RAM is filled).
fn wait_filled(proc: &mut Proc, serial: &Path) -> Result<(), String> {
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    loop {
        if std::fs::read(serial).is_ok_and(|b| b.contains(&b'F')) {
            return Ok(());
        }
        if let Some(how) = proc.exited() {
            return Err(format!("source {how}"));
        }
        if Instant::now() >= deadline {
            return Err("the filled guest never printed F".to_string());
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// One migration on fresh processes.
fn migrate_once(
    vmm: Vmm,
    size: Size,
    ram: Ram,
    bandwidth: Bandwidth,
    guests: &Guests,
    paths: &RunPaths,
) -> Result<Sample, String> {
    let prealloc = bandwidth == Bandwidth::Prealloc;
    let mut dst = spawn_side(
        vmm,
        size,
        ram,
        guests,
        paths,
        SideOptions {
            incoming: true,
            prealloc,
            ..SOURCE
        },
    )?;
    let mut dq = open_qmp(&mut dst, &paths.qmp("dst")).map_err(|e| format!("destination {e}"))?;
    wait_path(&mut dst, &paths.migration).map_err(|e| format!("destination {e}"))?;

    let mut src = spawn_side(vmm, size, ram, guests, paths, SOURCE)?;
    let mut sq = open_qmp(&mut src, &paths.qmp("src")).map_err(|e| format!("source {e}"))?;
    if vmm == Vmm::Skiff && ram == Ram::Filled {
        wait_filled(&mut src, &paths.dir.join("src.serial"))?;
    }
    thread::sleep(SETTLE);
    if vmm == Vmm::Qemu && bandwidth != Bandwidth::Default {
        sq.execute(
            "migrate-set-parameters",
            json!({"max-bandwidth": UNTHROTTLED_BPS}),
        )
        .map_err(first_line)?;
    }

    let started = Instant::now();
    let reply = sq
        .execute_raw(
            "migrate",
            json!({"uri": format!("unix:{}", paths.migration.display())}),
        )
        .map_err(first_line)?;
    if let Some(error) = reply.get("error") {
        return Err(format!(
            "migrate: {}",
            error["desc"].as_str().unwrap_or("?")
        ));
    }
    let info = loop {
        let info = sq
            .execute("query-migrate", Value::Null)
            .map_err(first_line)?;
        match info["status"].as_str() {
            Some("completed") => break info,
            Some(s @ ("failed" | "cancelled")) => {
                return Err(format!(
                    "migration {s}: {}",
                    info["error-desc"].as_str().unwrap_or("(no error-desc)")
                ))
            }
            _ => {}
        }
        if started.elapsed() > MIGRATION_TIMEOUT {
            return Err(format!("not completed after {MIGRATION_TIMEOUT:?}: {info}"));
        }
        if let Some(how) = src.exited() {
            return Err(format!("source {how}"));
        }
        thread::sleep(Duration::from_millis(1));
    };
    let wall_ms = started.elapsed().as_secs_f64() * 1e3;
    let field = |v: &Value, name: &str| {
        v.as_f64()
            .ok_or_else(|| format!("query-migrate has no {name}: {info}"))
    };
    let total_ms = field(&info["total-time"], "total-time")?;
    let downtime_ms = field(&info["downtime"], "downtime")?;
    let transferred = info["ram"]["transferred"]
        .as_u64()
        .ok_or_else(|| format!("query-migrate has no ram.transferred: {info}"))?;

    // The destination must be running the guest.
    let deadline = Instant::now() + QMP_TIMEOUT;
    loop {
        let status = dq
            .execute("query-status", Value::Null)
            .map_err(|e| format!("destination {}", first_line(e)))?;
        if status["status"] == "running" {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "destination not running after the migration: {status}"
            ));
        }
        thread::sleep(Duration::from_millis(1));
    }
    Ok(Sample {
        total_ms,
        downtime_ms,
        transferred,
        wall_ms,
    })
}

/// A table row: samples, or why there are none.
enum Row {
    Samples(Vec<Sample>),
    Unavailable(String),
}

/// `runs` migrations; stops at the first failure (the row then reports it).
fn measure(
    vmm: Vmm,
    size: Size,
    ram: Ram,
    bandwidth: Bandwidth,
    runs: usize,
    guests: &Guests,
    dir: &TempDir,
) -> Row {
    let (name, short) = match (vmm, bandwidth) {
        (Vmm::Skiff, Bandwidth::Prealloc) => ("skiff, preallocated destination", "sp"),
        (Vmm::Skiff, _) => ("skiff", "s"),
        (Vmm::Qemu, Bandwidth::Default) => ("qemu default", "qd"),
        (Vmm::Qemu, Bandwidth::Unthrottled) => ("qemu unthrottled", "qu"),
        (Vmm::Qemu, Bandwidth::Prealloc) => ("qemu unthrottled, preallocated destination", "qp"),
    };
    eprintln!("measuring {name}, {} {}...", size.label, ram.label());
    let mut samples = Vec::with_capacity(runs);
    for i in 0..runs {
        // Short: Unix socket paths are limited to 107 bytes.
        let tag = format!("{short}-{}-{}{i}", size.arg, &ram.label()[..1]);
        let paths = RunPaths::new(dir, shm_dir(dir), tag);
        match migrate_once(vmm, size, ram, bandwidth, guests, &paths) {
            Ok(s) => samples.push(s),
            Err(e) => {
                let who = if vmm == Vmm::Skiff { "skiff" } else { "qemu" };
                return Row::Unavailable(format!("{who}: migration not available: {e}"));
            }
        }
    }
    Row::Samples(samples)
}

/// Where the socket copy's receiver writes.
#[derive(Clone, Copy, PartialEq)]
enum CopyTarget {
    /// A buffer whose pages were faulted in before timing (the bare socket copy).
    Prefaulted,
    /// A new buffer whose pages are first touched by the copy, as a migration destination's
    /// RAM is (the kernel allocates and clears each page on the way); with transparent huge
    /// pages asked for, as Skiff's destination does. Each run starts [`FREED_MEMORY_SETTLE`]
    /// after the previous one freed its buffer, as a destination's RAM comes from memory
    /// that has been free for a while.
    Fresh,
}

/// A fresh anonymous mapping of `bytes` with transparent huge pages asked for; no page of it
/// is populated yet.
struct FreshBuffer {
    ptr: *mut u8,
    len: usize,
}

impl FreshBuffer {
    fn new(len: usize) -> FreshBuffer {
        // SAFETY: a new private anonymous mapping; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(ptr != libc::MAP_FAILED, "mmap of the copy buffer failed");
        // SAFETY: advice on the mapping just created; it changes no contents.
        unsafe { libc::madvise(ptr, len, libc::MADV_HUGEPAGE) };
        FreshBuffer {
            ptr: ptr.cast(),
            len,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes, owned by self, and readable and writable.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for FreshBuffer {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping this value created; no slice of it outlives self.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Copies `bytes` over a Unix socket pair between two threads, `COPY_RUNS` times; GiB/s each.
fn socket_copy_gib_s(bytes: usize, target: CopyTarget) -> Vec<f64> {
    eprintln!("measuring the socket copy of {} MiB...", bytes >> 20);
    let src = vec![FILL_BYTE; bytes];
    let prefaulted = || {
        let mut dst = vec![0u8; bytes];
        for i in (0..bytes).step_by(PAGE as usize) {
            dst[i] = 1; // fault the pages in
        }
        dst
    };
    let mut kept = prefaulted();
    let mut rates = Vec::with_capacity(COPY_RUNS);
    for run in 0..COPY_RUNS {
        if target == CopyTarget::Fresh {
            thread::sleep(FREED_MEMORY_SETTLE);
        }
        let mut fresh = (target == CopyTarget::Fresh).then(|| FreshBuffer::new(bytes));
        let dst = match fresh.as_mut() {
            Some(buffer) => buffer.as_mut_slice(),
            None => &mut kept[..],
        };
        let (mut tx, mut rx) = UnixStream::pair().expect("socketpair");
        let started = Instant::now();
        thread::scope(|s| {
            let src = &src;
            s.spawn(move || {
                for chunk in src.chunks(CHUNK) {
                    tx.write_all(chunk).expect("socket write");
                }
            });
            let mut at = 0;
            while at < bytes {
                let end = (at + CHUNK).min(bytes);
                match rx.read(&mut dst[at..end]) {
                    Ok(0) => panic!("socket closed after {at} bytes"),
                    Ok(n) => at += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => panic!("socket read: {e}"),
                }
            }
        });
        let elapsed = started.elapsed().as_secs_f64();
        if run == 0 {
            assert!(src[..] == dst[..], "the socket copy corrupted data");
        }
        rates.push(bytes as f64 / GIB / elapsed);
    }
    rates
}

/// Pages whose postcopy round trip is measured, one `pmemsave` each.
const RTT_PAGES: u64 = 400;
/// First page measured: far above what precopy sends before the switch (it scans upwards
/// from 0 at 1 MiB/s for a few milliseconds).
const RTT_FIRST_PAGE: u64 = 64 << 20;
/// Pages measured while the background stream runs unthrottled: it sends 1 GiB in about a
/// second, so only a few dozen reads fit before it reaches them.
const RTT_STREAMING_PAGES: u64 = 40;
/// Distance between the pages measured under the background stream, read from the top of
/// RAM down (the stream scans upwards).
const RTT_STREAMING_STRIDE: u64 = 4 << 20;

/// How busy the source is while the page round trip is measured.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Background {
    /// Background postcopy at 4 KiB/s: the source waits for requests.
    Idle,
    /// Background postcopy unthrottled (QEMU's default): a requested page competes with
    /// the stream of all other pages.
    Streaming,
}

fn wait_status(q: &mut QmpClient, proc: &mut Proc, goal: &str) -> Result<(), String> {
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let info = q
            .execute("query-migrate", Value::Null)
            .map_err(first_line)?;
        if info["status"] == goal {
            return Ok(());
        }
        if info["status"] == "failed" || Instant::now() >= deadline {
            return Err(format!("waiting for {goal}: {info}"));
        }
        if let Some(how) = proc.exited() {
            return Err(how);
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// Times one `pmemsave` of one page, in µs.
fn pmemsave_us(q: &mut QmpClient, addr: u64, file: &Path) -> Result<f64, String> {
    let started = Instant::now();
    q.execute(
        "pmemsave",
        json!({"val": addr, "size": PAGE, "filename": file.display().to_string()}),
    )
    .map_err(first_line)?;
    Ok(started.elapsed().as_secs_f64() * 1e6)
}

/// The postcopy page request round trip on one VMM (median, p99, µs): a filled guest is
/// switched to postcopy at once (precopy at 1 MiB/s, so the destination lacks almost every
/// page), and the stopped destination (`-S`) reads missing pages one `pmemsave` at a time.
/// Each page's round trip is the time of that first read minus the time of reading the
/// same page again (then present), which removes the QMP and file costs: what is left is
/// fault, request, source read, send and placement.
/// - [`Background::Idle`]: 256 MiB, background postcopy at 4 KiB/s, RTT_PAGES pages.
/// - [`Background::Streaming`]: 1 GiB, background postcopy unthrottled,
///   RTT_STREAMING_PAGES pages from the top of RAM down; the source must still be in
///   postcopy after the last read, or the figure is refused.
fn postcopy_page_round_trip(
    vmm: Vmm,
    background: Background,
    guests: &Guests,
    dir: &TempDir,
) -> Result<RoundTrip, String> {
    let (size, postcopy_bandwidth, pages) = match background {
        Background::Idle => (SIZES[0], 4096, RTT_PAGES),
        Background::Streaming => (SIZES[1], 0, RTT_STREAMING_PAGES),
    };
    let tag = match (vmm, background) {
        (Vmm::Skiff, Background::Idle) => "pc-s",
        (Vmm::Qemu, Background::Idle) => "pc-q",
        (Vmm::Skiff, Background::Streaming) => "pcs-s",
        (Vmm::Qemu, Background::Streaming) => "pcs-q",
    };
    let paths = RunPaths::new(dir, shm_dir(dir), tag.to_string());
    let mut dst = spawn_side(
        vmm,
        size,
        Ram::Filled,
        guests,
        &paths,
        SideOptions {
            incoming: true,
            paused: true,
            ..SOURCE
        },
    )?;
    let mut dq = open_qmp(&mut dst, &paths.qmp("dst")).map_err(|e| format!("destination {e}"))?;
    wait_path(&mut dst, &paths.migration).map_err(|e| format!("destination {e}"))?;
    let mut src = spawn_side(vmm, size, Ram::Filled, guests, &paths, SOURCE)?;
    let mut sq = open_qmp(&mut src, &paths.qmp("src")).map_err(|e| format!("source {e}"))?;
    if vmm == Vmm::Skiff {
        wait_filled(&mut src, &paths.dir.join("src.serial"))?;
    }
    let caps = json!({"capabilities": [{"capability": "postcopy-ram", "state": true}]});
    for q in [&mut sq, &mut dq] {
        q.execute("migrate-set-capabilities", caps.clone())
            .map_err(first_line)?;
    }
    sq.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": 1u64 << 20, "max-postcopy-bandwidth": postcopy_bandwidth}),
    )
    .map_err(first_line)?;
    sq.execute(
        "migrate",
        json!({"uri": format!("unix:{}", paths.migration.display())}),
    )
    .map_err(first_line)?;
    sq.execute("migrate-start-postcopy", Value::Null)
        .map_err(first_line)?;
    wait_status(&mut sq, &mut src, "postcopy-active")?;
    wait_status(&mut dq, &mut dst, "postcopy-active")?;
    let file = paths.dir.join("page.bin");
    let mut rtts = Vec::with_capacity(pages as usize);
    let mut reads = Vec::with_capacity(pages as usize);
    for i in 0..pages {
        let addr = match background {
            Background::Idle => RTT_FIRST_PAGE + i * PAGE,
            Background::Streaming => size.bytes - (i + 1) * RTT_STREAMING_STRIDE,
        };
        let missing = pmemsave_us(&mut dq, addr, &file)?;
        let present = pmemsave_us(&mut dq, addr, &file)?;
        rtts.push(missing - present);
        reads.push(present);
    }
    if background == Background::Streaming {
        let info = sq
            .execute("query-migrate", Value::Null)
            .map_err(first_line)?;
        if info["status"] != "postcopy-active" {
            return Err(format!(
                "the background stream ended before the last read ({}): not a loaded round trip",
                info["status"]
            ));
        }
    }
    let bytes = std::fs::read(&file).map_err(|e| e.to_string())?;
    if bytes.first() != Some(&FILL_BYTE) {
        return Err(format!(
            "the last page read {:?}, not the filled byte",
            bytes.first()
        ));
    }
    rtts.sort_by(|a, b| a.total_cmp(b));
    Ok(RoundTrip {
        median_us: median(rtts.iter().copied()),
        p99_us: rtts[(rtts.len() * 99 / 100).min(rtts.len() - 1)],
        present_read_us: median(reads),
    })
}

/// What [`postcopy_page_round_trip`] measured.
struct RoundTrip {
    median_us: f64,
    p99_us: f64,
    /// Median `pmemsave` of a page already present: the QMP and file cost taken off each
    /// round trip, and most of the time between two page requests.
    present_read_us: f64,
}

/// The postcopy page round trips of one VMM, without and with the background stream.
type RoundTrips = [(Background, Result<RoundTrip, String>); 2];

/// Measures the postcopy page round trips on Skiff and on QEMU (if installed).
fn round_trips(guests: &Guests, dir: &TempDir, qemu: bool) -> (RoundTrips, RoundTrips) {
    eprintln!("measuring the postcopy page round trip...");
    let measure = |vmm| {
        [Background::Idle, Background::Streaming].map(|background| {
            let rtt = if vmm == Vmm::Qemu && !qemu {
                Err("qemu: not installed".to_string())
            } else {
                postcopy_page_round_trip(vmm, background, guests, dir)
            };
            (background, rtt)
        })
    };
    (measure(Vmm::Skiff), measure(Vmm::Qemu))
}

/// How this host's idle CPUs wait, which sets the price of every wake-up in a page's
/// round trip: a CPU that halts at once must be woken through the host's own hypervisor
/// when it is virtual (measured here: 110-188 µs round trips with `guest_halt_poll_ns` 0,
/// 61-89 µs with 200000, the same build alternating).
fn idle_cpus() -> String {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "?".to_string())
    };
    let driver = read("/sys/devices/system/cpu/cpuidle/current_driver");
    if driver == "haltpoll" {
        let ns = read("/sys/module/haltpoll/parameters/guest_halt_poll_ns");
        format!("cpuidle driver haltpoll, guest_halt_poll_ns {ns}")
    } else {
        format!("cpuidle driver {driver}")
    }
}

/// Prints the round trips and their target (on the idle background).
fn print_round_trips(skiff: &RoundTrips, qemu: &RoundTrips) {
    println!("  host idle CPUs: {}", idle_cpus());
    match &skiff[0].1 {
        Ok(rtt) => target(
            "postcopy page request round trip, median",
            Some(rtt.median_us),
            "µs",
            TARGET_PAGE_RTT_US,
            false,
            "< 100 µs",
        ),
        Err(e) => println!("  postcopy page request round trip: skiff: {e}"),
    }
    for (who, rtts) in [("skiff", skiff), ("qemu", qemu)] {
        for (background, rtt) in rtts {
            let (label, pages) = match background {
                Background::Idle => ("256 MiB, background at 4 KiB/s", RTT_PAGES),
                Background::Streaming => ("1 GiB, background unthrottled", RTT_STREAMING_PAGES),
            };
            match rtt {
                Ok(rtt) => println!(
                    "  postcopy page round trip, {who}, {label}: median {:.1} µs, p99 {:.1} µs ({pages} pages; a present page's pmemsave: {:.1} µs)",
                    rtt.median_us, rtt.p99_us, rtt.present_read_us
                ),
                Err(e) => println!("  postcopy page round trip, {who}, {label}: not measured: {e}"),
            }
        }
    }
}

/// QEMU's default `max-bandwidth` (B/s) and `downtime-limit` (ms), from
/// `query-migrate-parameters` on a fresh process.
fn qemu_defaults(dir: &TempDir) -> Option<(u64, u64)> {
    let socket = dir.join("defaults-qmp.sock");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "microvm", "-accel", "kvm", "-m", "256M"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "none", "-S", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", socket.display()));
    let mut proc = Proc::spawn(cmd, dir.join("defaults.log")).ok()?;
    let mut q = open_qmp(&mut proc, &socket).ok()?;
    let p = q.execute("query-migrate-parameters", Value::Null).ok()?;
    Some((p["max-bandwidth"].as_u64()?, p["downtime-limit"].as_u64()?))
}

/// Medians of a row, or its error line.
fn print_row(label: &str, row: &Row, ram_bytes: u64) {
    match row {
        Row::Samples(s) => {
            let total = median(s.iter().map(|x| x.total_ms));
            let wire = median(
                s.iter()
                    .map(|x| x.transferred as f64 / (x.total_ms / 1e3) / GIB),
            );
            println!(
                "  {label:<34} {:>4} {:>10.1} {:>10.1} {:>10.1} {:>14.2} {:>10.3} {:>10.3}",
                s.len(),
                total,
                median(s.iter().map(|x| x.wall_ms)),
                median(s.iter().map(|x| x.downtime_ms)),
                median(s.iter().map(|x| x.transferred as f64 / MIB)),
                median(
                    s.iter()
                        .map(|x| ram_bytes as f64 / GIB / (x.total_ms / 1e3))
                ),
                wire,
            );
        }
        Row::Unavailable(why) => println!("  {label:<34} {why}"),
    }
}

/// RAM GiB/s (median) of a row, if measured.
fn ram_rate(row: &Row, ram_bytes: u64) -> Option<f64> {
    match row {
        Row::Samples(s) => Some(median(
            s.iter()
                .map(|x| ram_bytes as f64 / GIB / (x.total_ms / 1e3)),
        )),
        Row::Unavailable(_) => None,
    }
}

/// Prints a target line: `value` against `limit` (`at_least`: value must be >= limit).
fn target(label: &str, value: Option<f64>, unit: &str, limit: f64, at_least: bool, text: &str) {
    let (shown, verdict) = match value {
        Some(v) => {
            let met = if at_least { v >= limit } else { v < limit };
            (format!("{v:.3} {unit}"), if met { "met" } else { "MISSED" })
        }
        None => ("n/a".to_string(), "not measured"),
    };
    println!("  {label:<58} {shown:>14}   {text:<14} {verdict}");
}

/// Everything measured for one size.
struct SizeResults {
    size: Size,
    skiff_idle: Row,
    qemu_idle_default: Row,
    qemu_idle_unthrottled: Row,
    skiff_filled: Row,
    skiff_filled_prealloc: Row,
    qemu_filled_default: Row,
    qemu_filled_unthrottled: Row,
    qemu_filled_prealloc: Row,
    copy: Vec<f64>,
    copy_fresh: Vec<f64>,
}

fn main() {
    // `cargo bench` passes `--bench`; the one filter known is `round-trip`.
    let only_round_trip = std::env::args().skip(1).any(|a| a == "round-trip");
    let dir = TempDir::new("bench-migration");
    let guests = build_guests(&dir);
    let qemu = qemu_version();
    if only_round_trip {
        let (skiff, qemu) = round_trips(&guests, &dir, qemu.is_some());
        println!();
        print_round_trips(&skiff, &qemu);
        return;
    }
    let defaults = qemu.as_ref().and_then(|_| qemu_defaults(&dir));
    let no_qemu = || Row::Unavailable("qemu: not installed".to_string());

    let results: Vec<SizeResults> = SIZES
        .iter()
        .map(|&size| {
            let qemu_row = |ram, bw, runs| {
                if qemu.is_some() {
                    measure(Vmm::Qemu, size, ram, bw, runs, &guests, &dir)
                } else {
                    no_qemu()
                }
            };
            SizeResults {
                size,
                skiff_idle: measure(
                    Vmm::Skiff,
                    size,
                    Ram::Idle,
                    Bandwidth::Default,
                    RUNS,
                    &guests,
                    &dir,
                ),
                qemu_idle_default: qemu_row(Ram::Idle, Bandwidth::Default, RUNS),
                qemu_idle_unthrottled: qemu_row(Ram::Idle, Bandwidth::Unthrottled, RUNS),
                skiff_filled: measure(
                    Vmm::Skiff,
                    size,
                    Ram::Filled,
                    Bandwidth::Default,
                    FILLED_RUNS,
                    &guests,
                    &dir,
                ),
                qemu_filled_default: qemu_row(Ram::Filled, Bandwidth::Default, FILLED_RUNS),
                qemu_filled_unthrottled: qemu_row(Ram::Filled, Bandwidth::Unthrottled, FILLED_RUNS),
                skiff_filled_prealloc: measure(
                    Vmm::Skiff,
                    size,
                    Ram::Filled,
                    Bandwidth::Prealloc,
                    FILLED_RUNS,
                    &guests,
                    &dir,
                ),
                qemu_filled_prealloc: qemu_row(Ram::Filled, Bandwidth::Prealloc, FILLED_RUNS),
                copy: socket_copy_gib_s(size.bytes as usize, CopyTarget::Prefaulted),
                copy_fresh: socket_copy_gib_s(size.bytes as usize, CopyTarget::Fresh),
            }
        })
        .collect();
    let (page_rtt, qemu_page_rtt) = round_trips(&guests, &dir, qemu.is_some());

    println!();
    println!(
        "migration benchmark: skiff (this build) vs {}, both sides on this host, unix socket",
        qemu.as_deref()
            .map(|v| format!("{v} -M microvm -accel kvm"))
            .unwrap_or_else(|| "QEMU (not installed: QEMU rows skipped)".to_string())
    );
    match defaults {
        Some((bw, limit_ms)) => println!(
            "  qemu defaults: max-bandwidth {:.0} MiB/s, downtime-limit {limit_ms} ms; unthrottled: max-bandwidth {} GiB/s",
            bw as f64 / MIB,
            UNTHROTTLED_BPS >> 30
        ),
        None => println!("  qemu defaults: could not be read"),
    }
    println!("  medians; total and downtime as the source's query-migrate reports them (ms); wall = migrate sent to completed seen");
    println!("  RAM GiB/s = guest RAM / total-time; wire GiB/s = ram.transferred / total-time");
    println!(
        "  {:<34} {:>4} {:>10} {:>10} {:>10} {:>14} {:>10} {:>10}",
        "scenario",
        "runs",
        "total ms",
        "wall ms",
        "downtime",
        "transferred",
        "RAM GiB/s",
        "wire GiB/s"
    );
    println!(
        "  {:<34} {:>4} {:>10} {:>10} {:>10} {:>14} {:>10} {:>10}",
        "", "", "", "", "ms", "MiB", "", ""
    );
    for r in &results {
        let b = r.size.bytes;
        let l = r.size.label;
        print_row(&format!("{l} idle, skiff"), &r.skiff_idle, b);
        print_row(&format!("{l} idle, qemu default"), &r.qemu_idle_default, b);
        print_row(
            &format!("{l} idle, qemu unthrottled"),
            &r.qemu_idle_unthrottled,
            b,
        );
        print_row(&format!("{l} filled, skiff"), &r.skiff_filled, b);
        print_row(
            &format!("{l} filled, qemu default"),
            &r.qemu_filled_default,
            b,
        );
        print_row(
            &format!("{l} filled, qemu unthrottled"),
            &r.qemu_filled_unthrottled,
            b,
        );
        print_row(
            &format!("{l} filled, skiff, prealloc dest"),
            &r.skiff_filled_prealloc,
            b,
        );
        print_row(
            &format!("{l} filled, qemu unthr., prealloc"),
            &r.qemu_filled_prealloc,
            b,
        );
        for (what, rates) in [
            ("memcpy over unix socket", &r.copy),
            ("same, into fresh memory", &r.copy_fresh),
        ] {
            let copy = median(rates.iter().copied());
            println!(
                "  {:<34} {:>4} {:>10.1} {:>10} {:>10} {:>14.1} {:>10.3} {:>10.3}",
                format!("{l} {what}"),
                rates.len(),
                b as f64 / GIB / copy * 1e3,
                "-",
                "-",
                b as f64 / MIB,
                copy,
                copy
            );
        }
    }

    println!();
    println!("  {:<58} {:>14}   {:<14} result", "target", "skiff", "goal");
    for r in &results {
        let b = r.size.bytes;
        let l = r.size.label;
        let copy = median(r.copy.iter().copied());
        let copy_fresh = median(r.copy_fresh.iter().copied());
        for (ram, ours, theirs) in [
            ("idle", &r.skiff_idle, &r.qemu_idle_default),
            ("filled", &r.skiff_filled, &r.qemu_filled_default),
        ] {
            let skiff = ram_rate(ours, b);
            let ratio = skiff.zip(ram_rate(theirs, b)).map(|(s, q)| s / q);
            target(
                &format!("{l} {ram}: RAM throughput skiff / qemu default"),
                ratio,
                "x",
                TARGET_VS_QEMU,
                true,
                ">= 2",
            );
            target(
                &format!("{l} {ram}: RAM throughput skiff / socket memcpy"),
                skiff.map(|s| s / copy),
                "x",
                TARGET_VS_COPY,
                true,
                ">= 0.5",
            );
            target(
                &format!("{l} {ram}: same, copy into fresh memory"),
                skiff.map(|s| s / copy_fresh),
                "x",
                TARGET_VS_COPY,
                true,
                ">= 0.5",
            );
        }
        target(
            &format!("{l} filled, preallocated destination: skiff / socket memcpy"),
            ram_rate(&r.skiff_filled_prealloc, b).map(|s| s / copy),
            "x",
            TARGET_VS_COPY,
            true,
            ">= 0.5",
        );
    }
    let idle_256 = &results[0].skiff_idle;
    let downtime = match idle_256 {
        Row::Samples(s) => Some(median(s.iter().map(|x| x.downtime_ms))),
        Row::Unavailable(_) => None,
    };
    target(
        "256 MiB idle: downtime",
        downtime,
        "ms",
        TARGET_DOWNTIME_MS,
        false,
        "< 10 ms",
    );
    print_round_trips(&page_rtt, &qemu_page_rtt);
}
