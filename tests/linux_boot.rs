//! Boots the project's Linux guest (`resources/build-guest.sh` builds it) on the real `skiff`
//! binary and checks what the kernel prints on its serial console.
//!
//! On the development machines KVM emulates guest ring-0 code (about 0.4 M instructions/s, see
//! `/work/shared/reference/kvm-here.md`): the kernel reaches `console [ttyS0] enabled` after
//! about 40 s and unpacks the initramfs after about 3 minutes, and Linux user space cannot run
//! at all. [`linux_boots_to_initramfs`] therefore checks everything up to the initramfs, and
//! [`linux_boots_to_init`] (which needs user space) runs only on hardware-assisted KVM.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::process::{Skiff, TestTimer};
use common::repo_root;

/// Overall deadline of the boot up to the initramfs on the emulating KVM.
const INITRAMFS_DEADLINE: Duration = Duration::from_secs(600);
/// Deadline of a boot to /init on a hardware-assisted host.
const INIT_DEADLINE: Duration = Duration::from_secs(120);
/// What the guest's /init prints.
const INIT_MARKER: &str = "SKIFF-GUEST-INIT-OK";

/// The guest artifacts built by `resources/build-guest.sh`.
struct GuestArtifacts {
    vmlinux: PathBuf,
    initramfs: PathBuf,
    cmdline: String,
}

/// Finds the guest artifacts; panics (failing the test) with instructions if one is missing.
fn guest_artifacts() -> GuestArtifacts {
    let root = repo_root();
    let vmlinux = root.join("resources/build/guest/vmlinux");
    let initramfs = root.join("resources/build/guest/initramfs.cpio");
    let cmdline_file = root.join("resources/guest/cmdline");
    let missing: Vec<String> = [&vmlinux, &initramfs, &cmdline_file]
        .iter()
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "guest artifacts missing: {}\nbuild them first with: {}/resources/build-guest.sh \
         (it builds the Linux 6.1 guest kernel and its initramfs)",
        missing.join(", "),
        root.display()
    );
    let cmdline = std::fs::read_to_string(&cmdline_file)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", cmdline_file.display()))
        .trim_end_matches(['\n', '\r'])
        .to_string();
    assert!(
        !cmdline.is_empty() && !cmdline.contains('\n'),
        "{} must hold exactly one non-empty line",
        cmdline_file.display()
    );
    GuestArtifacts {
        vmlinux,
        initramfs,
        cmdline,
    }
}

/// Starts skiff on the guest with 512 MiB, 2 vCPUs, serial console on stdout.
fn boot(guest: &GuestArtifacts, cmdline: &str) -> Skiff {
    Skiff::spawn([
        "--kernel".as_ref(),
        guest.vmlinux.as_os_str(),
        "--initrd".as_ref(),
        guest.initramfs.as_os_str(),
        "--cmdline".as_ref(),
        cmdline.as_ref(),
        "--memory".as_ref(),
        "512M".as_ref(),
        "--cpus".as_ref(),
        "2".as_ref(),
        "--serial".as_ref(),
        "stdio".as_ref(),
    ])
}

