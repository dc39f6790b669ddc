//! The ACPI tables of Skiff's hardware-reduced ACPI platform: RSDP, XSDT, FADT, MADT, DSDT.
//!
//! The platform is "hardware-reduced" (ACPI 6.5, section 4.1): no PM1/GPE register blocks and
//! no SCI. Instead:
//!
//! * the FADT points its sleep control/status and reset registers at the
//!   [`AcpiPmDevice`](devices::acpi::AcpiPmDevice) in I/O space at [`ACPI_PM_PORT`], so a guest
//!   S5 (soft-off) or ACPI reset reaches the VMM;
//! * the power button is a control-method button (`PNP0C0C`, `\_SB_.PWRB`) notified by the
//!   Generic Event Device (`ACPI0013`, `\_SB_.GED_`): on [`ACPI_GED_GSI`] its `_EVT` method
//!   reads the [`GedDevice`](devices::acpi::GedDevice) register at [`ACPI_GED_START`] and does
//!   `Notify (\_SB_.PWRB, 0x80)` when the power-button bit is set.
//!
//! The DSDT also describes COM1 and the i8042: in hardware-reduced mode Linux sets up no
//! legacy PIC and no ISA IRQ mappings, so an ISA device only gets a working interrupt if the
//! DSDT lists it with its GSI.
//!
//! The MADT matches the MP table ([`super::mptable`]): one enabled local APIC per vCPU (APIC id
//! = ACPI processor UID = index), one IOAPIC with id [`ioapic_id`] and GSI base 0, ISA IRQ n on
//! IOAPIC pin n (so no interrupt source override: KVM's in-kernel PIT drives GSI 0), and NMI on
//! LINT1 of every local APIC.
//!
//! Layout: the RSDP at [`ACPI_RSDP_START`], then from [`ACPI_TABLES_START`] the DSDT, FADT,
//! MADT and XSDT, each 8-byte aligned, below [`ACPI_TABLES_END`].

use crate::memory::GuestRam;
use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags as FadtFlag};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use devices::acpi::{
    ACPI_GED_GSI, ACPI_RESET_VALUE, GED_EVENT_POWER_BUTTON, GED_EVENT_REG_LEN,
    GED_EVENT_REG_OFFSET, PM_REGISTER_BIT_WIDTH, PM_RESET_OFFSET, PM_SLEEP_CONTROL_OFFSET,
    PM_SLEEP_STATUS_OFFSET, SLP_TYP_S5,
};
use devices::legacy::cmos::{CMOS_PORT_BASE, CMOS_PORT_LEN};
use devices::legacy::i8042::I8042_PORT_BASE;
use devices::legacy::serial::{COM1_GSI, COM1_PORT_BASE, COM1_PORT_LEN};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::layout::{
    ACPI_GED_SIZE, ACPI_GED_START, ACPI_PM_PORT, ACPI_RSDP_START, ACPI_TABLES_END,
    ACPI_TABLES_START, APIC_START, IOAPIC_START,
};
use super::mptable::{ioapic_id, MAX_CPUS};

// ---- Identification ----------------------------------------------------------------------------

/// OEM ID of every table (6 bytes, space padded).
const OEM_ID: [u8; 6] = *b"SKIFF ";
/// OEM table ID of every table (8 bytes).
const OEM_TABLE_ID: [u8; 8] = *b"SKIFFVMM";
/// OEM revision of every table.
const OEM_REVISION: u32 = 1;
/// FADT "Hypervisor Vendor Identity": "SKIFF", NUL padded, as a little-endian u64.
const HYPERVISOR_VENDOR_IDENTITY: u64 = u64::from_le_bytes(*b"SKIFF\0\0\0");

// ---- Table layout ------------------------------------------------------------------------------

/// Length of the common System Description Table header.
const SDT_HEADER_LEN: usize = 36;
/// Length of the ACPI 2.0+ RSDP.
const RSDP_LEN: u64 = 36;
/// Alignment of each table after the RSDP.
const TABLE_ALIGNMENT: u64 = 8;

// ---- DSDT --------------------------------------------------------------------------------------

