//! Integration tests that boot tiny 64-bit guests, assembled here with iced-x86, on the real
//! `skiff` binary (and, for pause/resume, the `skiff` library in-process) on `/dev/kvm`.
//!
//! Each guest executes at most a few thousand instructions: on the development machines KVM
//! emulates guest ring-0 code at about 2.3 µs per instruction. Every `skiff` run has a hard
//! timeout after which it is killed, and every failure message includes everything the VMM
//! printed.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;

use common::elf::{self, LOAD_ADDR};
use common::guest::{
    self, ap_trampoline, write_guest, Asm, AsmResult, Image, AP_SIPI_VECTOR, AP_TRAMPOLINE_ADDR,
    CMOS_BOOT_COUNTER, DATA_AREA, UNEXPECTED_VECTOR_EXIT,
};
use common::migration_guest::{
    check_guest_ram, migration_guest, pass_counter, write_migration_guest, MIG_END,
    MIG_HEARTBEAT_PASSES, MIG_PAGES, MIG_PAGE_SIZE, MIG_PASS_COUNTER_OFFSET,
    MIG_REPORTED_BAD_PAGES, MIG_START,
};
use common::process::{connect_unix, read_until, run, run_guest, Skiff, TestTimer};
use common::qmp_client::QmpClient;
use common::TempDir;

/// Hard timeout of a tiny guest run (they normally end in well under a second).
const GUEST_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Self-tests of the helpers (no KVM needed).
// ---------------------------------------------------------------------------------------------

/// The ELF writer produces one PT_LOAD segment at 0x100000 holding exactly the code.
#[test]
fn helper_elf_layout() {
    let mut a = Asm::new64();
    a.print("x").unwrap();
    a.exit(0).unwrap();
    let code = a.assemble(LOAD_ADDR);
    let file = elf::elf64_executable(&code, 0);
    let parsed = elf::parse(&file);
    assert_eq!(parsed.entry, LOAD_ADDR);
    assert_eq!(
        parsed.segments,
        vec![(1, 0x1000, LOAD_ADDR, code.len() as u64, code.len() as u64)]
    );
    assert_eq!(&file[0x1000..], &code[..]);
}

/// GDT descriptors match the well-known flat descriptors, and the trampoline fits its page.
#[test]
fn helper_gdt_and_trampoline() {
    // Flat 64-bit code (0x00af9a000000ffff) and flat data (0x00cf92000000ffff).
    assert_eq!(
        guest::segment_descriptor(0, 0xf_ffff, 0x9a, 0xa),
        0x00af_9a00_0000_ffff
    );
    assert_eq!(
        guest::segment_descriptor(0, 0xf_ffff, 0x92, 0xc),
        0x00cf_9200_0000_ffff
    );
    let tramp = ap_trampoline(LOAD_ADDR);
    assert!(
        tramp.len() > 0x300 && tramp.len() <= 0x400,
        "{}",
        tramp.len()
    );
    // GDTR at +0x100: limit of 4 entries, base at +0x108.
    assert_eq!(&tramp[0x100..0x102], &31u16.to_le_bytes());
    assert_eq!(
        &tramp[0x102..0x106],
        &((AP_TRAMPOLINE_ADDR + 0x108) as u32).to_le_bytes()
    );
}

/// Synthetic RAM images for [`check_guest_ram`]: `values[i]` is the first byte of page `i`; the
/// rest of each page holds a filler the check must ignore.
fn synthetic_ram(values: &[u8]) -> Vec<u8> {
    let page = MIG_PAGE_SIZE as usize;
    let mut mem = vec![0xa5u8; values.len() * page];
    for (i, v) in values.iter().enumerate() {
        mem[i * page] = *v;
    }
    mem
}

/// `check_guest_ram` accepts a finished pass and one cursor edge (also across 255 -> 0), and
/// rejects stale pages, a second edge, a step the wrong way and malformed lengths.
#[test]
fn helper_check_guest_ram() {
    // Good: a whole pass done (all equal), and mid-pass (v + 1 before the cursor, v after).
    check_guest_ram(&synthetic_ram(&[7; 64])).unwrap();
    check_guest_ram(&synthetic_ram(&[8, 8, 8, 7, 7, 7])).unwrap();
    // The edge at the very first or last page.
    check_guest_ram(&synthetic_ram(&[8, 7, 7, 7])).unwrap();
    check_guest_ram(&synthetic_ram(&[8, 8, 8, 7])).unwrap();
    // Wrapped: pages before the cursor went 255 -> 0.
    check_guest_ram(&synthetic_ram(&[0, 0, 0, 255, 255])).unwrap();
    check_guest_ram(&synthetic_ram(&[255; 3])).unwrap();

    // One stale page (lost dirty page) two passes behind: itself and the step back up.
    let err = check_guest_ram(&synthetic_ram(&[9, 9, 9, 7, 9, 9])).unwrap_err();
    assert!(err.contains("2 bad page(s) of 6"), "{err}");
    assert!(
        err.contains("page 3 (offset 0x3000, guest 0x403000)"),
        "{err}"
    );
    // One stale page one pass behind in a finished pass: looks like an edge, then the step
    // back up is bad (QEMU's rule).
    let err = check_guest_ram(&synthetic_ram(&[9, 9, 8, 9, 9])).unwrap_err();
    assert!(err.contains("1 bad page(s)"), "{err}");
    assert!(err.contains("page 3 "), "{err}");
    // Two edges: the second is bad.
    let err = check_guest_ram(&synthetic_ram(&[9, 9, 8, 8, 7, 7])).unwrap_err();
    assert!(err.contains("1 bad page(s)"), "{err}");
    assert!(err.contains("page 4 "), "{err}");
    // A step up (a page ahead of the cursor) is never an edge.
    let err = check_guest_ram(&synthetic_ram(&[7, 7, 8, 8])).unwrap_err();
    assert!(err.contains("1 bad page(s)"), "{err}");
    // Only the first ten bad pages are listed, then the count of the others.
    let noisy: Vec<u8> = (0..40).map(|i| if i % 2 == 0 { 1 } else { 50 }).collect();
    let err = check_guest_ram(&synthetic_ram(&noisy)).unwrap_err();
    assert!(err.contains("39 bad page(s) of 40"), "{err}");
    assert_eq!(
        err.matches("\n  page ").count(),
        MIG_REPORTED_BAD_PAGES,
        "{err}"
    );
    assert!(err.ends_with("... and 29 more"), "{err}");
    // Lengths that are not whole pages.
    assert!(check_guest_ram(&[]).is_err());
    assert!(check_guest_ram(&[0; 4097]).is_err());
}

