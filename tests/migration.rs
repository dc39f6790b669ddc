//! Live migration on the real /dev/kvm: two skiff processes, the migration test guest
//! (tests/common/migration_guest.rs), and QMP as QEMU's own migration tests drive it
//! (tests/qtest/migration: precopy, postcopy, postcopy recovery, cancel, broken links, bad
//! URIs), plus snapshots to files and damaged streams.
//!
//! Postcopy tests whose destination vCPUs run while pages are missing are guarded by the
//! userfaultfd probe of tests/common/kvm.rs: when it says no, they print `SKIPPED: <reason>`
//! and return.

mod common;

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::kvm::userfault_vcpu_faults_work;
use common::migration_guest::{
    check_guest_ram, pass_counter, write_migration_guest, MIG_END, MIG_START,
};
use common::process::{resident_kib, run, Skiff, TestTimer};
use common::qmp_client::QmpClient;
use common::{repo_root, TempDir};

/// How long to wait for a guest or a migration step; generous for the loaded, emulated host.
const TIMEOUT: Duration = Duration::from_secs(60);
/// Guest RAM of every test VM: the guest needs 8 MiB; less RAM makes passes and files small.
const MEMORY: &str = "32M";
/// Guest RAM in bytes.
const MEMORY_BYTES: u64 = 32 << 20;
/// Precopy bandwidth that never converges: the guest redirties its 4 MiB range every ~10 ms.
const SLOW_PRECOPY: u64 = 8 << 20;
/// Postcopy background bandwidth that keeps a migration in postcopy for minutes.
const SLOW_POSTCOPY: u64 = 4096;
/// Pages the destination's vCPUs must fault in through the source before a running-destination
/// postcopy may complete (of the ~768 its walk misses after the first background burst).
const POSTCOPY_VCPU_REQUESTS: u64 = 200;
/// Bytes of the stream header (magic and version).
const STREAM_HEADER_LEN: usize = 12;
/// Section kinds of the stream (vmm/src/migration/stream.rs).
const KIND_CONFIG: u8 = 1;
const KIND_RAM_PAGES: u8 = 2;
const KIND_RAM_ZERO: u8 = 3;
const KIND_DEVICE_STATE: u8 = 4;
const KIND_END: u8 = 5;

/// One skiff process with its QMP monitor.
struct Vmm {
    skiff: Skiff,
    qmp: QmpClient,
}

fn start_vmm(dir: &TempDir, name: &str, kernel: &Path, extra: &[&str]) -> Vmm {
    start_vmm_via(&[], dir, name, kernel, extra)
}