/// DSDT revision; 2 or more makes AML integers 64 bits wide.
const DSDT_REVISION: u8 = 6;
/// Notify value "device-specific: button pressed" for a control-method power button.
const NOTIFY_BUTTON_PRESSED: u8 = 0x80;
/// Number of registers of the i8042 described (data and command/status), one port each.
const I8042_PORT_COUNT: u8 = 1;
/// The i8042's command/status port.
const I8042_COMMAND_PORT: u16 = I8042_PORT_BASE + 4;
/// The i8042 keyboard's ISA IRQ.
const I8042_KBD_GSI: u32 = 1;
/// I/O descriptor alignment when minimum == maximum (fixed location).
const IO_ALIGNMENT_FIXED: u8 = 0;
/// COM1's port count as an I/O descriptor length.
const COM1_IO_LEN: u8 = {
    assert!(COM1_PORT_LEN <= u8::MAX as u64);
    COM1_PORT_LEN as u8
};
/// The CMOS RTC's port count as an I/O descriptor length.
const CMOS_IO_LEN: u8 = {
    assert!(CMOS_PORT_LEN <= u8::MAX as u64);
    CMOS_PORT_LEN as u8
};
/// The GED register window as Memory32Fixed base (it sits below 4 GiB).
const GED_WINDOW_BASE: u32 = {
    assert!(ACPI_GED_START + ACPI_GED_SIZE <= 1 << 32);
    ACPI_GED_START as u32
};
/// The GED register window as Memory32Fixed length.
const GED_WINDOW_SIZE: u32 = ACPI_GED_SIZE as u32;
/// Guest-physical address of the GED event register.
const GED_EVENT_REG_ADDR: u64 = ACPI_GED_START + GED_EVENT_REG_OFFSET;
/// Bits in the GED event register (the DSDT field's width).
const GED_EVENT_REG_BITS: usize = (GED_EVENT_REG_LEN * 8) as usize;

// ---- FADT --------------------------------------------------------------------------------------

/// FADT major revision (ACPI 6).
const FADT_MAJOR_REVISION: u8 = 6;
/// FADT minor revision (ACPI 6.5).
const FADT_MINOR_REVISION: u8 = 5;
/// IA-PC boot architecture flag: user-visible devices on the LPC/ISA bus (COM1).
const IAPC_BOOT_ARCH_LEGACY_DEVICES: u16 = 1 << 0;
/// IA-PC boot architecture flag: an 8042 keyboard controller is present.
const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
/// IA-PC boot architecture flag: do not probe for VGA.
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
/// The IA-PC boot architecture flags Skiff reports.
const IAPC_BOOT_ARCH: u16 =
    IAPC_BOOT_ARCH_LEGACY_DEVICES | IAPC_BOOT_ARCH_8042 | IAPC_BOOT_ARCH_VGA_NOT_PRESENT;
/// CMOS index of the RTC century register (the FADT's CENTURY field).
const CMOS_CENTURY_INDEX: u8 = 0x32;
/// FADT flags, from the ACPI 6.5 table 5.10:
/// * HW_REDUCED_ACPI: no fixed hardware, no SCI, no FACS;
/// * PWR_BUTTON and SLP_BUTTON set: there is no fixed-feature power or sleep button, the power
///   button is the control-method device `PNP0C0C` (the only kind a hardware-reduced platform
///   can have);
/// * RESET_REG_SUP: the reset register is valid.
const FADT_FLAGS: [FadtFlag; 4] = [
    FadtFlag::HwReducedAcpi,
    FadtFlag::PwrButton,
    FadtFlag::SlpButton,
    FadtFlag::ResetRegSup,
];

// ---- MADT --------------------------------------------------------------------------------------

/// MADT revision (ACPI 6.3 and later).
const MADT_REVISION: u8 = 5;
/// Offset of the "Local Interrupt Controller Address" field.
const MADT_LAPIC_ADDRESS_OFFSET: usize = SDT_HEADER_LEN;
/// Offset of the MADT flags.
const MADT_FLAGS_OFFSET: usize = SDT_HEADER_LEN + 4;
/// Length of the MADT before its interrupt controller structures.
const MADT_HEADER_LEN: u32 = SDT_HEADER_LEN as u32 + 8;
/// MADT flag: the platform also has dual 8259 PICs (KVM's in-kernel irqchip emulates them).
const MADT_PCAT_COMPAT: u32 = 1 << 0;
/// The local APICs' base address as the MADT's 32-bit field.
const LAPIC_ADDRESS: u32 = {
    assert!(APIC_START < 1 << 32);
    APIC_START as u32
};
/// The IOAPIC's base address as the MADT's 32-bit field.
const IOAPIC_ADDRESS: u32 = {
    assert!(IOAPIC_START < 1 << 32);
    IOAPIC_START as u32
};
/// First GSI of the IOAPIC.
const IOAPIC_GSI_BASE: u32 = 0;
/// MADT structure type: Local APIC NMI.
const MADT_TYPE_LOCAL_APIC_NMI: u8 = 4;
/// Length of a Local APIC NMI structure.
const MADT_LOCAL_APIC_NMI_LEN: u8 = 6;
/// ACPI processor UID meaning "all processors".
const ALL_PROCESSORS_UID: u8 = 0xff;
/// MPS INTI flags: polarity and trigger mode conform to the bus.
const MPS_INTI_CONFORMS: u16 = 0;
/// The local APIC input the NMI is wired to.
const LAPIC_NMI_LINT: u8 = 1;