/// The migration guest's layout constants agree with each other.
#[test]
fn helper_migration_guest_layout() {
    assert_eq!(MIG_PAGES, 1024);
    assert_eq!(MIG_PASS_COUNTER_OFFSET, 8);
    let mut mem = vec![0u8; MIG_PAGE_SIZE as usize];
    mem[8..16].copy_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes());
    assert_eq!(pass_counter(&mem), 0x0102_0304_0506_0708);
    // The guest assembles.
    let mut a = Asm::new64();
    migration_guest(&mut a).unwrap();
    assert!(!a.assemble(LOAD_ADDR).is_empty());
}

/// `Image::place` pads gaps with zeros.
#[test]
fn helper_image_layout() {
    let mut image = Image::new();
    image.place(LOAD_ADDR, &[1, 2]).place(LOAD_ADDR + 8, &[3]);
    assert_eq!(image.bytes(), &[1, 2, 0, 0, 0, 0, 0, 0, 3]);
}

/// Documents whether this host's KVM serves repeated vCPU faults on userfaultfd-registered
/// guest RAM (what postcopy migration's destination needs). Always passes; read its output
/// with `--nocapture`. kvm-here.md predicts `Ok(false)` on our software-nested development
/// hosts; measured `Ok(true)` in both scopes (see `common::kvm::userfault_probe`).
#[test]
fn host_userfaultfd_vcpu_faults() {
    use common::kvm::{userfault_probe, userfault_vcpu_faults_work, UffdProbeScope};
    for scope in [UffdProbeScope::DataPages, UffdProbeScope::AllRam] {
        eprintln!("host: {scope:?} missing: {:?}", userfault_probe(scope));
    }
    let result = userfault_vcpu_faults_work();
    eprintln!("host: a vCPU runs on userfaultfd-served RAM: {result:?}");
}

// ---------------------------------------------------------------------------------------------
// 1. Serial output and the exit device.
// ---------------------------------------------------------------------------------------------

/// The guest prints a line on COM1 and exits 0 through port 0x501.
#[test]
fn serial_output_and_exit_0() {
    let _t = TestTimer::start("serial_output_and_exit_0");
    let dir = TempDir::new("hello");
    let kernel = write_guest(dir.path(), "hello.elf", |a| {
        a.print("Hello from a tiny guest!\n")?;
        a.exit(0)
    });
    let done = run_guest(&kernel, &[], GUEST_TIMEOUT);
    done.assert_exit(0);
    done.assert_stdout("Hello from a tiny guest!\n");
}

/// With `--serial file:PATH` the guest's output goes to the file, not stdout.
#[test]
fn serial_output_to_file() {
    let _t = TestTimer::start("serial_output_to_file");
    let dir = TempDir::new("serial-file");
    let kernel = write_guest(dir.path(), "hello.elf", |a| {
        a.print("to the file\n")?;
        a.exit(0)
    });
    let log = dir.join("serial.log");
    let serial_arg = format!("file:{}", log.display());
    let done = run_guest(&kernel, &["--serial", &serial_arg], GUEST_TIMEOUT);
    done.assert_exit(0);
    done.assert_stdout("");
    let written = std::fs::read_to_string(&log)
        .unwrap_or_else(|e| panic!("reading {}: {e}\n{}", log.display(), done.dump()));
    assert_eq!(written, "to the file\n", "{}", done.dump());
}

/// The byte written to port 0x501 becomes skiff's exit status.
#[test]
fn exit_device_status_reaches_process() {
    let _t = TestTimer::start("exit_device_status_reaches_process");
    let dir = TempDir::new("exit-code");
    for code in [3u8, 42, 255] {
        let kernel = write_guest(dir.path(), &format!("exit-{code}.elf"), |a| {
            a.print(&format!("exiting with {code}\n"))?;
            a.exit(code)
        });
        let done = run_guest(&kernel, &[], GUEST_TIMEOUT);
        done.assert_exit(i32::from(code));
        done.assert_stdout(&format!("exiting with {code}\n"));
    }
}

// ---------------------------------------------------------------------------------------------
// 2, 3. Serial input.
// ---------------------------------------------------------------------------------------------

/// A guest that echoes every byte it receives on COM1 (polling LSR.DR) until it receives
/// `q` (not echoed), then exits 0.
fn write_echo_guest(dir: &Path) -> PathBuf {
    write_guest(dir, "echo.elf", |a| {
        let mut poll = a.create_label();
        let mut quit = a.create_label();
        a.set_label(&mut poll)?;
        a.mov(dx, u32::from(guest::COM1_LSR))?;
        a.in_(al, dx)?;
        a.test(al, 1)?; // LSR.DR: data ready
        a.jz(poll)?;
        a.mov(dx, u32::from(guest::COM1))?;
        a.in_(al, dx)?;
        a.cmp(al, i32::from(b'q'))?;
        a.je(quit)?;
        a.out(dx, al)?;
        a.jmp(poll)?;
        a.set_label(&mut quit)?;
        a.exit(0)
    })
}

