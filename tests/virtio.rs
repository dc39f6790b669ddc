//! Integration tests of the virtio devices on the real `skiff` binary and `/dev/kvm`.
//!
//! The tiny guest drives the virtio-mmio registers itself: it checks each device's identity
//! registers, brings up one virtqueue on the RNG and on the disk, kicks them (the write to
//! `QueueNotify` lands in an ioeventfd, served by the event loop) and waits with `sti; hlt`
//! for the devices' interrupts (irqfds through the IOAPIC), then checks the used rings and
//! prints what it read. It also prints the kernel command line the VMM wrote, with its
//! `virtio_mmio.device=` entries.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use iced_x86::code_asm::*;

use common::guest::{self, Asm, AsmResult, DATA_AREA, UNEXPECTED_VECTOR_EXIT};
use common::process::{run, run_guest, TestTimer};
use common::qmp_client::QmpClient;
use common::TempDir;
use serde_json::json;

/// Hard timeout of a tiny guest run.
const GUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// First virtio-mmio window (the disk) and its GSI.
const DISK_BASE: u64 = 0xc000_1000;
const DISK_GSI: u8 = 5;
/// Second window (the RNG) and its GSI.
const RNG_BASE: u64 = 0xc000_2000;
const RNG_GSI: u8 = 6;
/// Interrupt vectors the guest routes the two GSIs to.
const DISK_VECTOR: u8 = 0x41;
const RNG_VECTOR: u8 = 0x40;

/// Where the kernel command line is (the VMM's layout).
const CMDLINE: u64 = 0x20000;
/// Per-device counters: interrupts taken, and the last InterruptStatus read.
const RNG_IRQS: u64 = DATA_AREA;
const RNG_ISR: u64 = DATA_AREA + 0x8;
const DISK_IRQS: u64 = DATA_AREA + 0x10;
const DISK_ISR: u64 = DATA_AREA + 0x18;
/// Virtqueues: descriptor table, available ring, used ring (a page each), then buffers.
const RNG_QUEUE: u64 = 0x40_0000;
const DISK_QUEUE: u64 = 0x41_0000;
/// The RNG's 16-byte buffer.
const RNG_BUF: u64 = 0x42_0000;
/// The disk request: header (16 bytes), data (512 bytes), status (1 byte).
const DISK_HDR: u64 = 0x43_0000;
const DISK_DATA: u64 = 0x43_1000;
const DISK_STATUS: u64 = 0x43_2000;
/// Bytes the guest prints from the disk's first sector.
const DISK_TEXT_LEN: usize = 16;

// virtio-mmio registers.
const REG_MAGIC: u64 = 0x00;
const REG_VERSION: u64 = 0x04;
const REG_DEVICE_ID: u64 = 0x08;
const REG_DEVICE_FEATURES: u64 = 0x10;
const REG_DEVICE_FEATURES_SEL: u64 = 0x14;
const REG_DRIVER_FEATURES: u64 = 0x20;
const REG_DRIVER_FEATURES_SEL: u64 = 0x24;
const REG_QUEUE_SEL: u64 = 0x30;
const REG_QUEUE_NUM_MAX: u64 = 0x34;
const REG_QUEUE_NUM: u64 = 0x38;
const REG_QUEUE_READY: u64 = 0x44;
const REG_QUEUE_NOTIFY: u64 = 0x50;
const REG_INTERRUPT_STATUS: u64 = 0x60;
const REG_INTERRUPT_ACK: u64 = 0x64;
const REG_STATUS: u64 = 0x70;
const REG_QUEUE_DESC: u64 = 0x80;
const REG_QUEUE_AVAIL: u64 = 0x90;
const REG_QUEUE_USED: u64 = 0xa0;
const QUEUE_SIZE: u32 = 8;

/// `[addr] = value` (32 bits). Clobbers `rbx`.
fn write32(a: &mut Asm, addr: u64, value: u32) -> AsmResult {
    a.mov(rbx, addr)?;
    a.mov(dword_ptr(rbx), value)
}

/// `eax = [addr]` (32 bits). Clobbers `rbx`.
fn read32(a: &mut Asm, addr: u64) -> AsmResult {
    a.mov(rbx, addr)?;
    a.mov(eax, dword_ptr(rbx))
}

/// Exits with `code` unless the flags say equal.
fn check_eq(a: &mut Asm, code: u8) -> AsmResult {
    let mut ok = a.create_label();
    a.je(ok)?;
    a.exit(code)?;
    a.set_label(&mut ok)?;
    a.nop()
}

/// Exits with `code` unless `eax == value`.
fn expect_eax(a: &mut Asm, value: u32, code: u8) -> AsmResult {
    a.cmp(eax, value)?;
    check_eq(a, code)
}

/// Checks a device's MagicValue, Version and DeviceID; exit codes `code`..`code + 2`.
fn check_identity(a: &mut Asm, base: u64, device_id: u32, code: u8) -> AsmResult {
    read32(a, base + REG_MAGIC)?;
    expect_eax(a, 0x7472_6976, code)?;
    read32(a, base + REG_VERSION)?;
    expect_eax(a, 2, code + 1)?;
    read32(a, base + REG_DEVICE_ID)?;
    expect_eax(a, device_id, code + 2)
}

/// Initialises a device (virtio 1.2 section 3.1.1) with queue 0 at `queue` (descriptors,
/// then the available and used rings a page apart) and sets DRIVER_OK. Exit codes
/// `code`..`code + 3`.
fn init_device(a: &mut Asm, base: u64, queue: u64, code: u8) -> AsmResult {
    write32(a, base + REG_STATUS, 0)?;
    write32(a, base + REG_STATUS, 1)?; // ACKNOWLEDGE
    write32(a, base + REG_STATUS, 3)?; // DRIVER
    write32(a, base + REG_DEVICE_FEATURES_SEL, 1)?;
    read32(a, base + REG_DEVICE_FEATURES)?;
    a.and(eax, 1)?; // VIRTIO_F_VERSION_1 (bit 32)
    expect_eax(a, 1, code)?;
    write32(a, base + REG_DRIVER_FEATURES_SEL, 1)?;
    write32(a, base + REG_DRIVER_FEATURES, 1)?;
    write32(a, base + REG_DRIVER_FEATURES_SEL, 0)?;
    write32(a, base + REG_DRIVER_FEATURES, 0)?;
    write32(a, base + REG_STATUS, 0xb)?; // FEATURES_OK
    read32(a, base + REG_STATUS)?;
    expect_eax(a, 0xb, code + 1)?;
    write32(a, base + REG_QUEUE_SEL, 0)?;
    read32(a, base + REG_QUEUE_NUM_MAX)?;
    a.cmp(eax, QUEUE_SIZE)?;
    let mut big_enough = a.create_label();
    a.jae(big_enough)?;
    a.exit(code + 2)?;
    a.set_label(&mut big_enough)?;
    write32(a, base + REG_QUEUE_NUM, QUEUE_SIZE)?;
    for (reg, addr) in [
        (REG_QUEUE_DESC, queue),
        (REG_QUEUE_AVAIL, queue + 0x1000),
        (REG_QUEUE_USED, queue + 0x2000),
    ] {
        write32(a, base + reg, addr as u32)?;
        write32(a, base + reg + 4, 0)?;
    }
    write32(a, base + REG_QUEUE_READY, 1)?;
    write32(a, base + REG_STATUS, 0xf)?; // DRIVER_OK
    read32(a, base + REG_STATUS)?;
    expect_eax(a, 0xf, code + 3)
}