/// Errors while writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The vCPU count is outside 1..=MAX_CPUS.
    #[error("{0} vCPUs requested; the MADT describes 1 to {MAX_CPUS}")]
    InvalidCpuCount(u8),
    /// The tables run past the end of their area.
    #[error("the ACPI tables end at {end:#x}, past the end of their area at {ACPI_TABLES_END:#x}")]
    TooLarge {
        /// Where the tables would end (exclusive).
        end: u64,
    },
    /// Writing a table to guest memory failed.
    #[error("cannot write the {table} table: {source}")]
    Write {
        /// Signature of the table.
        table: &'static str,
        /// The memory error.
        source: GuestMemoryError,
    },
}

/// Serialises an `acpi_tables` object.
fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// `Name (_S5_, Package (4) { S5, S5, 0, 0 })`: the S5 sleep type the PM device decodes.
fn s5_aml() -> Vec<u8> {
    to_bytes(&aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&SLP_TYP_S5, &SLP_TYP_S5, &aml::ZERO, &aml::ZERO]),
    ))
}

/// COM1: a 16550A (`PNP0501`) with its ports and ISA IRQ.
fn com1_aml() -> Vec<u8> {
    to_bytes(&aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ONE),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(
                        COM1_PORT_BASE,
                        COM1_PORT_BASE,
                        IO_ALIGNMENT_FIXED,
                        COM1_IO_LEN,
                    ),
                    &aml::Interrupt::new(true, true, false, false, COM1_GSI),
                ]),
            ),
        ],
    ))
}

/// The i8042's keyboard port (`PNP0303`): data and command/status ports, keyboard IRQ.
fn ps2_keyboard_aml() -> Vec<u8> {
    to_bytes(&aml::Device::new(
        "PS2K".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0303")),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(
                        I8042_PORT_BASE,
                        I8042_PORT_BASE,
                        IO_ALIGNMENT_FIXED,
                        I8042_PORT_COUNT,
                    ),
                    &aml::IO::new(
                        I8042_COMMAND_PORT,
                        I8042_COMMAND_PORT,
                        IO_ALIGNMENT_FIXED,
                        I8042_PORT_COUNT,
                    ),
                    &aml::Interrupt::new(true, true, false, false, I8042_KBD_GSI),
                ]),
            ),
        ],
    ))
}

/// The CMOS RTC (`PNP0B00`) with its index/data ports. No interrupt: the device does not
/// raise one, and Linux's rtc-cmos works without it. Hardware-reduced ACPI has no legacy
/// device list, so without this entry Linux does not find the RTC.
fn rtc_aml() -> Vec<u8> {
    to_bytes(&aml::Device::new(
        "RTC_".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0B00")),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::IO::new(
                    CMOS_PORT_BASE,
                    CMOS_PORT_BASE,
                    IO_ALIGNMENT_FIXED,
                    CMOS_IO_LEN,
                )]),
            ),
        ],
    ))
}

/// The control-method power button (`PNP0C0C`) the GED notifies.
fn power_button_aml() -> Vec<u8> {
    to_bytes(&aml::Device::new(
        "PWRB".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
        ],
    ))
}

/// The Generic Event Device (`ACPI0013`).
///
/// Its `_CRS` lists its interrupt and nothing else: Linux's GED driver fails on any other
/// resource, so the register window is claimed by [`ged_registers_aml`] instead. The event
/// register is read through an OperationRegion by `_EVT`:
///
/// ```text
/// Method (_EVT, 1, Serialized) {
///     Local0 = GDAT
///     If ((Local0 & POWER_BUTTON) == POWER_BUTTON) { Notify (\_SB_.PWRB, 0x80) }
/// }
/// ```
fn ged_aml() -> Vec<u8> {
    let gdat = aml::Path::new("GDAT");
    let power_button_bit = aml::And::new(&aml::ZERO, &aml::Local(0), &GED_EVENT_POWER_BUTTON);
    to_bytes(&aml::Device::new(
        "GED_".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::Interrupt::new(
                    true,
                    true,
                    false,
                    false,
                    ACPI_GED_GSI,
                )]),
            ),
            &aml::OpRegion::new(
                "GDST".into(),
                aml::OpRegionSpace::SystemMemory,
                &GED_EVENT_REG_ADDR,
                &GED_EVENT_REG_LEN,
            ),
            &aml::Field::new(
                "GDST".into(),
                aml::FieldAccessType::Byte,
                aml::FieldLockRule::NoLock,
                aml::FieldUpdateRule::WriteAsZeroes,
                vec![aml::FieldEntry::Named(*b"GDAT", GED_EVENT_REG_BITS)],
            ),
            &aml::Method::new(
                "_EVT".into(),
                1,
                true,
                vec![
                    &aml::Store::new(&aml::Local(0), &gdat),
                    &aml::If::new(
                        &aml::Equal::new(&power_button_bit, &GED_EVENT_POWER_BUTTON),
                        vec![&aml::Notify::new(
                            &aml::Path::new("\\_SB_.PWRB"),
                            &NOTIFY_BUTTON_PRESSED,
                        )],
                    ),
                ],
            ),
        ],
    ))
}