/// Bytes written to skiff's stdin reach the guest's COM1 receiver, and its echo comes back on
/// stdout.
#[test]
fn serial_input_echo_over_stdin() {
    let _t = TestTimer::start("serial_input_echo_over_stdin");
    let dir = TempDir::new("echo-stdin");
    let kernel = write_echo_guest(dir.path());
    let done = run(
        [
            "--kernel".as_ref(),
            kernel.as_os_str(),
            "--serial".as_ref(),
            "stdio".as_ref(),
        ],
        b"hello q",
        GUEST_TIMEOUT,
    );
    done.assert_exit(0);
    done.assert_stdout("hello ");
}

/// With `--serial unix:PATH`, a client connecting to PATH gets the guest's output and feeds
/// its input.
#[test]
fn serial_input_echo_over_unix_socket() {
    let _t = TestTimer::start("serial_input_echo_over_unix_socket");
    let dir = TempDir::new("echo-unix");
    let kernel = write_echo_guest(dir.path());
    let socket = dir.join("serial.sock");
    let serial_arg = format!("unix:{}", socket.display());
    let skiff = Skiff::spawn([
        "--kernel".as_ref(),
        kernel.as_os_str(),
        "--serial".as_ref(),
        serial_arg.as_ref(),
    ]);
    let mut stream = connect_unix(&socket, Duration::from_secs(10)).unwrap_or_else(|e| {
        panic!(
            "could not connect to {}: {e}\n{}",
            socket.display(),
            skiff.dump()
        )
    });
    stream
        .write_all(b"hello q")
        .unwrap_or_else(|e| panic!("writing to the serial socket: {e}\n{}", skiff.dump()));
    let echoed = read_until(&mut stream, Instant::now() + GUEST_TIMEOUT, |got| {
        got.len() >= b"hello ".len()
    });
    let done = skiff.finish(GUEST_TIMEOUT);
    assert_eq!(
        String::from_utf8_lossy(&echoed),
        "hello ",
        "unexpected echo on the serial socket\n{}",
        done.dump()
    );
    done.assert_exit(0);
}

// ---------------------------------------------------------------------------------------------
// 4. SMP: the BSP starts the APs with INIT/SIPI.
// ---------------------------------------------------------------------------------------------

/// Spin lock serialising COM1 output between CPUs.
const PRINT_LOCK: u64 = DATA_AREA;
/// Number of APs that have printed.
const APS_DONE: u64 = DATA_AREA + 8;
/// Guest physical address of the AP 64-bit entry code in the image.
const AP_MAIN: u64 = LOAD_ADDR + 0x1000;
/// Guest physical address of the trampoline's bytes in the image (copied to 0x8000 by the BSP).
const TRAMPOLINE_IN_IMAGE: u64 = LOAD_ADDR + 0x2000;

/// Prints `cpu <APIC id in r12d>\n` under the print lock.
fn print_cpu_line(a: &mut Asm) -> AsmResult {
    a.spin_lock(PRINT_LOCK)?;
    a.print("cpu ")?;
    a.mov(eax, r12d)?;
    a.put_digit_al()?;
    a.print("\n")?;
    a.spin_unlock(PRINT_LOCK)
}

/// Builds the SMP guest for `cpus` vCPUs: every CPU prints `cpu <APIC id>`, then the BSP
/// prints `all <cpus> cpus up` once every AP has reported, and exits 0.
fn write_smp_guest(dir: &Path, cpus: u8) -> PathBuf {
    let trampoline = ap_trampoline(AP_MAIN);
    let build = || -> AsmResult<Image> {
        // BSP.
        let mut a = Asm::new64();
        let mut wait = a.create_label();
        a.copy_memory(TRAMPOLINE_IN_IMAGE, AP_TRAMPOLINE_ADDR, trampoline.len())?;
        a.lapic_id_eax()?;
        a.mov(r12d, eax)?;
        print_cpu_line(&mut a)?;
        a.start_aps(AP_SIPI_VECTOR)?;
        a.mov(rbx, APS_DONE)?;
        a.set_label(&mut wait)?;
        a.cmp(dword_ptr(rbx), i32::from(cpus) - 1)?;
        a.jb(wait)?;
        a.print(&format!("all {cpus} cpus up\n"))?;
        a.exit(0)?;
        let bsp = a.assemble(LOAD_ADDR);

        // APs, entered from the trampoline with the APIC id in edi and a private stack.
        let mut a = Asm::new64();
        a.mov(r12d, edi)?;
        print_cpu_line(&mut a)?;
        a.mov(rbx, APS_DONE)?;
        a.lock().inc(dword_ptr(rbx))?;
        a.halt_forever()?;
        let ap = a.assemble(AP_MAIN);

        let mut image = Image::new();
        image
            .place(LOAD_ADDR, &bsp)
            .place(AP_MAIN, &ap)
            .place(TRAMPOLINE_IN_IMAGE, &trampoline);
        Ok(image)
    };
    build()
        .unwrap_or_else(|e| panic!("building the SMP guest: {e}"))
        .write(&dir.join(format!("smp-{cpus}.elf")))
}

/// Boots the SMP guest on `cpus` vCPUs and checks every APIC id 0..cpus was printed once.
fn check_smp(cpus: u8) {
    let dir = TempDir::new("smp");
    let kernel = write_smp_guest(dir.path(), cpus);
    let cpus_arg = cpus.to_string();
    let done = run_guest(&kernel, &["--cpus", &cpus_arg], GUEST_TIMEOUT);
    done.assert_exit(0);
    let lines: Vec<&str> = done.stdout.lines().collect();
    let last = format!("all {cpus} cpus up");
    assert_eq!(
        lines.last().copied(),
        Some(last.as_str()),
        "BSP did not finish last\n{}",
        done.dump()
    );
    let cpu_lines = &lines[..lines.len() - 1];
    let ids: BTreeSet<&str> = cpu_lines.iter().copied().collect();
    let expected: BTreeSet<String> = (0..cpus).map(|id| format!("cpu {id}")).collect();
    let expected: BTreeSet<&str> = expected.iter().map(String::as_str).collect();
    assert!(
        cpu_lines.len() == usize::from(cpus) && ids == expected,
        "expected each of {expected:?} exactly once\n{}",
        done.dump()
    );
}

