//! Integration tests of Skiff's QMP monitor, against the real `skiff` binary running tiny
//! guests on `/dev/kvm`.
//!
//! Most tests boot an idle guest (it prints `ready` and halts) and talk to the monitor with the
//! raw-socket client in `common::qmp_client`, comparing replies with QEMU's exact texts (see
//! `shared/reference/qmp.md`). The out-of-band tests block the VMM main loop for real: an
//! in-band `pmemsave` to a FIFO nobody reads yet makes the main loop block in `open()` with
//! the big lock held, which is the situation OOB commands exist for.
//!
//! Third-party clients run unmodified: Python's `qemu.qmp` (`QMPClient`, the legacy
//! synchronous wrapper and `qmp-shell`, from the venv `resources/install-deps.sh` creates) and
//! the Rust `qapi` crate.
//!
//! Every wait has a hard timeout; failures print skiff's command line, output and the last
//! QMP lines exchanged.

mod common;

use std::collections::BTreeSet;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use serde_json::{json, Value};

use common::guest::{write_guest, DATA_AREA};
use common::process::{Finished, Skiff, TestTimer};
use common::qmp_client::{check_event, ClientResult, QmpClient, DEFAULT_TIMEOUT};
use common::{repo_root, TempDir};

/// Hard limit for skiff to come up (socket listening, guest running).
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Hard limit for skiff to exit once told to.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a negative check ("nothing arrives") waits.
const QUIET: Duration = Duration::from_millis(300);
/// Hard limit for a third-party client script.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(90);

/// The greeting Skiff sends, byte for byte (QEMU's member order, CRLF).
const GREETING: &str = "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 9}, \"package\": \"skiff-0.1.0\"}, \"capabilities\": [\"oob\"]}}";
/// migrate-pause's error while no migration runs (QEMU's text).
const MIGRATE_PAUSE_ERROR: &str =
    "migrate-pause is currently only supported during postcopy-active or postcopy-recover state";
/// migrate-recover's error while no migration runs (QEMU's text).
const MIGRATE_RECOVER_ERROR: &str = "Migrate recover can only be run when postcopy is paused.";

/// Every command Skiff implements (besides `qmp_capabilities`).
const COMMANDS: &[&str] = &[
    "query-version",
    "query-commands",
    "query-qmp-schema",
    "query-name",
    "query-uuid",
    "query-status",
    "query-kvm",
    "query-cpus-fast",
    "query-memory-size-summary",
    "stop",
    "cont",
    "system_reset",
    "system_powerdown",
    "quit",
    "pmemsave",
    "memsave",
    "human-monitor-command",
    "migrate-pause",
    "migrate-recover",
];

/// Size of the pattern the pattern guest writes at [`DATA_AREA`].
const PATTERN_LEN: usize = 4096;

// ---------------------------------------------------------------------------------------------
// Guests.
// ---------------------------------------------------------------------------------------------

/// Prints `ready` and halts forever (prints it again on every boot).
fn idle_guest(dir: &Path) -> PathBuf {
    write_guest(dir, "idle.elf", |a| {
        a.print("ready\n")?;
        a.halt_forever()
    })
}

/// The dword `i` of the pattern.
fn pattern_dword(i: u32) -> u32 {
    i.wrapping_mul(0x9e37_79b1) ^ 0x5a5a_0000
}

/// The bytes the pattern guest writes at [`DATA_AREA`].
fn pattern() -> Vec<u8> {
    (0..(PATTERN_LEN / 4) as u32)
        .flat_map(|i| pattern_dword(i).to_le_bytes())
        .collect()
}

/// Writes [`pattern`] at [`DATA_AREA`], sets RBX to a marker, prints `ready` and halts.
fn pattern_guest(dir: &Path) -> PathBuf {
    write_guest(dir, "pattern.elf", |a| {
        let mut next = a.create_label();
        a.mov(rbx, DATA_AREA)?;
        a.xor(ecx, ecx)?;
        a.set_label(&mut next)?;
        a.imul_3(eax, ecx, 0x9e37_79b1u32 as i32)?;
        a.xor(eax, 0x5a5a_0000)?;
        a.mov(dword_ptr(rbx + rcx * 4), eax)?;
        a.inc(ecx)?;
        a.cmp(ecx, (PATTERN_LEN / 4) as i32)?;
        a.jb(next)?;
        a.mov(rbx, 0x1122_3344_5566_7788u64)?;
        a.print("ready\n")?;
        a.halt_forever()
    })
}

// ---------------------------------------------------------------------------------------------
// A skiff process with QMP monitors.
// ---------------------------------------------------------------------------------------------

/// A running skiff with `n` Unix-socket monitors in its temporary directory.
struct Vm {
    skiff: Skiff,
    sockets: Vec<PathBuf>,
    dir: TempDir,
}

impl Vm {
    /// Starts `skiff --kernel KERNEL --qmp unix:DIR/qmpN.sock... EXTRA`.
    fn start(dir: TempDir, kernel: &Path, monitors: usize, extra: &[&str]) -> Vm {
        let sockets: Vec<PathBuf> = (0..monitors)
            .map(|i| dir.join(&format!("qmp{i}.sock")))
            .collect();
        let mut args: Vec<String> = vec!["--kernel".into(), kernel.display().to_string()];
        for socket in &sockets {
            args.push("--qmp".into());
            args.push(format!("unix:{}", socket.display()));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        Vm {
            skiff: Skiff::spawn(&args),
            sockets,
            dir,
        }
    }

    /// An idle guest with one monitor and `extra` arguments.
    fn idle(tag: &str, extra: &[&str]) -> Vm {
        let dir = TempDir::new(tag);
        let kernel = idle_guest(dir.path());
        Vm::start(dir, &kernel, 1, extra)
    }

    /// Unwraps `result`, or panics with the error and everything skiff printed.
    fn ok<T>(&self, result: ClientResult<T>) -> T {
        result.unwrap_or_else(|e| panic!("{e}\n{}", self.skiff.dump()))
    }

    /// Panics with `what` and everything skiff printed.
    fn fail(&self, what: impl std::fmt::Display) -> ! {
        panic!("{what}\n{}", self.skiff.dump())
    }

    /// Connects to monitor `i` (retrying until it listens); reads nothing.
    fn connect(&self, i: usize) -> QmpClient {
        QmpClient::connect_unix(&self.sockets[i], START_TIMEOUT)
            .unwrap_or_else(|e| self.fail(format!("cannot connect to monitor {i}: {e}")))
    }

    /// Connects to monitor `i`, reads the greeting and negotiates (with OOB if `oob`).
    fn open(&self, i: usize, oob: bool) -> QmpClient {
        let mut client = self.connect(i);
        self.ok(client.read_greeting(START_TIMEOUT));
        if oob {
            self.ok(client.negotiate_oob());
        } else {
            self.ok(client.negotiate());
        }
        client
    }

    /// Waits until the guest has printed `ready` `n` times in all.
    fn wait_ready(&self, n: usize) {
        let deadline = Instant::now() + START_TIMEOUT;
        if !self.skiff.wait_stdout(deadline, |out| {
            String::from_utf8_lossy(out).matches("ready\n").count() >= n
        }) {
            self.fail(format!("the guest did not print `ready` {n} time(s)"));
        }
    }

    fn pid(&self) -> u32 {
        self.skiff.pid()
    }

    /// Waits for skiff to exit (killing it at [`EXIT_TIMEOUT`]).
    fn finish(self) -> (Finished, Vec<PathBuf>, TempDir) {
        let Vm {
            skiff,
            sockets,
            dir,
        } = self;
        (skiff.finish(EXIT_TIMEOUT), sockets, dir)
    }
}

/// Asserts `event` is `name` with `data` (None: no data member).
fn assert_event(vm: &Vm, event: &Value, name: &str, data: Option<Value>) {
    if let Err(what) = check_event(event, name, data.as_ref()) {
        vm.fail(what);
    }
}

/// Creates a FIFO at `path`.
fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).expect("path without NUL");
    // SAFETY: `c` is a valid NUL-terminated path.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(
        rc,
        0,
        "mkfifo {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Waits until a thread of process `pid` is blocked opening a FIFO (kernel wait channel
/// `wait_for_partner`): the readiness signal that the main loop is stuck in pmemsave's open().
fn wait_fifo_open_blocked(vm: &Vm) {
    let deadline = Instant::now() + START_TIMEOUT;
    let tasks = PathBuf::from(format!("/proc/{}/task", vm.pid()));
    loop {
        let blocked = std::fs::read_dir(&tasks)
            .map(|entries| {
                entries.flatten().any(|task| {
                    std::fs::read_to_string(task.path().join("wchan"))
                        .is_ok_and(|w| w.trim() == "wait_for_partner")
                })
            })
            .unwrap_or(false);
        if blocked {
            return;
        }
        if Instant::now() >= deadline {
            vm.fail("no skiff thread blocked opening the FIFO (pmemsave did not start?)");
        }
        thread::sleep(Duration::from_micros(200));
    }
}

/// Opens `fifo` for reading in a thread and returns everything written to it (the writer
/// closing ends it), or panics after `timeout`.
fn drain_fifo(vm: &Vm, fifo: &Path, timeout: Duration) -> Vec<u8> {
    let (tx, rx) = mpsc::channel();
    let path = fifo.to_path_buf();
    thread::spawn(move || {
        let result = std::fs::File::open(&path).and_then(|mut f| {
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes).map(|_| bytes)
        });
        let _ = tx.send(result);
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => vm.fail(format!("reading {}: {e}", fifo.display())),
        Err(_) => vm.fail(format!(
            "{} delivered no EOF within {:.1} s",
            fifo.display(),
            timeout.as_secs_f64()
        )),
    }
}

/// Reads the next message, which must be exactly the line `expected`.
fn expect_line(vm: &Vm, client: &mut QmpClient, expected: &str) {
    let line = vm.ok(client.read_line(DEFAULT_TIMEOUT));
    if line != expected {
        vm.fail(format!(
            "expected the line\n  {expected}\ngot\n  {line}\n{}",
            client.transcript()
        ));
    }
}

/// Asserts `query-status` reports `status` (and `running` exactly when it is "running").
fn assert_status(vm: &Vm, client: &mut QmpClient, status: &str) {
    assert_eq!(
        vm.ok(client.execute("query-status", Value::Null)),
        json!({"status": status, "running": status == "running"})
    );
}