/// Motherboard resources (`PNP0C02`): the GED's register window, so the OS keeps it free.
fn ged_registers_aml() -> Vec<u8> {
    to_bytes(&aml::Device::new(
        "GEDR".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::Memory32Fixed::new(
                    true,
                    GED_WINDOW_BASE,
                    GED_WINDOW_SIZE,
                )]),
            ),
        ],
    ))
}

/// A virtio-mmio window and its interrupt line, as the DSDT and the command line describe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioWindow {
    /// Base of the register window (below 4 GiB).
    pub base: u32,
    /// Its GSI.
    pub gsi: u32,
}

/// One virtio-mmio device (`LNRO0005`, as Firecracker and Cloud Hypervisor describe them):
/// its register window and edge-triggered, active-high interrupt.
fn virtio_mmio_aml(index: usize, window: VirtioMmioWindow) -> Vec<u8> {
    let uid = u32::try_from(index).unwrap_or(u32::MAX);
    to_bytes(&aml::Device::new(
        format!("VR{:02X}", index & 0xff).as_str().into(),
        vec![
            &aml::Name::new("_HID".into(), &"LNRO0005"),
            &aml::Name::new("_UID".into(), &uid),
            &aml::Name::new("_CCA".into(), &aml::ONE),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::Memory32Fixed::new(true, window.base, VIRTIO_WINDOW_SIZE),
                    &aml::Interrupt::new(true, true, false, false, window.gsi),
                ]),
            ),
        ],
    ))
}

/// A virtio-mmio register window as Memory32Fixed length.
const VIRTIO_WINDOW_SIZE: u32 = crate::arch::layout::VIRTIO_MMIO_SIZE as u32;

/// The DSDT's AML definition block (without the table header): `\_S5_` and `\_SB_`.
fn dsdt_aml(virtio: &[VirtioMmioWindow]) -> Vec<u8> {
    let mut devices = [
        com1_aml(),
        ps2_keyboard_aml(),
        rtc_aml(),
        power_button_aml(),
        ged_aml(),
        ged_registers_aml(),
    ]
    .concat();
    for (index, window) in virtio.iter().enumerate() {
        devices.extend(virtio_mmio_aml(index, *window));
    }
    let mut bytes = s5_aml();
    bytes.extend(aml::Scope::raw("\\_SB_".into(), devices));
    bytes
}

/// The complete DSDT.
fn dsdt(virtio: &[VirtioMmioWindow]) -> Vec<u8> {
    let mut dsdt = Sdt::new(
        *b"DSDT",
        SDT_HEADER_LEN as u32,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dsdt.append_slice(&dsdt_aml(virtio));
    dsdt.as_slice().to_vec()
}

/// A Generic Address Structure for one of the byte-wide registers of the ACPI PM device.
fn pm_register(offset: u64) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        PM_REGISTER_BIT_WIDTH,
        0,
        AccessSize::ByteAccess,
        u64::from(ACPI_PM_PORT) + offset,
    )
}

/// The FADT, pointing at the DSDT at `dsdt_addr`.
fn fadt(dsdt_addr: GuestAddress) -> Vec<u8> {
    let mut builder = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION).dsdt_64(dsdt_addr.0);
    for flag in FADT_FLAGS {
        builder = builder.flag(flag);
    }
    builder.major_version = FADT_MAJOR_REVISION;
    builder.fadt_minor_version = FADT_MINOR_REVISION;
    builder.century = CMOS_CENTURY_INDEX;
    builder.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    builder.reset_reg = pm_register(PM_RESET_OFFSET);
    builder.reset_value = ACPI_RESET_VALUE;
    builder.sleep_control_reg = pm_register(PM_SLEEP_CONTROL_OFFSET);
    builder.sleep_status_reg = pm_register(PM_SLEEP_STATUS_OFFSET);
    builder.hypervisor_vendor_identity = HYPERVISOR_VENDOR_IDENTITY.into();
    to_bytes(&builder.finalize())
}

/// The MADT for `num_cpus` vCPUs.
fn madt(num_cpus: u8) -> Vec<u8> {
    let mut madt = Sdt::new(
        *b"APIC",
        MADT_HEADER_LEN,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    madt.write_u32(MADT_LAPIC_ADDRESS_OFFSET, LAPIC_ADDRESS);
    madt.write_u32(MADT_FLAGS_OFFSET, MADT_PCAT_COMPAT);
    for cpu in 0..num_cpus {
        madt.append_slice(&to_bytes(&ProcessorLocalApic::new(
            cpu,
            cpu,
            EnabledStatus::Enabled,
        )));
    }
    madt.append_slice(&to_bytes(&IoApic::new(
        ioapic_id(num_cpus),
        IOAPIC_ADDRESS,
        IOAPIC_GSI_BASE,
    )));
    let [flags_lo, flags_hi] = MPS_INTI_CONFORMS.to_le_bytes();
    madt.append_slice(&[
        MADT_TYPE_LOCAL_APIC_NMI,
        MADT_LOCAL_APIC_NMI_LEN,
        ALL_PROCESSORS_UID,
        flags_lo,
        flags_hi,
        LAPIC_NMI_LINT,
    ]);
    madt.as_slice().to_vec()
}

/// The XSDT listing the tables at `entries`.
fn xsdt(entries: &[GuestAddress]) -> Vec<u8> {
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for entry in entries {
        xsdt.add_entry(entry.0);
    }
    to_bytes(&xsdt)
}

/// Places tables one after the other in the tables area and writes them to guest memory.
struct TableWriter<'a> {
    mem: &'a GuestRam,
    next: u64,
}