/// Writes descriptor `index` of the table at `queue`. Clobbers `rbx`.
fn descriptor(
    a: &mut Asm,
    queue: u64,
    index: u64,
    buf: u64,
    len: u32,
    flags: u32,
    next: u32,
) -> AsmResult {
    a.mov(rbx, queue + 16 * index)?;
    a.mov(qword_ptr(rbx), buf as i32)?;
    a.mov(dword_ptr(rbx + 8), len)?;
    a.mov(word_ptr(rbx + 12), flags)?;
    a.mov(word_ptr(rbx + 14), next)
}

/// Makes descriptor chain 0 available (first entry of the available ring) and kicks queue 0.
fn kick(a: &mut Asm, base: u64, queue: u64) -> AsmResult {
    a.mov(rbx, queue + 0x1000)?;
    a.mov(word_ptr(rbx), 0u32)?; // flags: interrupts wanted
    a.mov(word_ptr(rbx + 4), 0u32)?; // ring[0] = head 0
    a.mov(word_ptr(rbx + 2), 1u32)?; // idx = 1
    write32(a, base + REG_QUEUE_NOTIFY, 0)
}

/// Waits with `sti; hlt` until the counter at `irqs` is non-zero, then checks the used ring
/// holds one element for head 0 of `len` bytes and the handler saw the used-buffer bit.
/// Exit codes `code`..`code + 2`.
fn wait_used(a: &mut Asm, irqs: u64, isr: u64, queue: u64, len: u32, code: u8) -> AsmResult {
    let mut wait = a.create_label();
    let mut done = a.create_label();
    a.mov(rbx, irqs)?;
    a.set_label(&mut wait)?;
    a.cli()?;
    a.cmp(qword_ptr(rbx), 0)?;
    a.jne(done)?;
    a.sti()?;
    a.hlt()?;
    a.jmp(wait)?;
    a.set_label(&mut done)?;
    a.mov(rbx, queue + 0x2000)?;
    a.movzx(eax, word_ptr(rbx + 2))?; // used idx
    expect_eax(a, 1, code)?;
    a.mov(rbx, queue + 0x2000)?;
    a.mov(eax, dword_ptr(rbx + 8))?; // used ring[0].len
    expect_eax(a, len, code + 1)?;
    read32(a, isr)?;
    a.and(eax, 1)?;
    expect_eax(a, 1, code + 2)
}

/// An interrupt handler for the device at `base`: records InterruptStatus, acknowledges it,
/// counts the interrupt and sends the LAPIC EOI.
fn irq_handler(a: &mut Asm, base: u64, irqs: u64, isr: u64) -> AsmResult {
    a.push(rax)?;
    a.push(rbx)?;
    read32(a, base + REG_INTERRUPT_STATUS)?;
    a.mov(rbx, isr)?;
    a.mov(dword_ptr(rbx), eax)?;
    a.mov(rbx, base + REG_INTERRUPT_ACK)?;
    a.mov(dword_ptr(rbx), eax)?;
    a.mov(rbx, irqs)?;
    a.lock().inc(qword_ptr(rbx))?;
    a.lapic_eoi()?;
    a.pop(rbx)?;
    a.pop(rax)?;
    a.iretq()
}

/// Prints the NUL-terminated string at `addr`. Clobbers `al`, `dx`, `rsi`.
fn print_cstr(a: &mut Asm, addr: u64) -> AsmResult {
    let mut next = a.create_label();
    let mut end = a.create_label();
    a.mov(rsi, addr)?;
    a.set_label(&mut next)?;
    a.mov(al, byte_ptr(rsi))?;
    a.test(al, al)?;
    a.jz(end)?;
    a.putc_al()?;
    a.inc(rsi)?;
    a.jmp(next)?;
    a.set_label(&mut end)?;
    a.nop()
}

/// Prints `len` bytes at `addr`. Clobbers `al`, `ecx`, `dx`, `rsi`.
fn print_bytes(a: &mut Asm, addr: u64, len: usize) -> AsmResult {
    let mut next = a.create_label();
    a.mov(rsi, addr)?;
    a.mov(ecx, len as u32)?;
    a.set_label(&mut next)?;
    a.mov(al, byte_ptr(rsi))?;
    a.putc_al()?;
    a.inc(rsi)?;
    a.dec(ecx)?;
    a.jnz(next)
}

/// The main program: see the module documentation. Exits 0 at the end, or halts if `halt`.
fn main_code(a: &mut Asm, halt: bool) -> AsmResult {
    a.setup_interrupts()?;
    a.print("cmdline: ")?;
    print_cstr(a, CMDLINE)?;
    a.print("\n")?;
    check_identity(a, DISK_BASE, 2, 10)?;
    a.print("virtio-blk at 0xc0001000\n")?;
    check_identity(a, RNG_BASE, 4, 13)?;
    a.print("virtio-rng at 0xc0002000\n")?;
    a.ioapic_route(RNG_GSI, RNG_VECTOR)?;
    a.ioapic_route(DISK_GSI, DISK_VECTOR)?;

    // virtio-rng: one 16-byte device-writable buffer.
    init_device(a, RNG_BASE, RNG_QUEUE, 20)?;
    descriptor(a, RNG_QUEUE, 0, RNG_BUF, 16, 2, 0)?;
    kick(a, RNG_BASE, RNG_QUEUE)?;
    wait_used(a, RNG_IRQS, RNG_ISR, RNG_QUEUE, 16, 30)?;
    a.mov(rbx, RNG_BUF)?;
    a.mov(rax, qword_ptr(rbx))?;
    a.or(rax, qword_ptr(rbx + 8))?;
    a.cmp(rax, 0)?;
    let mut random = a.create_label();
    a.jne(random)?;
    a.exit(33)?;
    a.set_label(&mut random)?;
    a.print("rng: 16 bytes, interrupt taken\n")?;

    // virtio-blk: read sector 0 (header, 512-byte data buffer, status byte).
    init_device(a, DISK_BASE, DISK_QUEUE, 40)?;
    a.mov(rbx, DISK_HDR)?;
    a.mov(qword_ptr(rbx), 0)?; // type IN, reserved
    a.mov(qword_ptr(rbx + 8), 0)?; // sector 0
    a.mov(rbx, DISK_STATUS)?;
    a.mov(byte_ptr(rbx), 0xff)?;
    descriptor(a, DISK_QUEUE, 0, DISK_HDR, 16, 1, 1)?;
    descriptor(a, DISK_QUEUE, 1, DISK_DATA, 512, 3, 2)?;
    descriptor(a, DISK_QUEUE, 2, DISK_STATUS, 1, 2, 0)?;
    kick(a, DISK_BASE, DISK_QUEUE)?;
    wait_used(a, DISK_IRQS, DISK_ISR, DISK_QUEUE, 513, 50)?;
    a.mov(rbx, DISK_STATUS)?;
    a.movzx(eax, byte_ptr(rbx))?;
    expect_eax(a, 0, 53)?;
    a.print("disk: ")?;
    print_bytes(a, DISK_DATA, DISK_TEXT_LEN)?;
    a.print("\n")?;
    if halt {
        a.halt_forever()
    } else {
        a.exit(0)
    }
}