/// Two vCPUs: the BSP brings up the AP.
#[test]
fn smp_2_cpus_report_apic_ids() {
    let _t = TestTimer::start("smp_2_cpus_report_apic_ids");
    check_smp(2);
}

/// Four vCPUs: the BSP brings up three APs at once.
#[test]
fn smp_4_cpus_report_apic_ids() {
    let _t = TestTimer::start("smp_4_cpus_report_apic_ids");
    check_smp(4);
}

// ---------------------------------------------------------------------------------------------
// 5. Reset.
// ---------------------------------------------------------------------------------------------

/// How the reset guest resets the machine.
#[derive(Clone, Copy)]
enum ResetMethod {
    /// i8042 command 0xfe.
    I8042,
    /// `ud2` with the boot protocol's empty IDT: #UD → #GP → #DF → triple fault.
    TripleFault,
}

/// A guest that counts its boots in CMOS RAM, prints `boot <n>`, and resets with `method`
/// until the count reaches `last_boot`, then exits 0.
fn write_reset_guest(dir: &Path, method: ResetMethod, last_boot: u8) -> PathBuf {
    write_guest(dir, "reset.elf", |a| {
        let mut done = a.create_label();
        a.cmos_read(CMOS_BOOT_COUNTER)?;
        a.inc(al)?;
        a.mov(bl, al)?;
        a.cmos_write_bl(CMOS_BOOT_COUNTER)?;
        a.print("boot ")?;
        a.mov(al, bl)?;
        a.put_digit_al()?;
        a.print("\n")?;
        a.cmp(bl, i32::from(last_boot))?;
        a.jae(done)?;
        match method {
            ResetMethod::I8042 => a.i8042_reset()?,
            ResetMethod::TripleFault => {
                a.ud2()?;
                a.halt_forever()?;
            }
        }
        a.set_label(&mut done)?;
        a.exit(0)
    })
}

/// i8042 resets re-boot the guest; CMOS RAM survives, so it sees boots 1, 2, 3.
#[test]
fn reset_i8042_reboots_guest() {
    let _t = TestTimer::start("reset_i8042_reboots_guest");
    let dir = TempDir::new("reset");
    let kernel = write_reset_guest(dir.path(), ResetMethod::I8042, 3);
    let done = run_guest(&kernel, &[], GUEST_TIMEOUT);
    done.assert_exit(0);
    done.assert_stdout("boot 1\nboot 2\nboot 3\n");
}

/// With `--no-reboot`, the first i8042 reset ends skiff with status 0.
#[test]
fn reset_i8042_with_no_reboot_exits_0() {
    let _t = TestTimer::start("reset_i8042_with_no_reboot_exits_0");
    let dir = TempDir::new("reset-noreboot");
    let kernel = write_reset_guest(dir.path(), ResetMethod::I8042, 3);
    let done = run_guest(&kernel, &["--no-reboot"], GUEST_TIMEOUT);
    done.assert_exit(0);
    done.assert_stdout("boot 1\n");
}

/// A triple fault re-boots the guest too.
#[test]
fn triple_fault_reboots_guest() {
    let _t = TestTimer::start("triple_fault_reboots_guest");
    let dir = TempDir::new("triple");
    let kernel = write_reset_guest(dir.path(), ResetMethod::TripleFault, 2);
    let done = run_guest(&kernel, &[], GUEST_TIMEOUT);
    done.assert_exit(0);
    done.assert_stdout("boot 1\nboot 2\n");
}

/// With `--no-reboot`, a triple fault ends skiff with status 0.
#[test]
fn triple_fault_with_no_reboot_exits_0() {
    let _t = TestTimer::start("triple_fault_with_no_reboot_exits_0");
    let dir = TempDir::new("triple-noreboot");
    let kernel = write_reset_guest(dir.path(), ResetMethod::TripleFault, 2);
    let done = run_guest(&kernel, &["--no-reboot"], GUEST_TIMEOUT);
    done.assert_exit(0);
    done.assert_stdout("boot 1\n");
}

// ---------------------------------------------------------------------------------------------
// 6. Unmapped PIO and MMIO.
// ---------------------------------------------------------------------------------------------

/// A port no Skiff device decodes.
const UNMAPPED_PORT: u16 = 0x1230;
/// An address in the 3-4 GiB device gap with nothing mapped.
const UNMAPPED_MMIO: u64 = 0xd000_0000;

/// What each exit code of the unmapped-I/O guest means.
const UNMAPPED_CHECKS: &[(u8, &str)] = &[
    (10, "8-bit IN from an unmapped port != 0xff"),
    (11, "16-bit IN from an unmapped port != 0xffff"),
    (12, "32-bit IN from an unmapped port != 0xffffffff"),
    (
        13,
        "32-bit IN after OUTs to the unmapped port != 0xffffffff",
    ),
    (
        14,
        "32-bit MMIO read at 0xd0000000 (after a write) != 0xffffffff",
    ),
    (15, "8-bit MMIO read at 0xd0000000 != 0xff"),
    (16, "16-bit MMIO read at 0xd0000000 != 0xffff"),
    (
        17,
        "64-bit MMIO read at 0xd0000000 (after a write) != all ones",
    ),
];