/// Sends `command` with `id` and asserts QEMU's order: the run-state `event` first, then an
/// empty reply.
fn run_state_change(vm: &Vm, client: &mut QmpClient, command: &str, id: &str, event: &str) {
    vm.ok(client.send(&json!({"execute": command, "id": id})));
    let msg = vm.ok(client.read_message(DEFAULT_TIMEOUT));
    assert_event(vm, &msg, event, None);
    expect_return(vm, client, &json!(id), &json!({}));
}

/// Reads the next message and asserts it is a GenericError without `id` (what input that
/// is not a valid request gets).
fn expect_parse_error(vm: &Vm, client: &mut QmpClient, desc: &str) {
    expect_error(vm, client, None, "GenericError", desc);
}

/// Executes argument-less `command` with `id`, expects the empty reply, then `event` with
/// `data` as the very next message.
fn execute_then_event(
    vm: &Vm,
    client: &mut QmpClient,
    command: &str,
    id: &str,
    event: &str,
    data: Option<Value>,
) {
    vm.ok(client.send(&json!({"execute": command, "id": id})));
    expect_return(vm, client, &json!(id), &json!({}));
    let message = vm.ok(client.read_message(DEFAULT_TIMEOUT));
    assert_event(vm, &message, event, data);
}

/// Reads the next message and asserts it is the reply `{"return": ret, "id": id}`.
fn expect_return(vm: &Vm, client: &mut QmpClient, id: &Value, ret: &Value) {
    let msg = vm.ok(client.read_message(DEFAULT_TIMEOUT));
    if msg != json!({"return": ret, "id": id}) {
        vm.fail(format!(
            "expected return {ret} for id {id}, got {msg}\n{}",
            client.transcript()
        ));
    }
}

/// Reads the next message and asserts it is an error reply of `class` with `desc`, carrying
/// `id` (None: no id member).
fn expect_error(vm: &Vm, client: &mut QmpClient, id: Option<&Value>, class: &str, desc: &str) {
    let msg = vm.ok(client.read_message(DEFAULT_TIMEOUT));
    let mut expected = json!({"error": {"class": class, "desc": desc}});
    if let Some(id) = id {
        expected["id"] = id.clone();
    }
    if msg != expected {
        vm.fail(format!(
            "expected {expected}, got {msg}\n{}",
            client.transcript()
        ));
    }
}

/// A command-line tool's run: status (None if killed at the timeout), stdout, stderr.
struct ToolRun {
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
    command: String,
}

impl ToolRun {
    fn dump(&self) -> String {
        format!(
            "command: {}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- end ---",
            self.command,
            self.status
                .map_or("killed at its timeout".to_string(), |s| s.to_string()),
            self.stdout,
            self.stderr
        )
    }
}

/// Runs `cmd` with `stdin` as its input, killing it after `timeout`.
fn run_tool(mut cmd: Command, stdin: &[u8], timeout: Duration) -> ToolRun {
    let command = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command}: {e}"));
    let mut input = child.stdin.take().expect("piped stdin");
    let data = stdin.to_vec();
    let writer = thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let mut out_pipe = child.stdout.take().expect("piped stdout");
    let mut err_pipe = child.stderr.take().expect("piped stderr");
    let out = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out_pipe.read_to_end(&mut s);
        s
    });
    let err = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err_pipe.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the tool") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(5));
    };
    let _ = writer.join();
    ToolRun {
        status,
        stdout: String::from_utf8_lossy(&out.join().unwrap_or_default()).into_owned(),
        stderr: String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned(),
        command,
    }
}

/// The venv `resources/install-deps.sh` creates with `qemu.qmp`, if present.
fn venv_bin(tool: &str) -> Option<PathBuf> {
    let path = repo_root().join("resources/build/venv/bin").join(tool);
    path.exists().then_some(path)
}

// ---------------------------------------------------------------------------------------------
// Greeting and capabilities negotiation.
// ---------------------------------------------------------------------------------------------

