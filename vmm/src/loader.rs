//! Puts a bootable guest in memory: kernel, initrd, command line, boot tables, and the entry
//! point the boot vCPU starts at. Called at start-up and again on every guest reset.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::memory::GuestRam;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, BzImage, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::arch::boot_params::{self, InitrdPlacement};
use crate::arch::layout::{
    ram_regions, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO_GAP_START, VIRTIO_MMIO_SIZE,
};
use crate::arch::regs::{self, BootProtocol};
use crate::arch::{acpi, mptable};

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// Offset of the 64-bit entry point (startup_64) in a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Oldest boot protocol with a 64-bit entry point and `xloadflags`.
const MIN_BZIMAGE_PROTOCOL: u16 = 0x020c;
/// `xloadflags` bit: the kernel has the legacy 64-bit entry point at 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
const PAGE_SIZE: u64 = 4096;

/// Errors while loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The kernel file could not be opened or read.
    #[error("cannot read kernel {path}: {source}")]
    KernelFile {
        /// The path given.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The ELF loader rejected the kernel.
    #[error("cannot load ELF kernel: {0}")]
    Elf(linux_loader::loader::Error),
    /// The bzImage loader rejected the kernel.
    #[error("cannot load kernel (neither an ELF vmlinux nor a bzImage): {0}")]
    BzImage(linux_loader::loader::Error),
    /// The bzImage is too old or lacks a 64-bit entry point.
    #[error("the bzImage has no 64-bit entry point (boot protocol {0:#x}, need 2.12+ with XLF_KERNEL_64)")]
    BzImageNot64Bit(u16),
    /// The initrd file could not be opened or read.
    #[error("cannot read initrd {path}: {source}")]
    InitrdFile {
        /// The path given.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The initrd does not fit in low memory above the kernel.
    #[error(
        "the initrd ({size} bytes) does not fit in guest RAM below {limit:#x} above the kernel"
    )]
    InitrdTooLarge {
        /// Its size.
        size: u64,
        /// The highest address it may end at.
        limit: u64,
    },
    /// The command line is too long or malformed.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot tables failed.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// Writing the MP table failed.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// Writing the ACPI tables failed.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// Writing the zero page or PVH start info failed.
    #[error(transparent)]
    BootParams(#[from] boot_params::BootParamsError),
}

/// What the guest needs to boot, independent of the VM it runs in.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// Path of the kernel (ELF vmlinux or bzImage).
    pub kernel: std::path::PathBuf,
    /// Path of the initrd, if any.
    pub initrd: Option<std::path::PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// Guest RAM size in bytes.
    pub mem_size: u64,
    /// Number of vCPUs (for the MP table).
    pub num_cpus: u8,
    /// The virtio-mmio devices, described in the DSDT and on the command line.
    pub virtio: Vec<acpi::VirtioMmioWindow>,
}

/// Where and how the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    /// Entry point.
    pub entry: GuestAddress,
    /// Entry protocol.
    pub protocol: BootProtocol,
}

struct LoadedKernel {
    entry: BootEntry,
    end: u64,
    header: Option<setup_header>,
}

fn open(path: &Path) -> Result<File, LoaderError> {
    File::open(path).map_err(|source| LoaderError::KernelFile {
        path: path.display().to_string(),
        source,
    })
}

fn is_elf(file: &mut File) -> std::io::Result<bool> {
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic)?;
    file.seek(SeekFrom::Start(0))?;
    Ok(n == 4 && &magic == ELF_MAGIC)
}

fn load_kernel(mem: &GuestRam, path: &Path) -> Result<LoadedKernel, LoaderError> {
    let mut file = open(path)?;
    let io_err = |source| LoaderError::KernelFile {
        path: path.display().to_string(),
        source,
    };
    if is_elf(&mut file).map_err(io_err)? {
        let result =
            Elf::load(mem, None, &mut file, Some(HIMEM_START)).map_err(LoaderError::Elf)?;
        let entry = match result.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => BootEntry {
                entry: addr,
                protocol: BootProtocol::Pvh,
            },
            _ => BootEntry {
                entry: result.kernel_load,
                protocol: BootProtocol::Linux64,
            },
        };
        return Ok(LoadedKernel {
            entry,
            end: result.kernel_end,
            header: None,
        });
    }
    let result =
        BzImage::load(mem, None, &mut file, Some(HIMEM_START)).map_err(LoaderError::BzImage)?;
    let header = result.setup_header;
    let version = header.map_or(0, |h| h.version);
    let xloadflags = header.map_or(0, |h| h.xloadflags);
    if version < MIN_BZIMAGE_PROTOCOL || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LoaderError::BzImageNot64Bit(version));
    }
    Ok(LoadedKernel {
        entry: BootEntry {
            entry: result.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
            protocol: BootProtocol::Linux64,
        },
        end: result.kernel_end,
        header,
    })
}