/// Unmapped port reads return all ones by size, unmapped MMIO reads return all ones, writes
/// to either are ignored. The guest exits with a distinct code per failed check.
#[test]
fn unmapped_pio_and_mmio_read_all_ones() {
    let _t = TestTimer::start("unmapped_pio_and_mmio_read_all_ones");
    let dir = TempDir::new("unmapped");
    let kernel = write_guest(dir.path(), "unmapped.elf", |a| {
        let mut fails: Vec<(u8, CodeLabel)> = UNMAPPED_CHECKS
            .iter()
            .map(|&(code, _)| (code, a.create_label()))
            .collect();
        let fail = |code: u8| fails.iter().find(|f| f.0 == code).expect("known check").1;

        a.mov(dx, u32::from(UNMAPPED_PORT))?;
        a.xor(eax, eax)?;
        a.in_(al, dx)?;
        a.cmp(eax, 0xff)?;
        a.jne(fail(10))?;
        a.xor(eax, eax)?;
        a.in_(ax, dx)?;
        a.cmp(eax, 0xffff)?;
        a.jne(fail(11))?;
        a.xor(eax, eax)?;
        a.in_(eax, dx)?;
        a.cmp(eax, -1)?;
        a.jne(fail(12))?;
        a.mov(eax, 0x1234_5678)?;
        a.out(dx, al)?;
        a.out(dx, ax)?;
        a.out(dx, eax)?;
        a.xor(eax, eax)?;
        a.in_(eax, dx)?;
        a.cmp(eax, -1)?;
        a.jne(fail(13))?;

        a.mov(rbx, UNMAPPED_MMIO)?;
        a.mov(dword_ptr(rbx), 0x1234_5678)?;
        a.xor(eax, eax)?;
        a.mov(eax, dword_ptr(rbx))?;
        a.cmp(eax, -1)?;
        a.jne(fail(14))?;
        a.movzx(eax, byte_ptr(rbx))?;
        a.cmp(eax, 0xff)?;
        a.jne(fail(15))?;
        a.movzx(eax, word_ptr(rbx))?;
        a.cmp(eax, 0xffff)?;
        a.jne(fail(16))?;
        a.mov(byte_ptr(rbx), 0x5a)?;
        a.xor(eax, eax)?;
        a.mov(qword_ptr(rbx), rax)?;
        a.mov(rax, qword_ptr(rbx))?;
        a.cmp(rax, -1)?;
        a.jne(fail(17))?;

        a.print("unmapped I/O ok\n")?;
        a.exit(0)?;
        for (code, label) in fails.iter_mut() {
            a.set_label(label)?;
            a.exit(*code)?;
        }
        Ok(())
    });
    let done = run_guest(&kernel, &[], GUEST_TIMEOUT);
    if let Some(&(code, what)) = UNMAPPED_CHECKS
        .iter()
        .find(|&&(code, _)| done.code() == Some(i32::from(code)))
    {
        panic!("guest check {code} failed: {what}\n{}", done.dump());
    }
    done.assert_exit(0);
    done.assert_stdout("unmapped I/O ok\n");
}

// ---------------------------------------------------------------------------------------------
// Interrupts: the in-kernel PIT through the IOAPIC to the BSP's local APIC.
// ---------------------------------------------------------------------------------------------

/// Vector the timer interrupt is routed to.
const TIMER_VECTOR: u8 = 0x30;
/// Ticks counted by the timer handler.
const TICKS: u64 = DATA_AREA + 0x10;
/// Ticks the guest waits for.
const WANTED_TICKS: i32 = 5;
/// Exit status of the TSC-deadline timer guest when the CPU does not offer that mode.
const NO_TSC_DEADLINE_EXIT: u8 = 78;

/// Where the timer interrupts of the timer guest come from.
#[derive(Clone, Copy, Debug)]
enum TimerSource {
    /// The in-kernel PIT (channel 0, mode 2, 100 Hz) through this IOAPIC pin.
    PitThroughIoapic(u8),
    /// The local APIC timer in TSC-deadline mode (what Linux uses when the CPU has it),
    /// re-armed 3 M TSC cycles (about 1 ms) ahead before each wait.
    LapicTscDeadline,
}

/// A guest that takes [`WANTED_TICKS`] timer interrupts from `source` on [`TIMER_VECTOR`],
/// waiting for each with `sti; hlt` and acknowledging it with a LAPIC EOI, then exits 0. The
/// 8259 PICs are masked. Any other vector exits with [`UNEXPECTED_VECTOR_EXIT`]; the spurious
/// vector 0xff is ignored.
fn write_timer_guest(dir: &Path, source: TimerSource) -> PathBuf {
    let timer_handler = |a: &mut Asm| -> AsmResult<Vec<(u8, CodeLabel)>> {
        let mut timer = a.create_label();
        a.set_label(&mut timer)?;
        a.push(rax)?;
        a.push(rbx)?;
        a.mov(rbx, TICKS)?;
        a.lock().inc(qword_ptr(rbx))?;
        a.lapic_eoi()?;
        a.pop(rbx)?;
        a.pop(rax)?;
        a.iretq()?;
        Ok(vec![(TIMER_VECTOR, timer)])
    };
    let main = |a: &mut Asm| -> AsmResult {
        let mut wait = a.create_label();
        // Timer interrupts must arrive only the tested way: the 8259 PICs are masked.
        a.setup_interrupts()?;
        match source {
            TimerSource::PitThroughIoapic(pin) => {
                a.ioapic_route(pin, TIMER_VECTOR)?;
                // PIT channel 0, lobyte/hibyte, mode 2 (rate generator), divisor 11932.
                a.mov(al, 0x34)?;
                a.out(0x43, al)?;
                a.mov(al, 11932 & 0xff)?;
                a.out(0x40, al)?;
                a.mov(al, 11932 >> 8)?;
                a.out(0x40, al)?;
                a.mov(rbx, TICKS)?;
                a.set_label(&mut wait)?;
                a.sti()?;
                a.hlt()?;
            }
            TimerSource::LapicTscDeadline => {
                // CPUID.01H:ECX[24]: TSC-deadline mode supported?
                let mut supported = a.create_label();
                a.mov(eax, 1)?;
                a.cpuid()?;
                a.bt(ecx, 24)?;
                a.jc(supported)?;
                a.exit(NO_TSC_DEADLINE_EXIT)?;
                a.set_label(&mut supported)?;
                // LVT timer: vector, unmasked, mode 0b10 = TSC deadline.
                a.mov(rbx, guest::LAPIC_BASE + 0x320)?;
                a.mov(dword_ptr(rbx), i32::from(TIMER_VECTOR) | (0b10 << 17))?;
                a.set_label(&mut wait)?;
                // IA32_TSC_DEADLINE = TSC + 3 M cycles (about 1 ms at a few GHz).
                a.rdtsc()?;
                a.shl(rdx, 32)?;
                a.or(rax, rdx)?;
                a.add(rax, 3_000_000)?;
                a.mov(rdx, rax)?;
                a.shr(rdx, 32)?;
                a.mov(ecx, 0x6e0)?;
                a.wrmsr()?;
                a.mov(rbx, TICKS)?;
                a.sti()?;
                a.hlt()?;
            }
        }
        a.cmp(qword_ptr(rbx), WANTED_TICKS)?;
        a.jb(wait)?;
        a.cli()?;
        a.print(&format!("{WANTED_TICKS} timer interrupts\n"))?;
        a.exit(0)
    };
    guest::write_interrupt_guest(dir, "timer.elf", timer_handler, main)
}

