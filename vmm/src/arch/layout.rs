//! The guest-physical memory map, in address order.
//!
//! Every fixed guest address Skiff uses is defined here and nowhere else: the boot code, the
//! e820 table, the MP table and the device manager import these constants. Keep the file ordered
//! by address; derive a constant from its neighbours when it depends on them.

use vm_memory::GuestAddress;

/// One KiB.
pub const KIB: u64 = 1 << 10;
/// One MiB.
pub const MIB: u64 = 1 << 20;
/// One GiB.
pub const GIB: u64 = 1 << 30;

// ---- Low memory (below 1 MiB) ------------------------------------------------------------------

/// Boot GDT: null, 64-bit code, data and TSS descriptors.
pub const BOOT_GDT_START: GuestAddress = GuestAddress(0x500);
/// Number of 8-byte entries in the boot GDT.
pub const BOOT_GDT_ENTRIES: usize = 4;
/// Boot IDT: a single empty gate, so any early exception escalates to a triple fault (reset).
pub const BOOT_IDT_START: GuestAddress = GuestAddress(0x520);

/// PVH `hvm_start_info` structure.
pub const PVH_INFO_START: GuestAddress = GuestAddress(0x6000);
/// PVH module list (one entry: the initrd), right after the start info.
pub const PVH_MODLIST_START: GuestAddress = GuestAddress(0x6040);
/// PVH memory map. Shares the page with the zero page: the two protocols never coexist.
pub const PVH_MEMMAP_START: GuestAddress = GuestAddress(0x7000);

/// Linux zero page (`struct boot_params`) for the 64-bit boot protocol.
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x7000);

/// Initial stack pointer of the boot vCPU (grows down inside page 0x8000).
pub const BOOT_STACK_POINTER: GuestAddress = GuestAddress(0x8ff0);

/// Boot page tables: one PML4, one PDPT and [`BOOT_PD_COUNT`] page directories that identity-map
/// the first 4 GiB with 2 MiB pages.
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
/// Page-directory-pointer table.
pub const PDPT_START: GuestAddress = GuestAddress(PML4_START.0 + 0x1000);
/// First of the page directories (one per GiB mapped).
pub const PD_START: GuestAddress = GuestAddress(PDPT_START.0 + 0x1000);
/// Number of page directories, i.e. GiB identity-mapped at boot.
pub const BOOT_PD_COUNT: u64 = 4;

/// Kernel command line.
pub const CMDLINE_START: GuestAddress = GuestAddress(0x20000);
/// Largest command line accepted, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 0x10000;

/// Start of the last KiB of base memory, where the MP table lives; reserved in the e820 map up
/// to [`BIOS_ROM_START`]. Linux scans this KiB for the MP floating pointer.
pub const MPTABLE_START: GuestAddress = GuestAddress(0x9fc00);
/// End of the conventional RAM the guest may use below 1 MiB (exclusive).
pub const BASE_RAM_END: u64 = MPTABLE_START.0;
/// Start of the legacy BIOS/ROM area; only the ACPI tables live between here and 1 MiB.
pub const BIOS_ROM_START: u64 = 0xe0000;
/// ACPI Root System Description Pointer, where Linux's legacy scan also finds it.
pub const ACPI_RSDP_START: GuestAddress = GuestAddress(BIOS_ROM_START);
/// The other ACPI tables (XSDT, FADT, DSDT, MADT), after the RSDP, up to 1 MiB.
pub const ACPI_TABLES_START: GuestAddress = GuestAddress(BIOS_ROM_START + 0x100);
/// End of the ACPI tables area (exclusive).
pub const ACPI_TABLES_END: u64 = HIMEM_START.0;

// ---- High memory -------------------------------------------------------------------------------

/// I/O port of the ACPI sleep control/status and reset registers (hardware-reduced ACPI).
pub const ACPI_PM_PORT: u16 = 0x600;

/// Where the kernel is loaded and "high memory" begins for the boot protocol.
pub const HIMEM_START: GuestAddress = GuestAddress(MIB);

/// Start of the 32-bit device gap: RAM below 4 GiB ends here at the latest.
pub const MMIO_GAP_START: u64 = 3 * GIB;
/// End of the 32-bit device gap; RAM beyond [`MMIO_GAP_START`] continues from here.
pub const MMIO_GAP_END: u64 = 4 * GIB;
/// Size of the device gap.
pub const MMIO_GAP_SIZE: u64 = MMIO_GAP_END - MMIO_GAP_START;