impl TableWriter<'_> {
    /// Writes `table` at the next aligned address and returns that address.
    fn write(&mut self, table: &'static str, bytes: &[u8]) -> Result<GuestAddress, AcpiError> {
        let start = self.next.next_multiple_of(TABLE_ALIGNMENT);
        let end = start + bytes.len() as u64;
        if end > ACPI_TABLES_END {
            return Err(AcpiError::TooLarge { end });
        }
        self.mem
            .write_slice(bytes, GuestAddress(start))
            .map_err(|source| AcpiError::Write { table, source })?;
        self.next = end;
        Ok(GuestAddress(start))
    }
}

// The RSDP must fit below the other tables.
const _: () = assert!(ACPI_RSDP_START.0 + RSDP_LEN <= ACPI_TABLES_START.0);

/// Writes the ACPI tables for `num_cpus` vCPUs and the `virtio` devices into guest memory and
/// returns the address of the RSDP (for the zero page's `acpi_rsdp_addr` or the PVH start
/// info's `rsdp_paddr`).
pub fn create_acpi_tables(
    mem: &GuestRam,
    num_cpus: u8,
    virtio: &[VirtioMmioWindow],
) -> Result<GuestAddress, AcpiError> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(AcpiError::InvalidCpuCount(num_cpus));
    }
    let mut writer = TableWriter {
        mem,
        next: ACPI_TABLES_START.0,
    };
    let dsdt_addr = writer.write("DSDT", &dsdt(virtio))?;
    let fadt_addr = writer.write("FACP", &fadt(dsdt_addr))?;
    let madt_addr = writer.write("APIC", &madt(num_cpus))?;
    let xsdt_addr = writer.write("XSDT", &xsdt(&[fadt_addr, madt_addr]))?;

    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr.0));
    mem.write_slice(&rsdp, ACPI_RSDP_START)
        .map_err(|source| AcpiError::Write {
            table: "RSDP",
            source,
        })?;
    Ok(ACPI_RSDP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::path::Path;
    use std::process::Command;

    use vmm_sys_util::tempdir::TempDir;

    use crate::arch::layout::MIB;

    fn guest_memory() -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), 2 * MIB as usize)]).unwrap()
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
    }

    fn u16_at(bytes: &[u8], offset: usize) -> u16 {
        u16::from_le_bytes(bytes[offset..offset + 2].try_into().unwrap())
    }

    fn u32_at(bytes: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], offset: usize) -> u64 {
        u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
    }

    /// Reads the whole SDT at `addr` from guest memory (its length is in its header).
    fn read_table(mem: &GuestRam, addr: u64) -> Vec<u8> {
        let mut header = [0u8; SDT_HEADER_LEN];
        mem.read_slice(&mut header, GuestAddress(addr)).unwrap();
        let mut table = vec![0u8; u32_at(&header, 4) as usize];
        mem.read_slice(&mut table, GuestAddress(addr)).unwrap();
        table
    }

    /// Checks the common header: signature, length, revision, checksum, OEM fields.
    fn check_header(table: &[u8], signature: &[u8; 4], revision: u8) {
        assert_eq!(&table[0..4], signature);
        assert_eq!(u32_at(table, 4) as usize, table.len());
        assert_eq!(table[8], revision, "{signature:?} revision");
        assert_eq!(sum(table), 0, "{signature:?} checksum");
        assert_eq!(&table[10..16], b"SKIFF ");
        assert_eq!(&table[16..24], b"SKIFFVMM");
        assert_eq!(u32_at(table, 24), 1);
    }

    struct Tables {
        rsdp: Vec<u8>,
        xsdt: Vec<u8>,
        fadt: Vec<u8>,
        madt: Vec<u8>,
        dsdt: Vec<u8>,
        addrs: [u64; 4],
    }

    /// Creates the tables and finds them again the way a guest does, from the RSDP.
    fn tables(num_cpus: u8) -> Tables {
        let mem = guest_memory();
        let rsdp_addr = create_acpi_tables(&mem, num_cpus, &[]).unwrap();
        assert_eq!(rsdp_addr, ACPI_RSDP_START);
        let mut rsdp = vec![0u8; RSDP_LEN as usize];
        mem.read_slice(&mut rsdp, rsdp_addr).unwrap();
        let xsdt_addr = u64_at(&rsdp, 24);
        let xsdt = read_table(&mem, xsdt_addr);
        let fadt_addr = u64_at(&xsdt, 36);
        let madt_addr = u64_at(&xsdt, 44);
        let fadt = read_table(&mem, fadt_addr);
        let dsdt_addr = u64_at(&fadt, 140);
        let dsdt = read_table(&mem, dsdt_addr);
        let madt = read_table(&mem, madt_addr);
        Tables {
            rsdp,
            xsdt,
            fadt,
            madt,
            dsdt,
            addrs: [xsdt_addr, fadt_addr, madt_addr, dsdt_addr],
        }
    }

    #[test]
    fn rsdp_points_to_the_xsdt() {
        let t = tables(1);
        assert_eq!(&t.rsdp[0..8], b"RSD PTR ");
        assert_eq!(sum(&t.rsdp[0..20]), 0, "ACPI 1.0 checksum");
        assert_eq!(sum(&t.rsdp), 0, "extended checksum");
        assert_eq!(&t.rsdp[9..15], b"SKIFF ");
        assert_eq!(t.rsdp[15], 2, "revision");
        assert_eq!(u32_at(&t.rsdp, 16), 0, "no RSDT");
        assert_eq!(u32_at(&t.rsdp, 20), 36, "length");
    }

    #[test]
    fn tables_lie_in_their_area_aligned_and_apart() {
        let t = tables(MAX_CPUS);
        let lens = [t.xsdt.len(), t.fadt.len(), t.madt.len(), t.dsdt.len()];
        let mut ranges: Vec<(u64, u64)> = t
            .addrs
            .iter()
            .zip(lens)
            .map(|(a, l)| (*a, *a + l as u64))
            .collect();
        ranges.sort();
        assert!(ranges[0].0 >= ACPI_TABLES_START.0);
        assert!(ranges[3].1 <= ACPI_TABLES_END);
        for pair in ranges.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "overlap: {pair:x?}");
        }
        for (start, _) in ranges {
            assert_eq!(start % TABLE_ALIGNMENT, 0);
        }
    }

    #[test]
    fn xsdt_lists_fadt_and_madt() {
        let t = tables(2);
        check_header(&t.xsdt, b"XSDT", 1);
        assert_eq!(t.xsdt.len(), 36 + 2 * 8);
        assert_eq!(&t.fadt[0..4], b"FACP");
        assert_eq!(&t.madt[0..4], b"APIC");
    }

    #[test]
    fn fadt_is_hardware_reduced_with_pm_registers_at_the_pm_port() {
        let t = tables(1);
        let f = &t.fadt;
        check_header(f, b"FACP", 6);
        assert_eq!(f.len(), 276, "ACPI 6.x FADT length");
        assert_eq!(u32_at(f, 36), 0, "no FACS");
        assert_eq!(u32_at(f, 40), 0, "32-bit DSDT unused");
        assert_eq!(u64_at(f, 140), t.addrs[3], "X_DSDT");
        assert_eq!(u64_at(f, 132), 0, "no X_FACS");
        assert_eq!(f[131], 5, "minor revision");
        // Flags: PWR_BUTTON (4), SLP_BUTTON (5), RESET_REG_SUP (10), HW_REDUCED_ACPI (20).
        assert_eq!(u32_at(f, 112), (1 << 4) | (1 << 5) | (1 << 10) | (1 << 20));
        assert_eq!(u32_at(f, 112), 0x0010_0430);
        // IAPC_BOOT_ARCH: legacy devices, 8042, no VGA.
        assert_eq!(u16_at(f, 109), 0b111);
        assert_eq!(f[108], 0x32, "CMOS century index");
        // No fixed hardware: SCI, SMI and the PM1/GPE blocks are all zero.
        assert!(f[46..108].iter().all(|b| *b == 0));
        assert!(f[148..244].iter().all(|b| *b == 0));
        // RESET_REG: SystemIO, 8 bits, offset 0, byte access, ACPI_PM_PORT + 2; RESET_VALUE.
        let gas = |port: u16| {
            let mut g = vec![1, 8, 0, 1];
            g.extend_from_slice(&u64::from(port).to_le_bytes());
            g
        };
        assert_eq!(f[116..128], gas(0x602));
        assert_eq!(f[128], ACPI_RESET_VALUE);
        // SLEEP_CONTROL_REG and SLEEP_STATUS_REG.
        assert_eq!(f[244..256], gas(0x600));
        assert_eq!(f[256..268], gas(0x601));
        assert_eq!(&f[268..276], b"SKIFF\0\0\0");
    }

    #[test]
    fn madt_has_one_lapic_per_cpu_the_ioapic_and_the_nmi() {
        for num_cpus in [1u8, 2, 4, MAX_CPUS] {
            let m = tables(num_cpus).madt;
            check_header(&m, b"APIC", 5);
            assert_eq!(u32_at(&m, 36), 0xfee0_0000, "local APIC address");
            assert_eq!(u32_at(&m, 40), 1, "PCAT_COMPAT");
            let n = usize::from(num_cpus);
            assert_eq!(m.len(), 44 + 8 * n + 12 + 6);
            for cpu in 0..n {
                let e = &m[44 + 8 * cpu..44 + 8 * (cpu + 1)];
                // Type 0, length 8, UID, APIC id, flags = enabled.
                assert_eq!(e, [0, 8, cpu as u8, cpu as u8, 1, 0, 0, 0]);
            }
            let io = &m[44 + 8 * n..44 + 8 * n + 12];
            assert_eq!(io[..4], [1, 12, num_cpus, 0]);
            assert_eq!(u32_at(io, 4), 0xfec0_0000);
            assert_eq!(u32_at(io, 8), 0, "GSI base");
            assert_eq!(m[44 + 8 * n + 12..], [4, 6, 0xff, 0, 0, 1]);
            // No interrupt source override.
            let mut offset = 44;
            while offset < m.len() {
                assert_ne!(m[offset], 2);
                offset += usize::from(m[offset + 1]);
            }
            assert_eq!(offset, m.len());
        }
    }

    /// Returns whether `needle` occurs in `haystack`.
    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn dsdt_header_and_contents() {
        let d = tables(1).dsdt;
        check_header(&d, b"DSDT", 6);
        let body = &d[SDT_HEADER_LEN..];
        assert_eq!(body, dsdt_aml(&[]).as_slice());
        // Name (_S5_, Package (4) { 5, 5, 0, 0 }) at the root, first.
        assert_eq!(
            body[..13],
            [0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, 0x05, 0x0a, 0x05, 0x00][..]
        );
        assert_eq!(body[13], 0x00);
        // Scope (\_SB_).
        assert_eq!(body[14], 0x10);
        // _HID EISA ids: PNP0501, PNP0303, PNP0B00, PNP0C0C, PNP0C02 (compressed, as dwords).
        for id in [
            0x0105_d041u32,
            0x0303_d041,
            0x000b_d041,
            0x0c0c_d041,
            0x020c_d041,
        ] {
            let mut hid = vec![0x08, b'_', b'H', b'I', b'D', 0x0c];
            hid.extend_from_slice(&id.to_le_bytes());
            assert!(contains(body, &hid), "missing _HID {id:#x}");
        }
        // _HID "ACPI0013".
        assert!(contains(body, b"\x08_HID\x0dACPI0013\0"));
        // COM1: IO (Decode16, 0x3f8, 0x3f8, 0, 8), then Interrupt {4}: edge, high, exclusive.
        let com1_io = [0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x00, 0x08];
        let com1_irq = [0x89, 0x06, 0x00, 0x03, 0x01, 4, 0, 0, 0];
        assert!(contains(body, &[&com1_io[..], &com1_irq[..]].concat()));
        // GED interrupt: Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) {9} alone.
        assert!(contains(
            body,
            &[0x89, 0x06, 0x00, 0x03, 0x01, 9, 0, 0, 0, 0x79, 0x00]
        ));
        // OperationRegion (GDST, SystemMemory, 0xc0000000, 1).
        assert!(contains(
            body,
            &[0x5b, 0x80, b'G', b'D', b'S', b'T', 0x00, 0x0c, 0x00, 0x00, 0x00, 0xc0, 0x01]
        ));
        // Memory32Fixed (ReadWrite, 0xc0000000, 0x1000).
        assert!(contains(
            body,
            &[0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0x00, 0xc0, 0x00, 0x10, 0x00, 0x00]
        ));
        // Notify (\_SB_.PWRB, 0x80).
        assert!(contains(
            body,
            &[0x86, b'\\', 0x2e, b'_', b'S', b'B', b'_', b'P', b'W', b'R', b'B', 0x0a, 0x80]
        ));
    }

    #[test]
    fn dsdt_describes_each_virtio_mmio_device() {
        let window = VirtioMmioWindow {
            base: 0xc000_3000,
            gsi: 7,
        };
        let body = dsdt_aml(&[window, window]);
        assert!(contains(&body, b"VR00"));
        assert!(contains(&body, b"VR01"));
        assert!(contains(&body, b"\x08_HID\x0dLNRO0005\0"));
        // Memory32Fixed (ReadWrite, 0xc0003000, 0x1000), then Interrupt {7}.
        let mem = [
            0x86, 0x09, 0x00, 0x01, 0x00, 0x30, 0x00, 0xc0, 0x00, 0x10, 0x00, 0x00,
        ];
        let irq = [0x89, 0x06, 0x00, 0x03, 0x01, 7, 0, 0, 0];
        assert!(contains(&body, &[&mem[..], &irq[..]].concat()));
        assert_eq!(
            dsdt_aml(&[]).len() + 2 * virtio_mmio_aml(0, window).len(),
            body.len()
        );
    }

    #[test]
    fn invalid_cpu_counts_are_rejected() {
        let mem = guest_memory();
        for n in [0, MAX_CPUS + 1, u8::MAX] {
            assert!(matches!(
                create_acpi_tables(&mem, n, &[]),
                Err(AcpiError::InvalidCpuCount(m)) if m == n
            ));
        }
    }

    #[test]
    fn missing_memory_is_an_error() {
        // Guest memory that ends before the tables area.
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 0x80000)]).unwrap();
        assert!(matches!(
            create_acpi_tables(&mem, 1, &[]),
            Err(AcpiError::Write { table: "DSDT", .. })
        ));
    }

    /// Runs `iasl` with `args` in `dir`; `None` if iasl is not installed. Returns its
    /// success and its whole console output.
    fn iasl(dir: &Path, args: &[&str]) -> Option<(bool, String)> {
        match Command::new("iasl").args(args).current_dir(dir).output() {
            Ok(out) => Some((
                out.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => panic!("cannot run iasl: {e}"),
        }
    }

    /// Disassembles `table` with `iasl -d` in `dir`, checks that iasl found nothing wrong and
    /// returns the disassembly; `None` (after saying why) if iasl is not installed.
    fn iasl_disassemble(dir: &Path, name: &str, table: &[u8]) -> Option<String> {
        let file = format!("{name}.dat");
        std::fs::write(dir.join(&file), table).unwrap();
        let Some((success, log)) = iasl(dir, &["-d", &file]) else {
            println!("SKIPPED: iasl (Debian package acpica-tools) is not installed");
            return None;
        };
        let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap_or_default();
        assert!(success, "iasl -d {file} failed:\n{log}");
        for bad in ["Error", "Warning", "Incorrect", "Invalid"] {
            assert!(!log.contains(bad), "iasl -d {file}:\n{log}");
            assert!(!dsl.contains(bad), "iasl -d {file}:\n{dsl}");
        }
        Some(dsl)
    }

    #[test]
    fn iasl_disassembles_and_recompiles_the_dsdt() {
        let dir = TempDir::new().unwrap();
        let virtio = [
            VirtioMmioWindow {
                base: 0xc000_1000,
                gsi: 5,
            },
            VirtioMmioWindow {
                base: 0xc000_2000,
                gsi: 16,
            },
        ];
        let Some(dsl) = iasl_disassemble(dir.as_path(), "dsdt", &dsdt(&virtio)) else {
            return;
        };
        for expected in [
            "DefinitionBlock (\"\", \"DSDT\", 6, \"SKIFF \", \"SKIFFVMM\", 0x00000001)",
            "Name (_S5, Package (0x04)",
            "Device (COM1)",
            "Device (PS2K)",
            "Device (PWRB)",
            "Device (GED)",
            "Name (_HID, \"ACPI0013\"",
            "Method (_EVT, 1, Serialized)",
            "Notify (\\_SB.PWRB, 0x80)",
            "OperationRegion (GDST, SystemMemory, 0xC0000000, One)",
            "Device (GEDR)",
            "Device (VR00)",
            "Device (VR01)",
            "Name (_HID, \"LNRO0005\")",
            "0xC0002000,",
            "0x00000010,",
        ] {
            assert!(dsl.contains(expected), "{expected:?} not in:\n{dsl}");
        }
        // Compiling the disassembly back checks the AML's semantics (names resolve, argument
        // counts and resource descriptors are valid) beyond the disassembler's parsing.
        let (success, log) = iasl(dir.as_path(), &["-p", "recompiled", "dsdt.dsl"]).unwrap();
        assert!(success, "iasl failed on:\n{dsl}\n{log}");
        assert!(log.contains(" 0 Errors, 0 Warnings"), "{log}");
    }

    #[test]
    fn iasl_decodes_the_fadt_and_madt() {
        let dir = TempDir::new().unwrap();
        let Some(fadt) = iasl_disassemble(dir.as_path(), "facp", &fadt(ACPI_TABLES_START)) else {
            return;
        };
        for expected in [
            "Control Method Power Button (V1) : 1",
            "Reset Register Supported (V2) : 1",
            "Hardware Reduced (V5) : 1",
            "8042 Present on ports 60/64 (V2) : 1",
            "Value to cause reset : 01",
            "Address : 0000000000000602",
            "Address : 0000000000000600",
            "Address : 0000000000000601",
        ] {
            assert!(fadt.contains(expected), "{expected:?} not in:\n{fadt}");
        }
        let Some(madt) = iasl_disassemble(dir.as_path(), "apic", &madt(2)) else {
            return;
        };
        assert_eq!(madt.matches("[Processor Local APIC]").count(), 2, "{madt}");
        assert_eq!(madt.matches("[I/O APIC]").count(), 1, "{madt}");
        assert_eq!(madt.matches("[Local APIC NMI]").count(), 1, "{madt}");
    }
}