/// Boots the timer guest for `source` and checks it counted its ticks.
fn check_timer(source: TimerSource) {
    let dir = TempDir::new("timer");
    let kernel = write_timer_guest(dir.path(), source);
    let done = run_guest(&kernel, &[], GUEST_TIMEOUT);
    if done.code() == Some(i32::from(NO_TSC_DEADLINE_EXIT)) {
        common::skipped(format_args!(
            "SKIPPED: the guest CPU does not report TSC-deadline timer support"
        ));
        return;
    }
    if done.code() == Some(i32::from(UNEXPECTED_VECTOR_EXIT)) {
        panic!(
            "{source:?}: the guest took an unexpected interrupt or exception\n{}",
            done.dump()
        );
    }
    done.assert_exit(0);
    done.assert_stdout(&format!("{WANTED_TICKS} timer interrupts\n"));
}

/// The in-kernel PIT interrupts the BSP through the IOAPIC pin the MP table gives for IRQ 0
/// (pin 0, KVM's default GSI routing).
#[test]
fn pit_timer_interrupts_through_ioapic() {
    let _t = TestTimer::start("pit_timer_interrupts_through_ioapic");
    check_timer(TimerSource::PitThroughIoapic(0));
}

/// The local APIC timer in TSC-deadline mode interrupts the vCPU. Linux uses it as its tick
/// (instead of the PIT) whenever the CPU reports TSC-deadline support.
#[test]
fn lapic_tsc_deadline_timer_interrupts() {
    let _t = TestTimer::start("lapic_tsc_deadline_timer_interrupts");
    check_timer(TimerSource::LapicTscDeadline);
}

// ---------------------------------------------------------------------------------------------
// 7. KVM internal error (emulation failure).
// ---------------------------------------------------------------------------------------------

/// Formats `bytes` as lowercase hex with `sep` between bytes.
fn hex(bytes: &[u8], sep: &str) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(sep)
}

/// An instruction this host's KVM cannot emulate ends skiff with status 1 and one stderr
/// line with the exit reason, `rip=0x...` and the instruction bytes. On a hardware-assisted
/// host the instruction simply runs, and there is nothing to check.
#[test]
fn emulation_failure_reports_internal_error() {
    let _t = TestTimer::start("emulation_failure_reports_internal_error");
    let dir = TempDir::new("internal-error");
    let mut a = Asm::new64();
    let mut insn = a.create_label();
    let mut after = a.create_label();
    let build = |a: &mut Asm, insn: &mut CodeLabel, after: &mut CodeLabel| -> AsmResult {
        a.print("before\n")?;
        a.set_label(insn)?;
        a.popcnt(eax, ebx)?;
        a.set_label(after)?;
        a.print("survived\n")?;
        a.exit(0)
    };
    build(&mut a, &mut insn, &mut after).expect("building the popcnt guest");
    let (code, addrs) = a.assemble_with_labels(LOAD_ADDR, &[insn, after]);
    let (rip, end) = (addrs[0], addrs[1]);
    let insn_bytes = &code[(rip - LOAD_ADDR) as usize..(end - LOAD_ADDR) as usize];
    let kernel = Image::new()
        .place(LOAD_ADDR, &code)
        .write(&dir.join("popcnt.elf"));

    let done = run_guest(&kernel, &[], GUEST_TIMEOUT);
    if done.code() == Some(0) && done.stdout == "before\nsurvived\n" {
        common::skipped(format_args!(
            "SKIPPED: this host's KVM executed popcnt natively (hardware-assisted), so there is \
             no emulation failure to observe"
        ));
        return;
    }
    done.assert_exit(1);
    done.assert_stdout("before\n");
    let line = done
        .stderr
        .lines()
        .find(|l| l.contains("rip="))
        .unwrap_or_else(|| panic!("no stderr line with rip=\n{}", done.dump()));
    let rip_text = line
        .split("rip=")
        .nth(1)
        .and_then(|r| r.strip_prefix("0x"))
        .map(|r| {
            r.chars()
                .take_while(char::is_ascii_hexdigit)
                .collect::<String>()
        })
        .unwrap_or_default();
    assert_eq!(
        u64::from_str_radix(&rip_text, 16).ok(),
        Some(rip),
        "expected rip={rip:#x} in {line:?}\n{}",
        done.dump()
    );
    let lower = line.to_ascii_lowercase();
    assert!(
        ["", " ", ", ", ":"]
            .iter()
            .any(|sep| lower.contains(&hex(insn_bytes, sep))),
        "expected the instruction bytes {} in {line:?}\n{}",
        hex(insn_bytes, " "),
        done.dump()
    );
    assert!(
        lower.contains("internal") || lower.contains("emulation"),
        "expected the exit reason (internal error / emulation failure) in {line:?}\n{}",
        done.dump()
    );
}

