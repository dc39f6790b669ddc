//! What kind of KVM this host has.
//!
//! On our development and CI machines KVM is a software nested hypervisor that emulates guest
//! ring-0 code at about 2.3 µs per instruction and cannot run Linux user space (see
//! `/work/shared/reference/kvm-here.md`). Tests that need real guest speed or user space call
//! [`hardware_assisted`] and skip (with `SKIPPED: <reason>` on stderr) when it is false.

use std::sync::OnceLock;
use std::time::Duration;

use iced_x86::code_asm::*;

use super::guest::{write_guest, AsmResult};
use super::process::{run_guest, Finished};
use super::TempDir;

/// Iterations of the calibration loop (2 instructions each).
const LOOP_ITERATIONS: u32 = 100_000;
/// Below this many microseconds per guest instruction, KVM is considered hardware-assisted.
/// Real hardware runs this loop at about a nanosecond per instruction (start-up noise of a few
/// tens of ms adds at most ~0.1 µs here); the emulating KVM of our machines measures 1 to
/// 2.3 µs.
const HARDWARE_THRESHOLD_US: f64 = 0.25;
/// Runs of each calibration guest; the fastest counts.
const RUNS: usize = 3;

/// The result of the calibration.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// Measured guest execution cost, in microseconds per instruction.
    pub us_per_instruction: f64,
    /// Whether that is fast enough to be hardware-assisted virtualization.
    pub hardware_assisted: bool,
}

/// Measures (once per test process) how fast this host's KVM runs guest code.
///
/// Runs a tiny guest doing `dec ecx; jnz` [`LOOP_ITERATIONS`] times and the same guest doing it
/// once, each [`RUNS`] times, and divides the difference of the best wall times by the number of
/// extra instructions, so that the VMM's start-up cost cancels out. Panics (failing the test)
/// if the guests do not run.
pub fn probe() -> Probe {
    static PROBE: OnceLock<Probe> = OnceLock::new();
    *PROBE.get_or_init(|| {
        let dir = TempDir::new("kvm-probe");
        let best = |iterations: u32| -> Duration {
            let kernel = write_guest(dir.path(), &format!("loop-{iterations}"), |a| {
                calibration_loop(a, iterations)
            });
            (0..RUNS)
                .map(|_| {
                    let done: Finished =
                        run_guest(&kernel, &["--serial", "none"], Duration::from_secs(120));
                    done.assert_exit(0);
                    done.elapsed
                })
                .min()
                .expect("at least one run")
        };
        let base = best(1);
        let long = best(LOOP_ITERATIONS + 1);
        let instructions = 2.0 * f64::from(LOOP_ITERATIONS);
        let us_per_instruction =
            (long.as_secs_f64() - base.as_secs_f64()).max(0.0) * 1e6 / instructions;
        let probe = Probe {
            us_per_instruction,
            hardware_assisted: us_per_instruction < HARDWARE_THRESHOLD_US,
        };
        eprintln!(
            "KVM probe: {:.4} µs per guest instruction ({} vs {} ms for {} extra instructions): {}",
            probe.us_per_instruction,
            long.as_millis(),
            base.as_millis(),
            instructions,
            if probe.hardware_assisted {
                "hardware-assisted"
            } else {
                "emulated"
            }
        );
        probe
    })
}

/// Whether this host's KVM runs guest code at hardware speed (see [`probe`]).
pub fn hardware_assisted() -> bool {
    probe().hardware_assisted
}

/// `ecx = iterations; do { ecx -= 1 } while ecx != 0;` then exit 0.
fn calibration_loop(a: &mut super::guest::Asm, iterations: u32) -> AsmResult {
    let mut again = a.create_label();
    a.mov(ecx, iterations)?;
    a.set_label(&mut again)?;
    a.dec(ecx)?;
    a.jnz(again)?;
    a.exit(0)
}
