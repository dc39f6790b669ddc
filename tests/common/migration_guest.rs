//! The migration test guest and its consistency check, after QEMU's `a-b-bootblock.S` and
//! `check_guests_ram` (tests/qtest/migration).
//!
//! The guest ([`write_migration_guest`], body [`migration_guest`]) is a tiny 64-bit guest (see
//! [`super::guest`]) that:
//! 1. prints `'A'` on COM1;
//! 2. stores 0 in the first byte of every 4 KiB page of [[`MIG_START`], [`MIG_END`]) and zeroes
//!    the pass counter at [`MIG_PASS_COUNTER`];
//! 3. forever walks the range doing `inc byte [page]` on each page's first byte; after each
//!    pass it increments the 64-bit pass counter and, every [`MIG_HEARTBEAT_PASSES`] passes,
//!    prints `'B'` on COM1.
//!
//! **Invariant.** Mid-pass, every page before the cursor holds v + 1 (mod 256) and every page at
//! or after it holds v. A lost dirty page, a stale page or an unplaced postcopy page shows up as
//! an extra step, which [`check_guest_ram`] reports. The pass counter sits at a non-page-aligned
//! address inside the first page, so the walk never touches it, and a read of the range carries
//! it ([`pass_counter`]).
//!
//! Speed: the loop body is four instructions per page; at the ~0.4 M emulated instructions per
//! second of the development machines a pass over the 1024 pages takes about 10 ms (the
//! `migration_guest_ram_is_consistent` test in tests/tiny_guests.rs measures and prints it). On
//! hardware-assisted KVM a pass takes microseconds.

use std::path::{Path, PathBuf};

use iced_x86::code_asm::*;

use super::guest::{write_guest, Asm, AsmResult, COM1};

/// Page size of the walk: the guest touches the first byte of every page of this size.
pub const MIG_PAGE_SIZE: u64 = 4096;
/// First guest physical address of the walked range (4 MiB: clear of the image at 1 MiB, the
/// data area at 2 MiB and the AP stacks at 3 MiB).
pub const MIG_START: u64 = 0x40_0000;
/// End (exclusive) of the walked range: 4 MiB, 1024 pages.
pub const MIG_END: u64 = MIG_START + 0x40_0000;
/// Number of pages walked per pass.
pub const MIG_PAGES: u64 = (MIG_END - MIG_START) / MIG_PAGE_SIZE;
/// Guest physical address of the 64-bit pass counter (little-endian), incremented after each
/// complete pass. Inside the first page but not page-aligned, so the walk never touches it.
pub const MIG_PASS_COUNTER: u64 = MIG_START + 8;
/// Offset of the pass counter in a read of [`MIG_START`]..[`MIG_END`].
pub const MIG_PASS_COUNTER_OFFSET: usize = (MIG_PASS_COUNTER - MIG_START) as usize;
/// The guest prints `'B'` after every this many passes (a power of two, at most 128).
pub const MIG_HEARTBEAT_PASSES: u64 = 16;
/// How many bad pages [`check_guest_ram`] lists (QEMU lists 10 too).
pub const MIG_REPORTED_BAD_PAGES: usize = 10;

const _: () = assert!(MIG_HEARTBEAT_PASSES.is_power_of_two() && MIG_HEARTBEAT_PASSES <= 128);
const _: () = assert!(MIG_START % MIG_PAGE_SIZE == 0 && MIG_END % MIG_PAGE_SIZE == 0);
const _: () = assert!(
    MIG_END < 0x8000_0000,
    "addresses are used as 32-bit immediates"
);