/// Start of the window handed out to platform and virtio-mmio devices.
pub const MMIO_DEVICES_START: u64 = MMIO_GAP_START;
/// The ACPI Generic Event Device's one-page register window (power button events).
pub const ACPI_GED_START: u64 = MMIO_DEVICES_START;
/// Size of the GED window.
pub const ACPI_GED_SIZE: u64 = 0x1000;
/// First virtio-mmio device window; each device takes [`VIRTIO_MMIO_SIZE`].
pub const VIRTIO_MMIO_START: u64 = ACPI_GED_START + ACPI_GED_SIZE;
/// Size of one virtio-mmio register window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The interrupt lines (GSIs, IOAPIC pins) of the virtio-mmio devices, in device order.
///
/// Edge-triggered, active high, like every ISA line the MP table and MADT describe. They
/// avoid the lines of the timer (0), keyboard (1), cascade (2), COM1 (4), the RTC (8) and the
/// ACPI GED (9); the IOAPIC's pins above 15 follow.
pub const VIRTIO_GSIS: [u32; 17] = [
    5, 6, 7, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23,
];
/// Most virtio-mmio devices a machine holds (one GSI each).
pub const VIRTIO_MMIO_MAX_DEVICES: usize = VIRTIO_GSIS.len();
/// End of the virtio-mmio windows (exclusive).
pub const VIRTIO_MMIO_END: u64 =
    VIRTIO_MMIO_START + VIRTIO_MMIO_MAX_DEVICES as u64 * VIRTIO_MMIO_SIZE;

/// Where the virtio-mmio device number `index` lives: its window base and GSI.
pub fn virtio_mmio_slot(index: usize) -> Option<(u64, u32)> {
    let gsi = *VIRTIO_GSIS.get(index)?;
    Some((VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE, gsi))
}

/// KVM's three-page TSS region required on Intel hosts (inside the gap, below the IOAPIC).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity-map page for real-mode emulation on Intel hosts, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = KVM_TSS_ADDRESS - 0x1000;

/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const APIC_START: u64 = 0xfee0_0000;

/// Where guest RAM resumes above the device gap.
pub const RAM_64BIT_START: GuestAddress = GuestAddress(MMIO_GAP_END);

/// The RAM regions of a guest with `mem_size` bytes: everything below the gap, then the rest
/// from 4 GiB. Returns one or two `(start, size)` pairs.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (RAM_64BIT_START, mem_size - MMIO_GAP_START),
        ]
    }
}

// The map's ordering, checked at compile time: moving one region past another fails the build.
const _: () = {
    assert!(BOOT_IDT_START.0 >= BOOT_GDT_START.0 + 8 * BOOT_GDT_ENTRIES as u64);
    assert!(PVH_MODLIST_START.0 >= PVH_INFO_START.0 + 0x38);
    assert!(BOOT_STACK_POINTER.0 < PML4_START.0);
    assert!(PD_START.0 + BOOT_PD_COUNT * 0x1000 <= CMDLINE_START.0);
    assert!(CMDLINE_START.0 + CMDLINE_MAX_SIZE as u64 <= MPTABLE_START.0);
    assert!(BIOS_ROM_START <= HIMEM_START.0);
    assert!(ACPI_TABLES_START.0 < ACPI_TABLES_END);
    assert!(IOAPIC_START >= MMIO_DEVICES_START);
    assert!(VIRTIO_MMIO_END <= KVM_IDENTITY_MAP_ADDRESS && VIRTIO_MMIO_END <= IOAPIC_START);
    // KVM's private pages sit in the gap above the APICs and below 4 GiB.
    assert!(KVM_IDENTITY_MAP_ADDRESS >= APIC_START + 0x1000);
    assert!(KVM_TSS_ADDRESS + 3 * 0x1000 <= MMIO_GAP_END);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region() {
        assert_eq!(ram_regions(256 * MIB), vec![(GuestAddress(0), 256 * MIB)]);
        assert_eq!(ram_regions(3 * GIB), vec![(GuestAddress(0), 3 * GIB)]);
    }

    #[test]
    fn virtio_slots_follow_the_ged_with_free_gsis() {
        assert_eq!(virtio_mmio_slot(0), Some((0xc000_1000, 5)));
        assert_eq!(virtio_mmio_slot(3), Some((0xc000_4000, 10)));
        assert_eq!(virtio_mmio_slot(VIRTIO_MMIO_MAX_DEVICES), None);
        for gsi in VIRTIO_GSIS {
            assert!(![0, 1, 2, 4, 8, 9].contains(&gsi) && gsi < 24, "{gsi}");
        }
    }

    #[test]
    fn large_guest_skips_the_gap() {
        assert_eq!(
            ram_regions(6 * GIB),
            vec![(GuestAddress(0), 3 * GIB), (GuestAddress(4 * GIB), 3 * GIB)]
        );
    }
}