/// Loads the initrd at the top of low RAM (below the device gap and below `addr_max`),
/// page-aligned, above the kernel.
fn load_initrd(
    mem: &GuestRam,
    path: &Path,
    mem_size: u64,
    kernel_end: u64,
    addr_max: Option<u64>,
) -> Result<InitrdPlacement, LoaderError> {
    let io_err = |source| LoaderError::InitrdFile {
        path: path.display().to_string(),
        source,
    };
    let mut file = File::open(path).map_err(io_err)?;
    let size = file.metadata().map_err(io_err)?.len();
    let low_end = ram_regions(mem_size)
        .first()
        .map_or(0, |(start, len)| start.0 + len)
        .min(MMIO_GAP_START);
    let limit = addr_max.map_or(low_end, |max| low_end.min(max.saturating_add(1)));
    let too_large = LoaderError::InitrdTooLarge { size, limit };
    let start = limit.checked_sub(size).ok_or(too_large)? & !(PAGE_SIZE - 1);
    if start < kernel_end {
        return Err(LoaderError::InitrdTooLarge { size, limit });
    }
    let addr = GuestAddress(start);
    mem.read_exact_volatile_from(addr, &mut file, size as usize)
        .map_err(|e| io_err(std::io::Error::other(e.to_string())))?;
    Ok(InitrdPlacement { addr, size })
}

/// The `virtio_mmio.device=SIZE@BASE:IRQ` parameter that tells a kernel without ACPI about a
/// virtio-mmio device (`CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`).
pub fn virtio_mmio_param(window: &acpi::VirtioMmioWindow) -> String {
    format!(
        "virtio_mmio.device={}K@{:#x}:{}",
        VIRTIO_MMIO_SIZE >> 10,
        window.base,
        window.gsi
    )
}

/// Builds the kernel command line: one `virtio_mmio.device=` per virtio device, then the
/// user's (which may end with `-- ARGS` for init), checking its length.
fn build_cmdline(text: &str, virtio: &[acpi::VirtioMmioWindow]) -> Result<Cmdline, LoaderError> {
    let mut cmdline =
        Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| LoaderError::Cmdline(e.to_string()))?;
    for window in virtio {
        cmdline
            .insert_str(virtio_mmio_param(window))
            .map_err(|e| LoaderError::Cmdline(e.to_string()))?;
    }
    if !text.is_empty() {
        cmdline
            .insert_str(text)
            .map_err(|e| LoaderError::Cmdline(e.to_string()))?;
    }
    Ok(cmdline)
}

/// Loads everything the guest needs into (zeroed) guest memory and returns the boot vCPU's
/// entry point.
pub fn load_guest(mem: &GuestRam, image: &GuestImage) -> Result<BootEntry, LoaderError> {
    let kernel = load_kernel(mem, &image.kernel)?;
    let initrd = match &image.initrd {
        Some(path) => Some(load_initrd(
            mem,
            path,
            image.mem_size,
            kernel.end,
            kernel.header.map(|h| u64::from(h.initrd_addr_max)),
        )?),
        None => None,
    };
    let cmdline = build_cmdline(&image.cmdline, &image.virtio)?;
    load_cmdline(mem, CMDLINE_START, &cmdline).map_err(|e| LoaderError::Cmdline(e.to_string()))?;
    let cmdline_size = cmdline
        .as_cstring()
        .map_err(|e| LoaderError::Cmdline(e.to_string()))?
        .as_bytes_with_nul()
        .len();

    regs::write_descriptor_tables(mem, kernel.entry.protocol)?;
    regs::write_page_tables(mem)?;
    mptable::setup_mptable(mem, image.num_cpus)?;
    let rsdp = acpi::create_acpi_tables(mem, image.num_cpus, &image.virtio)?;
    match kernel.entry.protocol {
        BootProtocol::Linux64 => boot_params::write_zero_page(
            mem,
            image.mem_size,
            kernel.header,
            cmdline_size,
            initrd,
            Some(rsdp),
        )?,
        BootProtocol::Pvh => {
            boot_params::write_pvh_start_info(mem, image.mem_size, initrd, Some(rsdp))?
        }
    }
    Ok(kernel.entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_lists_virtio_devices_first() {
        let virtio = [
            acpi::VirtioMmioWindow {
                base: 0xc000_1000,
                gsi: 5,
            },
            acpi::VirtioMmioWindow {
                base: 0xc000_2000,
                gsi: 6,
            },
        ];
        let cmdline = build_cmdline("console=ttyS0 -- init", &virtio).unwrap();
        assert_eq!(
            cmdline.as_cstring().unwrap().to_str().unwrap(),
            "virtio_mmio.device=4K@0xc0001000:5 virtio_mmio.device=4K@0xc0002000:6 \
             console=ttyS0 -- init"
        );
        let plain = build_cmdline("console=ttyS0", &[]).unwrap();
        assert_eq!(
            plain.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0"
        );
        assert!(build_cmdline(&"x".repeat(CMDLINE_MAX_SIZE), &virtio).is_err());
    }
}