/// Emits the migration guest's code (see the module documentation). Never returns; uses `rax`
/// (cursor), `rbx` (counter address), `al`/`dx` (serial).
pub fn migration_guest(a: &mut Asm) -> AsmResult {
    let start = i32::try_from(MIG_START).expect("low address");
    let end = i32::try_from(MIG_END).expect("low address");
    let step = i32::try_from(MIG_PAGE_SIZE).expect("small page");

    a.print("A")?;

    // Pre-zero the first byte of every page, and the pass counter.
    let mut zero = a.create_label();
    a.mov(rax, MIG_START)?;
    a.set_label(&mut zero)?;
    a.mov(byte_ptr(rax), 0)?;
    a.add(rax, step)?;
    a.cmp(rax, end)?;
    a.jb(zero)?;
    a.mov(rbx, MIG_PASS_COUNTER)?;
    a.mov(qword_ptr(rbx), 0)?;

    // The walk: four instructions per page.
    let mut pass = a.create_label();
    let mut page = a.create_label();
    a.set_label(&mut pass)?;
    a.mov(eax, start)?;
    a.set_label(&mut page)?;
    a.inc(byte_ptr(rax))?;
    a.add(rax, step)?;
    a.cmp(rax, end)?;
    a.jb(page)?;
    // End of a pass: count it, and every MIG_HEARTBEAT_PASSES passes print 'B'.
    a.inc(qword_ptr(rbx))?;
    a.test(byte_ptr(rbx), (MIG_HEARTBEAT_PASSES - 1) as i32)?;
    a.jnz(pass)?;
    a.mov(al, u32::from(b'B'))?;
    a.mov(dx, u32::from(COM1))?;
    a.out(dx, al)?;
    a.jmp(pass)
}

/// Writes the migration guest as `dir/name` (an ELF executable for `skiff --kernel`) and
/// returns its path.
pub fn write_migration_guest(dir: &Path, name: &str) -> PathBuf {
    write_guest(dir, name, migration_guest)
}

/// The pass counter in `mem`, a read of [`MIG_START`]..[`MIG_END`] (or at least its first
/// page).
pub fn pass_counter(mem: &[u8]) -> u64 {
    let bytes = &mem[MIG_PASS_COUNTER_OFFSET..MIG_PASS_COUNTER_OFFSET + 8];
    u64::from_le_bytes(bytes.try_into().expect("8 bytes"))
}

/// QEMU's `check_guests_ram` on `mem`, the guest's [`MIG_START`]..[`MIG_END`] as read with the
/// guest stopped (e.g. by `pmemsave`); its length must be a non-zero multiple of
/// [`MIG_PAGE_SIZE`].
///
/// Walks the first byte of each page. A page whose byte differs from the previous page's is
/// accepted once, and only if it equals the previous one minus 1 (mod 256): the cursor edge of
/// an interrupted pass. Every other difference is a bad page; as in QEMU, the next page is then
/// compared with the bad one. Returns `Err` with the first [`MIG_REPORTED_BAD_PAGES`] bad pages
/// (offset in `mem`, guest address assuming `mem` starts at [`MIG_START`], values) and the total.
pub fn check_guest_ram(mem: &[u8]) -> Result<(), String> {
    let page = MIG_PAGE_SIZE as usize;
    if mem.is_empty() || mem.len() % page != 0 {
        return Err(format!(
            "{} bytes is not a non-zero multiple of the {page}-byte page",
            mem.len()
        ));
    }
    let first = mem[0];
    let mut last = first;
    let mut hit_edge = false;
    let mut bad = Vec::new();
    let mut bad_count = 0usize;
    for offset in (page..mem.len()).step_by(page) {
        let b = mem[offset];
        if b != last {
            if b.wrapping_add(1) == last && !hit_edge {
                hit_edge = true;
            } else {
                bad_count += 1;
                if bad.len() < MIG_REPORTED_BAD_PAGES {
                    bad.push(format!(
                        "  page {} (offset {offset:#x}, guest {:#x}): {b:#04x} after {last:#04x} (first byte {first:#04x}, edge seen: {hit_edge})",
                        offset / page,
                        MIG_START + offset as u64
                    ));
                }
            }
        }
        last = b;
    }
    if bad_count == 0 {
        return Ok(());
    }
    let mut report = format!(
        "guest RAM inconsistent: {bad_count} bad page(s) of {} (first byte {first:#04x}, last byte {last:#04x}):\n{}",
        mem.len() / page,
        bad.join("\n")
    );
    if bad_count > bad.len() {
        report.push_str(&format!("\n  ... and {} more", bad_count - bad.len()));
    }
    Err(report)
}