// ---------------------------------------------------------------------------------------------
// 8. Pause / resume through the library.
// ---------------------------------------------------------------------------------------------

/// Where the counting guest keeps its counter.
const COUNTER_GPA: u64 = 0x20_0000;

/// A guest that increments the 64-bit counter at [`COUNTER_GPA`] forever.
fn write_counter_guest(dir: &Path) -> PathBuf {
    write_guest(dir, "counter.elf", |a| {
        let mut again = a.create_label();
        a.mov(rbx, COUNTER_GPA)?;
        a.set_label(&mut again)?;
        a.inc(qword_ptr(rbx))?;
        a.jmp(again)
    })
}

/// A VM running on its own thread, driven through its controller.
struct InProcessVm {
    controller: skiff::VmController,
    thread: Option<JoinHandle<Result<i32, String>>>,
}

impl InProcessVm {
    /// Creates the VM for `kernel` (serial output off) and runs it on a new thread.
    fn start(kernel: PathBuf, start_paused: bool) -> InProcessVm {
        let (tx, rx) = mpsc::channel();
        let thread = thread::spawn(move || {
            let mut config = skiff::VmConfig::new(kernel);
            config.serial = skiff::SerialConfig::None;
            config.start_paused = start_paused;
            let vmm = match skiff::Vmm::new(config) {
                Ok(vmm) => vmm,
                Err(e) => {
                    let msg = format!("Vmm::new failed: {e}");
                    let _ = tx.send(Err(msg.clone()));
                    return Err(msg);
                }
            };
            let _ = tx.send(Ok(vmm.controller()));
            vmm.run().map_err(|e| format!("Vmm::run failed: {e}"))
        });
        let controller = match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(controller)) => controller,
            Ok(Err(msg)) => panic!("{msg}"),
            Err(e) => panic!("the VMM thread did not hand over its controller: {e}"),
        };
        InProcessVm {
            controller,
            thread: Some(thread),
        }
    }

    /// The guest's counter.
    fn counter(&self) -> u64 {
        let mut buf = [0u8; 8];
        self.controller
            .read_guest_memory(COUNTER_GPA, &mut buf)
            .expect("read_guest_memory");
        u64::from_le_bytes(buf)
    }

    /// Waits until the counter exceeds `than`; returns its value. Panics after `timeout`.
    fn wait_counter_above(&self, than: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.counter();
            if value > than {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "guest counter stuck at {value} (state {})",
                self.controller.run_state().as_str()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Quits the VM and returns what `run()` returned. Panics if it takes over 10 s.
    fn quit(mut self) -> Result<i32, String> {
        self.controller.quit();
        let thread = self.thread.take().expect("not joined yet");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !thread.is_finished() {
            assert!(
                Instant::now() < deadline,
                "run() did not return within 10 s of quit()"
            );
            thread::sleep(Duration::from_millis(5));
        }
        thread.join().expect("VMM thread panicked")
    }
}

impl Drop for InProcessVm {
    fn drop(&mut self) {
        if self.thread.is_some() {
            // A failed assertion: stop the VM so its vCPU threads do not outlive the test.
            self.controller.quit();
        }
    }
}

/// Pausing stops the guest (its counter does not move, state "paused"); resuming continues it;
/// quit() makes run() return Ok(0).
#[test]
fn library_pause_resume() {
    let _t = TestTimer::start("library_pause_resume");
    let dir = TempDir::new("pause");
    let vm = InProcessVm::start(write_counter_guest(dir.path()), false);
    vm.wait_counter_above(0, Duration::from_secs(10));
    assert_eq!(vm.controller.run_state().as_str(), "running");

    vm.controller.pause().expect("pause");
    assert_eq!(vm.controller.run_state().as_str(), "paused");
    let first = vm.counter();
    thread::sleep(Duration::from_millis(200));
    let second = vm.counter();
    assert_eq!(first, second, "the counter moved while paused");
    assert_eq!(vm.controller.run_state().as_str(), "paused");

    vm.controller.resume().expect("resume");
    vm.wait_counter_above(second, Duration::from_secs(10));
    assert_eq!(vm.controller.run_state().as_str(), "running");
    assert_eq!(vm.quit(), Ok(0));
}

/// With start_paused the guest does not run (counter 0, state "prelaunch") until resume().
#[test]
fn library_start_paused() {
    let _t = TestTimer::start("library_start_paused");
    let dir = TempDir::new("prelaunch");
    let vm = InProcessVm::start(write_counter_guest(dir.path()), true);
    thread::sleep(Duration::from_millis(300));
    let early = vm.counter();
    assert_eq!(
        early,
        0,
        "the guest ran before resume(): counter {early}, run state {}",
        vm.controller.run_state().as_str()
    );
    assert_eq!(vm.controller.run_state().as_str(), "prelaunch");

    vm.controller.resume().expect("resume");
    vm.wait_counter_above(0, Duration::from_secs(10));
    assert_eq!(vm.controller.run_state().as_str(), "running");
    assert_eq!(vm.quit(), Ok(0));
}

// ---------------------------------------------------------------------------------------------
// 9. Command-line errors.
// ---------------------------------------------------------------------------------------------

/// Hard timeout of a run that should fail on its command line.
const CLI_TIMEOUT: Duration = Duration::from_secs(20);

/// A guest that would exit 0 at once if it were (wrongly) started.
fn write_exit0_guest(dir: &Path) -> PathBuf {
    write_guest(dir, "exit0.elf", |a| a.exit(0))
}

/// A kernel path that does not exist: clean one-line error.
#[test]
fn cli_missing_kernel_file() {
    let _t = TestTimer::start("cli_missing_kernel_file");
    let dir = TempDir::new("cli-missing");
    let missing = dir.join("no-such-kernel");
    let done = run(["--kernel".as_ref(), missing.as_os_str()], b"", CLI_TIMEOUT);
    done.assert_clean_error();
    assert!(
        done.stderr.contains("no-such-kernel"),
        "the error should name the file\n{}",
        done.dump()
    );
}

/// `--memory 12Q`: clean one-line error naming the value.
#[test]
fn cli_bad_memory_size() {
    let _t = TestTimer::start("cli_bad_memory_size");
    let dir = TempDir::new("cli-memory");
    let kernel = write_exit0_guest(dir.path());
    let done = run_guest(&kernel, &["--memory", "12Q"], CLI_TIMEOUT);
    done.assert_clean_error();
    assert!(
        done.stderr.contains("12Q"),
        "the error should name the value\n{}",
        done.dump()
    );
}

/// `--cpus 0`: clean one-line error.
#[test]
fn cli_zero_cpus() {
    let _t = TestTimer::start("cli_zero_cpus");
    let dir = TempDir::new("cli-cpus0");
    let kernel = write_exit0_guest(dir.path());
    let done = run_guest(&kernel, &["--cpus", "0"], CLI_TIMEOUT);
    done.assert_clean_error();
}

/// `--cpus 33`: clean one-line error naming the value.
#[test]
fn cli_too_many_cpus() {
    let _t = TestTimer::start("cli_too_many_cpus");
    let dir = TempDir::new("cli-cpus33");
    let kernel = write_exit0_guest(dir.path());
    let done = run_guest(&kernel, &["--cpus", "33"], CLI_TIMEOUT);
    done.assert_clean_error();
    assert!(
        done.stderr.contains("33"),
        "the error should name the value\n{}",
        done.dump()
    );
}

// ---------------------------------------------------------------------------------------------
// The migration test guest (QEMU's a-b guest), run without migrating.
// ---------------------------------------------------------------------------------------------

/// How long the migration guest runs before it is stopped.
const MIG_GUEST_RUN: Duration = Duration::from_secs(2);

/// Reads the walked range of a stopped guest with `pmemsave` into `dir/name`.
fn pmemsave_range(skiff: &Skiff, qmp: &mut QmpClient, dir: &TempDir, name: &str) -> Vec<u8> {
    let file = dir.join(name);
    qmp.execute(
        "pmemsave",
        serde_json::json!({"val": MIG_START, "size": MIG_END - MIG_START,
            "filename": file.display().to_string()}),
    )
    .unwrap_or_else(|e| panic!("pmemsave: {e}\n{}", skiff.dump()));
    let mem = std::fs::read(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
    assert_eq!(mem.len() as u64, MIG_END - MIG_START, "pmemsave size");
    mem
}

/// The migration guest runs about 2 s, is stopped with QMP `stop`, and its range (read with
/// `pmemsave`) passes `check_guest_ram`; it made progress, printed `A` then one `B` per
/// MIG_HEARTBEAT_PASSES passes, and stays unchanged while stopped. Prints the time per pass.
#[test]
fn migration_guest_ram_is_consistent() {
    let _t = TestTimer::start("migration_guest_ram_is_consistent");
    let dir = TempDir::new("mig-guest");
    let kernel = write_migration_guest(dir.path(), "migration.elf");
    let socket = dir.join("qmp.sock");
    let skiff = Skiff::spawn([
        "--kernel".to_string(),
        kernel.display().to_string(),
        "--qmp".to_string(),
        format!("unix:{}", socket.display()),
    ]);
    let mut qmp = QmpClient::open_unix(&socket, false, GUEST_TIMEOUT)
        .unwrap_or_else(|e| panic!("QMP: {e}\n{}", skiff.dump()));
    assert!(
        skiff.wait_stdout_contains("A", Instant::now() + GUEST_TIMEOUT),
        "the guest did not print A\n{}",
        skiff.dump()
    );
    let started = Instant::now();
    thread::sleep(MIG_GUEST_RUN);
    qmp.execute("stop", serde_json::Value::Null)
        .unwrap_or_else(|e| panic!("stop: {e}\n{}", skiff.dump()));
    let ran = started.elapsed();

    let mem = pmemsave_range(&skiff, &mut qmp, &dir, "ram-1.bin");
    thread::sleep(Duration::from_millis(200));
    let again = pmemsave_range(&skiff, &mut qmp, &dir, "ram-2.bin");
    assert!(
        mem == again,
        "guest RAM changed while stopped\n{}",
        skiff.dump()
    );
    if let Err(report) = check_guest_ram(&mem) {
        panic!("{report}\n{}", skiff.dump());
    }

    let passes = pass_counter(&mem);
    assert!(
        passes > 0,
        "the guest made no complete pass\n{}",
        skiff.dump()
    );
    // Stopped between passes (first byte = passes) or mid-pass (first byte = passes + 1).
    let first = mem[0];
    assert!(
        first == passes as u8 || first == (passes as u8).wrapping_add(1),
        "first byte {first} does not match {passes} passes"
    );
    // One 'B' per MIG_HEARTBEAT_PASSES passes (the stop may fall between the count and the 'B').
    let beats = passes / MIG_HEARTBEAT_PASSES;
    let expected = |out: &[u8]| {
        let b = out.iter().filter(|c| **c == b'B').count() as u64;
        b == beats || b + 1 == beats
    };
    assert!(
        skiff.wait_stdout(Instant::now() + Duration::from_secs(2), expected),
        "expected A then {beats} B for {passes} passes\n{}",
        skiff.dump()
    );
    assert!(skiff.stdout_text().starts_with('A'), "{}", skiff.dump());
    eprintln!(
        "migration guest: {passes} passes of {MIG_PAGES} pages in {:.3} s: {:.2} ms per pass",
        ran.as_secs_f64(),
        ran.as_secs_f64() * 1e3 / passes as f64
    );
}