/// Builds the guest image: main program, handlers and IDT.
fn write_virtio_guest(dir: &Path, halt: bool) -> PathBuf {
    write_guest_with_handlers(dir, "virtio.elf", |a| main_code(a, halt))
}

/// Builds a guest image of `main` (at the load address) with the device interrupt handlers
/// and the IDT.
fn write_guest_with_handlers(
    dir: &Path,
    name: &str,
    main: impl FnOnce(&mut Asm) -> AsmResult,
) -> PathBuf {
    let handlers = |a: &mut Asm| -> AsmResult<Vec<(u8, CodeLabel)>> {
        let mut rng = a.create_label();
        let mut disk = a.create_label();
        a.set_label(&mut rng)?;
        irq_handler(a, RNG_BASE, RNG_IRQS, RNG_ISR)?;
        a.set_label(&mut disk)?;
        irq_handler(a, DISK_BASE, DISK_IRQS, DISK_ISR)?;
        Ok(vec![(RNG_VECTOR, rng), (DISK_VECTOR, disk)])
    };
    guest::write_interrupt_guest(dir, name, handlers, main)
}

/// Writes a 1 MiB image starting with `SKIFF-DISK-TEST!`.
fn write_test_disk(dir: &Path) -> PathBuf {
    let disk = dir.join("disk.img");
    let mut sector = b"SKIFF-DISK-TEST!".to_vec();
    sector.resize(1 << 20, 0);
    std::fs::write(&disk, &sector).unwrap();
    disk
}

/// `query-block`, `query-blockstats` and `info block` describe the disk with QEMU's names;
/// after the guest read one sector, the counters say so.
#[test]
fn qmp_reports_disks_and_their_counters() {
    let _t = TestTimer::start("qmp_reports_disks_and_their_counters");
    let dir = TempDir::new("virtio-qmp");
    let kernel = write_virtio_guest(dir.path(), true);
    let disk = write_test_disk(dir.path());
    let sock = dir.join("qmp.sock");
    let disk_arg = format!("path={},id=d0,readonly=on", disk.display());
    let qmp_arg = format!("unix:{}", sock.display());
    let mut skiff = common::process::Skiff::spawn([
        "--kernel",
        kernel.to_str().unwrap(),
        "--disk",
        &disk_arg,
        "--rng",
        "--qmp",
        &qmp_arg,
        "--serial",
        "stdio",
    ]);
    let deadline = std::time::Instant::now() + GUEST_TIMEOUT;
    assert!(
        skiff.wait_stdout_contains("disk: SKIFF-DISK-TEST!\n", deadline),
        "{}",
        skiff.dump()
    );
    let mut qmp = QmpClient::open_unix(&sock, false, GUEST_TIMEOUT).unwrap();
    let path = disk.display().to_string();
    let blocks = qmp.execute("query-block", json!({})).unwrap();
    assert_eq!(
        blocks,
        json!([{
            "device": "d0",
            "qdev": "/machine/peripheral/d0/virtio-backend",
            "type": "unknown",
            "removable": false,
            "locked": false,
            "inserted": {
                "file": path, "ro": true, "drv": "raw", "backing_file_depth": 0,
                "encrypted": false, "detect_zeroes": "off",
                "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
                "image": {"filename": path, "format": "raw", "virtual-size": 1 << 20,
                          "dirty-flag": false},
                "cache": {"writeback": true, "direct": false, "no-flush": false},
                "write_threshold": 0
            }
        }])
    );
    let stats = qmp.execute("query-blockstats", json!({})).unwrap();
    let s = &stats[0]["stats"];
    assert_eq!(stats[0]["device"], "d0", "{stats}");
    assert_eq!(s["rd_operations"], 1, "{stats}");
    assert_eq!(s["rd_bytes"], 512, "{stats}");
    assert_eq!(s["wr_operations"], 0, "{stats}");
    assert_eq!(s["flush_operations"], 0, "{stats}");
    assert_eq!(s["timed_stats"], json!([]), "{stats}");
    let info = qmp
        .execute(
            "human-monitor-command",
            json!({"command-line": "info block"}),
        )
        .unwrap();
    assert_eq!(
        info,
        json!(format!(
            "d0: {path} (raw, read-only)\r\n    Attached to:      \
             /machine/peripheral/d0/virtio-backend\r\n    Cache mode:       writeback\r\n"
        ))
    );
    skiff.kill();
}

/// What each guest exit status means.
const CHECKS: &[(u8, &str)] = &[
    (10, "disk MagicValue"),
    (11, "disk Version"),
    (12, "disk DeviceID"),
    (13, "rng MagicValue"),
    (14, "rng Version"),
    (15, "rng DeviceID"),
    (20, "rng VIRTIO_F_VERSION_1 offered"),
    (21, "rng FEATURES_OK accepted"),
    (22, "rng QueueNumMax >= 8"),
    (23, "rng DRIVER_OK accepted"),
    (30, "rng used idx == 1"),
    (31, "rng used len == 16"),
    (32, "rng InterruptStatus had the used-buffer bit"),
    (33, "rng bytes not all zero"),
    (40, "disk VIRTIO_F_VERSION_1 offered"),
    (41, "disk FEATURES_OK accepted"),
    (42, "disk QueueNumMax >= 8"),
    (43, "disk DRIVER_OK accepted"),
    (50, "disk used idx == 1"),
    (51, "disk used len == 513"),
    (52, "disk InterruptStatus had the used-buffer bit"),
    (53, "disk request status OK"),
    (
        UNEXPECTED_VECTOR_EXIT,
        "no unexpected interrupt or exception",
    ),
];

