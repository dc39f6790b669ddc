//! A minimal ELF64 executable writer for tiny test guests.
//!
//! The file holds exactly what the VMM's ELF loader (linux-loader) needs: the ELF header, one
//! program header of type `PT_LOAD`, and the segment's bytes. No section headers, no PVH note
//! (so the VMM uses the Linux 64-bit boot protocol and enters the guest in long mode at
//! `e_entry`).
//!
//! File layout:
//!
//! | file offset | size | content |
//! | --- | --- | --- |
//! | 0x00 | 64 | `Elf64_Ehdr` |
//! | 0x40 | 56 | `Elf64_Phdr` (the only one) |
//! | 0x78 .. 0x1000 | | zero padding, so that `p_offset` is page aligned like `p_vaddr` |
//! | 0x1000 | `code.len()` | the segment, loaded at `p_paddr` |

use std::path::Path;

/// Guest physical (and virtual, the guest runs on an identity map) address of the segment, and
/// the entry point.
pub const LOAD_ADDR: u64 = 0x10_0000;

/// Size of `Elf64_Ehdr`.
const EHDR_SIZE: u16 = 64;
/// Size of `Elf64_Phdr`.
const PHDR_SIZE: u16 = 56;
/// File offset of the segment's bytes.
const SEGMENT_OFFSET: u64 = 0x1000;

/// `e_ident[EI_CLASS]`: 64-bit objects.
const ELFCLASS64: u8 = 2;
/// `e_ident[EI_DATA]`: little-endian.
const ELFDATA2LSB: u8 = 1;
/// `e_ident[EI_VERSION]` and `e_version`: the current (only) ELF version.
const EV_CURRENT: u8 = 1;
/// `e_type`: executable file.
const ET_EXEC: u16 = 2;
/// `e_machine`: AMD x86-64.
const EM_X86_64: u16 = 62;
/// `p_type`: loadable segment.
const PT_LOAD: u32 = 1;
/// `p_flags`: executable, writable, readable.
const PF_RWX: u32 = 0x1 | 0x2 | 0x4;

/// Builds an ELF64 executable whose single `PT_LOAD` segment holds `code`, loaded at
/// [`LOAD_ADDR`] (both `p_paddr` and `p_vaddr`), with the entry point at its first byte.
///
/// `mem_size` is the segment's size in memory (`p_memsz`); anything beyond `code.len()` is
/// zero-filled by the loader (it is zero anyway: guest RAM starts zeroed). It is raised to
/// `code.len()` if smaller.
pub fn elf64_executable(code: &[u8], mem_size: u64) -> Vec<u8> {
    assert!(
        !code.is_empty(),
        "an empty PT_LOAD segment would be skipped by the loader"
    );
    let file_size = code.len() as u64;
    let mem_size = mem_size.max(file_size);

    let mut out = Vec::with_capacity(SEGMENT_OFFSET as usize + code.len());

    // ---- Elf64_Ehdr ----
    // e_ident[0..4]: magic.
    out.extend_from_slice(&[0x7f, b'E', b'L', b'F']);
    // e_ident[4..7]: class, data encoding, version.
    out.extend_from_slice(&[ELFCLASS64, ELFDATA2LSB, EV_CURRENT]);
    // e_ident[7]: OS ABI (System V), e_ident[8]: ABI version, e_ident[9..16]: padding.
    out.extend_from_slice(&[0; 9]);
    out.extend_from_slice(&ET_EXEC.to_le_bytes()); // e_type
    out.extend_from_slice(&EM_X86_64.to_le_bytes()); // e_machine
    out.extend_from_slice(&u32::from(EV_CURRENT).to_le_bytes()); // e_version
    out.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    out.extend_from_slice(&u64::from(EHDR_SIZE).to_le_bytes()); // e_phoff: right after us
    out.extend_from_slice(&0u64.to_le_bytes()); // e_shoff: no section headers
    out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    out.extend_from_slice(&EHDR_SIZE.to_le_bytes()); // e_ehsize
    out.extend_from_slice(&PHDR_SIZE.to_le_bytes()); // e_phentsize
    out.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    out.extend_from_slice(&0u16.to_le_bytes()); // e_shentsize: no section headers
    out.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    out.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx: SHN_UNDEF
    debug_assert_eq!(out.len(), usize::from(EHDR_SIZE));

    // ---- Elf64_Phdr ----
    out.extend_from_slice(&PT_LOAD.to_le_bytes()); // p_type
    out.extend_from_slice(&PF_RWX.to_le_bytes()); // p_flags
    out.extend_from_slice(&SEGMENT_OFFSET.to_le_bytes()); // p_offset
    out.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_vaddr
    out.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_paddr
    out.extend_from_slice(&file_size.to_le_bytes()); // p_filesz
    out.extend_from_slice(&mem_size.to_le_bytes()); // p_memsz
    out.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    debug_assert_eq!(out.len(), usize::from(EHDR_SIZE + PHDR_SIZE));

    // ---- padding, then the segment ----
    out.resize(SEGMENT_OFFSET as usize, 0);
    out.extend_from_slice(code);
    out
}

/// Writes [`elf64_executable`]`(code, mem_size)` to `path`.
pub fn write_elf(path: &Path, code: &[u8], mem_size: u64) {
    std::fs::write(path, elf64_executable(code, mem_size))
        .unwrap_or_else(|e| panic!("cannot write guest ELF {}: {e}", path.display()));
}

/// The fields of an ELF64 file that the tests check, parsed back (little-endian).
#[derive(Debug, PartialEq, Eq)]
pub struct ParsedElf {
    /// `e_entry`.
    pub entry: u64,
    /// `(p_type, p_offset, p_paddr, p_filesz, p_memsz)` of every program header.
    pub segments: Vec<(u32, u64, u64, u64, u64)>,
}

/// Parses the header fields [`ParsedElf`] holds; panics on a malformed file. Used by the
/// helpers' self-tests to check [`elf64_executable`] independently of the VMM.
pub fn parse(bytes: &[u8]) -> ParsedElf {
    let u16_at = |o: usize| u16::from_le_bytes(bytes[o..o + 2].try_into().expect("2 bytes"));
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
    assert_eq!(&bytes[0..4], b"\x7fELF", "bad magic");
    assert_eq!(bytes[4], ELFCLASS64, "not ELFCLASS64");
    assert_eq!(bytes[5], ELFDATA2LSB, "not little-endian");
    assert_eq!(u16_at(16), ET_EXEC, "not ET_EXEC");
    assert_eq!(u16_at(18), EM_X86_64, "not EM_X86_64");
    let entry = u64_at(24);
    let phoff = u64_at(32) as usize;
    let phentsize = usize::from(u16_at(54));
    let phnum = usize::from(u16_at(56));
    assert_eq!(phentsize, usize::from(PHDR_SIZE), "bad e_phentsize");
    let segments = (0..phnum)
        .map(|i| {
            let p = phoff + i * phentsize;
            (
                u32_at(p),
                u64_at(p + 8),
                u64_at(p + 24),
                u64_at(p + 32),
                u64_at(p + 40),
            )
        })
        .collect();
    ParsedElf { entry, segments }
}
