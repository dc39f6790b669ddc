//! What the kernel reads at entry: the e820 memory map, and the zero page (Linux 64-bit boot
//! protocol) or the `hvm_start_info` structure (PVH).

use crate::memory::GuestRam;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{ByteValued, GuestAddress};

use super::layout::{
    ram_regions, BASE_RAM_END, BIOS_ROM_START, CMDLINE_START, HIMEM_START, MPTABLE_START,
    PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

// Zero-page header constants (Documentation/x86/boot.rst).
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Physical alignment a relocatable kernel needs when no setup header says otherwise.
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const E820_MAX_ENTRIES: usize = 128;

const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
const PVH_START_INFO_VERSION: u32 = 1;

/// Errors while writing the boot parameters.
#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    /// The e820 table would not fit in the zero page.
    #[error("the e820 map has {0} entries; the zero page holds {E820_MAX_ENTRIES}")]
    TooManyE820Entries(usize),
    /// linux-loader could not write the structure.
    #[error("cannot write the boot parameters: {0}")]
    Write(linux_loader::configurator::Error),
}

/// One e820 map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The guest's e820 map: base RAM, the reserved MP table area, then RAM from 1 MiB (below the
/// device gap) and from 4 GiB.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: BASE_RAM_END,
            kind: E820_RAM,
        },
        E820Entry {
            addr: MPTABLE_START.0,
            size: BIOS_ROM_START - MPTABLE_START.0,
            kind: E820_RESERVED,
        },
    ];
    for (start, size) in ram_regions(mem_size) {
        let begin = start.0.max(HIMEM_START.0);
        let end = start.0 + size;
        if end > begin {
            map.push(E820Entry {
                addr: begin,
                size: end - begin,
                kind: E820_RAM,
            });
        }
    }
    map
}

/// `boot_params` wrapped so vm-memory can read and write it as bytes.
#[derive(Clone, Copy, Default)]
pub struct ZeroPage(pub boot_params);

// SAFETY: `boot_params` is a plain-old-data C struct (integers and arrays only), so every byte
// pattern is a valid value.
unsafe impl ByteValued for ZeroPage {}

/// Where the initrd was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdPlacement {
    /// Guest-physical address.
    pub addr: GuestAddress,
    /// Size in bytes.
    pub size: u64,
}

/// Writes the zero page for the Linux 64-bit boot protocol. `header` is the bzImage's own
/// setup header, or `None` for an ELF vmlinux.
pub fn write_zero_page(
    mem: &GuestRam,
    mem_size: u64,
    header: Option<setup_header>,
    cmdline_size: usize,
    initrd: Option<InitrdPlacement>,
    rsdp: Option<GuestAddress>,
) -> Result<(), BootParamsError> {
    let mut params = boot_params::default();
    if let Some(hdr) = header {
        params.hdr = hdr;
    } else {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START.0 as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr.0 as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    if let Some(rsdp) = rsdp {
        params.acpi_rsdp_addr = rsdp.0;
    }
    let map = e820_map(mem_size);
    if map.len() > E820_MAX_ENTRIES {
        return Err(BootParamsError::TooManyE820Entries(map.len()));
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&ZeroPage(params), ZERO_PAGE_START),
        mem,
    )
    .map_err(BootParamsError::Write)
}

/// Writes the PVH start info, its memory map and the initrd module entry.
pub fn write_pvh_start_info(
    mem: &GuestRam,
    mem_size: u64,
    initrd: Option<InitrdPlacement>,
    rsdp: Option<GuestAddress>,
) -> Result<(), BootParamsError> {
    let map: Vec<hvm_memmap_table_entry> = e820_map(mem_size)
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: PVH_START_INFO_VERSION,
        cmdline_paddr: CMDLINE_START.0,
        memmap_paddr: PVH_MEMMAP_START.0,
        memmap_entries: map.len() as u32,
        rsdp_paddr: rsdp.map_or(0, |a| a.0),
        ..Default::default()
    };
    let mut params;
    if let Some(initrd) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START.0;
        params = BootParams::new(&info, PVH_INFO_START);
        params.set_modules(
            &[hvm_modlist_entry {
                paddr: initrd.addr.0,
                size: initrd.size,
                ..Default::default()
            }],
            PVH_MODLIST_START,
        );
    } else {
        params = BootParams::new(&info, PVH_INFO_START);
    }
    params.set_sections(&map, PVH_MEMMAP_START);
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(BootParamsError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout::{GIB, MIB};
    use vm_memory::Bytes;

    #[test]
    fn e820_for_small_and_large_guests() {
        let small = e820_map(512 * MIB);
        assert_eq!(
            small,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: 0x9fc00,
                    size: 0x40400,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: MIB,
                    size: 511 * MIB,
                    kind: E820_RAM
                },
            ]
        );
        let large = e820_map(5 * GIB);
        assert_eq!(
            large[2],
            E820Entry {
                addr: MIB,
                size: 3 * GIB - MIB,
                kind: E820_RAM
            }
        );
        assert_eq!(
            large[3],
            E820Entry {
                addr: 4 * GIB,
                size: 2 * GIB,
                kind: E820_RAM
            }
        );
    }

    #[test]
    fn zero_page_fields() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), (16 * MIB) as usize)]).unwrap();
        let initrd = InitrdPlacement {
            addr: GuestAddress(0xf0_0000),
            size: 0x1234,
        };
        write_zero_page(&mem, 16 * MIB, None, 42, Some(initrd), None).unwrap();
        let params: ZeroPage = mem.read_obj(ZERO_PAGE_START).unwrap();
        let hdr = params.0.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ hdr.cmdline_size }, 42);
        assert_eq!(
            ({ hdr.ramdisk_image }, { hdr.ramdisk_size }),
            (0xf0_0000, 0x1234)
        );
        assert_eq!(params.0.e820_entries, 3);
        let third = params.0.e820_table[2];
        assert_eq!(
            ({ third.addr }, { third.size }, { third.r#type }),
            (MIB, 15 * MIB, 1)
        );
    }

    #[test]
    fn pvh_start_info_fields() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), (16 * MIB) as usize)]).unwrap();
        let initrd = InitrdPlacement {
            addr: GuestAddress(0xf0_0000),
            size: 0x1000,
        };
        write_pvh_start_info(&mem, 16 * MIB, Some(initrd), None).unwrap();
        let info: hvm_start_info = mem.read_obj(PVH_INFO_START).unwrap();
        assert_eq!(
            (info.magic, info.version, info.nr_modules),
            (0x336e_c578, 1, 1)
        );
        assert_eq!((info.memmap_paddr, info.memmap_entries), (0x7000, 3));
        let module: hvm_modlist_entry = mem.read_obj(PVH_MODLIST_START).unwrap();
        assert_eq!((module.paddr, module.size), (0xf0_0000, 0x1000));
        let ram: hvm_memmap_table_entry = mem.read_obj(GuestAddress(0x7000 + 2 * 24)).unwrap();
        assert_eq!((ram.addr, ram.size, ram.type_), (MIB, 15 * MIB, 1));
    }
}