/// The guest finds a disk and an RNG at the first two virtio-mmio windows, reads 16 random
/// bytes from the RNG and the first sector of the disk, each completion signalled by an
/// interrupt; the command line lists both devices.
#[test]
fn tiny_guest_drives_virtio_rng_and_blk() {
    let _t = TestTimer::start("tiny_guest_drives_virtio_rng_and_blk");
    let dir = TempDir::new("virtio");
    let kernel = write_virtio_guest(dir.path(), false);
    let disk = write_test_disk(dir.path());
    let disk_arg = format!("path={},id=d0", disk.display());
    let done = run_guest(
        &kernel,
        &["--disk", &disk_arg, "--rng", "--cmdline", "console=ttyS0"],
        GUEST_TIMEOUT,
    );
    if let Some((code, what)) = CHECKS
        .iter()
        .find(|(c, _)| done.code() == Some(i32::from(*c)))
    {
        panic!("guest check {code} failed: {what}\n{}", done.dump());
    }
    done.assert_exit(0);
    done.assert_stdout(
        "cmdline: virtio_mmio.device=4K@0xc0001000:5 virtio_mmio.device=4K@0xc0002000:6 \
         console=ttyS0\n\
         virtio-blk at 0xc0001000\n\
         virtio-rng at 0xc0002000\n\
         rng: 16 bytes, interrupt taken\n\
         disk: SKIFF-DISK-TEST!\n",
    );
}

/// Bad device options and missing images fail start-up with one clear line, before any
/// guest runs.
#[test]
fn bad_device_options_fail_cleanly() {
    let dir = TempDir::new("virtio-bad");
    let kernel = guest::write_guest(dir.path(), "exit.elf", |a| a.exit(0));
    let missing = dir.join("missing.img");
    let missing_arg = format!("path={}", missing.display());
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0u8; 4096]).unwrap();
    let dup_arg = format!("path={},id=x", image.display());
    let cases: [(&[&str], &str); 5] = [
        (&["--disk", "readonly=on"], "path= is missing"),
        (&["--disk", "path=a,bogus=1"], "unknown option 'bogus'"),
        (&["--net", "tap=t0,mac=01:02:03:04:05:06"], "multicast"),
        (&["--disk", &missing_arg], "cannot open disk image"),
        (
            &["--disk", &dup_arg, "--disk", &dup_arg],
            "device id 'x' is used twice",
        ),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["--kernel", kernel.to_str().unwrap()];
        args.extend_from_slice(extra);
        let done = run(args, b"", GUEST_TIMEOUT);
        assert_ne!(done.code(), Some(0), "{extra:?}\n{}", done.dump());
        done.assert_clean_error();
        assert!(done.stderr.contains(expected), "{extra:?}: {}", done.dump());
    }
}

// ---------------------------------------------------------------------------------------------
// Live migration of a guest that keeps its disk busy.
// ---------------------------------------------------------------------------------------------

/// Sectors of the read-only pattern region (sectors 0..64) and of the write region after it.
const PATTERN_SECTORS: u64 = 64;
/// Sectors of the migration test disk: the pattern region, then the write region.
const MIG_DISK_SECTORS: u64 = 2 * PATTERN_SECTORS;
/// Marker in the top byte of every qword of a pattern sector: qword `j` of sector `s` is
/// `READ_MARK | s << 32 | j`.
const READ_MARK: u64 = 0xa5 << 56;
/// Marker of the write region: qword `j` of a sector written in iteration `k` is
/// `WRITE_MARK | k << 8 | j` (k = 0 is the image's initial contents).
const WRITE_MARK: u64 = 0x5a << 56;
/// Buffers of the migration guest's requests: chain A (descriptors 0-2) reads, chain B
/// (descriptors 3-5) writes.
const MG_HDR_A: u64 = 0x44_0000;
const MG_HDR_B: u64 = 0x44_0100;
const MG_STATUS_A: u64 = 0x44_0200;
const MG_STATUS_B: u64 = 0x44_0300;
const MG_READ_BUF: u64 = 0x44_1000;
const MG_WRITE_BUF: u64 = 0x44_2000;
/// The iteration that last wrote each write-region sector (64 qwords), as the guest knows it.
const MG_WRITTEN: u64 = DATA_AREA + 0x1000;
/// Requests the guest must complete on the source while a throttled precopy runs.
const THROTTLED_REQUESTS: usize = 200;
/// Deadline of each step of the migration tests.
const MIG_TIMEOUT: Duration = Duration::from_secs(30);

/// The image of the migration tests: pattern sectors, then the write region at iteration 0.
fn write_pattern_disk(dir: &Path) -> PathBuf {
    let mut image = Vec::with_capacity(MIG_DISK_SECTORS as usize * 512);
    for s in 0..MIG_DISK_SECTORS {
        for j in 0..64u64 {
            let qword = if s < PATTERN_SECTORS {
                READ_MARK | s << 32 | j
            } else {
                WRITE_MARK | j
            };
            image.extend_from_slice(&qword.to_le_bytes());
        }
    }
    let disk = dir.join("pattern.img");
    std::fs::write(&disk, image).unwrap();
    disk
}

/// Emits the migration guest's code, collecting the failure labels it jumps to.
struct MigGuest<'a> {
    a: &'a mut Asm,
    /// (label, check letter): each prints `X<letter>` and starts the next iteration.
    failures: Vec<(CodeLabel, char)>,
}