/// A line the kernel must print, matched after removing the `\r` of the serial console and
/// any `[    0.000000] ` timestamp.
enum Expect {
    /// The line contains this text.
    Contains(&'static str),
    /// The line contains the first text, and what follows it is exactly the second.
    Exactly(&'static str, String),
}

impl Expect {
    fn matches(&self, line: &str) -> bool {
        match self {
            Expect::Contains(text) => line.contains(text),
            Expect::Exactly(prefix, rest) => line
                .find(prefix)
                .is_some_and(|at| &line[at + prefix.len()..] == rest.as_str()),
        }
    }

    fn describe(&self) -> String {
        match self {
            Expect::Contains(text) => format!("a line containing {text:?}"),
            Expect::Exactly(prefix, rest) => {
                format!("a line ending in {:?}", format!("{prefix}{rest}"))
            }
        }
    }
}

/// Cleans one line of console output as [`Expect`] describes.
fn clean_line(line: &str) -> String {
    let line = line.trim_end_matches('\r');
    // Strip a printk timestamp if CONFIG_PRINTK_TIME is on.
    match (line.starts_with('['), line.find("] ")) {
        (true, Some(end)) => line[end + 2..].to_string(),
        _ => line.to_string(),
    }
}

/// Watches `skiff`'s output and checks `expected` appear in this order (each on a later line
/// than the previous one) before `deadline`. Prints the time each was reached. Kills skiff and
/// panics with its whole output if one is missed.
fn expect_in_order(skiff: &mut Skiff, expected: &[Expect], started: Instant, deadline: Instant) {
    let mut next = 0;
    // Bytes of stdout already split into lines (always just after a newline).
    let mut consumed = 0;
    while next < expected.len() {
        let mut new_lines = String::new();
        let progressed = skiff.wait_stdout(deadline, |out| {
            match out[consumed..].iter().rposition(|&b| b == b'\n') {
                Some(last_newline) => {
                    let end = consumed + last_newline + 1;
                    new_lines = String::from_utf8_lossy(&out[consumed..end]).into_owned();
                    consumed = end;
                    true
                }
                None => false,
            }
        });
        for line in new_lines.lines().map(clean_line) {
            if next < expected.len() && expected[next].matches(&line) {
                eprintln!(
                    "[{:7.1} s] {} -> {line:?}",
                    started.elapsed().as_secs_f64(),
                    expected[next].describe()
                );
                next += 1;
            }
        }
        if next < expected.len() && !progressed {
            let exited = skiff.try_status();
            skiff.kill();
            panic!(
                "after {:.1} s, still waiting for {} ({} of {} milestones met; skiff {})\n{}",
                started.elapsed().as_secs_f64(),
                expected[next].describe(),
                next,
                expected.len(),
                match exited {
                    Some(status) => format!("exited: {status}"),
                    None => "was killed at the deadline".to_string(),
                },
                skiff.dump()
            );
        }
    }
}

/// Boots Linux up to the initramfs, checking the boot protocol, the command line, the e820
/// map, the ACPI tables (MADT CPUs, the power button, the RTC with the host's date), the
/// secondary CPU coming up, the serial console and the initramfs unpacking, in the order the
/// kernel prints them. Stops as soon as
/// the last line is seen.
#[test]
fn linux_boots_to_initramfs() {
    let _t = TestTimer::start("linux_boots_to_initramfs");
    let guest = guest_artifacts();
    let started = Instant::now();
    let mut skiff = boot(&guest, &guest.cmdline);
    let expected = [
        Expect::Contains("Linux version 6.1"),
        Expect::Exactly("Command line: ", guest.cmdline.clone()),
        Expect::Contains("BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable"),
        Expect::Contains("BIOS-e820: [mem 0x000000000009fc00-"),
        Expect::Contains("BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable"),
        // The MP table is found, but with ACPI tables present the MADT describes the CPUs.
        Expect::Contains("found SMP MP-table at [mem 0x0009fc00-0x0009fc0f]"),
        Expect::Contains("ACPI: Using ACPI (MADT) for SMP configuration information"),
        // arch/x86/kernel/smpboot.c, prefill_possible_map().
        Expect::Contains("smpboot: Allowing 2 CPUs, 0 hotplug CPUs"),
        Expect::Contains("printk: console [ttyS0] enabled"),
        Expect::Contains("smp: Brought up 1 node, 2 CPUs"),
        Expect::Contains("Unpacking initramfs"),
        Expect::Contains("Freeing initrd memory"),
        // drivers/acpi/button.c: the DSDT's PNP0C0C device behind the GED.
        Expect::Contains("ACPI: button: Power Button [PWRB]"),
        // drivers/rtc/rtc-cmos.c via the DSDT's PNP0B00, then the RTC core reading the date.
        Expect::Contains("setting system clock to "),
    ];
    expect_in_order(&mut skiff, &expected, started, started + INITRAMFS_DEADLINE);
    // The reserved entry right after the low RAM must say so.
    let out = skiff.stdout_text();
    let reserved = out
        .lines()
        .map(clean_line)
        .find(|l| l.contains("BIOS-e820: [mem 0x000000000009fc00-"));
    assert!(
        reserved.as_deref().is_some_and(|l| l.ends_with("reserved")),
        "the e820 entry at 0x9fc00 should be reserved: {reserved:?}\n{}",
        skiff.dump()
    );
    // The CMOS clock gave the host's real date: the kernel prints it as UNIX seconds.
    let clock = out
        .lines()
        .find_map(|l| l.split("setting system clock to ").nth(1))
        .and_then(|rest| {
            rest.split_once('(')?
                .1
                .split_once(')')?
                .0
                .parse::<u64>()
                .ok()
        });
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    assert!(
        clock.is_some_and(|c| c.abs_diff(now) < 600),
        "the guest's RTC date ({clock:?}) is not the host's ({now})\n{}",
        skiff.dump()
    );
    skiff.kill();
    eprintln!(
        "linux_boots_to_initramfs: all milestones met after {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Boots Linux without ACPI (`acpi=off`), so the kernel takes its CPUs from the VMM's MP
/// table, and checks that both CPUs come up. Stops once they have.
#[test]
fn linux_brings_up_cpus_from_the_mp_table() {
    let _t = TestTimer::start("linux_brings_up_cpus_from_the_mp_table");
    let guest = guest_artifacts();
    let started = Instant::now();
    let cmdline = format!("{} acpi=off", guest.cmdline);
    let mut skiff = boot(&guest, &cmdline);
    let expected = [
        Expect::Exactly("Command line: ", cmdline.clone()),
        // arch/x86/kernel/mpparse.c, after parsing the VMM's MP table.
        Expect::Contains("Processor #0 (Bootup-CPU)"),
        Expect::Contains("Processor #1"),
        Expect::Contains("Processors: 2"),
        Expect::Contains("smp: Brought up 1 node, 2 CPUs"),
    ];
    expect_in_order(&mut skiff, &expected, started, started + INITRAMFS_DEADLINE);
    skiff.kill();
    eprintln!(
        "linux_brings_up_cpus_from_the_mp_table: both CPUs up after {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Boots Linux to its /init, which prints [`INIT_MARKER`]. Needs hardware-assisted KVM.
#[test]
fn linux_boots_to_init() {
    let _t = TestTimer::start("linux_boots_to_init");
    let probe = common::kvm::probe();
    if !probe.hardware_assisted {
        common::skipped(format_args!(
            "SKIPPED: this host's KVM emulates guest code ({:.2} µs per instruction measured), \
             Linux user space cannot run here (see kvm-here.md)",
            probe.us_per_instruction
        ));
        return;
    }
    let guest = guest_artifacts();
    let started = Instant::now();
    let mut skiff = boot(&guest, &guest.cmdline);
    expect_in_order(
        &mut skiff,
        &[
            Expect::Contains("Linux version 6.1"),
            Expect::Contains(INIT_MARKER),
        ],
        started,
        started + INIT_DEADLINE,
    );
    skiff.kill();
}
