//! Live migration on the real /dev/kvm: two skiff processes, the migration test guest
//! (tests/common/migration_guest.rs), and QMP as QEMU's own migration tests drive it.

mod common;

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::migration_guest::{
    check_guest_ram, pass_counter, write_migration_guest, MIG_END, MIG_START,
};
use common::process::{Skiff, TestTimer};
use common::qmp_client::QmpClient;
use common::TempDir;

/// How long to wait for a guest or a migration step; generous for the loaded, emulated host.
const TIMEOUT: Duration = Duration::from_secs(60);

/// One skiff process with its QMP monitor.
struct Vmm {
    skiff: Skiff,
    qmp: QmpClient,
}

fn start_vmm(dir: &TempDir, name: &str, kernel: &Path, extra: &[&str]) -> Vmm {
    let socket = dir.join(&format!("{name}.qmp"));
    let mut args = vec![
        "--kernel".to_string(),
        kernel.display().to_string(),
        "--qmp".to_string(),
        format!("unix:{}", socket.display()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let skiff = Skiff::spawn(args);
    let qmp = QmpClient::open_unix(&socket, true, TIMEOUT)
        .unwrap_or_else(|e| panic!("{name} QMP: {e}\n{}", skiff.dump()));
    Vmm { skiff, qmp }
}

impl Vmm {
    fn exec(&mut self, name: &str, args: Value) -> Value {
        self.qmp
            .execute(name, args)
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", self.skiff.dump()))
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

    fn read_range(&mut self, dir: &TempDir, name: &str) -> Vec<u8> {
        let file = dir.join(name);
        self.exec(
            "pmemsave",
            json!({"val": MIG_START, "size": MIG_END - MIG_START,
                   "filename": file.display().to_string()}),
        );
        std::fs::read(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()))
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

#[test]
fn precopy_over_unix_socket() {
    let _t = TestTimer::start("precopy_over_unix_socket");
    let dir = TempDir::new("mig-precopy-unix");
    let kernel = write_migration_guest(dir.path(), "guest.elf");
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
    let info = src.wait_migration(&["completed"]);
    eprintln!("source: {info}");
    assert_eq!(src.status(), "postmigrate");
    dest.wait_migration(&["completed"]);
    assert_eq!(dest.status(), "running");
    check_destination_runs(&mut dest, &dir);
}