impl MigGuest<'_> {
    /// A label that prints `X<letter>` and goes on with the next iteration.
    fn fail_label(&mut self, letter: char) -> CodeLabel {
        let label = self.a.create_label();
        self.failures.push((label, letter));
        label
    }

    /// Jumps to the failure `letter` unless the flags say equal.
    fn jne_fail(&mut self, letter: char) -> AsmResult {
        let label = self.fail_label(letter);
        self.a.jne(label)
    }

    /// Puts `head` in the next available-ring slot of the queue at `queue`; `idx` counts the
    /// buffers made available. Clobbers `rax`, `rbx`.
    fn push_avail(&mut self, queue: u64, head: u32, idx: AsmRegister64) -> AsmResult {
        let a = &mut *self.a;
        a.mov(rax, idx)?;
        a.and(eax, QUEUE_SIZE - 1)?;
        a.mov(rbx, queue + 0x1000)?;
        a.mov(word_ptr(rbx + rax * 2 + 4), head)?;
        a.inc(idx)
    }

    /// Publishes the available index `idx` and kicks queue 0 of the device at `base`.
    fn publish(&mut self, base: u64, queue: u64, idx: AsmRegister64) -> AsmResult {
        let idx16 = word_of(idx);
        self.a.mov(rbx, queue + 0x1000)?;
        self.a.mov(word_ptr(rbx + 2), idx16)?;
        write32(self.a, base + REG_QUEUE_NOTIFY, 0)
    }

    /// Waits with `sti; hlt` until the used index of `queue` equals `idx` (16 bits): each
    /// completion is signalled by an interrupt, so a lost one hangs the guest.
    fn wait_used(&mut self, queue: u64, idx: AsmRegister64) -> AsmResult {
        let a = &mut *self.a;
        let mut wait = a.create_label();
        let mut done = a.create_label();
        a.set_label(&mut wait)?;
        a.cli()?;
        a.mov(rbx, queue + 0x2000)?;
        a.movzx(eax, word_ptr(rbx + 2))?;
        a.cmp(ax, word_of(idx))?;
        a.je(done)?;
        a.sti()?;
        a.hlt()?;
        a.jmp(wait)?;
        a.set_label(&mut done)?;
        a.nop()
    }

    /// Checks the used element of the request made available as number `idx - back`: it
    /// must be chain `head` with `len` bytes written. Clobbers `rax`, `rbx`.
    fn check_used(
        &mut self,
        queue: u64,
        idx: AsmRegister64,
        back: i32,
        head: u32,
        len: u32,
        letter: char,
    ) -> AsmResult {
        self.a.mov(rax, idx)?;
        self.a.sub(rax, back)?;
        self.a.and(eax, QUEUE_SIZE - 1)?;
        self.a.mov(rbx, queue + 0x2004)?;
        self.a.cmp(dword_ptr(rbx + rax * 8), head)?;
        self.jne_fail(letter)?;
        self.a.cmp(dword_ptr(rbx + rax * 8 + 4), len)?;
        self.jne_fail(letter)
    }

    /// Checks the status byte at `addr` is VIRTIO_BLK_S_OK. Clobbers `rbx`.
    fn check_status(&mut self, addr: u64, letter: char) -> AsmResult {
        self.a.mov(rbx, addr)?;
        self.a.cmp(byte_ptr(rbx), 0)?;
        self.jne_fail(letter)
    }

    /// Checks qword `j` of the sector at `buf` is `rax | j`. Clobbers `rcx`, `rdx`, `rsi`.
    fn verify_sector(&mut self, buf: u64, letter: char) -> AsmResult {
        self.sector_qwords(buf, Some(letter))
    }

    /// Fills the sector at `buf` with `rax | j` in qword `j`. Clobbers `rcx`, `rdx`, `rsi`.
    fn fill_sector(&mut self, buf: u64) -> AsmResult {
        self.sector_qwords(buf, None)
    }

    /// Walks qwords `j` of the sector at `buf` with `rdx = rax | j`: compares each with it
    /// (failure `letter` on a difference) when `check` is given, else stores it. Clobbers
    /// `rcx`, `rdx`, `rsi`.
    fn sector_qwords(&mut self, buf: u64, check: Option<char>) -> AsmResult {
        let bad = check.map(|letter| self.fail_label(letter));
        let a = &mut *self.a;
        let mut next = a.create_label();
        a.mov(rsi, buf)?;
        a.xor(ecx, ecx)?;
        a.set_label(&mut next)?;
        a.mov(rdx, rax)?;
        a.or(rdx, rcx)?;
        match bad {
            Some(bad) => {
                a.cmp(qword_ptr(rsi + rcx * 8), rdx)?;
                a.jne(bad)?;
            }
            None => a.mov(qword_ptr(rsi + rcx * 8), rdx)?,
        }
        a.inc(ecx)?;
        a.cmp(ecx, 64)?;
        a.jb(next)
    }

    /// Sets up the request header at `hdr`: `kind` (0 read, 1 write), sector `sector`, and
    /// the status byte at `status` to 0xff. Clobbers `rbx`.
    fn header(&mut self, hdr: u64, kind: u32, sector: AsmRegister64, status: u64) -> AsmResult {
        let a = &mut *self.a;
        a.mov(rbx, hdr)?;
        a.mov(dword_ptr(rbx), kind)?;
        a.mov(dword_ptr(rbx + 4), 0)?;
        a.mov(qword_ptr(rbx + 8), sector)?;
        a.mov(rbx, status)?;
        a.mov(byte_ptr(rbx), 0xff)
    }
}

/// The 16-bit part of a 64-bit register the migration guest counts in.
fn word_of(reg: AsmRegister64) -> AsmRegister16 {
    if reg == r13 {
        r13w
    } else if reg == r14 {
        r14w
    } else {
        panic!("no 16-bit view defined for {reg:?}")
    }
}