/// [`start_vmm`] through `wrapper`, which must exec skiff (see [`Skiff::spawn_via`]).
fn start_vmm_via(
    wrapper: &[&str],
    dir: &TempDir,
    name: &str,
    kernel: &Path,
    extra: &[&str],
) -> Vmm {
    let socket = dir.join(&format!("{name}.qmp"));
    let mut args = vec![
        "--kernel".to_string(),
        kernel.display().to_string(),
        "--qmp".to_string(),
        format!("unix:{}", socket.display()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let skiff = Skiff::spawn_via(wrapper, args);
    let qmp = QmpClient::open_unix(&socket, true, TIMEOUT)
        .unwrap_or_else(|e| panic!("{name} QMP: {e}\n{}", skiff.dump()));
    Vmm { skiff, qmp }
}

/// Arguments every test VM gets, followed by `extra`.
fn vm_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--serial", "none", "--memory", MEMORY];
    args.extend_from_slice(extra);
    args
}

impl Vmm {
    fn exec(&mut self, name: &str, args: Value) -> Value {
        self.qmp
            .execute(name, args)
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", self.skiff.dump()))
    }

    /// Passes `fd` to the monitor and keeps it there as `name` (`getfd`).
    fn getfd(&mut self, name: &str, fd: &impl AsRawFd) {
        self.qmp
            .send_fd(fd.as_raw_fd())
            .unwrap_or_else(|e| panic!("passing {name}: {e}\n{}", self.skiff.dump()));
        self.exec("getfd", json!({ "fdname": name }));
    }

    /// Runs a command that must fail; returns its error description.
    fn exec_err(&mut self, name: &str, args: Value) -> String {
        self.qmp
            .execute_err(name, args)
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", self.skiff.dump()))
            .1
    }

    fn status(&mut self) -> String {
        self.exec("query-status", Value::Null)["status"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn migration_status(&mut self) -> Value {
        self.exec("query-migrate", Value::Null)
    }

    /// Polls query-migrate until `status` is one of `goals`; panics on `failed` unless it is
    /// a goal.
    fn wait_migration(&mut self, goals: &[&str]) -> Value {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let info = self.migration_status();
            let status = info["status"].as_str().unwrap_or("none").to_string();
            if goals.contains(&status.as_str()) {
                return info;
            }
            assert!(
                status != "failed",
                "migration failed: {info}\n{}",
                self.skiff.dump()
            );
            assert!(
                Instant::now() < deadline,
                "migration stuck in {status}: {info}\n{}",
                self.skiff.dump()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Removes and returns the first event (already received or still to come) for which
    /// `want` holds; other events stay queued. A command reply meanwhile is an error.
    fn take_event(&mut self, what: &str, want: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + TIMEOUT;
        if let Some(i) = self.qmp.events.iter().position(&want) {
            return self.qmp.events.remove(i).expect("queued event");
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = self
                .qmp
                .read_message(left)
                .unwrap_or_else(|e| panic!("waiting for {what}: {e}\n{}", self.skiff.dump()));
            assert!(
                message.get("event").is_some(),
                "waiting for {what}, got the reply {message}"
            );
            if want(&message) {
                return message;
            }
            self.qmp.events.push_back(message);
        }
    }

    /// Waits for the event `name`.
    fn wait_event(&mut self, name: &str) -> Value {
        self.take_event(name, |e| e["event"] == name)
    }

    /// Waits for the MIGRATION event with `status`.
    fn wait_migration_event(&mut self, status: &str) -> Value {
        self.take_event(&format!("MIGRATION {status}"), |e| {
            e["event"] == "MIGRATION" && e["data"]["status"] == status
        })
    }

    /// The statuses of the MIGRATION events received so far (removing them).
    fn drain_migration_events(&mut self) -> Vec<String> {
        let mut statuses = Vec::new();
        self.qmp.events.retain(|e| {
            if e["event"] == "MIGRATION" {
                statuses.push(e["data"]["status"].as_str().unwrap_or("?").to_string());
                false
            } else {
                true
            }
        });
        statuses
    }

    fn set_capabilities(&mut self, postcopy: bool) {
        self.exec(
            "migrate-set-capabilities",
            json!({"capabilities": [
                {"capability": "events", "state": true},
                {"capability": "postcopy-ram", "state": postcopy},
            ]}),
        );
    }

    fn set_parameters(&mut self, params: Value) {
        self.exec("migrate-set-parameters", params);
    }

    fn pmemsave(&mut self, file: &Path) {
        self.exec(
            "pmemsave",
            json!({"val": MIG_START, "size": MIG_END - MIG_START,
                   "filename": file.display().to_string()}),
        );
    }

    fn read_range(&mut self, dir: &TempDir, name: &str) -> Vec<u8> {
        let file = dir.join(name);
        self.pmemsave(&file);
        std::fs::read(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()))
    }

    /// Waits until the guest has completed at least `passes` passes.
    fn wait_guest_passes(&mut self, dir: &TempDir, passes: u64) -> u64 {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let count = pass_counter(&self.read_range(dir, "passes.bin"));
            if count >= passes {
                return count;
            }
            assert!(
                Instant::now() < deadline,
                "the guest does not run ({count} passes)\n{}",
                self.skiff.dump()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `exec-oob` of `name` with a fresh id; returns the reply and how long it took. Events
    /// are queued; an in-band reply meanwhile is an error.
    fn exec_oob(&mut self, name: &str, args: Value) -> (Value, Duration) {
        let id = self.qmp.fresh_id();
        let started = Instant::now();
        let mut request = json!({"exec-oob": name, "id": id});
        if !args.is_null() {
            request["arguments"] = args;
        }
        self.qmp
            .send(&request)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let reply = self
            .qmp
            .reply_to(&id, TIMEOUT)
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", self.skiff.dump()));
        (reply, started.elapsed())
    }

    /// `exec-oob` of `name`, which must succeed; returns how long it took.
    fn oob_ok(&mut self, name: &str, args: Value) -> Duration {
        let (reply, took) = self.exec_oob(name, args);
        assert_eq!(reply["return"], json!({}), "{name}: {reply}");
        took
    }

    /// `exec-oob` of `name`, which must be refused.
    fn oob_refused(&mut self, name: &str, args: Value) {
        let (reply, _) = self.exec_oob(name, args);
        assert!(reply.get("error").is_some(), "{name}: {reply}");
    }

    /// `migrate-recover` (out of band) on a paused postcopy destination, listening on `uri`;
    /// returns how long the answer took.
    fn recover(&mut self, uri: &str) -> Duration {
        self.oob_ok("migrate-recover", json!({ "uri": uri }))
    }

    /// `migrate` with `resume`: a paused postcopy source reconnects to `uri`.
    fn resume(&mut self, uri: &str) {
        self.exec("migrate", json!({"uri": uri, "resume": true}));
    }
}

/// The destination runs the guest on: its RAM passes the a-b check and keeps changing.
fn check_destination_runs(dest: &mut Vmm, dir: &TempDir) {
    let first = dest.read_range(dir, "dest-1.bin");
    let deadline = Instant::now() + TIMEOUT;
    loop {
        thread::sleep(Duration::from_millis(100));
        let now = dest.read_range(dir, "dest-2.bin");
        if pass_counter(&now) > pass_counter(&first) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest does not run on the destination\n{}",
            dest.skiff.dump()
        );
    }
    dest.exec("stop", Value::Null);
    let mem = dest.read_range(dir, "dest-3.bin");
    if let Err(report) = check_guest_ram(&mem) {
        panic!("{report}\n{}", dest.skiff.dump());
    }
}

/// The source guest keeps running: query-status says so and its pass counter grows.
fn check_source_runs(src: &mut Vmm, dir: &TempDir) {
    assert_eq!(src.status(), "running", "{}", src.skiff.dump());
    let before = pass_counter(&src.read_range(dir, "src-runs.bin"));
    src.wait_guest_passes(dir, before + 2);
}

/// Whether the running-destination postcopy tests can run here; prints why not.
fn postcopy_vcpu_faults_supported(test: &str) -> bool {
    match userfault_vcpu_faults_work() {
        Ok(true) => true,
        Ok(false) => {
            common::skipped(format_args!(
                "SKIPPED: {test}: vCPU faults on userfaultfd memory do not work on this host"
            ));
            false
        }
        Err(e) => {
            common::skipped(format_args!(
                "SKIPPED: {test}: the userfaultfd probe could not run: {e}"
            ));
            false
        }
    }
}

/// Whether this host has userfaultfd at all (host-side postcopy faults); prints why not.
fn userfaultfd_available(test: &str) -> bool {
    match skiff::uffd::Userfault::new() {
        Ok(_) => true,
        Err(e) => {
            common::skipped(format_args!(
                "SKIPPED: {test}: userfaultfd is not available: {e}"
            ));
            false
        }
    }
}

/// Starts test `name`: its timer (first, so it is dropped last), a temporary directory named
/// after `tag`, and the migration guest in it.
fn start_test(name: &'static str, tag: &str) -> (TestTimer, TempDir, PathBuf) {
    let timer = TestTimer::start(name);
    let dir = TempDir::new(tag);
    let kernel = write_migration_guest(dir.path(), "guest.elf");
    (timer, dir, kernel)
}

/// Starts test `name` (see [`start_test`]) with a source running the guest and a destination
/// waiting with `--incoming defer`.
fn start_deferred_pair(name: &'static str, tag: &str) -> (TestTimer, TempDir, Vmm, Vmm) {
    let (timer, dir, kernel) = start_test(name, tag);
    let src = start_vmm(&dir, "src", &kernel, &vm_args(&[]));
    let mut dest = start_vmm(&dir, "dest", &kernel, &vm_args(&["--incoming", "defer"]));
    assert_eq!(dest.status(), "inmigrate");
    (timer, dir, src, dest)
}

/// How a pair's migration channel is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// The destination listens on a unix socket (`--incoming unix:`), the source connects.
    Unix,
    /// A socket pair, one end passed to each side (see [`pass_socketpair`]).
    FdPair,
}

/// Gives each side one end of a new socket pair, kept as `name` (`getfd`); returns the
/// migration URI `fd:NAME` that uses them.
fn pass_socketpair(src: &mut Vmm, dest: &mut Vmm, name: &str) -> String {
    let (a, b) = UnixStream::pair().expect("socket pair");
    src.getfd(name, &a);
    dest.getfd(name, &b);
    format!("fd:{name}")
}

/// A source running the guest (at least 3 passes done) and a destination waiting for it over
/// `link` (a unix socket it listens on, or a socket pair with `migrate-incoming fd:`), with
/// the events capability (and postcopy-ram when `postcopy`) on both sides; returns them and
/// the URI for the source's `migrate`.
fn start_pair(
    dir: &TempDir,
    kernel: &Path,
    dest_extra: &[&str],
    postcopy: bool,
    link: Link,
) -> (Vmm, Vmm, String) {
    let mut src = start_vmm(dir, "src", kernel, &vm_args(&[]));
    let listen = format!("unix:{}", dir.join("mig.sock").display());
    let incoming = match link {
        Link::Unix => listen.as_str(),
        Link::FdPair => "defer",
    };
    let mut dest_args = vec!["--incoming", incoming];
    dest_args.extend_from_slice(dest_extra);
    let mut dest = start_vmm(dir, "dest", kernel, &vm_args(&dest_args));
    assert_eq!(dest.status(), "inmigrate");
    src.set_capabilities(postcopy);
    dest.set_capabilities(postcopy);
    let uri = match link {
        Link::Unix => listen,
        Link::FdPair => {
            let uri = pass_socketpair(&mut src, &mut dest, "mig");
            dest.exec("migrate-incoming", json!({ "uri": uri }));
            uri
        }
    };
    src.wait_guest_passes(dir, 3);
    (src, dest, uri)
}

/// A pair (see [`start_pair`]) in a slow precopy at 1 MiB/s, active for 200 ms.
fn start_slow_precopy(dir: &TempDir, kernel: &Path) -> (Vmm, Vmm) {
    let (mut src, dest, uri) = start_pair(dir, kernel, &[], false, Link::Unix);
    src.set_parameters(json!({"max-bandwidth": 1u64 << 20}));
    src.exec("migrate", json!({ "uri": uri }));
    src.wait_migration_event("active");
    thread::sleep(Duration::from_millis(200));
    (src, dest)
}

/// A pair (see [`start_pair`]; the destination started with -S unless `dest_runs`) in a
/// postcopy that stays for minutes: starts a precopy that cannot converge, waits for its first
/// complete pass, switches to postcopy at [`SLOW_POSTCOPY`] and waits for STOP on the source
/// and (when `dest_runs`) RESUME on the destination, else for it to leave inmigrate.
fn start_postcopy(dir: &TempDir, kernel: &Path, dest_runs: bool, link: Link) -> (Vmm, Vmm) {
    let dest_extra: &[&str] = if dest_runs { &[] } else { &["-S"] };
    let (mut src, mut dest, uri) = start_pair(dir, kernel, dest_extra, true, link);
    src.set_parameters(json!({"max-bandwidth": SLOW_PRECOPY, "downtime-limit": 1,
                              "max-postcopy-bandwidth": SLOW_POSTCOPY}));
    src.exec("migrate", json!({ "uri": uri }));
    src.take_event("MIGRATION_PASS 2", |e| {
        e["event"] == "MIGRATION_PASS" && e["data"]["pass"].as_i64() >= Some(2)
    });
    assert_eq!(src.migration_status()["status"], "active");
    src.exec("migrate-start-postcopy", Value::Null);
    src.wait_event("STOP");
    src.wait_migration_event("postcopy-active");
    dest.wait_migration_event("postcopy-active");
    if dest_runs {
        dest.wait_event("RESUME");
    } else {
        // The run state follows the postcopy-active event (as in QEMU).
        let deadline = Instant::now() + TIMEOUT;
        while dest.status() == "inmigrate" {
            assert!(
                Instant::now() < deadline,
                "the destination stays in inmigrate"
            );
            thread::sleep(Duration::from_millis(5));
        }
    }
    (src, dest)
}

/// Starts postcopy test `name` (see [`start_test`] and [`start_postcopy`]), or returns `None`
/// having printed why this host cannot run it: a running destination needs vCPU faults on
/// userfaultfd memory, a paused one userfaultfd itself.
fn start_postcopy_test(
    name: &'static str,
    tag: &str,
    dest_runs: bool,
    link: Link,
) -> Option<(TestTimer, TempDir, Vmm, Vmm)> {
    let supported = if dest_runs {
        postcopy_vcpu_faults_supported(name)
    } else {
        userfaultfd_available(name)
    };
    if !supported {
        return None;
    }
    let (timer, dir, kernel) = start_test(name, tag);
    let (src, dest) = start_postcopy(&dir, &kernel, dest_runs, link);
    Some((timer, dir, src, dest))
}

/// `migrate-pause` on the source of a postcopy; both sides report postcopy-paused.
fn pause_postcopy(src: &mut Vmm, dest: &mut Vmm) {
    src.oob_ok("migrate-pause", Value::Null);
    src.wait_migration_event("postcopy-paused");
    dest.wait_migration_event("postcopy-paused");
}

/// Lifts the postcopy bandwidth limit and waits for both sides to complete; returns the
/// source's query-migrate.
fn complete_postcopy(src: &mut Vmm, dest: &mut Vmm) -> Value {
    src.set_parameters(json!({"max-postcopy-bandwidth": 0}));
    let info = src.wait_migration(&["completed"]);
    eprintln!("source: {info}");
    dest.wait_migration(&["completed"]);
    info
}

/// `got` equals the source's (stopped) guest range; `what` names it in the failure.
fn assert_matches_source(src: &mut Vmm, dir: &TempDir, got: &[u8], what: &str) {
    let frozen = src.read_range(dir, "src-final.bin");
    assert!(got == frozen, "{what} and the source's RAM differ");
}

/// A postcopy destination started with -S has the source's RAM once complete, then runs on
/// after `cont`.
fn check_paused_destination(src: &mut Vmm, dest: &mut Vmm, dir: &TempDir) {
    let mem = dest.read_range(dir, "dest-final.bin");
    assert_matches_source(src, dir, &mem, "the destination's final RAM");
    dest.exec("cont", Value::Null);
    check_destination_runs(dest, dir);
}

/// An incoming migration completes and the guest runs on the destination.
fn check_incoming_completes(dest: &mut Vmm, dir: &TempDir) {
    dest.wait_migration(&["completed"]);
    assert_eq!(dest.status(), "running");
    check_destination_runs(dest, dir);
}

/// The source of a precopy completes and stops in postmigrate; returns its query-migrate.
fn wait_source_completed(src: &mut Vmm) -> Value {
    let info = src.wait_migration(&["completed"]);
    eprintln!("source: {info}");
    assert_eq!(src.status(), "postmigrate", "{info}");
    info
}

/// An out-of-band command that must answer within a second.
fn assert_prompt(what: &str, took: Duration) {
    assert!(took < Duration::from_secs(1), "{what} took {took:?}");
}

// ---------------------------------------------------------------------------------------
// Precopy

/// Precopy over a unix socket given to `--incoming`; the guest runs on, consistent.
#[test]
fn precopy_over_unix_socket() {
    let (_t, dir, kernel) = start_test("precopy_over_unix_socket", "mig-precopy-unix");
    let mut src = start_vmm(&dir, "src", &kernel, &["--serial", "none"]);
    let sock = dir.join("mig.sock");
    let incoming = format!("unix:{}", sock.display());
    let mut dest = start_vmm(
        &dir,
        "dest",
        &kernel,
        &["--serial", "none", "--incoming", &incoming],
    );
    assert_eq!(dest.status(), "inmigrate");
    thread::sleep(Duration::from_millis(300));
    src.exec("migrate", json!({ "uri": incoming }));
    wait_source_completed(&mut src);
    check_incoming_completes(&mut dest, &dir);
    // Only what the guest used arrives populated: the rest of its 256 MiB stays untouched
    // on the destination, as on the source (the destination populates ahead only what the
    // source's plan names).
    let (rss, _) = resident_kib(dest.skiff.pid(), 256 << 10).expect("destination smaps");
    assert!(rss < 64 << 10, "destination resident set {rss} KiB");
}

/// `--incoming defer`, `migrate-incoming tcp:127.0.0.1:0` and the real port from
/// `socket-address`; MIGRATION and MIGRATION_PASS events; query-migrate's numbers.
#[test]
fn precopy_over_tcp_with_deferred_incoming() {
    let (_t, dir, mut src, mut dest) =
        start_deferred_pair("precopy_over_tcp_with_deferred_incoming", "mig-precopy-tcp");
    assert_eq!(dest.migration_status(), json!({}));
    src.set_capabilities(false);
    dest.set_capabilities(false);
    dest.exec("migrate-incoming", json!({"uri": "tcp:127.0.0.1:0"}));
    dest.wait_migration_event("setup");
    let info = dest.migration_status();
    let addr = &info["socket-address"][0];
    assert_eq!(addr["type"], "inet", "{info}");
    let port: u16 = addr["port"]
        .as_str()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {info}"));
    assert_ne!(port, 0, "{info}");
    let again = dest.exec_err("migrate-incoming", json!({"uri": "tcp:127.0.0.1:0"}));
    assert!(again.contains("already"), "{again}");

    src.wait_guest_passes(&dir, 3);
    // Slow enough for a few passes, fast enough to converge once the rate is known.
    src.set_parameters(json!({"max-bandwidth": 64u64 << 20}));
    src.exec("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    let info = wait_source_completed(&mut src);

    // Source events: setup, active, device, completed; passes numbered from 1.
    src.wait_migration_event("completed");
    let mut passes = Vec::new();
    while let Some(i) = src
        .qmp
        .events
        .iter()
        .position(|e| e["event"] == "MIGRATION_PASS")
    {
        let e = src.qmp.events.remove(i).expect("event");
        passes.push(e["data"]["pass"].as_i64().expect("pass number"));
    }
    assert!(!passes.is_empty(), "no MIGRATION_PASS event");
    assert_eq!(passes, (1..=passes.len() as i64).collect::<Vec<_>>());
    let statuses = src.drain_migration_events();
    assert_eq!(statuses, ["setup", "active", "device"], "{statuses:?}");

    // query-migrate after completion.
    let total_time = info["total-time"].as_i64().expect("total-time");
    let downtime = info["downtime"].as_i64().expect("downtime");
    assert!(
        total_time > 0 && (0..=total_time).contains(&downtime),
        "{info}"
    );
    assert!(info.get("expected-downtime").is_none(), "{info}");
    let ram = &info["ram"];
    assert_eq!(ram["total"].as_u64(), Some(MEMORY_BYTES), "{info}");
    assert_eq!(ram["remaining"].as_u64(), Some(0), "{info}");
    let transferred = ram["transferred"].as_u64().expect("transferred");
    // At least the guest's range once, at most a few times all RAM.
    assert!(
        transferred > (MIG_END - MIG_START) && transferred < 8 * MEMORY_BYTES,
        "{info}"
    );
    assert!(
        ram["normal"].as_u64() >= Some((MIG_END - MIG_START) / 4096),
        "{info}"
    );
    assert!(
        ram["dirty-sync-count"].as_u64() >= Some(passes.len() as u64),
        "{info}"
    );
    assert_eq!(ram["page-size"].as_u64(), Some(4096), "{info}");

    check_incoming_completes(&mut dest, &dir);
}

// ---------------------------------------------------------------------------------------
// Snapshots to files

/// Stops a source, saves it to `dir/name` with `migrate file:`, and returns the path.
fn save_snapshot(dir: &TempDir, kernel: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let mut src = start_vmm(dir, &format!("{name}-src"), kernel, &vm_args(&[]));
    src.wait_guest_passes(dir, 3);
    src.exec("stop", Value::Null);
    src.exec(
        "migrate",
        json!({"uri": format!("file:{}", path.display())}),
    );
    let info = src.wait_migration(&["completed"]);
    assert_eq!(src.status(), "postmigrate", "{info}");
    path
}

/// `stop`, `migrate file:`, then `--incoming file:` restores a running guest; with -S it
/// stays paused, RAM frozen, until `cont`.
#[test]
fn file_save_and_restore() {
    let (_t, dir, kernel) = start_test("file_save_and_restore", "mig-file");
    let snapshot = save_snapshot(&dir, &kernel, "snap.bin");
    let incoming = format!("file:{}", snapshot.display());

    let mut dest = start_vmm(&dir, "dest", &kernel, &vm_args(&["--incoming", &incoming]));
    check_incoming_completes(&mut dest, &dir);

    // With -S the restored guest waits for `cont`.
    let mut paused = start_vmm(
        &dir,
        "dest-s",
        &kernel,
        &vm_args(&["-S", "--incoming", &incoming]),
    );
    paused.wait_migration(&["completed"]);
    assert_eq!(paused.status(), "paused");
    let before = paused.read_range(&dir, "paused-1.bin");
    thread::sleep(Duration::from_millis(200));
    let after = paused.read_range(&dir, "paused-2.bin");
    assert_eq!(pass_counter(&before), pass_counter(&after), "the guest ran");
    assert!(before == after, "guest RAM changed while paused");
    check_guest_ram(&before).unwrap_or_else(|r| panic!("{r}"));
    paused.exec("cont", Value::Null);
    assert_eq!(paused.status(), "running");
    check_destination_runs(&mut paused, &dir);
}

// ---------------------------------------------------------------------------------------
// Channels passed as descriptors (fd: URIs)

/// Both sides get their channel by descriptor: one end of a socket pair goes to the source
/// (`getfd`, `migrate fd:`), the other to a `--incoming defer` destination (`getfd`,
/// `migrate-incoming fd:`). Taking a descriptor uses it up, as in QEMU.
#[test]
fn precopy_over_fd_socketpair() {
    let (_t, dir, mut src, mut dest) =
        start_deferred_pair("precopy_over_fd_socketpair", "mig-fd-pair");
    let uri = pass_socketpair(&mut src, &mut dest, "mig");
    dest.exec("migrate-incoming", json!({ "uri": uri }));
    src.wait_guest_passes(&dir, 3);
    src.exec("migrate", json!({ "uri": uri }));
    wait_source_completed(&mut src);
    check_incoming_completes(&mut dest, &dir);
    for vmm in [&mut src, &mut dest] {
        let e = vmm.exec_err("closefd", json!({"fdname": "mig"}));
        assert_eq!(e, "File descriptor named 'mig' not found");
    }
}

/// Stopped guests saved through descriptors: one to a regular file, one to a pipe whose
/// reader keeps the stream. The file is restored by `getfd` and `migrate-incoming fd:`, the pipe's
/// stream by a descriptor skiff inherits (`--incoming fd:7`).
#[test]
fn fd_save_and_restore() {
    let (_t, dir, kernel) = start_test("fd_save_and_restore", "mig-fd-file");
    let mut src = start_vmm(&dir, "src", &kernel, &vm_args(&[]));
    src.wait_guest_passes(&dir, 3);
    src.exec("stop", Value::Null);
    let saved = dir.join("snap.bin");
    src.getfd("snap", &File::create(&saved).expect("snapshot file"));
    src.exec("migrate", json!({"uri": "fd:snap"}));
    src.wait_migration(&["completed"]);
    let (mut reader, writer) = common::fd_passing::pipe();
    let copier = thread::spawn(move || {
        let mut stream = Vec::new();
        reader.read_to_end(&mut stream).map(|_| stream)
    });
    // A second guest: a source that completed gives its guest up.
    let mut src2 = start_vmm(&dir, "src2", &kernel, &vm_args(&[]));
    src2.wait_guest_passes(&dir, 3);
    src2.exec("stop", Value::Null);
    src2.getfd("pipe", &writer);
    drop(writer);
    src2.exec("migrate", json!({"uri": "fd:pipe"}));
    src2.wait_migration(&["completed"]);
    let piped = dir.join("piped.bin");
    let stream = copier.join().expect("copier").expect("read the pipe");
    std::fs::write(&piped, &stream).expect("write the piped stream");
    assert!(stream.len() > STREAM_HEADER_LEN, "{} bytes", stream.len());

    let mut dest = start_vmm(&dir, "dest", &kernel, &vm_args(&["--incoming", "defer"]));
    dest.getfd("snap", &File::open(&saved).expect("snapshot file"));
    dest.exec("migrate-incoming", json!({"uri": "fd:snap"}));
    check_incoming_completes(&mut dest, &dir);

    let redirect = format!("exec \"$@\" 7<'{}'", piped.display());
    let mut inherited = start_vmm_via(
        &["sh", "-c", &redirect, "sh"],
        &dir,
        "inherited",
        &kernel,
        &vm_args(&["--incoming", "fd:7"]),
    );
    check_incoming_completes(&mut inherited, &dir);
}

/// What cannot carry a migration is refused at once with the reason, the descriptor used up;
/// numbers name only inherited descriptors, and only for incoming migrations (as QEMU).
#[test]
fn fd_uri_errors() {
    let (_t, dir, mut src, mut dest) = start_deferred_pair("fd_uri_errors", "mig-fd-errors");
    let kernel = dir.join("guest.elf");
    let e = src.exec_err("migrate", json!({"uri": "fd:nope"}));
    assert_eq!(e, "File descriptor named 'nope' has not been found");
    let e = src.exec_err("migrate", json!({"uri": "fd:3"}));
    assert_eq!(e, "File descriptor named '3' has not been found");
    let kernel_file = File::open(&kernel).expect("kernel");
    src.getfd("ro", &kernel_file);
    let e = src.exec_err("migrate", json!({"uri": "fd:ro"}));
    assert_eq!(e, "file descriptor 'ro': not open for writing");
    let e = src.exec_err("closefd", json!({"fdname": "ro"}));
    assert_eq!(e, "File descriptor named 'ro' not found");
    assert_eq!(src.migration_status(), json!({}));
    check_source_runs(&mut src, &dir);

    let e = dest.exec_err("migrate-incoming", json!({"uri": "fd:9x"}));
    assert_eq!(e, "Invalid file descriptor number '9x'");
    let e = dest.exec_err("migrate-incoming", json!({"uri": "fd:7"}));
    assert!(e.contains("not a descriptor Skiff inherited"), "{e}");
    dest.getfd("dir", &File::open(dir.path()).expect("directory"));
    let e = dest.exec_err("migrate-incoming", json!({"uri": "fd:dir"}));
    assert_eq!(e, "file descriptor 'dir': a directory");
    let listener = std::os::unix::net::UnixListener::bind(dir.join("l.sock")).expect("bind");
    dest.getfd("listening", &listener);
    let e = dest.exec_err("migrate-incoming", json!({"uri": "fd:listening"}));
    assert_eq!(
        e,
        "file descriptor 'listening': a socket that is not connected"
    );
    assert_eq!(dest.status(), "inmigrate");
    assert_eq!(dest.migration_status(), json!({}));

    for (incoming, expected) in [
        ("fd:abc", "Invalid file descriptor number 'abc'"),
        ("fd:9", "not a descriptor Skiff inherited"),
    ] {
        let finished = refused_incoming(&kernel, incoming, 1);
        assert!(finished.stderr.contains(expected), "{}", finished.dump());
    }
}

// ---------------------------------------------------------------------------------------
// Postcopy

/// Variant A: the destination was started with -S, so its vCPUs never run in postcopy;
/// pmemsave on it faults the missing pages in through the source.
#[test]
fn postcopy_with_paused_destination() {
    let Some((_t, dir, mut src, mut dest)) = start_postcopy_test(
        "postcopy_with_paused_destination",
        "mig-postcopy-paused",
        false,
        Link::Unix,
    ) else {
        return;
    };
    assert_eq!(src.status(), "postmigrate");
    assert_eq!(dest.status(), "paused");
    // Still in postcopy (slow background): this read faults pages in on demand.
    let started = Instant::now();
    let during = dest.read_range(&dir, "during.bin");
    eprintln!("pmemsave in postcopy took {:?}", started.elapsed());
    assert_eq!(dest.migration_status()["status"], "postcopy-active");
    let requests = src.migration_status()["ram"]["postcopy-requests"]
        .as_u64()
        .unwrap_or(0);
    assert!(requests > 0, "no page was requested");
    complete_postcopy(&mut src, &mut dest);
    assert_eq!(dest.status(), "paused");
    assert_matches_source(&mut src, &dir, &during, "pages read in postcopy");
    check_guest_ram(&during).unwrap_or_else(|r| panic!("{r}"));
    dest.exec("cont", Value::Null);
    check_destination_runs(&mut dest, &dir);
}

/// A destination that preallocated its RAM (`--mem-prealloc`): precopy loads into it; in a
/// postcopy switched on before the guest's range was sent, those pages fault in from the
/// source (the switch-over discards every page not sent) instead of reading zeroes.
#[test]
fn migration_into_preallocated_destination() {
    const NAME: &str = "migration_into_preallocated_destination";
    if !userfaultfd_available(NAME) {
        return;
    }
    let (_t, dir, kernel) = start_test(NAME, "mig-prealloc");
    let (mut src, mut dest, uri) =
        start_pair(&dir, &kernel, &["--mem-prealloc"], false, Link::Unix);
    src.exec("migrate", json!({ "uri": uri }));
    wait_source_completed(&mut src);
    check_incoming_completes(&mut dest, &dir);

    // Postcopy at once, before precopy (at 64 KiB/s) reaches the guest's range: those pages
    // were never sent, and must fault on the destination rather than read preallocated zeroes.
    let dir = TempDir::new("mig-prealloc-postcopy");
    let (mut src, mut dest, uri) =
        start_pair(&dir, &kernel, &["-S", "--mem-prealloc"], true, Link::Unix);
    src.set_parameters(json!({"max-bandwidth": 64 << 10, "downtime-limit": 1,
                              "max-postcopy-bandwidth": SLOW_POSTCOPY}));
    src.exec("migrate", json!({ "uri": uri }));
    src.wait_migration_event("active");
    src.exec("migrate-start-postcopy", Value::Null);
    src.wait_migration_event("postcopy-active");
    dest.wait_migration_event("postcopy-active");
    let during = dest.read_range(&dir, "during.bin");
    complete_postcopy(&mut src, &mut dest);
    assert_matches_source(&mut src, &dir, &during, "pages read in postcopy");
    check_paused_destination(&mut src, &mut dest, &dir);
}

/// Variant B: the destination's vCPUs run during postcopy and fault pages in.
#[test]
fn postcopy_with_running_destination() {
    // A slow background: the guest's walk itself must fault most pages in.
    let Some((_t, dir, mut src, mut dest)) = start_postcopy_test(
        "postcopy_with_running_destination",
        "mig-postcopy-running",
        true,
        Link::Unix,
    ) else {
        return;
    };
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let info = src.migration_status();
        let requests = info["ram"]["postcopy-requests"].as_u64().unwrap_or(0);
        if requests >= POSTCOPY_VCPU_REQUESTS {
            break;
        }
        assert_eq!(info["status"], "postcopy-active", "{info}");
        assert!(
            Instant::now() < deadline,
            "the destination's vCPUs asked for only {requests} pages: {info}\n{}",
            dest.skiff.dump()
        );
        thread::sleep(Duration::from_millis(10));
    }
    let info = complete_postcopy(&mut src, &mut dest);
    assert!(info["downtime"].as_i64().is_some(), "{info}");
    assert!(info["ram"]["postcopy-bytes"].as_u64() > Some(0), "{info}");
    assert_eq!(src.status(), "postmigrate");
    check_incoming_completes(&mut dest, &dir);
}

/// Breaks a postcopy migration over `link` `breaks` times with `migrate-pause` on the source
/// and recovers it each time over a new channel of the same kind (a unix socket, or a socket
/// pair passed to both sides); nothing may be lost. Skipped where the host cannot run it (see
/// [`start_postcopy_test`]).
fn postcopy_recovery(test: &'static str, breaks: usize, dest_runs: bool, link: Link) {
    let Some((_t, dir, mut src, mut dest)) = start_postcopy_test(test, test, dest_runs, link)
    else {
        return;
    };
    for round in 0..breaks {
        pause_postcopy(&mut src, &mut dest);
        assert_eq!(src.migration_status()["status"], "postcopy-paused");
        if !dest_runs {
            assert_eq!(dest.migration_status()["status"], "postcopy-paused");
        }
        // Postcopy cannot be cancelled, and a second pause is refused.
        let e = src.exec_err("migrate_cancel", Value::Null);
        assert!(e.contains("Postcopy"), "{e}");
        src.oob_refused("migrate-pause", Value::Null);

        let recover = match link {
            Link::Unix => format!(
                "unix:{}",
                dir.join(&format!("recover-{round}.sock")).display()
            ),
            Link::FdPair => {
                check_fd_recover_refusals(&mut dest, &dir);
                pass_socketpair(&mut src, &mut dest, &format!("recover-{round}"))
            }
        };
        let took = dest.recover(&recover);
        eprintln!("round {round}: migrate-recover answered in {took:?}");
        src.resume(&recover);
        dest.wait_migration_event("postcopy-recover");
        dest.wait_migration_event("postcopy-active");
        src.wait_migration_event("postcopy-recover-setup");
        src.wait_migration_event("postcopy-recover");
        src.wait_migration_event("postcopy-active");
    }
    complete_postcopy(&mut src, &mut dest);
    src.wait_migration_event("completed");
    dest.wait_migration_event("completed");
    if dest_runs {
        assert_eq!(dest.status(), "running");
        check_destination_runs(&mut dest, &dir);
    } else {
        check_paused_destination(&mut src, &mut dest, &dir);
    }
}

/// A paused postcopy destination refuses `migrate-recover fd:NAME` (out of band and in band)
/// for a name its monitor does not keep, and for a descriptor that is not a connected stream
/// socket, which is used up; it stays paused.
fn check_fd_recover_refusals(dest: &mut Vmm, dir: &TempDir) {
    let missing = "File descriptor named 'nope' has not been found";
    let (reply, _) = dest.exec_oob("migrate-recover", json!({"uri": "fd:nope"}));
    assert_eq!(reply["error"]["desc"], missing, "{reply}");
    let e = dest.exec_err("migrate-recover", json!({"uri": "fd:nope"}));
    assert_eq!(e, missing);
    let file = File::open(dir.join("guest.elf")).expect("guest file");
    let listener = std::os::unix::net::UnixListener::bind(dir.join("l.sock")).expect("bind");
    for (name, fd, reason) in [
        (
            "file",
            file.as_raw_fd(),
            "postcopy recovery needs a connected stream socket",
        ),
        (
            "listening",
            listener.as_raw_fd(),
            "a socket that is not connected",
        ),
    ] {
        dest.getfd(name, &fd);
        let (reply, took) = dest.exec_oob("migrate-recover", json!({"uri": format!("fd:{name}")}));
        assert_prompt("a refused migrate-recover", took);
        assert_eq!(
            reply["error"]["desc"],
            format!("file descriptor '{name}': {reason}"),
            "{reply}"
        );
        let e = dest.exec_err("closefd", json!({ "fdname": name }));
        assert_eq!(e, format!("File descriptor named '{name}' not found"));
    }
    assert_eq!(dest.migration_status()["status"], "postcopy-paused");
}

/// One `migrate-pause` and recovery, destination vCPUs running (probe-guarded).
#[test]
fn postcopy_recovery_once() {
    postcopy_recovery("postcopy_recovery_once", 1, true, Link::Unix);
}

/// Two successive breaks and recoveries, destination started with -S; its final RAM must
/// equal the source's.
#[test]
fn postcopy_recovery_twice() {
    postcopy_recovery("postcopy_recovery_twice", 2, false, Link::Unix);
}

/// Postcopy over a socket pair passed to both sides (`getfd`, `migrate-incoming fd:` and
/// `migrate fd:`), broken by `migrate-pause` and recovered over a second pair: `getfd` and
/// out-of-band `migrate-recover fd:NAME` on the destination, `getfd` and `migrate fd:NAME`
/// with `resume` on the source, as libvirt drives QEMU. Destination started with -S; its
/// final RAM must equal the source's.
#[test]
fn postcopy_recovery_over_fd_socketpairs() {
    postcopy_recovery(
        "postcopy_recovery_over_fd_socketpairs",
        1,
        false,
        Link::FdPair,
    );
}

/// Recovery survives failed attempts (QEMU's double-failure tests): a resume towards nobody,
/// a reconnection that sends garbage, a retried `migrate-recover`, and a reconnection that
/// stalls in the handshake until `migrate-pause` on the destination.
#[test]
fn postcopy_recovery_after_failed_attempts() {
    let Some((_t, dir, mut src, mut dest)) = start_postcopy_test(
        "postcopy_recovery_after_failed_attempts",
        "mig-recovery-failures",
        false,
        Link::Unix,
    ) else {
        return;
    };
    let sock = |name: &str| dir.join(name);
    let uri = |name: &str| format!("unix:{}", sock(name).display());
    pause_postcopy(&mut src, &mut dest);

    // 1. The source resumes towards nobody: back to paused.
    src.resume(&uri("nobody.sock"));
    src.wait_migration_event("postcopy-recover-setup");
    src.wait_migration_event("postcopy-paused");

    // 1b. The source reaches something that never answers: migrate-pause on the source.
    let silent = std::os::unix::net::UnixListener::bind(sock("silent.sock")).expect("bind");
    src.resume(&uri("silent.sock"));
    src.wait_migration_event("postcopy-recover-setup");
    src.wait_migration_event("postcopy-recover");
    let took = src.oob_ok("migrate-pause", Value::Null);
    assert_prompt("migrate-pause", took);
    src.wait_migration_event("postcopy-paused");
    drop(silent);

    // 2. Something else connects to the recovery address and sends garbage.
    dest.recover(&uri("a.sock"));
    {
        use std::io::Write;
        let mut fake = std::os::unix::net::UnixStream::connect(sock("a.sock")).expect("connect");
        fake.write_all(b"NOT A SKIFF STREAM").expect("write");
    }
    dest.wait_migration_event("postcopy-recover");
    dest.wait_migration_event("postcopy-paused");

    // 3. Something connects and stalls in the handshake: migrate-pause on the destination.
    dest.recover(&uri("b.sock"));
    let stalled = std::os::unix::net::UnixStream::connect(sock("b.sock")).expect("connect");
    dest.wait_migration_event("postcopy-recover");
    let took = dest.oob_ok("migrate-pause", Value::Null);
    assert_prompt("migrate-pause", took);
    dest.wait_migration_event("postcopy-paused");
    drop(stalled);

    // 4. migrate-recover retried before the source comes, with another address and then
    // with the same one again: the last one counts.
    for name in ["c.sock", "d.sock", "d.sock"] {
        dest.recover(&uri(name));
        thread::sleep(Duration::from_millis(50));
    }
    src.resume(&uri("d.sock"));
    src.wait_migration_event("postcopy-active");
    dest.wait_migration_event("postcopy-active");
    complete_postcopy(&mut src, &mut dest);
    check_paused_destination(&mut src, &mut dest, &dir);
}

/// QEMU's reason for out-of-band `migrate-recover`: while postcopy is paused, an in-band
/// command that reads a missing page blocks the destination's main loop (with the big lock)
/// until the page arrives, which needs recovery first. `migrate-recover` must still be
/// answered at once.
#[test]
fn oob_migrate_recover_while_main_loop_blocked() {
    let Some((_t, dir, mut src, mut dest)) = start_postcopy_test(
        "oob_migrate_recover_while_main_loop_blocked",
        "mig-oob",
        false,
        Link::Unix,
    ) else {
        return;
    };
    pause_postcopy(&mut src, &mut dest);

    // An in-band pmemsave of the whole range: pages dirtied at the switch-over are missing.
    let blocked_file = dir.join("blocked.bin");
    let pmem_id = json!("blocked-pmemsave");
    dest.qmp
        .send(&json!({"execute": "pmemsave", "id": pmem_id, "arguments": {
            "val": MIG_START, "size": MIG_END - MIG_START,
            "filename": blocked_file.display().to_string()}}))
        .expect("send pmemsave");
    match dest.qmp.read_message(Duration::from_millis(500)) {
        Err(e) if e.is_timeout() => {}
        other => panic!("pmemsave did not block on a missing page: {other:?}"),
    }

    let recover = format!("unix:{}", dir.join("recover.sock").display());
    let took = dest.recover(&recover);
    eprintln!("migrate-recover answered in {took:?} with pmemsave blocked");
    assert_prompt("migrate-recover", took);
    // The in-band pmemsave has not answered (reply_to would have failed on it).

    src.resume(&recover);
    src.wait_migration_event("postcopy-active");
    src.set_parameters(json!({"max-postcopy-bandwidth": 0}));
    // Events that come first are queued by reply_to.
    let reply = dest
        .qmp
        .reply_to(&pmem_id, TIMEOUT)
        .unwrap_or_else(|e| panic!("pmemsave: {e}\n{}", dest.skiff.dump()));
    assert_eq!(reply["return"], json!({}), "{reply}");
    dest.wait_migration_event("postcopy-recover");
    dest.wait_migration_event("postcopy-active");
    src.wait_migration(&["completed"]);
    dest.wait_migration(&["completed"]);
    let got = std::fs::read(&blocked_file).expect("pmemsave file");
    assert_matches_source(&mut src, &dir, &got, "the bytes the blocked pmemsave read");
    check_guest_ram(&got).unwrap_or_else(|r| panic!("{r}"));
}

// ---------------------------------------------------------------------------------------
// Cancel and broken connections

/// `migrate_cancel` in a slow precopy: the source goes `cancelled` and runs on, the
/// destination exits with status 1, and a new migration can start.
#[test]
fn cancel_during_precopy() {
    let (_t, dir, kernel) = start_test("cancel_during_precopy", "mig-cancel");
    let (mut src, dest) = start_slow_precopy(&dir, &kernel);
    // query-migrate while active.
    let info = src.migration_status();
    assert_eq!(info["status"], "active", "{info}");
    let ram = &info["ram"];
    assert!(ram["transferred"].as_u64() > Some(0), "{info}");
    assert!(ram["remaining"].as_u64() > Some(0), "{info}");
    assert_eq!(ram["total"].as_u64(), Some(MEMORY_BYTES), "{info}");
    assert!(info["total-time"].as_i64() > Some(0), "{info}");
    assert!(info.get("downtime").is_none(), "{info}");
    let started = Instant::now();
    src.exec("migrate_cancel", Value::Null);
    src.wait_migration(&["cancelled"]);
    eprintln!("cancelled in {:?}", started.elapsed());
    // The event follows the status (as in QEMU): wait for it, then look at the ones before.
    src.wait_migration_event("cancelled");
    let statuses = src.drain_migration_events();
    assert!(statuses.ends_with(&["cancelling".into()]), "{statuses:?}");
    check_source_runs(&mut src, &dir);
    let finished = dest.skiff.finish(Duration::from_secs(20));
    finished.assert_exit(1);
    assert!(!finished.stderr.contains("panicked"), "{}", finished.dump());
    // A new migration can start after a cancelled one.
    src.set_parameters(json!({"max-bandwidth": 0}));
    let file = dir.join("after-cancel.bin");
    src.exec(
        "migrate",
        json!({"uri": format!("file:{}", file.display())}),
    );
    src.wait_migration(&["completed"]);
}

/// The destination dies in precopy: the source goes `failed`, says why, and runs on.
#[test]
fn killed_destination_fails_precopy() {
    let (_t, dir, kernel) = start_test("killed_destination_fails_precopy", "mig-kill-precopy");
    let (mut src, mut dest) = start_slow_precopy(&dir, &kernel);
    dest.skiff.kill();
    let info = src.wait_migration(&["failed"]);
    eprintln!("source: {info}");
    let error = info["error-desc"].as_str().unwrap_or_default();
    assert!(!error.is_empty(), "no error-desc: {info}");
    check_source_runs(&mut src, &dir);
}

/// The destination dies in postcopy: the source pauses (the guest stays stopped there,
/// nothing lost), refuses cancel, and a resume towards nobody pauses again.
#[test]
fn killed_destination_pauses_postcopy() {
    let Some((_t, dir, mut src, mut dest)) = start_postcopy_test(
        "killed_destination_pauses_postcopy",
        "mig-kill-postcopy",
        false,
        Link::Unix,
    ) else {
        return;
    };
    dest.skiff.kill();
    src.wait_migration_event("postcopy-paused");
    let info = src.wait_migration(&["postcopy-paused"]);
    eprintln!("source: {info}");
    // The guest state stays on the source, stopped: nothing is lost or run twice.
    assert_eq!(src.status(), "postmigrate");
    let e = src.exec_err("migrate_cancel", Value::Null);
    assert!(e.contains("Postcopy"), "{e}");
    // Resuming towards nobody fails and pauses again.
    src.resume(&format!("unix:{}", dir.join("nobody.sock").display()));
    src.wait_migration_event("postcopy-recover-setup");
    src.wait_migration_event("postcopy-paused");
    assert_eq!(src.migration_status()["status"], "postcopy-paused");
}

/// The source dies in postcopy: the destination pauses, answers QMP and accepts
/// `migrate-recover`.
#[test]
fn killed_source_pauses_postcopy_destination() {
    let Some((_t, dir, mut src, mut dest)) = start_postcopy_test(
        "killed_source_pauses_postcopy_destination",
        "mig-kill-source",
        false,
        Link::Unix,
    ) else {
        return;
    };
    src.skiff.kill();
    dest.wait_migration_event("postcopy-paused");
    // The destination waits for a recovery; its monitor still answers.
    assert_eq!(dest.migration_status()["status"], "postcopy-paused");
    assert_eq!(dest.status(), "paused");
    dest.recover(&format!("unix:{}", dir.join("r.sock").display()));
    assert!(dest.skiff.try_status().is_none(), "the destination exited");
}

// ---------------------------------------------------------------------------------------
// Bad addresses

/// Runs skiff with `--incoming incoming`, which must end it at start-up with exit status
/// `status` and a one-line error.
fn refused_incoming(kernel: &Path, incoming: &str, status: i32) -> common::process::Finished {
    let finished = run(
        [
            "--kernel",
            &kernel.display().to_string(),
            "--serial",
            "none",
            "--incoming",
            incoming,
        ],
        b"",
        Duration::from_secs(20),
    );
    finished.assert_exit(status);
    finished.assert_clean_error();
    finished
}

/// Bad `migrate` URIs give clear errors, a missing destination fails the migration (the
/// guest runs on), recovery commands are refused outside postcopy, and a bad `--incoming`
/// is a one-line CLI error with status 2.
#[test]
fn bad_migration_uris() {
    let _t = TestTimer::start("bad_migration_uris");
    let dir = TempDir::new("mig-bad-uri");
    let kernel = write_migration_guest(dir.path(), "guest.elf");
    let mut src = start_vmm(&dir, "src", &kernel, &vm_args(&[]));
    src.set_capabilities(false);
    for (uri, expected) in [
        ("exec:cat", "unknown migration protocol: exec"),
        ("tcp:nohost", "invalid migration URI 'tcp:nohost'"),
        ("unix:", "invalid migration URI 'unix:'"),
        ("bogus", "unknown migration protocol"),
    ] {
        let e = src.exec_err("migrate", json!({ "uri": uri }));
        assert!(e.contains(expected), "{uri}: {e}");
    }
    assert_eq!(src.migration_status(), json!({}));
    let e = src.exec_err("migrate-start-postcopy", Value::Null);
    assert!(e.contains("Enable postcopy"), "{e}");
    // No destination: the migration fails and says why; the guest runs on.
    src.exec("migrate", json!({"uri": "unix:/nonexistent/sock"}));
    let info = src.wait_migration(&["failed"]);
    let error = info["error-desc"].as_str().unwrap_or_default();
    assert!(error.contains("/nonexistent/sock"), "{info}");
    src.wait_migration_event("failed");
    check_source_runs(&mut src, &dir);
    // Recovery commands outside postcopy are refused.
    src.oob_refused("migrate-pause", Value::Null);
    let e = src.exec_err("migrate", json!({"uri": "unix:/x", "resume": true}));
    assert!(e.contains("paused"), "{e}");

    for bad in ["bogus:x", "tcp:nohost", "file:"] {
        let finished = refused_incoming(&kernel, bad, 2);
        assert!(
            finished.stderr.contains("--incoming"),
            "{}",
            finished.dump()
        );
    }
}

// ---------------------------------------------------------------------------------------
// Damaged streams

/// One section of a saved stream: kind and byte range (header to checksum).
struct Section {
    kind: u8,
    start: usize,
    payload: usize,
    end: usize,
    /// The guest-physical pages a RamPages or RamZero section carries.
    pages: Vec<std::ops::Range<u64>>,
}

impl Section {
    /// Where the page data of a RamPages section starts (after its head).
    fn data(&self) -> usize {
        let pages = (self.end - 4 - self.payload - 12) / 4100;
        self.payload + 12 + 4 * pages
    }
}

/// Splits a stream into its sections (the framing of vmm/src/migration/stream.rs).
fn parse_stream(bytes: &[u8]) -> Vec<Section> {
    assert_eq!(&bytes[..8], b"SKIFFMIG");
    let mut sections = Vec::new();
    let mut at = STREAM_HEADER_LEN;
    while at < bytes.len() {
        let kind = bytes[at];
        assert_eq!(&bytes[at + 1..at + 4], &[0, 0, 0]);
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes")) as usize;
        let end = at + 8 + len + 4;
        assert!(end <= bytes.len(), "section at {at} overruns the file");
        let payload = &bytes[at + 8..at + 8 + len];
        let u64_at = |i: usize| u64::from_le_bytes(payload[i..i + 8].try_into().expect("8 bytes"));
        let pages = match kind {
            // Head (address, a u32 checksum per page, a u32 check), pages.
            KIND_RAM_PAGES => {
                let start = u64_at(0);
                std::iter::once(start..start + (len as u64 - 12) / 4100 * 4096).collect()
            }
            // Runs of (address, u32 page count).
            KIND_RAM_ZERO => payload
                .chunks_exact(12)
                .map(|run| {
                    let addr = u64::from_le_bytes(run[..8].try_into().expect("8 bytes"));
                    let count = u32::from_le_bytes(run[8..].try_into().expect("4 bytes"));
                    addr..addr + u64::from(count) * 4096
                })
                .collect(),
            _ => Vec::new(),
        };
        sections.push(Section {
            kind,
            start: at,
            payload: at + 8,
            end,
            pages,
        });
        at = end;
    }
    sections
}

/// Restores `bytes` (written to `dir/name`) into a new skiff; it must
/// exit with status 1 and one line of error, which is returned. `memory` is its RAM size.
fn restore_must_fail(
    dir: &TempDir,
    kernel: &Path,
    name: &str,
    bytes: &[u8],
    memory: &str,
) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write damaged stream");
    let incoming = format!("file:{}", path.display());
    let kernel = kernel.display().to_string();
    let args = [
        "--kernel",
        kernel.as_str(),
        "--incoming",
        incoming.as_str(),
        "--serial",
        "none",
        "--memory",
        memory,
    ];
    let finished = run(args, b"", Duration::from_secs(20));
    finished.assert_exit(1);
    finished.assert_clean_error();
    let _ = std::fs::remove_file(&path);
    finished.stderr.trim().to_string()
}

/// A saved stream cut at every section boundary and inside a section, with flipped bytes
/// (stream header, section header, page data, device state), or restored into another RAM
/// size or vCPU count: the destination exits with status 1 and one line naming the problem,
/// never panics or hangs; with `exit-on-error: false` it stays and reports the error.
#[test]
fn damaged_streams_are_refused() {
    let _t = TestTimer::start("damaged_streams_are_refused");
    let dir = TempDir::new("mig-damaged");
    let kernel = write_migration_guest(dir.path(), "guest.elf");
    let snapshot = std::fs::read(save_snapshot(&dir, &kernel, "snap.bin")).expect("snapshot");
    let sections = parse_stream(&snapshot);
    let kinds: Vec<u8> = sections.iter().map(|s| s.kind).collect();
    eprintln!("{} sections: {kinds:?}", sections.len());
    assert_eq!(kinds.first(), Some(&KIND_CONFIG));
    assert_eq!(kinds.last(), Some(&KIND_END));
    assert!(kinds.contains(&KIND_RAM_PAGES) && kinds.contains(&KIND_DEVICE_STATE));

    // Cut at every section boundary (the stream ends cleanly, but too early).
    let mut cuts = vec![0, STREAM_HEADER_LEN];
    cuts.extend(sections[..sections.len() - 1].iter().map(|s| s.end));
    for cut in cuts {
        let e = restore_must_fail(&dir, &kernel, "cut.bin", &snapshot[..cut], MEMORY);
        eprintln!("cut at {cut}: {e}");
        assert!(
            e.contains("ended before the migration was complete"),
            "cut at {cut}: {e}"
        );
    }
    // Cuts inside a section header, a payload and a checksum.
    // A page section of at least two pages, none of which the stream carries again (a page
    // sent again supersedes a damaged copy: the source resends every page the guest wrote
    // during its send).
    let overlaps = |a: &Section, b: &Section| {
        a.pages
            .iter()
            .any(|x| b.pages.iter().any(|y| x.start < y.end && y.start < x.end))
    };
    let pages = sections
        .iter()
        .enumerate()
        .find(|(i, s)| {
            s.kind == KIND_RAM_PAGES
                && s.end - s.payload >= 12 + 2 * 4100 + 4
                && !sections[i + 1..].iter().any(|later| overlaps(s, later))
        })
        .map(|(_, s)| s)
        .expect("a section of pages sent once");
    for (cut, what) in [
        (pages.start + 3, "a section header"),
        (pages.payload + 5000, "a section"),
        (pages.end - 2, "a section checksum"),
    ] {
        let e = restore_must_fail(&dir, &kernel, "cut.bin", &snapshot[..cut], MEMORY);
        assert!(
            e.contains(&format!("ends in the middle of {what}")),
            "cut at {cut}: {e}"
        );
    }

    // Flipped bytes.
    let state = sections
        .iter()
        .find(|s| s.kind == KIND_DEVICE_STATE)
        .expect("state");
    let flips = [
        (0, "bad magic"),
        (8, "version"),
        (pages.start, "section"),
        (pages.start + 1, "reserved bytes"),
        // A wrong length: the layout or the checksum is wrong then.
        (pages.start + 5, "RamPages section"),
        (pages.payload + 3, "its address or length is corrupt"),
        (
            pages.data() + 4096 + 17,
            "failed their checksum and were not sent again",
        ),
        (state.payload + 10, "checksum"),
        (state.end - 1, "checksum"),
        (pages.end - 1, "checksum"),
    ];
    for (at, expected) in flips {
        let mut bad = snapshot.clone();
        bad[at] ^= 0x41;
        let e = restore_must_fail(&dir, &kernel, "flip.bin", &bad, MEMORY);
        eprintln!("flip at {at}: {e}");
        assert!(e.contains(expected), "flip at {at}: {e}");
    }

    // Another RAM size.
    let e = restore_must_fail(&dir, &kernel, "mem.bin", &snapshot, "64M");
    assert!(e.contains("32 MiB") && e.contains("64 MiB"), "{e}");
    // With migrate-incoming exit-on-error=false the destination stays and reports.
    let path = dir.join("bad-magic.bin");
    let mut bad = snapshot.clone();
    bad[0] ^= 0x41;
    std::fs::write(&path, &bad).expect("write stream");
    let mut dest = start_vmm(&dir, "dest", &kernel, &vm_args(&["--incoming", "defer"]));
    dest.set_capabilities(false);
    dest.exec(
        "migrate-incoming",
        json!({"uri": format!("file:{}", path.display()), "exit-on-error": false}),
    );
    let info = dest.wait_migration(&["failed"]);
    assert!(
        info["error-desc"]
            .as_str()
            .is_some_and(|e| e.contains("bad magic")),
        "{info}"
    );
    dest.wait_migration_event("failed");
    assert_eq!(dest.status(), "inmigrate");
    assert!(dest.skiff.try_status().is_none(), "the destination exited");

    // Another vCPU count.
    let path = dir.join("cpus.bin");
    std::fs::write(&path, &snapshot).expect("write stream");
    let finished = run(
        [
            "--kernel",
            &kernel.display().to_string(),
            "--incoming",
            &format!("file:{}", path.display()),
            "--serial",
            "none",
            "--memory",
            MEMORY,
            "--cpus",
            "2",
        ],
        b"",
        Duration::from_secs(20),
    );
    finished.assert_exit(1);
    finished.assert_clean_error();
    assert!(finished.stderr.contains("1 vCPUs"), "{}", finished.dump());
}

/// The source sends guest RAM as it is while the guest runs, so a page the guest writes
/// during its send may arrive with a bad checksum; the source sends it again (it is dirty),
/// and that copy counts. Here a damaged copy of a page section is put before the good one:
/// the restore completes with the good pages.
#[test]
fn damaged_pages_sent_again_are_superseded() {
    let (_t, dir, kernel) = start_test("damaged_pages_sent_again_are_superseded", "mig-resent");
    let snapshot = std::fs::read(save_snapshot(&dir, &kernel, "snap.bin")).expect("snapshot");
    let sections = parse_stream(&snapshot);
    let pages = sections
        .iter()
        .find(|s| s.kind == KIND_RAM_PAGES)
        .expect("a section of pages");
    let mut damaged = snapshot[pages.start..pages.end].to_vec();
    damaged[pages.data() - pages.start + 100] ^= 0x41;
    let mut stream = snapshot[..pages.start].to_vec();
    stream.extend_from_slice(&damaged);
    stream.extend_from_slice(&snapshot[pages.start..]);
    let path = dir.join("resent.bin");
    std::fs::write(&path, &stream).expect("write stream");

    let range = &pages.pages[0];
    let page_bytes = |vmm: &mut Vmm, name: &str| {
        let file = dir.join(name);
        vmm.exec(
            "pmemsave",
            json!({"val": range.start, "size": range.end - range.start, "filename": file}),
        );
        std::fs::read(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()))
    };
    let restore = |name: &str, file: &Path| {
        let incoming = format!("file:{}", file.display());
        let mut vmm = start_vmm(
            &dir,
            name,
            &kernel,
            &vm_args(&["-S", "--incoming", &incoming]),
        );
        vmm.wait_migration(&["completed"]);
        vmm
    };
    let mut good = restore("good", &dir.join("snap.bin"));
    let mut resent = restore("resent", &path);
    assert!(
        page_bytes(&mut good, "good.bin") == page_bytes(&mut resent, "resent-pages.bin"),
        "the damaged copy was kept"
    );
    check_guest_ram(&resent.read_range(&dir, "range.bin")).unwrap_or_else(|r| panic!("{r}"));
}

// ---------------------------------------------------------------------------------------
// A third-party client

/// The unmodified `qemu.qmp` asyncio client (tests/python/qemu_qmp_migration.py) drives a
/// postcopy migration with an out-of-band pause and recovery on second monitors of both
/// VMMs; the destination then holds the source's RAM and runs on after `cont`.
#[test]
fn python_qemu_qmp_drives_postcopy_recovery() {
    const NAME: &str = "python_qemu_qmp_drives_postcopy_recovery";
    let python = repo_root().join("resources/build/venv/bin/python");
    if !python.exists() {
        common::skipped(format_args!(
            "SKIPPED: {NAME}: no venv at resources/build/venv (run resources/install-deps.sh)"
        ));
        return;
    }
    if !userfaultfd_available(NAME) {
        return;
    }
    let (_timer, dir, kernel) = start_test(NAME, "mig-python");
    let py_src = dir.join("py-src.qmp");
    let py_dest = dir.join("py-dest.qmp");
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let recovery = format!("unix:{}", dir.join("recover.sock").display());
    let py_src_arg = format!("unix:{}", py_src.display());
    let py_dest_arg = format!("unix:{}", py_dest.display());
    let mut src = start_vmm(&dir, "src", &kernel, &vm_args(&["--qmp", &py_src_arg]));
    let mut dest = start_vmm(
        &dir,
        "dest",
        &kernel,
        &vm_args(&["--qmp", &py_dest_arg, "--incoming", &uri, "-S"]),
    );
    src.wait_guest_passes(&dir, 3);
    let out = std::process::Command::new(&python)
        .arg(repo_root().join("tests/python/qemu_qmp_migration.py"))
        .args([&py_src, &py_dest])
        .args([&uri, &recovery])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run the qemu.qmp script: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("qemu.qmp migration: OK"),
        "the qemu.qmp script failed: {}\n{stdout}\n{}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        src.skiff.dump(),
        dest.skiff.dump()
    );
    check_paused_destination(&mut src, &mut dest, &dir);
}
