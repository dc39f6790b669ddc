//! Start-up and memory benchmark: `cargo bench -p skiff --bench startup`.
//!
//! Prints, as medians over several runs on this host:
//! - process start to the first byte a tiny guest writes to COM1 (Skiff);
//! - the VMM's own memory: resident set minus the resident guest RAM, for a 256 MiB guest
//!   idling after its first byte (Skiff), beside `qemu-system-x86_64 -M microvm -accel kvm
//!   -m 256` idling with the same memory in the same run.
//!
//! Figures, not pass/fail: machines here are shared and noisy, so read medians and ratios.

#[path = "common/mod.rs"]
mod common;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::bench::median;
use common::guest::write_guest;
use common::process::resident_kib;
use common::TempDir;

const START_RUNS: usize = 30;
const MEMORY_RUNS: usize = 5;
const GUEST_RAM_KIB: u64 = 256 * 1024;
/// How long a VMM idles before its memory is read.
const SETTLE: Duration = Duration::from_millis(1500);

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let rank = ((values.len() as f64 - 1.0) * p).round() as usize;
    values[rank]
}

fn spawn_skiff(kernel: &std::path::Path) -> Child {
    Command::new(common::skiff_bin())
        .arg("--kernel")
        .arg(kernel)
        .args(["--memory", "256M"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start skiff")
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn qemu_available() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn main() {
    let dir = TempDir::new("bench-startup");
    let kernel = write_guest(dir.path(), "first-byte.elf", |a| {
        a.print("X")?;
        a.halt_forever()
    });

    let mut start_ms = Vec::with_capacity(START_RUNS);
    for _ in 0..START_RUNS {
        let begin = Instant::now();
        let mut child = spawn_skiff(&kernel);
        let mut byte = [0u8; 1];
        let got = child.stdout.as_mut().map(|out| out.read_exact(&mut byte));
        let elapsed = begin.elapsed();
        stop(child);
        match got {
            Some(Ok(())) if byte[0] == b'X' => start_ms.push(elapsed.as_secs_f64() * 1e3),
            other => panic!("the guest did not write its byte: {other:?}"),
        }
    }

    let mut skiff_overhead = Vec::with_capacity(MEMORY_RUNS);
    let mut skiff_total = Vec::with_capacity(MEMORY_RUNS);
    for _ in 0..MEMORY_RUNS {
        let mut child = spawn_skiff(&kernel);
        let mut byte = [0u8; 1];
        if let Some(out) = child.stdout.as_mut() {
            let _ = out.read_exact(&mut byte);
        }
        sleep(SETTLE);
        let (total, guest) =
            resident_kib(child.id(), GUEST_RAM_KIB).expect("cannot read skiff's smaps");
        stop(child);
        skiff_overhead.push((total - guest) as f64 / 1024.0);
        skiff_total.push(total as f64 / 1024.0);
    }

    let mut qemu_overhead = Vec::with_capacity(MEMORY_RUNS);
    if qemu_available() {
        for _ in 0..MEMORY_RUNS {
            let child = Command::new("qemu-system-x86_64")
                .args(["-M", "microvm", "-accel", "kvm", "-m", "256"])
                .args(["-nodefaults", "-no-user-config", "-display", "none"])
                .args(["-serial", "none"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("cannot start qemu");
            sleep(SETTLE);
            let usage = resident_kib(child.id(), GUEST_RAM_KIB);
            stop(child);
            if let Some((total, guest)) = usage {
                qemu_overhead.push((total - guest) as f64 / 1024.0);
            }
        }
    }

    println!("startup benchmark ({START_RUNS} start runs, {MEMORY_RUNS} memory runs each)");
    println!(
        "  skiff start to first guest serial byte: median {:.2} ms, p90 {:.2} ms (target < 10 ms)",
        median(&start_ms),
        percentile(&mut start_ms, 0.9)
    );
    let ours = median(&skiff_overhead);
    println!(
        "  skiff VMM memory overhead (RSS - guest RAM), 256 MiB guest: median {ours:.2} MiB (RSS {:.2} MiB; target < 5 MiB)",
        median(&skiff_total)
    );
    if qemu_overhead.is_empty() {
        println!("  qemu microvm: not measured (qemu-system-x86_64 not installed or failed)");
    } else {
        let theirs = median(&qemu_overhead);
        println!(
            "  qemu -M microvm -accel kvm -m 256 overhead: median {theirs:.2} MiB; skiff/qemu = {:.3} (target < 0.1)",
            ours / theirs
        );
    }
}