/// The migration guest: brings up the disk and the RNG, prints `ready\n`, then loops forever.
/// Iteration `k` (in `r15`), after a busy wait of `pace` rounds:
///
/// 1. makes two disk requests and one RNG request available at once and kicks both devices:
///    read pattern sector `k % 64`, write sector `64 + k % 64` with iteration `k`'s pattern,
///    16 random bytes;
/// 2. waits for the used rings with `sti; hlt`, checks each used element (chain, length)
///    against its own count of requests, the status bytes, and the data read; records `k` as
///    the sector's last write;
/// 3. reads back sector `64 + (k + 32) % 64` and checks it holds the pattern of the iteration
///    that last wrote it (possibly on the other side of a migration).
///
/// Each completed disk request prints `.`; a failed check prints `X` and the check's letter
/// and goes on with the next iteration.
fn migration_guest_code(a: &mut Asm, pace: u32) -> AsmResult {
    a.setup_interrupts()?;
    check_identity(a, DISK_BASE, 2, 10)?;
    check_identity(a, RNG_BASE, 4, 13)?;
    a.ioapic_route(RNG_GSI, RNG_VECTOR)?;
    a.ioapic_route(DISK_GSI, DISK_VECTOR)?;
    init_device(a, RNG_BASE, RNG_QUEUE, 20)?;
    init_device(a, DISK_BASE, DISK_QUEUE, 40)?;
    descriptor(a, RNG_QUEUE, 0, RNG_BUF, 16, 2, 0)?;
    descriptor(a, DISK_QUEUE, 0, MG_HDR_A, 16, 1, 1)?;
    descriptor(a, DISK_QUEUE, 1, MG_READ_BUF, 512, 3, 2)?;
    descriptor(a, DISK_QUEUE, 2, MG_STATUS_A, 1, 2, 0)?;
    descriptor(a, DISK_QUEUE, 3, MG_HDR_B, 16, 1, 4)?;
    descriptor(a, DISK_QUEUE, 4, MG_WRITE_BUF, 512, 1, 5)?;
    descriptor(a, DISK_QUEUE, 5, MG_STATUS_B, 1, 2, 0)?;
    a.print("ready\n")?;
    a.xor(r15d, r15d)?; // iteration
    a.xor(r14d, r14d)?; // disk requests made available
    a.xor(r13d, r13d)?; // RNG requests made available

    let mut g = MigGuest {
        a,
        failures: Vec::new(),
    };
    let mut top = g.a.create_label();
    g.a.set_label(&mut top)?;
    if pace > 0 {
        let mut spin = g.a.create_label();
        g.a.mov(ecx, pace)?;
        g.a.set_label(&mut spin)?;
        g.a.pause()?;
        g.a.dec(ecx)?;
        g.a.jnz(spin)?;
    }
    // 1. Read pattern sector r8 = k % 64; write sector r9 = 64 + k % 64; RNG.
    g.a.mov(r8, r15)?;
    g.a.and(r8, 63)?;
    g.a.lea(r9, qword_ptr(r8 + PATTERN_SECTORS as i32))?;
    g.header(MG_HDR_A, 0, r8, MG_STATUS_A)?;
    g.a.mov(rax, r15)?;
    g.a.shl(rax, 8)?;
    g.a.mov(rdx, WRITE_MARK)?;
    g.a.or(rax, rdx)?;
    g.fill_sector(MG_WRITE_BUF)?;
    g.header(MG_HDR_B, 1, r9, MG_STATUS_B)?;
    g.push_avail(DISK_QUEUE, 0, r14)?;
    g.push_avail(DISK_QUEUE, 3, r14)?;
    g.publish(DISK_BASE, DISK_QUEUE, r14)?;
    g.push_avail(RNG_QUEUE, 0, r13)?;
    g.publish(RNG_BASE, RNG_QUEUE, r13)?;
    // 2. Completions.
    g.wait_used(DISK_QUEUE, r14)?;
    g.wait_used(RNG_QUEUE, r13)?;
    g.check_used(DISK_QUEUE, r14, 2, 0, 513, 'a')?;
    g.check_used(DISK_QUEUE, r14, 1, 3, 1, 'b')?;
    g.check_used(RNG_QUEUE, r13, 1, 0, 16, 'r')?;
    g.check_status(MG_STATUS_A, 'c')?;
    g.a.mov(rax, r8)?;
    g.a.shl(rax, 32)?;
    g.a.mov(rdx, READ_MARK)?;
    g.a.or(rax, rdx)?;
    g.verify_sector(MG_READ_BUF, 'd')?;
    g.a.print(".")?;
    g.check_status(MG_STATUS_B, 'e')?;
    g.a.mov(rbx, MG_WRITTEN)?;
    g.a.mov(qword_ptr(rbx + r8 * 8), r15)?;
    g.a.print(".")?;
    // 3. Read back r10 = 64 + (k + 32) % 64.
    g.a.lea(r10, qword_ptr(r15 + 32))?;
    g.a.and(r10, 63)?;
    g.a.mov(rbx, MG_WRITTEN)?;
    g.a.mov(r11, qword_ptr(rbx + r10 * 8))?;
    g.a.add(r10, PATTERN_SECTORS as i32)?;
    g.header(MG_HDR_A, 0, r10, MG_STATUS_A)?;
    g.push_avail(DISK_QUEUE, 0, r14)?;
    g.publish(DISK_BASE, DISK_QUEUE, r14)?;
    g.wait_used(DISK_QUEUE, r14)?;
    g.check_used(DISK_QUEUE, r14, 1, 0, 513, 'f')?;
    g.check_status(MG_STATUS_A, 'g')?;
    g.a.mov(rax, r11)?;
    g.a.shl(rax, 8)?;
    g.a.mov(rdx, WRITE_MARK)?;
    g.a.or(rax, rdx)?;
    g.verify_sector(MG_READ_BUF, 'h')?;
    g.a.print(".")?;
    let mut next = g.a.create_label();
    g.a.set_label(&mut next)?;
    g.a.inc(r15)?;
    g.a.jmp(top)?;
    for (mut label, letter) in std::mem::take(&mut g.failures) {
        g.a.set_label(&mut label)?;
        g.a.print(&format!("X{letter}"))?;
        g.a.jmp(next)?;
    }
    Ok(())
}

/// Counts of `.` (completed requests) and `X` (failed checks) in a serial output file.
fn heartbeats(serial: &Path) -> (usize, usize) {
    let out = std::fs::read(serial).unwrap_or_default();
    let dots = out.iter().filter(|&&b| b == b'.').count();
    let fails = out.iter().filter(|&&b| b == b'X').count();
    (dots, fails)
}

/// A skiff running the migration guest, with its QMP monitor and serial output file.
struct MigVm {
    skiff: common::process::Skiff,
    qmp: QmpClient,
    serial: PathBuf,
}