/// The greeting is QEMU's, byte for byte; the socket is 0600; before negotiation only
/// qmp_capabilities works; bad capabilities are refused; a second qmp_capabilities is refused.
#[test]
fn greeting_and_negotiation() {
    let _t = TestTimer::start("greeting_and_negotiation");
    let vm = Vm::idle("greeting", &[]);
    let mut c = vm.connect(0);
    expect_line(&vm, &mut c, GREETING);

    let mode = std::fs::metadata(&vm.sockets[0])
        .unwrap_or_else(|e| vm.fail(format!("stat socket: {e}")))
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");

    // Before negotiation every other command, known or not, gets the same error.
    for name in ["query-version", "query-commands", "no-such-cmd", "quit"] {
        vm.ok(c.send(&json!({"execute": name, "id": name})));
        expect_line(
            &vm,
            &mut c,
            &format!("{{\"id\": \"{name}\", \"error\": {{\"class\": \"CommandNotFound\", \"desc\": \"Expecting capabilities negotiation with 'qmp_capabilities'\"}}}}"),
        );
    }
    // Malformed input still gets the ordinary errors.
    vm.ok(c.send_raw(b"{}"));
    expect_parse_error(&vm, &mut c, "QMP input lacks member 'execute'");

    // Bad capability values and arguments.
    vm.ok(c.send(
        &json!({"execute": "qmp_capabilities", "arguments": {"enable": ["cap-does-not-exist"]}, "id": 1}),
    ));
    let msg = vm.ok(c.read_message(DEFAULT_TIMEOUT));
    assert_eq!(msg["id"], 1, "{msg}");
    assert_eq!(msg["error"]["class"], "GenericError", "{msg}");
    vm.ok(c.send(&json!({"execute": "qmp_capabilities", "arguments": {"oob": true}, "id": 2})));
    expect_error(
        &vm,
        &mut c,
        Some(&json!(2)),
        "GenericError",
        "Parameter 'oob' is unexpected",
    );
    vm.ok(c.send(&json!({"execute": "qmp_capabilities", "arguments": {"enable": "oob"}, "id": 3})));
    let msg = vm.ok(c.read_message(DEFAULT_TIMEOUT));
    assert_eq!(msg["error"]["class"], "GenericError", "{msg}");
    // Still in negotiation mode after the failures.
    vm.ok(c.send(&json!({"execute": "query-version", "id": 4})));
    expect_error(
        &vm,
        &mut c,
        Some(&json!(4)),
        "CommandNotFound",
        "Expecting capabilities negotiation with 'qmp_capabilities'",
    );

    // Enable OOB, with no trailing newline (input is a JSON stream, not lines).
    vm.ok(
        c.send_raw(br#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":"neg"}"#)
    );
    expect_line(&vm, &mut c, r#"{"return": {}, "id": "neg"}"#);
    vm.ok(c.send(&json!({"execute": "qmp_capabilities", "id": "again"})));
    expect_line(
        &vm,
        &mut c,
        r#"{"id": "again", "error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}"#,
    );
    // Now in command mode.
    let version = vm.ok(c.execute("query-version", Value::Null));
    assert_eq!(
        version,
        json!({"qemu": {"micro": 0, "minor": 2, "major": 9}, "package": "skiff-0.1.0"})
    );
    let greeting: Value = serde_json::from_str(GREETING).expect("greeting JSON");
    assert_eq!(version, greeting["QMP"]["version"]);
}

/// `qmp_capabilities` with no arguments, `{}` and `"enable": []` all negotiate without OOB:
/// `exec-oob` is then an unexpected member.
#[test]
fn negotiation_without_oob() {
    let _t = TestTimer::start("negotiation_without_oob");
    let vm = Vm::idle("neg-no-oob", &[]);
    for args in [None, Some(json!({})), Some(json!({"enable": []}))] {
        let mut c = vm.connect(0);
        vm.ok(c.read_greeting(START_TIMEOUT));
        let mut req = json!({"execute": "qmp_capabilities", "id": "n"});
        if let Some(args) = args {
            req["arguments"] = args;
        }
        vm.ok(c.send(&req));
        expect_line(&vm, &mut c, r#"{"return": {}, "id": "n"}"#);
        vm.ok(c.send(&json!({"exec-oob": "migrate-pause", "id": "o"})));
        expect_error(
            &vm,
            &mut c,
            Some(&json!("o")),
            "GenericError",
            "QMP input member 'exec-oob' is unexpected",
        );
        // In-band migrate-pause still works (allow-oob commands may run in-band).
        vm.ok(c.send(&json!({"execute": "migrate-pause", "id": "ib"})));
        expect_error(
            &vm,
            &mut c,
            Some(&json!("ib")),
            "GenericError",
            MIGRATE_PAUSE_ERROR,
        );
        drop(c);
    }
}

/// A reconnecting client gets a fresh greeting and starts over in negotiation mode; a client
/// that disconnects in the middle of a request leaves no parser state behind.
#[test]
fn reconnect_gets_fresh_greeting() {
    let _t = TestTimer::start("reconnect_gets_fresh_greeting");
    let vm = Vm::idle("reconnect", &[]);
    let mut c = vm.open(0, true);
    vm.ok(c.execute("query-status", Value::Null));
    // Half a request, then gone.
    vm.ok(c.send_raw(br#"{"execute": "query-st"#));
    drop(c);
    for _ in 0..3 {
        let mut c = vm.connect(0);
        expect_line(&vm, &mut c, GREETING);
        vm.ok(c.send(&json!({"execute": "query-status", "id": 1})));
        expect_error(
            &vm,
            &mut c,
            Some(&json!(1)),
            "CommandNotFound",
            "Expecting capabilities negotiation with 'qmp_capabilities'",
        );
        vm.ok(c.negotiate());
        let status = vm.ok(c.execute("query-status", Value::Null));
        assert_eq!(status, json!({"status": "running", "running": true}));
    }
}

/// A monitor serves one client at a time: a second client gets its greeting only when the
/// first one leaves.
#[test]
fn one_client_at_a_time() {
    let _t = TestTimer::start("one_client_at_a_time");
    let vm = Vm::idle("one-client", &[]);
    let mut first = vm.open(0, false);
    let mut second = vm.connect(0);
    vm.ok(second.expect_silence(QUIET));
    vm.ok(first.execute("query-name", Value::Null));
    drop(first);
    expect_line(&vm, &mut second, GREETING);
    vm.ok(second.negotiate());
    vm.ok(second.execute("query-name", Value::Null));
}

// ---------------------------------------------------------------------------------------------
// Commands.
// ---------------------------------------------------------------------------------------------

/// query-commands lists every command (and qmp_capabilities), each as `{"name": ...}`.
#[test]
fn query_commands_lists_all() {
    let _t = TestTimer::start("query_commands_lists_all");
    let vm = Vm::idle("query-commands", &[]);
    let mut c = vm.open(0, false);
    let list = vm.ok(c.execute("query-commands", Value::Null));
    let entries = list
        .as_array()
        .unwrap_or_else(|| vm.fail(format!("not a list: {list}")));
    let mut names = BTreeSet::new();
    for e in entries {
        let name = e["name"]
            .as_str()
            .unwrap_or_else(|| vm.fail(format!("bad entry {e}")));
        assert_eq!(e.as_object().map(|o| o.len()), Some(1), "entry {e}");
        assert!(names.insert(name.to_string()), "duplicate {name}");
    }
    for name in COMMANDS.iter().chain(&["qmp_capabilities"]) {
        assert!(names.contains(*name), "{name} missing from {names:?}");
    }
}

/// query-qmp-schema describes every command; `allow-oob` appears (as true) exactly on
/// migrate-pause and migrate-recover; type names are masked and resolvable.
#[test]
fn query_qmp_schema_allow_oob() {
    let _t = TestTimer::start("query_qmp_schema_allow_oob");
    let vm = Vm::idle("schema", &[]);
    let mut c = vm.open(0, false);
    let schema = vm.ok(c.execute("query-qmp-schema", Value::Null));
    let entries = schema
        .as_array()
        .unwrap_or_else(|| vm.fail("query-qmp-schema did not return a list"));
    let names: BTreeSet<&str> = entries.iter().filter_map(|e| e["name"].as_str()).collect();
    assert_eq!(names.len(), entries.len(), "schema names are not unique");
    let mut commands = BTreeSet::new();
    let mut oob = BTreeSet::new();
    for e in entries {
        if e["meta-type"] != "command" {
            continue;
        }
        let name = e["name"].as_str().expect("command name");
        commands.insert(name);
        for key in ["arg-type", "ret-type"] {
            let t = e[key]
                .as_str()
                .unwrap_or_else(|| vm.fail(format!("{name}: no {key}")));
            assert!(
                names.contains(t) || t.starts_with('['),
                "{name}: {key} {t} not in the schema"
            );
        }
        match e.get("allow-oob") {
            None => {}
            Some(Value::Bool(true)) => {
                oob.insert(name);
            }
            Some(other) => vm.fail(format!("{name}: allow-oob is {other}, not absent or true")),
        }
    }
    for name in COMMANDS.iter().chain(&["qmp_capabilities"]) {
        assert!(commands.contains(name), "{name} missing from the schema");
    }
    assert_eq!(
        oob,
        BTreeSet::from(["migrate-pause", "migrate-recover"]),
        "allow-oob commands"
    );
    // Events Skiff emits are described too.
    for event in ["STOP", "RESUME", "RESET", "SHUTDOWN", "POWERDOWN"] {
        assert!(
            entries
                .iter()
                .any(|e| e["name"] == event && e["meta-type"] == "event"),
            "event {event} missing from the schema"
        );
    }
}

/// query-name with and without --name; query-uuid; query-kvm (exact wire text);
/// query-memory-size-summary with --memory; query-version.
#[test]
fn simple_queries() {
    let _t = TestTimer::start("simple_queries");
    let vm = Vm::idle("queries", &["--name", "qmp-test-vm", "--memory", "128M"]);
    let mut c = vm.open(0, false);
    assert_eq!(
        vm.ok(c.execute("query-name", Value::Null)),
        json!({"name": "qmp-test-vm"})
    );
    assert_eq!(
        vm.ok(c.execute("query-uuid", Value::Null)),
        json!({"UUID": "00000000-0000-0000-0000-000000000000"})
    );
    vm.ok(c.send(&json!({"execute": "query-kvm", "id": "k"})));
    expect_line(
        &vm,
        &mut c,
        r#"{"return": {"enabled": true, "present": true}, "id": "k"}"#,
    );
    assert_eq!(
        vm.ok(c.execute("query-memory-size-summary", Value::Null)),
        json!({"base-memory": 128u64 << 20, "plugged-memory": 0})
    );
    vm.ok(c.send(&json!({"execute": "query-version", "id": "v"})));
    expect_line(
        &vm,
        &mut c,
        r#"{"return": {"qemu": {"micro": 0, "minor": 2, "major": 9}, "package": "skiff-0.1.0"}, "id": "v"}"#,
    );

    let unnamed = Vm::idle("queries-unnamed", &[]);
    let mut c = unnamed.open(0, false);
    // QEMU's exact reply for an unnamed VM (qmp-test's cookie#1 case).
    unnamed.ok(c.send_raw(br#"{"execute": "query-name", "id": "cookie#1"}"#));
    expect_line(&unnamed, &mut c, r#"{"return": {}, "id": "cookie#1"}"#);
    assert_eq!(
        unnamed.ok(c.execute("query-memory-size-summary", Value::Null)),
        json!({"base-memory": 256u64 << 20, "plugged-memory": 0})
    );
}

/// query-cpus-fast with 2 vCPUs: one entry each, and the thread ids are real, distinct
/// threads of the skiff process (as `info cpus` also says).
#[test]
fn query_cpus_fast_two_vcpus() {
    let _t = TestTimer::start("query_cpus_fast_two_vcpus");
    let vm = Vm::idle("cpus", &["--cpus", "2"]);
    vm.wait_ready(1);
    let mut c = vm.open(0, false);
    let cpus = vm.ok(c.execute("query-cpus-fast", Value::Null));
    let cpus = cpus
        .as_array()
        .unwrap_or_else(|| vm.fail(format!("not a list: {cpus}")))
        .clone();
    assert_eq!(cpus.len(), 2, "{cpus:?}");
    let mut tids = Vec::new();
    for (i, cpu) in cpus.iter().enumerate() {
        assert_eq!(cpu["cpu-index"], i, "{cpu}");
        assert_eq!(cpu["target"], "x86_64", "{cpu}");
        assert_eq!(
            cpu["qom-path"],
            format!("/machine/unattached/device[{i}]"),
            "{cpu}"
        );
        assert_eq!(cpu["props"]["core-id"], i, "{cpu}");
        let tid = cpu["thread-id"]
            .as_u64()
            .unwrap_or_else(|| vm.fail(format!("no thread-id in {cpu}")));
        let task = PathBuf::from(format!("/proc/{}/task/{tid}", vm.pid()));
        assert!(
            task.exists(),
            "vCPU {i} thread id {tid} is not a thread of skiff ({} missing)\n{}",
            task.display(),
            vm.skiff.dump()
        );
        assert_ne!(
            tid,
            u64::from(vm.pid()),
            "vCPU {i} runs on the main thread?"
        );
        tids.push(tid);
    }
    assert_ne!(tids[0], tids[1], "both vCPUs report the same thread");

    let cpus_text = vm.ok(c.execute(
        "human-monitor-command",
        json!({"command-line": "info cpus"}),
    ));
    assert_eq!(
        cpus_text,
        json!(format!(
            "* CPU #0: thread_id={}\r\n  CPU #1: thread_id={}\r\n",
            tids[0], tids[1]
        ))
    );
}

/// With -S: prelaunch, then cont (RESUME before its return) starts the guest; stop (STOP
/// before its return) pauses it; repeated stop/cont succeed without events; HMP `info
/// status` follows along.
#[test]
fn run_state_transitions() {
    let _t = TestTimer::start("run_state_transitions");
    let vm = Vm::idle("runstate", &["-S"]);
    let mut c = vm.open(0, false);
    let hmp_status = |c: &mut QmpClient| {
        vm.ok(c.execute(
            "human-monitor-command",
            json!({"command-line": "info status"}),
        ))
    };
    assert_status(&vm, &mut c, "prelaunch");
    assert_eq!(hmp_status(&mut c), "VM status: paused (prelaunch)\r\n");
    // The vCPU threads exist (their thread ids are known once they run) and must stay
    // parked: nothing may reach the serial port before cont.
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let cpus = vm.ok(c.execute("query-cpus-fast", Value::Null));
        if cpus[0]["thread-id"].as_u64().is_some_and(|t| t != 0) {
            break;
        }
        if Instant::now() >= deadline {
            vm.fail(format!("vCPU 0 never reported a thread id: {cpus}"));
        }
        thread::sleep(Duration::from_millis(1));
    }
    let printed = vm
        .skiff
        .wait_stdout(Instant::now() + QUIET, |out| !out.is_empty());
    assert!(
        !printed,
        "BUG: with -S the guest ran before cont (query-status said prelaunch)\n{}",
        vm.skiff.dump()
    );

    // cont: RESUME, then the reply.
    run_state_change(&vm, &mut c, "cont", "cont-1", "RESUME");
    vm.wait_ready(1);
    assert_status(&vm, &mut c, "running");
    assert_eq!(hmp_status(&mut c), "VM status: running\r\n");

    // cont while running: success, no event.
    vm.ok(c.send(&json!({"execute": "cont", "id": "cont-2"})));
    expect_return(&vm, &mut c, &json!("cont-2"), &json!({}));

    // stop: STOP, then the reply.
    run_state_change(&vm, &mut c, "stop", "stop-1", "STOP");
    assert_status(&vm, &mut c, "paused");
    assert_eq!(hmp_status(&mut c), "VM status: paused\r\n");

    // stop while paused: success, no event.
    vm.ok(c.send(&json!({"execute": "stop", "id": "stop-2"})));
    expect_return(&vm, &mut c, &json!("stop-2"), &json!({}));

    // And back.
    run_state_change(&vm, &mut c, "cont", "cont-3", "RESUME");
    assert_status(&vm, &mut c, "running");
    vm.ok(c.expect_silence(QUIET));
    assert_eq!(vm.skiff.stdout_text(), "ready\n", "the guest booted twice?");
}

/// human-monitor-command: info registers shows the guest's registers in QEMU's layout;
/// info kvm / name / version; unknown commands; a missing command-line.
#[test]
fn human_monitor_command() {
    let _t = TestTimer::start("human_monitor_command");
    let dir = TempDir::new("hmp");
    let kernel = pattern_guest(dir.path());
    let vm = Vm::start(dir, &kernel, 1, &["--name", "hmp-vm"]);
    vm.wait_ready(1);
    let mut c = vm.open(0, false);
    let hmp = |c: &mut QmpClient, line: &str| -> String {
        let out = vm.ok(c.execute("human-monitor-command", json!({"command-line": line})));
        out.as_str()
            .unwrap_or_else(|| vm.fail(format!("HMP {line} returned {out}")))
            .to_string()
    };
    let regs = hmp(&mut c, "info registers");
    assert!(
        regs.contains("RBX=1122334455667788"),
        "info registers lacks the guest's RBX:\n{regs}"
    );
    let first = regs.lines().next().unwrap_or("");
    assert!(
        first.starts_with("RAX=") && first.contains(" RBX=") && first.contains(" RDX="),
        "unexpected first line {first:?}"
    );
    assert!(
        regs.contains("RIP=0000000000") && regs.contains("CPL=0"),
        "{regs}"
    );
    assert!(
        regs.ends_with("\r\n") && !regs.replace("\r\n", "").contains('\n'),
        "HMP output lines must end in CRLF: {regs:?}"
    );
    // The same through cpu-index 0; a CPU that does not exist is an error.
    let regs0 = vm.ok(c.execute(
        "human-monitor-command",
        json!({"command-line": "info registers", "cpu-index": 0}),
    ));
    assert!(regs0
        .as_str()
        .unwrap_or("")
        .contains("RBX=1122334455667788"));
    let (class, _) = vm.ok(c.execute_err(
        "human-monitor-command",
        json!({"command-line": "info registers", "cpu-index": 7}),
    ));
    assert_eq!(class, "GenericError");

    assert_eq!(hmp(&mut c, "info kvm"), "kvm support: enabled\r\n");
    assert_eq!(hmp(&mut c, "info name"), "hmp-vm\r\n");
    assert_eq!(hmp(&mut c, "info version"), "9.2.0 (skiff-0.1.0)\r\n");
    assert_eq!(hmp(&mut c, "info status"), "VM status: running\r\n");
    assert_eq!(hmp(&mut c, ""), "");
    assert_eq!(
        hmp(&mut c, "frobnicate"),
        "unknown command: 'frobnicate'\r\n"
    );

    // qmp-test's missing-argument case, byte for byte.
    vm.ok(c.send_raw(br#"{"execute": "human-monitor-command", "id": 2}"#));
    expect_line(
        &vm,
        &mut c,
        r#"{"id": 2, "error": {"class": "GenericError", "desc": "Parameter 'command-line' is missing"}}"#,
    );
    // Output is pure ASCII: non-ASCII characters come back as uppercase \uXXXX escapes.
    vm.ok(c.send(&json!({"execute": "human-monitor-command", "arguments": {"command-line": "caf\u{e9}\u{1f600}"}, "id": 3})));
    expect_line(
        &vm,
        &mut c,
        r#"{"return": "unknown command: 'caf\u00E9\uD83D\uDE00'\r\n", "id": 3}"#,
    );
}

/// pmemsave and memsave write exactly what the guest put in RAM; bad addresses, sizes, CPU
/// indexes and file names are errors.
#[test]
fn pmemsave_and_memsave_contents() {
    let _t = TestTimer::start("pmemsave_and_memsave_contents");
    let dir = TempDir::new("pmemsave");
    let kernel = pattern_guest(dir.path());
    let vm = Vm::start(dir, &kernel, 1, &["--memory", "64M"]);
    vm.wait_ready(1);
    let mut c = vm.open(0, false);
    let expected = pattern();

    let phys = vm.dir.join("phys.bin");
    let ret = vm.ok(c.execute(
        "pmemsave",
        json!({"val": DATA_AREA, "size": PATTERN_LEN, "filename": phys.display().to_string()}),
    ));
    assert_eq!(ret, json!({}));
    let got = std::fs::read(&phys).unwrap_or_else(|e| vm.fail(format!("reading pmemsave: {e}")));
    assert!(
        got == expected,
        "pmemsave bytes differ from the guest's pattern"
    );

    // An unaligned window crossing a page boundary (DATA_AREA is page aligned; the guest
    // wrote nothing just below it).
    let part = vm.dir.join("part.bin");
    vm.ok(c.execute(
        "pmemsave",
        json!({"val": DATA_AREA - 3, "size": 7, "filename": part.display().to_string()}),
    ));
    let mut window = vec![0u8; 3];
    window.extend_from_slice(&expected[..4]);
    assert_eq!(std::fs::read(&part).expect("part"), window);

    // memsave: virtual addresses through the guest's page tables (identity map here).
    let virt = vm.dir.join("virt.bin");
    let ret = vm.ok(c.execute(
        "memsave",
        json!({"val": DATA_AREA, "size": PATTERN_LEN, "filename": virt.display().to_string(), "cpu-index": 0}),
    ));
    assert_eq!(ret, json!({}));
    let got = std::fs::read(&virt).unwrap_or_else(|e| vm.fail(format!("reading memsave: {e}")));
    assert!(
        got == expected,
        "memsave bytes differ from the guest's pattern"
    );
    // Without cpu-index, CPU 0.
    let virt2 = vm.dir.join("virt2.bin");
    vm.ok(c.execute(
        "memsave",
        json!({"val": DATA_AREA, "size": 16, "filename": virt2.display().to_string()}),
    ));
    assert_eq!(std::fs::read(&virt2).expect("virt2"), &expected[..16]);

    // Zero bytes: an empty file.
    let empty = vm.dir.join("empty.bin");
    vm.ok(c.execute(
        "pmemsave",
        json!({"val": 0, "size": 0, "filename": empty.display().to_string()}),
    ));
    assert_eq!(std::fs::read(&empty).expect("empty").len(), 0);

    // Errors.
    let junk = vm.dir.join("junk.bin").display().to_string();
    let (class, desc) = vm.ok(c.execute_err(
        "pmemsave",
        json!({"val": 64u64 << 20, "size": 4096, "filename": junk}),
    ));
    assert_eq!(class, "GenericError", "{desc}");
    let (class, desc) = vm.ok(c.execute_err(
        "memsave",
        json!({"val": 0, "size": 16, "filename": junk, "cpu-index": 5}),
    ));
    assert_eq!(class, "GenericError", "{desc}");
    let (class, desc) = vm.ok(c.execute_err(
        "pmemsave",
        json!({"val": 0, "size": 16, "filename": "/nonexistent-dir/x.bin"}),
    ));
    assert_eq!(class, "GenericError");
    assert!(desc.contains("/nonexistent-dir/x.bin"), "{desc}");
    // Argument checking, in QEMU's words.
    vm.ok(c.send(&json!({"execute": "pmemsave", "id": "a"})));
    expect_error(
        &vm,
        &mut c,
        Some(&json!("a")),
        "GenericError",
        "Parameter 'val' is missing",
    );
    vm.ok(c.send(&json!({"execute": "pmemsave", "arguments": {"val": "x", "size": 1, "filename": junk}, "id": "b"})));
    expect_error(
        &vm,
        &mut c,
        Some(&json!("b")),
        "GenericError",
        "Parameter 'val' expects uint64",
    );
    vm.ok(c.send(&json!({"execute": "pmemsave", "arguments": {"val": 0, "size": 1, "filename": junk, "bogus": 1}, "id": "c"})));
    expect_error(
        &vm,
        &mut c,
        Some(&json!("c")),
        "GenericError",
        "Parameter 'bogus' is unexpected",
    );
}

/// system_reset: the reply, then RESET (host-qmp-system-reset); the guest boots again. While
/// paused, a reset leaves the VM in prelaunch until cont.
#[test]
fn system_reset_reboots_guest() {
    let _t = TestTimer::start("system_reset_reboots_guest");
    let vm = Vm::idle("reset", &[]);
    vm.wait_ready(1);
    let mut c = vm.open(0, false);
    execute_then_event(
        &vm,
        &mut c,
        "system_reset",
        "r1",
        "RESET",
        Some(json!({"guest": false, "reason": "host-qmp-system-reset"})),
    );
    vm.wait_ready(2);
    assert_status(&vm, &mut c, "running");

    // Reset while paused: prelaunch, and the guest runs again only after cont.
    vm.ok(c.execute("stop", Value::Null));
    vm.ok(c.wait_event("STOP", DEFAULT_TIMEOUT));
    execute_then_event(
        &vm,
        &mut c,
        "system_reset",
        "r2",
        "RESET",
        Some(json!({"guest": false, "reason": "host-qmp-system-reset"})),
    );
    assert_status(&vm, &mut c, "prelaunch");
    vm.ok(c.expect_silence(QUIET));
    assert_eq!(vm.skiff.stdout_text(), "ready\nready\n");
    vm.ok(c.execute("cont", Value::Null));
    vm.ok(c.wait_event("RESUME", DEFAULT_TIMEOUT));
    vm.wait_ready(3);
}

/// A guest reset through the i8042 (0xfe) emits RESET with guest true, reason guest-reset.
#[test]
fn guest_reset_event() {
    let _t = TestTimer::start("guest_reset_event");
    let dir = TempDir::new("guest-reset");
    // First boot: bump the CMOS boot counter and reset; later boots print and halt.
    let kernel = write_guest(dir.path(), "reset-once.elf", |a| {
        let mut again = a.create_label();
        a.cmos_read(common::guest::CMOS_BOOT_COUNTER)?;
        a.mov(bl, al)?;
        a.inc(bl)?;
        a.cmos_write_bl(common::guest::CMOS_BOOT_COUNTER)?;
        a.cmp(bl, 1)?;
        a.jne(again)?;
        a.i8042_reset()?;
        a.set_label(&mut again)?;
        a.print("ready\n")?;
        a.halt_forever()
    });
    let vm = Vm::start(dir, &kernel, 1, &["-S"]);
    let mut c = vm.open(0, false);
    vm.ok(c.execute("cont", Value::Null));
    let resume = vm.ok(c.wait_event("RESUME", DEFAULT_TIMEOUT));
    assert_event(&vm, &resume, "RESUME", None);
    let reset = vm.ok(c.wait_event("RESET", DEFAULT_TIMEOUT));
    assert_event(
        &vm,
        &reset,
        "RESET",
        Some(json!({"guest": true, "reason": "guest-reset"})),
    );
    vm.wait_ready(1);
    assert_status(&vm, &mut c, "running");
}

/// system_powerdown: the reply, then POWERDOWN without data; the (ACPI-less) guest keeps
/// running.
#[test]
fn system_powerdown_event() {
    let _t = TestTimer::start("system_powerdown_event");
    let vm = Vm::idle("powerdown", &[]);
    let mut c = vm.open(0, false);
    vm.ok(c.send(&json!({"execute": "system_powerdown", "id": "p"})));
    expect_return(&vm, &mut c, &json!("p"), &json!({}));
    let event = vm.ok(c.read_message(DEFAULT_TIMEOUT));
    assert_event(&vm, &event, "POWERDOWN", None);
    assert_status(&vm, &mut c, "running");
}

/// A KVM internal error with a monitor attached: the VM stops in `internal-error` (STOP),
/// `cont` needs a reset first, and `system_reset` brings the guest back (it then waits in
/// `prelaunch` for `cont`, as QEMU). Needs an instruction this KVM cannot emulate.
#[test]
fn internal_error_state() {
    let _t = TestTimer::start("internal_error_state");
    let dir = TempDir::new("internal-error-qmp");
    let kernel = write_guest(dir.path(), "popcnt.elf", |a| {
        a.print("ready\n")?;
        a.popcnt(eax, ebx)?;
        a.print("survived\n")?;
        a.halt_forever()
    });
    let vm = Vm::start(dir, &kernel, 1, &[]);
    let mut c = vm.open(0, false);
    vm.wait_ready(1);
    let deadline = Instant::now() + START_TIMEOUT;
    let status = loop {
        let status = vm.ok(c.execute("query-status", Value::Null));
        if status["status"] != "running" || Instant::now() >= deadline {
            break status;
        }
        if vm.skiff.stdout_text().contains("survived") {
            common::skipped(format_args!(
                "SKIPPED: this host's KVM executed popcnt natively (hardware-assisted), so \
                 there is no internal error to observe"
            ));
            return;
        }
        thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(
        status,
        json!({"status": "internal-error", "running": false})
    );
    // STOP came before the query-status reply (it may have been collected on the way).
    let event = vm.ok(c.wait_event("STOP", DEFAULT_TIMEOUT));
    assert_event(&vm, &event, "STOP", None);
    assert!(
        vm.skiff.stderr_text().contains("rip="),
        "no internal-error line on stderr\n{}",
        vm.skiff.dump()
    );
    assert_eq!(
        vm.ok(c.execute_err("cont", Value::Null)),
        (
            "GenericError".to_string(),
            "Resetting the Virtual Machine is required".to_string()
        )
    );
    execute_then_event(
        &vm,
        &mut c,
        "system_reset",
        "r",
        "RESET",
        Some(json!({"guest": false, "reason": "host-qmp-system-reset"})),
    );
    assert_status(&vm, &mut c, "prelaunch");
    run_state_change(&vm, &mut c, "cont", "c", "RESUME");
    vm.wait_ready(2);
}

/// quit: the reply, SHUTDOWN (host-qmp-quit), EOF; skiff exits 0 and removes its socket.
#[test]
fn quit_exits_cleanly() {
    let _t = TestTimer::start("quit_exits_cleanly");
    let vm = Vm::idle("quit", &[]);
    vm.wait_ready(1);
    let mut c = vm.open(0, false);
    execute_then_event(
        &vm,
        &mut c,
        "quit",
        "q",
        "SHUTDOWN",
        Some(json!({"guest": false, "reason": "host-qmp-quit"})),
    );
    vm.ok(c.expect_eof(DEFAULT_TIMEOUT));
    let (done, sockets, _dir) = vm.finish();
    done.assert_exit(0);
    assert!(
        !sockets[0].exists(),
        "socket {} left behind\n{}",
        sockets[0].display(),
        done.dump()
    );
    assert!(!done.stderr.contains("panicked"), "{}", done.dump());
}

/// A guest that ends itself through the exit port ends skiff with its status; the monitor
/// connection closes and the socket file is removed.
#[test]
fn guest_exit_closes_monitor() {
    let _t = TestTimer::start("guest_exit_closes_monitor");
    let dir = TempDir::new("guest-exit");
    let kernel = write_guest(dir.path(), "exit7.elf", |a| {
        a.print("bye\n")?;
        a.exit(7)
    });
    let vm = Vm::start(dir, &kernel, 1, &["-S"]);
    let mut c = vm.open(0, false);
    vm.ok(c.execute("cont", Value::Null));
    // Whatever events come first (printed), the connection must end.
    let deadline = Instant::now() + DEFAULT_TIMEOUT;
    loop {
        match c.read_message(deadline.saturating_duration_since(Instant::now())) {
            Ok(msg) if msg.get("event").is_some() => println!("guest exit: event {msg}"),
            Ok(msg) => vm.fail(format!("unexpected {msg}")),
            Err(e) if e.is_eof() => break,
            Err(e) => vm.fail(e),
        }
    }
    let (done, sockets, _dir) = vm.finish();
    done.assert_exit(7);
    done.assert_stdout("bye\n");
    assert!(!sockets[0].exists(), "socket left behind\n{}", done.dump());
}

/// SIGTERM once the VM runs: SHUTDOWN (host-signal) to the client, exit 0, socket removed.
#[test]
fn sigterm_shuts_down_cleanly() {
    let _t = TestTimer::start("sigterm_shuts_down_cleanly");
    let vm = Vm::idle("sigterm", &[]);
    let mut c = vm.open(0, false);
    // An in-band reply means the main loop (and its signal handling) is running.
    vm.ok(c.execute("query-status", Value::Null));
    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(vm.pid() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    let event = vm.ok(c.read_message(DEFAULT_TIMEOUT));
    assert_event(
        &vm,
        &event,
        "SHUTDOWN",
        Some(json!({"guest": false, "reason": "host-signal"})),
    );
    vm.ok(c.expect_eof(DEFAULT_TIMEOUT));
    let (done, sockets, _dir) = vm.finish();
    done.assert_exit(0);
    assert!(!sockets[0].exists(), "socket left behind\n{}", done.dump());
}

// ---------------------------------------------------------------------------------------------
// Protocol robustness.
// ---------------------------------------------------------------------------------------------

/// qmp-test's malformed-input battery, before and after negotiation: each input gets
/// exactly one GenericError (no id), and the parser recovers (the probe works right after).
#[test]
fn malformed_input_battery() {
    let _t = TestTimer::start("malformed_input_battery");
    let vm = Vm::idle("malformed", &[]);
    let mut c = vm.connect(0);
    expect_line(&vm, &mut c, GREETING);
    let cases: &[(&[u8], Option<&str>)] = &[
        (b"{]\n", None),
        (b"{\xff", None),
        (b"{\x01", None),
        (b"{'bad \xff", None),
        (b"{'execute': 'nonexistent', 'id':'\n", None),
        (b"%%p", None),
        (b"null\n", Some("QMP input must be a JSON object")),
        (b"[]", Some("QMP input must be a JSON object")),
        (b"42\n", Some("QMP input must be a JSON object")),
        (b"{}", Some("QMP input lacks member 'execute'")),
        (
            b"{'execute': true}",
            Some("QMP input member 'execute' must be a string"),
        ),
        (
            b"{'execute': 'no-such-cmd', 'arguments': []}",
            Some("QMP input member 'arguments' must be an object"),
        ),
        (
            b"{'execute': 'no-such-cmd', 'extra': true}",
            Some("QMP input member 'extra' is unexpected"),
        ),
        (
            b"{'execute': 'no-such-cmd', 'control': {'run-oob': true}}",
            Some("QMP input member 'control' is unexpected"),
        ),
    ];
    for negotiated in [false, true] {
        if negotiated {
            vm.ok(c.negotiate());
        }
        for (input, desc) in cases {
            vm.ok(c.send_raw(input));
            let msg = vm.ok(c.read_message(DEFAULT_TIMEOUT));
            let shown = String::from_utf8_lossy(input);
            assert_eq!(
                msg["error"]["class"],
                "GenericError",
                "input {shown:?}: {msg}\n{}",
                c.transcript()
            );
            assert!(msg.get("id").is_none(), "input {shown:?}: {msg}");
            match desc {
                Some(desc) => assert_eq!(msg["error"]["desc"], *desc, "input {shown:?}"),
                None => assert!(
                    msg["error"]["desc"]
                        .as_str()
                        .is_some_and(|d| d.starts_with("JSON parse error, ")),
                    "input {shown:?}: {msg}"
                ),
            }
            // The probe: the parser is back in a known state.
            vm.ok(c.send_raw(b"{'execute': 'no-such-cmd'}"));
            let desc = if negotiated {
                "The command no-such-cmd has not been found"
            } else {
                "Expecting capabilities negotiation with 'qmp_capabilities'"
            };
            expect_error(&vm, &mut c, None, "CommandNotFound", desc);
        }
    }
}

/// Validation errors in QEMU's order and words; ids of every JSON type are echoed; no id
/// means no id; single quotes work; a request split byte by byte, two requests in one
/// write, and bare whitespace behave like a stream.
#[test]
fn request_validation_and_framing() {
    let _t = TestTimer::start("request_validation_and_framing");
    let vm = Vm::idle("validation", &[]);
    let mut c = vm.open(0, true);
    let cases: &[(&str, &str)] = &[
        (
            r#"{"execute": "no-such-cmd", "id": "u"}"#,
            r#"{"id": "u", "error": {"class": "CommandNotFound", "desc": "The command no-such-cmd has not been found"}}"#,
        ),
        (
            r#"{"id": "x"}"#,
            r#"{"id": "x", "error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}}"#,
        ),
        (
            r#"{"execute": "query-status", "exec-oob": "migrate-pause", "id": 5}"#,
            r#"{"id": 5, "error": {"class": "GenericError", "desc": "QMP input member 'execute' clashes with 'exec-oob'"}}"#,
        ),
        (
            r#"{"exec-oob": "query-status", "id": 6}"#,
            r#"{"id": 6, "error": {"class": "GenericError", "desc": "The command query-status does not support OOB"}}"#,
        ),
        (
            r#"{"execute": "query-status", "arguments": {"foo": 1}, "id": 7}"#,
            r#"{"id": 7, "error": {"class": "GenericError", "desc": "Parameter 'foo' is unexpected"}}"#,
        ),
        (
            r#"{"execute": "no-such-cmd", "extra": 1, "id": 8}"#,
            r#"{"id": 8, "error": {"class": "GenericError", "desc": "QMP input member 'extra' is unexpected"}}"#,
        ),
        (
            r#"{"exec-oob": "migrate-recover", "id": 9}"#,
            r#"{"id": 9, "error": {"class": "GenericError", "desc": "Parameter 'uri' is missing"}}"#,
        ),
        (
            r#"{"execute": "query-status"}"#,
            r#"{"return": {"status": "running", "running": true}}"#,
        ),
        (
            r#"{'execute': 'query-name', 'id': 'it\'s'}"#,
            r#"{"return": {}, "id": "it's"}"#,
        ),
    ];
    for (request, reply) in cases {
        vm.ok(c.send_raw(request.as_bytes()));
        expect_line(&vm, &mut c, reply);
    }
    // ids of every JSON type come back unchanged.
    for id in [
        json!("s"),
        json!(0),
        json!(-17),
        json!(1.5),
        json!(true),
        json!(null),
        json!([1, "two", {"three": 3}]),
        json!({"nested": {"id": [1, 2]}}),
    ] {
        vm.ok(c.send(&json!({"execute": "query-name", "id": id})));
        let msg = vm.ok(c.read_message(DEFAULT_TIMEOUT));
        assert_eq!(msg, json!({"return": {}, "id": id}));
    }
    // One byte at a time: exactly one reply.
    for b in br#"{"execute": "query-kvm", "id": "bytes"}"# {
        vm.ok(c.send_raw(&[*b]));
    }
    expect_line(
        &vm,
        &mut c,
        r#"{"return": {"enabled": true, "present": true}, "id": "bytes"}"#,
    );
    // Two in one write, whitespace in between and after (a bare space is harmless).
    vm.ok(c.send_raw(
        b"{\"execute\": \"query-name\", \"id\": 1} \t\r\n {\"execute\": \"query-name\", \"id\": 2}   \n ",
    ));
    expect_line(&vm, &mut c, r#"{"return": {}, "id": 1}"#);
    expect_line(&vm, &mut c, r#"{"return": {}, "id": 2}"#);
    vm.ok(c.send_raw(b" "));
    vm.ok(c.expect_silence(QUIET));
}

/// Nesting deeper than 1024 is refused with QEMU's message without killing the session:
/// like QEMU's streamer, the parser resets at the error, so each of the 1025 closing brackets
/// that follow is then a stray `]` ("expecting value"); exactly 1024 levels parse.
#[test]
fn nesting_depth_limit() {
    let _t = TestTimer::start("nesting_depth_limit");
    let vm = Vm::idle("nesting", &[]);
    let mut c = vm.open(0, false);
    let probe = |vm: &Vm, c: &mut QmpClient, id: &str| {
        vm.ok(c.send(&json!({"execute": "query-name", "id": id})));
        let msg = vm.ok(c.read_message(DEFAULT_TIMEOUT));
        assert_eq!(msg, json!({"return": {}, "id": id}), "{}", c.transcript());
    };

    // Opening brackets only: one error, and the parser starts over.
    vm.ok(c.send_raw("[".repeat(1025).as_bytes()));
    expect_parse_error(&vm, &mut c, "JSON nesting depth limit exceeded");
    probe(&vm, &mut c, "after-open");

    // Balanced 1025 levels: the limit error, then one error per stray closing bracket.
    let mut balanced = "[".repeat(1025);
    balanced.push_str(&"]".repeat(1025));
    vm.ok(c.send_raw(balanced.as_bytes()));
    expect_parse_error(&vm, &mut c, "JSON nesting depth limit exceeded");
    for _ in 0..1025 {
        expect_parse_error(&vm, &mut c, "JSON parse error, expecting value");
    }
    probe(&vm, &mut c, "after-balanced");

    // 1024 levels are within the limit: a complete value, just not an object.
    let mut max = "[".repeat(1024);
    max.push_str(&"]".repeat(1024));
    vm.ok(c.send_raw(max.as_bytes()));
    expect_parse_error(&vm, &mut c, "QMP input must be a JSON object");
    probe(&vm, &mut c, "end");
}

/// 20 commands in one write (without OOB, then with) are answered in order, errors in
/// their place.
#[test]
fn pipelined_commands_in_order() {
    let _t = TestTimer::start("pipelined_commands_in_order");
    let vm = Vm::idle("pipeline", &[]);
    for oob in [false, true] {
        let mut c = vm.open(0, oob);
        let mut batch = Vec::new();
        let mut expected = Vec::new();
        for i in 0..20 {
            let (req, rep) = match i % 4 {
                0 => (
                    json!({"execute": "query-name", "id": i}),
                    json!({"return": {}, "id": i}),
                ),
                1 => (
                    json!({"execute": "query-status", "id": i}),
                    json!({"return": {"status": "running", "running": true}, "id": i}),
                ),
                2 => (
                    json!({"id": i}),
                    json!({"id": i, "error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}}),
                ),
                _ => (
                    json!({"execute": "no-such", "id": i}),
                    json!({"id": i, "error": {"class": "CommandNotFound", "desc": "The command no-such has not been found"}}),
                ),
            };
            batch.extend(serde_json::to_vec(&req).expect("json"));
            expected.push(rep);
        }
        vm.ok(c.send_raw(&batch));
        for rep in expected {
            let msg = vm.ok(c.read_message(DEFAULT_TIMEOUT));
            assert_eq!(msg, rep, "oob={oob}\n{}", c.transcript());
        }
    }
}

/// Two monitors at once: each negotiates separately; events reach both; a connected but
/// not negotiated client receives no events (not even later).
#[test]
fn two_monitors_get_events() {
    let _t = TestTimer::start("two_monitors_get_events");
    let dir = TempDir::new("two-monitors");
    let kernel = idle_guest(dir.path());
    let vm = Vm::start(dir, &kernel, 3, &[]);
    let mut a = vm.open(0, false);
    let mut b = vm.open(1, true);
    let mut waiting = vm.connect(2);
    vm.ok(waiting.read_greeting(START_TIMEOUT));

    vm.ok(a.send(&json!({"execute": "stop", "id": "a1"})));
    let e = vm.ok(a.read_message(DEFAULT_TIMEOUT));
    assert_event(&vm, &e, "STOP", None);
    expect_return(&vm, &mut a, &json!("a1"), &json!({}));
    let e = vm.ok(b.read_message(DEFAULT_TIMEOUT));
    assert_event(&vm, &e, "STOP", None);

    vm.ok(b.send(&json!({"execute": "cont", "id": "b1"})));
    let e = vm.ok(b.read_message(DEFAULT_TIMEOUT));
    assert_event(&vm, &e, "RESUME", None);
    expect_return(&vm, &mut b, &json!("b1"), &json!({}));
    let e = vm.ok(a.read_message(DEFAULT_TIMEOUT));
    assert_event(&vm, &e, "RESUME", None);
    assert_eq!(
        vm.ok(a.execute("query-status", Value::Null)),
        json!({"status": "running", "running": true})
    );

    vm.ok(b.send(&json!({"execute": "system_reset", "id": "b2"})));
    expect_return(&vm, &mut b, &json!("b2"), &json!({}));
    let reset = Some(json!({"guest": false, "reason": "host-qmp-system-reset"}));
    let e = vm.ok(b.read_message(DEFAULT_TIMEOUT));
    assert_event(&vm, &e, "RESET", reset.clone());
    let e = vm.ok(a.read_message(DEFAULT_TIMEOUT));
    assert_event(&vm, &e, "RESET", reset);

    // The client still negotiating saw none of it, and its next line is its own reply.
    vm.ok(waiting.expect_silence(QUIET));
    vm.ok(waiting.send(&json!({"execute": "qmp_capabilities", "id": "w"})));
    expect_line(&vm, &mut waiting, r#"{"return": {}, "id": "w"}"#);

    // quit: SHUTDOWN everywhere, then EOF everywhere.
    vm.ok(a.send(&json!({"execute": "quit", "id": "a2"})));
    expect_return(&vm, &mut a, &json!("a2"), &json!({}));
    let shutdown = Some(json!({"guest": false, "reason": "host-qmp-quit"}));
    for c in [&mut a, &mut b, &mut waiting] {
        let e = vm.ok(c.wait_event("SHUTDOWN", DEFAULT_TIMEOUT));
        assert_event(&vm, &e, "SHUTDOWN", shutdown.clone());
        vm.ok(c.expect_eof(DEFAULT_TIMEOUT));
    }
    let (done, sockets, _dir) = vm.finish();
    done.assert_exit(0);
    for s in sockets {
        assert!(!s.exists(), "{} left behind", s.display());
    }
}

/// A monitor on TCP works like one on a Unix socket.
#[test]
fn tcp_monitor() {
    let _t = TestTimer::start("tcp_monitor");
    let dir = TempDir::new("tcp");
    let kernel = idle_guest(dir.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let skiff = Skiff::spawn([
        "--kernel".to_string(),
        kernel.display().to_string(),
        "--qmp".to_string(),
        format!("tcp:{addr}"),
    ]);
    let ok = |r: ClientResult<Value>| r.unwrap_or_else(|e| panic!("{e}\n{}", skiff.dump()));
    let mut c = QmpClient::connect_tcp(&addr, START_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", skiff.dump()));
    let line = c
        .read_line(START_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", skiff.dump()));
    assert_eq!(line, GREETING);
    ok(c.execute("qmp_capabilities", json!({"enable": ["oob"]})));
    assert_eq!(
        ok(c.execute("query-status", Value::Null)),
        json!({"status": "running", "running": true})
    );
    c.send(&json!({"exec-oob": "migrate-pause", "id": "o"}))
        .expect("send");
    let reply = ok(c.read_message(DEFAULT_TIMEOUT));
    assert_eq!(reply["error"]["desc"], MIGRATE_PAUSE_ERROR);
    ok(c.execute("quit", Value::Null));
    let done = skiff.finish(EXIT_TIMEOUT);
    done.assert_exit(0);
}

// ---------------------------------------------------------------------------------------------
// Out-of-band execution.
// ---------------------------------------------------------------------------------------------

/// THE KEY TEST. With the main loop blocked (in-band pmemsave to a FIFO nobody reads, so it
/// blocks in open() with the big lock held) and more in-band commands queued behind it, an
/// `exec-oob migrate-pause` is answered at once. Once the FIFO is drained, the in-band
/// replies arrive in order and pmemsave wrote the guest's bytes.
#[test]
fn oob_answered_while_main_loop_blocked() {
    let _t = TestTimer::start("oob_answered_while_main_loop_blocked");
    let dir = TempDir::new("oob-fifo");
    let kernel = pattern_guest(dir.path());
    let vm = Vm::start(dir, &kernel, 1, &[]);
    vm.wait_ready(1);
    let mut c = vm.open(0, true);
    let fifo = vm.dir.join("dump.fifo");
    mkfifo(&fifo);

    vm.ok(c.send(&json!({"execute": "pmemsave", "id": "ib-block",
        "arguments": {"val": DATA_AREA, "size": PATTERN_LEN, "filename": fifo.display().to_string()}})));
    wait_fifo_open_blocked(&vm);
    // More in-band work behind it, including a malformed request (answered in its place).
    let mut queued = Vec::new();
    for req in [
        json!({"execute": "query-name", "id": "ib-1"}),
        json!({"execute": "query-status", "id": "ib-2"}),
        json!({"id": "err-3"}),
        json!({"execute": "stop", "id": "ib-4"}),
        json!({"execute": "query-status", "id": "ib-5"}),
    ] {
        queued.extend(serde_json::to_vec(&req).expect("json"));
    }
    vm.ok(c.send_raw(&queued));
    vm.ok(c.wait_consumed(DEFAULT_TIMEOUT));

    let started = Instant::now();
    vm.ok(c.send_raw(br#"{"exec-oob": "migrate-pause", "id": "oob-1"}"#));
    let line = vm.ok(c.read_line(DEFAULT_TIMEOUT));
    let latency = started.elapsed();
    println!(
        "OOB migrate-pause answered in {:.1} µs while the main loop was blocked",
        latency.as_secs_f64() * 1e6
    );
    assert_eq!(
        line,
        format!(
            "{{\"id\": \"oob-1\", \"error\": {{\"class\": \"GenericError\", \"desc\": \"{MIGRATE_PAUSE_ERROR}\"}}}}"
        ),
        "the first message after the blocked pmemsave must be the OOB reply\n{}",
        c.transcript()
    );
    assert!(
        latency < Duration::from_millis(500),
        "OOB reply took {latency:?}"
    );

    // More OOB: migrate-recover, the pre-3.0 "control" form, a non-OOB command by exec-oob.
    vm.ok(c.send(&json!({"exec-oob": "migrate-recover", "arguments": {"uri": "tcp:127.0.0.1:1"}, "id": "oob-2"})));
    expect_error(
        &vm,
        &mut c,
        Some(&json!("oob-2")),
        "GenericError",
        MIGRATE_RECOVER_ERROR,
    );
    vm.ok(c.send(&json!({"execute": "migrate-pause", "control": {"run-oob": true}, "id": "oob-3"})));
    expect_error(
        &vm,
        &mut c,
        Some(&json!("oob-3")),
        "GenericError",
        MIGRATE_PAUSE_ERROR,
    );
    vm.ok(c.send(&json!({"exec-oob": "query-status", "id": "oob-4"})));
    expect_error(
        &vm,
        &mut c,
        Some(&json!("oob-4")),
        "GenericError",
        "The command query-status does not support OOB",
    );
    // The in-band commands are all still waiting.
    vm.ok(c.expect_silence(QUIET));

    let bytes = drain_fifo(&vm, &fifo, DEFAULT_TIMEOUT);
    assert!(
        bytes == pattern(),
        "pmemsave through the FIFO wrote {} bytes that differ from the guest's pattern",
        bytes.len()
    );
    expect_return(&vm, &mut c, &json!("ib-block"), &json!({}));
    expect_return(&vm, &mut c, &json!("ib-1"), &json!({}));
    expect_return(
        &vm,
        &mut c,
        &json!("ib-2"),
        &json!({"status": "running", "running": true}),
    );
    expect_error(
        &vm,
        &mut c,
        Some(&json!("err-3")),
        "GenericError",
        "QMP input lacks member 'execute'",
    );
    let e = vm.ok(c.read_message(DEFAULT_TIMEOUT));
    assert_event(&vm, &e, "STOP", None);
    expect_return(&vm, &mut c, &json!("ib-4"), &json!({}));
    expect_return(
        &vm,
        &mut c,
        &json!("ib-5"),
        &json!({"status": "paused", "running": false}),
    );
}

/// Flow control with OOB: with the main loop blocked, 7 queued in-band requests still let
/// OOB requests through; the 8th makes the monitor stop reading (the OOB request stays
/// unread in the socket) until the queue drains. Nothing is dropped.
#[test]
fn inband_queue_limit_suspends_reading() {
    let _t = TestTimer::start("inband_queue_limit_suspends_reading");
    let vm = Vm::idle("queue-limit", &[]);
    let mut c = vm.open(0, true);
    let fifo = vm.dir.join("block.fifo");
    mkfifo(&fifo);
    vm.ok(c.send(&json!({"execute": "pmemsave", "id": "block",
        "arguments": {"val": 0, "size": 16, "filename": fifo.display().to_string()}})));
    wait_fifo_open_blocked(&vm);
    for i in 1..=7 {
        vm.ok(c.send(&json!({"execute": "query-name", "id": i})));
    }
    vm.ok(c.wait_consumed(DEFAULT_TIMEOUT));
    vm.ok(c.send(&json!({"exec-oob": "migrate-pause", "id": "oob-7"})));
    expect_error(
        &vm,
        &mut c,
        Some(&json!("oob-7")),
        "GenericError",
        MIGRATE_PAUSE_ERROR,
    );
    // The 8th queued request: reading stops.
    vm.ok(c.send(&json!({"execute": "query-name", "id": 8})));
    vm.ok(c.wait_consumed(DEFAULT_TIMEOUT));
    vm.ok(c.send(&json!({"exec-oob": "migrate-pause", "id": "oob-8"})));
    vm.ok(c.expect_silence(QUIET));
    let unread = c
        .unread_by_server()
        .unwrap_or_else(|e| vm.fail(format!("SIOCOUTQ: {e}")));
    assert!(
        unread > 0,
        "the monitor read the OOB request although 8 in-band requests were queued"
    );

    let drained = drain_fifo(&vm, &fifo, DEFAULT_TIMEOUT);
    assert_eq!(drained.len(), 16);
    // Everything is answered: in-band in order, the OOB reply somewhere once reading resumed.
    let mut inband = Vec::new();
    let mut oob_seen = false;
    while inband.len() < 9 || !oob_seen {
        let msg = vm.ok(c.read_message(DEFAULT_TIMEOUT));
        if msg["id"] == "oob-8" {
            assert_eq!(msg["error"]["desc"], MIGRATE_PAUSE_ERROR);
            oob_seen = true;
        } else {
            assert!(msg.get("return").is_some(), "{msg}");
            inband.push(msg["id"].clone());
        }
    }
    let expected: Vec<Value> = std::iter::once(json!("block"))
        .chain((1..=8).map(|i| json!(i)))
        .collect();
    assert_eq!(inband, expected, "{}", c.transcript());
}

/// A client that disconnects while its command blocks the main loop: the command finishes,
/// its reply and the queued requests are discarded, and the next client starts clean.
#[test]
fn client_disconnect_mid_command() {
    let _t = TestTimer::start("client_disconnect_mid_command");
    let dir = TempDir::new("disconnect");
    let kernel = pattern_guest(dir.path());
    let vm = Vm::start(dir, &kernel, 1, &[]);
    vm.wait_ready(1);
    let mut c = vm.open(0, true);
    let fifo = vm.dir.join("gone.fifo");
    mkfifo(&fifo);
    vm.ok(c.send(&json!({"execute": "pmemsave", "id": "old-block",
        "arguments": {"val": DATA_AREA, "size": PATTERN_LEN, "filename": fifo.display().to_string()}})));
    wait_fifo_open_blocked(&vm);
    vm.ok(c.send(&json!({"execute": "stop", "id": "old-stop"})));
    vm.ok(c.send(&json!({"execute": "query-name", "id": "old-q"})));
    vm.ok(c.wait_consumed(DEFAULT_TIMEOUT));
    drop(c);

    // The new client gets its greeting while the main loop is still blocked.
    let mut c = vm.connect(0);
    expect_line(&vm, &mut c, GREETING);
    let bytes = drain_fifo(&vm, &fifo, DEFAULT_TIMEOUT);
    assert!(bytes == pattern(), "pmemsave output differs");
    vm.ok(c.send(&json!({"execute": "qmp_capabilities", "id": "new"})));
    expect_line(&vm, &mut c, r#"{"return": {}, "id": "new"}"#);
    // The discarded stop never ran.
    vm.ok(c.send(&json!({"execute": "query-status", "id": "new-q"})));
    expect_return(
        &vm,
        &mut c,
        &json!("new-q"),
        &json!({"status": "running", "running": true}),
    );
    vm.ok(c.expect_silence(QUIET));
}

// ---------------------------------------------------------------------------------------------
// Third-party clients, unmodified.
// ---------------------------------------------------------------------------------------------

/// Runs tests/python/`script` with the venv's Python against the monitor of a new idle VM
/// (the socket, then `args`); the script must print `ok` and quit the VM, which must exit
/// with status 0 and remove its socket. Skipped without the venv.
fn run_qemu_qmp_script(test: &'static str, tag: &str, script: &str, args: &[&str], ok: &str) {
    let _t = TestTimer::start(test);
    let Some(python) = venv_bin("python") else {
        common::skipped(format_args!(
            "SKIPPED: {test}: no venv at resources/build/venv (run resources/install-deps.sh)"
        ));
        return;
    };
    let vm = Vm::idle(tag, &[]);
    vm.wait_ready(1);
    let mut cmd = Command::new(python);
    cmd.arg(repo_root().join("tests/python").join(script))
        .arg(&vm.sockets[0])
        .args(args)
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let run = run_tool(cmd, b"", SCRIPT_TIMEOUT);
    if run.status.map(|s| s.success()) != Some(true) || !run.stdout.contains(ok) {
        vm.fail(format!("the qemu.qmp script failed\n{}", run.dump()));
    }
    print!("{}", run.stdout);
    let (done, sockets, _dir) = vm.finish();
    done.assert_exit(0);
    assert!(!sockets[0].exists());
}

/// Python's `qemu.qmp`: QMPClient (negotiates OOB, execute, exec-oob, events, quit) and the
/// legacy synchronous wrapper, from tests/python/qemu_qmp_client.py.
#[test]
fn python_qemu_qmp_client() {
    run_qemu_qmp_script(
        "python_qemu_qmp_client",
        "py-qmp",
        "qemu_qmp_client.py",
        &[],
        "qemu.qmp: OK",
    );
}

/// Python's `qemu.qmp` passing descriptors (tests/python/qemu_qmp_fds.py): the legacy
/// wrapper's and QMPClient's `send_fd_scm`, then getfd, closefd and their errors, an
/// out-of-band migrate-recover refused without using the descriptor up, and a migration into
/// a file Python opened (`migrate fd:NAME`), which must hold a skiff stream. The script passes
/// against QEMU 7.2 `-M none` too (with QEMU's stream magic).
#[test]
fn python_qemu_qmp_passes_descriptors() {
    run_qemu_qmp_script(
        "python_qemu_qmp_passes_descriptors",
        "py-fds",
        "qemu_qmp_fds.py",
        &["SKIFFMIG"],
        "qemu.qmp descriptors: OK",
    );
}

/// `qmp-shell` (QMP and HMP modes) reading commands from stdin.
#[test]
fn python_qmp_shell() {
    let _t = TestTimer::start("python_qmp_shell");
    let Some(shell) = venv_bin("qmp-shell") else {
        common::skipped(format_args!("SKIPPED: python_qmp_shell: no venv at resources/build/venv (run resources/install-deps.sh)"));
        return;
    };
    let vm = Vm::idle("qmp-shell", &["--name", "shell-vm"]);
    vm.wait_ready(1);

    let mut cmd = Command::new(&shell);
    cmd.arg(&vm.sockets[0]);
    let run = run_tool(
        cmd,
        b"query-status\nquery-name\nstop\n\nquery-kvm\n",
        SCRIPT_TIMEOUT,
    );
    let expected = [
        "Welcome to the QMP low-level shell!",
        "Connected to QEMU 9.2.0",
        r#"{"return": {"status": "running", "running": true}}"#,
        r#"{"return": {"name": "shell-vm"}}"#,
        r#"{"return": {}}"#,
        "'event': 'STOP'",
        r#"{"return": {"enabled": true, "present": true}}"#,
    ];
    let mut rest = run.stdout.as_str();
    for needle in expected {
        match rest.find(needle) {
            Some(at) => rest = &rest[at + needle.len()..],
            None => vm.fail(format!(
                "qmp-shell output lacks {needle:?} (in order)\n{}",
                run.dump()
            )),
        }
    }
    if run.status.map(|s| s.success()) != Some(true) {
        vm.fail(format!("qmp-shell failed\n{}", run.dump()));
    }

    // HMP mode, through human-monitor-command.
    let mut cmd = Command::new(&shell);
    cmd.arg("-H").arg(&vm.sockets[0]);
    let run = run_tool(cmd, b"info status\ninfo name\n", SCRIPT_TIMEOUT);
    for needle in ["VM status: paused", "shell-vm"] {
        if !run.stdout.contains(needle) {
            vm.fail(format!(
                "qmp-shell -H output lacks {needle:?}\n{}",
                run.dump()
            ));
        }
    }
    println!("qmp-shell output:\n{}", run.stdout);
}

/// The Rust `qapi` crate's synchronous client: handshake, query-status, query-version, stop,
/// cont (with their events).
#[test]
fn rust_qapi_crate_client() {
    use qapi::qmp;
    let _t = TestTimer::start("rust_qapi_crate_client");
    let vm = Vm::idle("qapi-crate", &[]);
    vm.wait_ready(1);
    let stream = common::process::connect_unix(&vm.sockets[0], START_TIMEOUT)
        .unwrap_or_else(|e| vm.fail(format!("connect: {e}")));
    stream
        .set_read_timeout(Some(DEFAULT_TIMEOUT))
        .expect("read timeout");
    let mut client = qapi::Qmp::from_stream(&stream);
    let info = client
        .handshake()
        .unwrap_or_else(|e| vm.fail(format!("qapi handshake: {e}")));
    assert_eq!(info.version.qemu.major, 9);
    assert_eq!(info.version.qemu.minor, 2);
    assert_eq!(info.version.package, "skiff-0.1.0");
    // (qapi 0.15 models "oob" as a unit variant of an untagged enum, so it lands in Unknown.)
    assert_eq!(info.capabilities.len(), 1);
    assert!(format!("{:?}", info.capabilities[0]).contains("oob"));

    let status = client
        .execute(&qmp::query_status {})
        .unwrap_or_else(|e| vm.fail(format!("query-status: {e}")));
    assert!(status.running);
    assert!(matches!(status.status, qmp::RunState::running));
    let version = client
        .execute(&qmp::query_version {})
        .unwrap_or_else(|e| vm.fail(format!("query-version: {e}")));
    assert_eq!(
        (version.qemu.major, version.qemu.minor, version.qemu.micro),
        (9, 2, 0)
    );

    client
        .execute(&qmp::stop {})
        .unwrap_or_else(|e| vm.fail(format!("stop: {e}")));
    let status = client
        .execute(&qmp::query_status {})
        .unwrap_or_else(|e| vm.fail(format!("query-status: {e}")));
    assert!(!status.running);
    assert!(matches!(status.status, qmp::RunState::paused));
    client
        .execute(&qmp::cont {})
        .unwrap_or_else(|e| vm.fail(format!("cont: {e}")));
    let status = client
        .execute(&qmp::query_status {})
        .unwrap_or_else(|e| vm.fail(format!("query-status: {e}")));
    assert!(matches!(status.status, qmp::RunState::running));
    let events: Vec<String> = client
        .events()
        .map(|e| {
            format!("{:?}", e)
                .split([' ', '(', '{'])
                .next()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(events, ["STOP", "RESUME"], "events seen by qapi");
    let err = client
        .execute(&qmp::migrate_pause {})
        .expect_err("migrate-pause must fail");
    assert_eq!(err.to_string(), MIGRATE_PAUSE_ERROR);
    client
        .execute(&qmp::quit {})
        .unwrap_or_else(|e| vm.fail(format!("quit: {e}")));
    drop(client);
    let (done, _, _dir) = vm.finish();
    done.assert_exit(0);
}

/// `getfd` and `closefd` with descriptors passed by SCM_RIGHTS, with the command itself (as
/// libvirt sends them) or on a lone space before it (as qemu.qmp does): QEMU 7.2's replies
/// and errors, named descriptors per monitor and kept across reconnections, and nothing left
/// open that no command took.
#[test]
fn getfd_and_closefd_over_scm_rights() {
    use common::fd_passing::{peer_closed, probe_pair};
    use std::os::fd::AsRawFd;
    let dir = TempDir::new("qmp-getfd");
    let kernel = idle_guest(dir.path());
    let vm = Vm::start(dir, &kernel, 2, &["--serial", "none"]);
    let mut c = vm.open(0, false);
    let send = |c: &mut QmpClient, text: &str, fd: &std::os::unix::net::UnixStream| {
        common::fd_passing::send_with_fds(c.unix_stream(), text.as_bytes(), &[fd.as_raw_fd()])
            .expect("sendmsg");
    };
    let (r, w) = probe_pair();
    send(
        &mut c,
        r#"{"execute":"getfd","arguments":{"fdname":"a"},"id":1}"#,
        &r,
    );
    drop(r);
    expect_return(&vm, &mut c, &json!(1), &json!({}));
    assert!(!peer_closed(&w), "the monitor keeps it");
    // Another monitor has its own names.
    let mut other = vm.open(1, false);
    let e = vm.ok(other.execute_err("closefd", json!({"fdname": "a"})));
    assert_eq!(e.1, "File descriptor named 'a' not found");
    // Kept across a reconnection, closed by closefd.
    drop(c);
    let mut c = vm.open(0, false);
    vm.ok(c.execute("closefd", json!({"fdname": "a"})));
    assert!(peer_closed(&w));

    let e = vm.ok(c.execute_err("getfd", json!({"fdname": "b"})));
    assert_eq!(e.1, "No file descriptor supplied via SCM_RIGHTS");
    let (r, w) = probe_pair();
    send(
        &mut c,
        r#"{"execute":"getfd","arguments":{"fdname":"1b"},"id":2}"#,
        &r,
    );
    drop(r);
    expect_error(
        &vm,
        &mut c,
        Some(&json!(2)),
        "GenericError",
        "Parameter 'fdname' expects a name not starting with a digit",
    );
    assert!(peer_closed(&w), "the refused descriptor is closed");
    let (r, w) = probe_pair();
    send(&mut c, r#"{"execute":"query-name","id":3}"#, &r);
    drop(r);
    expect_return(&vm, &mut c, &json!(3), &json!({}));
    assert!(peer_closed(&w), "a descriptor no command takes is closed");

    // qemu.qmp's way, and a name used again replaces (and closes) the old descriptor.
    let (r1, w1) = probe_pair();
    let (r2, w2) = probe_pair();
    for r in [&r1, &r2] {
        vm.ok(c.send_fd(r.as_raw_fd()));
        vm.ok(c.execute("getfd", json!({"fdname": "c"})));
    }
    drop((r1, r2));
    assert!(peer_closed(&w1) && !peer_closed(&w2));
    vm.ok(c.execute("closefd", json!({"fdname": "c"})));
    assert!(peer_closed(&w2));
}