impl MigVm {
    fn start(dir: &TempDir, name: &str, kernel: &Path, disk: &Path, extra: &[&str]) -> MigVm {
        let sock = dir.join(&format!("{name}.qmp"));
        let serial = dir.join(&format!("{name}.serial"));
        let mut args = vec![
            "--kernel".to_string(),
            kernel.display().to_string(),
            "--memory".to_string(),
            "32M".to_string(),
            "--disk".to_string(),
            format!("path={},id=d0", disk.display()),
            "--rng".to_string(),
            "--serial".to_string(),
            format!("file:{}", serial.display()),
            "--qmp".to_string(),
            format!("unix:{}", sock.display()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let skiff = common::process::Skiff::spawn(args);
        let qmp = QmpClient::open_unix(&sock, false, MIG_TIMEOUT)
            .unwrap_or_else(|e| panic!("{name} QMP: {e}\n{}", skiff.dump()));
        MigVm { skiff, qmp, serial }
    }

    fn exec(&mut self, name: &str, args: serde_json::Value) -> serde_json::Value {
        self.qmp
            .execute(name, args)
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", self.dump()))
    }

    fn dump(&self) -> String {
        let serial = std::fs::read(&self.serial).unwrap_or_default();
        let tail = &serial[serial.len().saturating_sub(400)..];
        format!(
            "{}\n--- serial (last bytes) ---\n{}",
            self.skiff.dump(),
            String::from_utf8_lossy(tail)
        )
    }

    fn status(&mut self) -> String {
        self.exec("query-status", serde_json::Value::Null)["status"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Waits until at least `dots` requests completed in this VM; panics on a failed check.
    fn wait_heartbeats(&self, dots: usize) {
        let deadline = std::time::Instant::now() + MIG_TIMEOUT;
        loop {
            let (seen, fails) = heartbeats(&self.serial);
            assert_eq!(fails, 0, "the guest saw bad data or rings\n{}", self.dump());
            if seen >= dots {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "only {seen} of {dots} requests completed\n{}",
                self.dump()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Polls query-migrate until `completed`; panics on `failed` or at the deadline.
    fn wait_completed(&mut self) -> serde_json::Value {
        let deadline = std::time::Instant::now() + MIG_TIMEOUT;
        loop {
            let info = self.exec("query-migrate", serde_json::Value::Null);
            match info["status"].as_str() {
                Some("completed") => return info,
                Some("failed") => panic!("migration failed: {info}\n{}", self.dump()),
                status => assert!(
                    std::time::Instant::now() < deadline,
                    "migration stuck in {status:?}: {info}\n{}",
                    self.dump()
                ),
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `query-blockstats` of the one disk: (rd_operations, wr_operations).
    fn disk_ops(&mut self) -> (u64, u64) {
        let stats = self.exec("query-blockstats", json!({}));
        assert_eq!(stats[0]["device"], "d0", "{stats}");
        let s = &stats[0]["stats"];
        (
            s["rd_operations"].as_u64().unwrap(),
            s["wr_operations"].as_u64().unwrap(),
        )
    }
}

/// Checks the write region of the image: every sector holds the whole pattern of one
/// iteration that writes it (`k % 64` = its index). Returns the highest iteration found.
fn check_write_region(disk: &Path) -> u64 {
    let image = std::fs::read(disk).unwrap();
    let mut highest = 0;
    for w in 0..PATTERN_SECTORS {
        let at = ((PATTERN_SECTORS + w) * 512) as usize;
        let sector = &image[at..at + 512];
        let q = |j: usize| u64::from_le_bytes(sector[8 * j..8 * j + 8].try_into().unwrap());
        let k = (q(0) & !WRITE_MARK) >> 8;
        for j in 0..64 {
            assert_eq!(
                q(j),
                WRITE_MARK | k << 8 | j as u64,
                "write-region sector {w}, qword {j}"
            );
        }
        assert!(
            k == 0 || k % PATTERN_SECTORS == w,
            "sector {w} holds iteration {k}"
        );
        highest = highest.max(k);
    }
    highest
}

/// Migrates the migration guest (spinning `pace` rounds between iterations) from a source to
/// a destination sharing its disk image. With `passes > 0`, the precopy is throttled (1 MiB/s,
/// 1 ms downtime limit: it cannot converge) until its pass `passes` starts and the guest
/// completed [`THROTTLED_REQUESTS`] requests since `migrate`, then let go.
/// Checks that the guest's requests complete on both sides with the right data, ring entries
/// and interrupts, that writes made on the source are read back on the destination, and that
/// the destination's disk counters grow. Returns how many requests completed on the source
/// during the migration.
fn migrate_busy_disk(test: &'static str, pace: u32, passes: i64) -> usize {
    let _t = TestTimer::start(test);
    let dir = TempDir::new("virtio-mig");
    let kernel =
        write_guest_with_handlers(dir.path(), "mig.elf", |a| migration_guest_code(a, pace));
    let disk = write_pattern_disk(dir.path());
    let mut src = MigVm::start(&dir, "src", &kernel, &disk, &[]);
    // Past iteration 32, read-backs check what earlier iterations wrote.
    src.wait_heartbeats(3 * 40);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut dest = MigVm::start(&dir, "dest", &kernel, &disk, &["--incoming", &uri]);
    assert_eq!(dest.status(), "inmigrate");
    if passes > 0 {
        src.exec(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "events", "state": true}]}),
        );
        src.exec(
            "migrate-set-parameters",
            json!({"max-bandwidth": 1 << 20, "downtime-limit": 1}),
        );
    }
    let before = heartbeats(&src.serial).0;
    src.exec("migrate", json!({ "uri": uri }));
    if passes > 0 {
        loop {
            let event = src
                .qmp
                .wait_event("MIGRATION_PASS", MIG_TIMEOUT)
                .unwrap_or_else(|e| panic!("MIGRATION_PASS: {e}\n{}", src.dump()));
            if event["data"]["pass"].as_i64() >= Some(passes) {
                break;
            }
        }
        // The precopy cannot converge yet: let the guest complete enough requests in it.
        src.wait_heartbeats(before + THROTTLED_REQUESTS);
        src.exec(
            "migrate-set-parameters",
            json!({"max-bandwidth": 0, "downtime-limit": 300}),
        );
    }
    let info = src.wait_completed();
    let during = heartbeats(&src.serial).0 - before;
    eprintln!("{test}: {during} requests on the source during the migration; {info}");
    if passes > 0 {
        assert!(
            info["ram"]["dirty-sync-count"].as_i64() >= Some(passes),
            "{info}"
        );
    }
    assert_eq!(src.status(), "postmigrate", "{}", src.dump());
    dest.wait_completed();
    assert_eq!(dest.status(), "running", "{}", dest.dump());
    let on_source = heartbeats(&src.serial);
    assert_eq!(on_source.1, 0, "{}", src.dump());

    let (rd0, wr0) = dest.disk_ops();
    // More than 64 iterations: every write-region sector is read back on the destination.
    dest.wait_heartbeats(3 * 70);
    let (rd1, wr1) = dest.disk_ops();
    assert!(rd1 > rd0 && wr1 > wr0, "({rd0}, {wr0}) -> ({rd1}, {wr1})");
    // The source's guest stays stopped.
    assert_eq!(heartbeats(&src.serial), on_source, "{}", src.dump());
    dest.skiff.kill();
    src.skiff.kill();
    let highest = check_write_region(&disk);
    let total = on_source.0 + heartbeats(&dest.serial).0;
    assert!(
        highest * 3 + 3 >= total.saturating_sub(6) as u64,
        "highest iteration on disk {highest}, {total} requests seen"
    );
    eprintln!(
        "{test}: {} requests on the source, {} on the destination, disk reads {rd0} -> {rd1}",
        on_source.0,
        total - on_source.0
    );
    during
}

/// A guest reading a pattern disk, writing a second region and reading it back, paced, is
/// live-migrated to a destination sharing the image: its requests go on there without a bad
/// byte, ring entry or lost interrupt, and the destination's `query-blockstats` grows.
#[test]
fn migration_keeps_a_busy_virtio_disk_working() {
    migrate_busy_disk("migration_keeps_a_busy_virtio_disk_working", 2_000, 0);
}

/// The same guest without pacing (requests back to back) under a precopy held for 5 passes
/// and at least [`THROTTLED_REQUESTS`] requests:
/// the device writes guest RAM (data buffers, used rings) all through the precopy, so the
/// dirty tracking of device writes and the queue indices carried over must keep the
/// destination's view exact.
#[test]
fn migration_under_heavy_virtio_request_load() {
    let during = migrate_busy_disk("migration_under_heavy_virtio_request_load", 0, 5);
    assert!(
        during >= THROTTLED_REQUESTS,
        "only {during} requests during the precopy"
    );
}

// ---------------------------------------------------------------------------------------------
// Linux: virtio-blk probe with MBR partitions, virtio-net DHCP through a tap in a netns.
// ---------------------------------------------------------------------------------------------

/// Deadline of the Linux boot up to its IP autoconfiguration on the emulating KVM.
const LINUX_DEADLINE: Duration = Duration::from_secs(900);
/// Sectors of the test disk (4 MiB).
const DISK_SECTORS: u32 = 8192;

/// A 4 MiB raw image with an MBR holding two Linux partitions (sectors 2048+2048, 4096+4096).
fn mbr_image(path: &Path) {
    let mut image = vec![0u8; DISK_SECTORS as usize * 512];
    for (i, (start, count)) in [(2048u32, 2048u32), (4096, 4096)].iter().enumerate() {
        let entry = &mut image[446 + 16 * i..446 + 16 * (i + 1)];
        entry[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
        entry[4] = 0x83;
        entry[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
        entry[8..12].copy_from_slice(&start.to_le_bytes());
        entry[12..16].copy_from_slice(&count.to_le_bytes());
    }
    image[510] = 0x55;
    image[511] = 0xaa;
    std::fs::write(path, image).unwrap();
}

/// Runs a command, panicking with its output if it fails.
fn sh(args: &[&str]) {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace holding a tap (10.0.2.1/24) and a DHCP server on it; both go away
/// when dropped.
struct DhcpNetns {
    name: String,
    server: std::process::Child,
}

/// Tap interface name inside the namespace.
const TAP: &str = "vtap0";

impl DhcpNetns {
    /// Why the test cannot run here, if it cannot.
    fn unavailable() -> Option<String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Some("not root (network namespaces and taps need CAP_NET_ADMIN)".into());
        }
        if !Path::new("/dev/net/tun").exists() {
            return Some("/dev/net/tun does not exist".into());
        }
        for tool in ["ip", "busybox"] {
            let found = std::process::Command::new("which")
                .arg(tool)
                .output()
                .is_ok_and(|o| o.status.success());
            if !found {
                return Some(format!("{tool} is not installed"));
            }
        }
        None
    }

    fn start(dir: &Path) -> DhcpNetns {
        let name = format!("skiffvt{}", std::process::id());
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .output();
        sh(&["ip", "netns", "add", &name]);
        let ns = |cmd: &[&str]| {
            let mut full = vec!["ip", "netns", "exec", &name];
            full.extend_from_slice(cmd);
            sh(&full);
        };
        ns(&["ip", "link", "set", "lo", "up"]);
        ns(&["ip", "tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr"]);
        ns(&["ip", "addr", "add", "10.0.2.1/24", "dev", TAP]);
        ns(&["ip", "link", "set", TAP, "up"]);
        let leases = dir.join("udhcpd.leases");
        std::fs::write(&leases, b"").unwrap();
        let conf = dir.join("udhcpd.conf");
        std::fs::write(
            &conf,
            format!(
                "start 10.0.2.15\nend 10.0.2.20\ninterface {TAP}\nlease_file {}\n\
                 pidfile {}\noption subnet 255.255.255.0\noption router 10.0.2.1\n\
                 option lease 3600\n",
                leases.display(),
                dir.join("udhcpd.pid").display()
            ),
        )
        .unwrap();
        let server = std::process::Command::new("ip")
            .args(["netns", "exec", &name, "busybox", "udhcpd", "-f"])
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start udhcpd: {e}"));
        DhcpNetns { name, server }
    }
}

impl Drop for DhcpNetns {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Waits until every needle has appeared in skiff's output, in order, or the deadline.
/// Returns the index of the first needle not seen.
fn wait_in_order(
    skiff: &common::process::Skiff,
    needles: &[&str],
    deadline: std::time::Instant,
) -> usize {
    let seen = |out: &[u8]| {
        let text = String::from_utf8_lossy(out);
        let mut at = 0;
        let mut count = 0;
        for needle in needles {
            match text[at..].find(needle) {
                Some(i) => {
                    at += i + needle.len();
                    count += 1;
                }
                None => break,
            }
        }
        count
    };
    skiff.wait_stdout(deadline, |out| seen(out) == needles.len());
    seen(skiff.stdout_text().as_bytes())
}

/// Boots the project's Linux kernel (no initramfs: everything checked happens before user
/// space) with a virtio disk holding an MBR image, a virtio-net interface on a tap in a
/// network namespace where udhcpd serves 10.0.2.15-20, and virtio-rng. The kernel must probe
/// the disk with its size and both partitions, and its `ip=dhcp` autoconfiguration must get
/// an address through virtio-net.
#[test]
fn linux_probes_virtio_blk_and_gets_dhcp_over_virtio_net() {
    let _t = TestTimer::start("linux_probes_virtio_blk_and_gets_dhcp_over_virtio_net");
    if let Some(why) = DhcpNetns::unavailable() {
        common::skipped(format_args!("SKIPPED: {why}"));
        return;
    }
    let root = common::repo_root();
    let vmlinux = root.join("resources/build/guest/vmlinux");
    let cmdline_file = root.join("resources/guest/cmdline");
    assert!(
        vmlinux.is_file(),
        "{} is missing: build it with resources/build-guest.sh",
        vmlinux.display()
    );
    let base_cmdline = std::fs::read_to_string(&cmdline_file).unwrap();
    let cmdline = format!("{} ip=dhcp", base_cmdline.trim());
    let dir = TempDir::new("virtio-linux");
    let disk = dir.join("mbr.img");
    mbr_image(&disk);
    let net = DhcpNetns::start(dir.path());
    let disk_arg = format!("path={},id=root", disk.display());
    let net_arg = format!("tap={TAP},mac=52:54:00:12:34:56,id=net0");
    let started = std::time::Instant::now();
    let mut skiff = common::process::Skiff::spawn_via(
        &["ip", "netns", "exec", &net.name],
        [
            "--kernel",
            vmlinux.to_str().unwrap(),
            "--cmdline",
            &cmdline,
            "--memory",
            "256M",
            "--disk",
            &disk_arg,
            "--net",
            &net_arg,
            "--rng",
            "--serial",
            "stdio",
        ],
    );
    let blocks = format!("virtio_blk virtio0: [vda] {DISK_SECTORS} 512-byte logical blocks");
    let needles = [
        blocks.as_str(),
        " vda: vda1 vda2",
        "IP-Config: Got DHCP answer from 10.0.2.1, my address is 10.0.2.15",
    ];
    let met = wait_in_order(&skiff, &needles, started + LINUX_DEADLINE);
    let elapsed = started.elapsed().as_secs_f64();
    skiff.kill();
    let out = skiff.stdout_text();
    let last = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .to_string();
    assert!(
        met == needles.len(),
        "after {elapsed:.1} s: missing {:?} (last line: {last:?})\n{}",
        needles[met],
        skiff.dump()
    );
    for line in out.lines().filter(|l| {
        l.contains("vda") || l.contains("IP-Config") || l.contains("virtio") || l.contains("ipaddr")
    }) {
        eprintln!("guest: {}", line.trim_end());
    }
    eprintln!("linux virtio test: all lines seen after {elapsed:.1} s");
}
