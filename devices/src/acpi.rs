//! The two devices behind Skiff's hardware-reduced ACPI platform.
//!
//! A hardware-reduced ACPI platform (ACPI 6.x, section 4.1) has none of the PC's fixed
//! hardware: no PM1 event/control blocks, no GPE blocks, no SCI. What the guest's OSPM still
//! needs is provided by two small devices, both described by the ACPI tables the VMM writes
//! (the FADT and the DSDT):
//!
//! * [`GedDevice`], the Generic Event Device's register: a one-byte event latch in an MMIO page.
//!   The VMM sets a bit (only [`GED_EVENT_POWER_BUTTON`] today) and raises [`ACPI_GED_GSI`];
//!   the GED's `_EVT` method in the DSDT reads the latch (which clears it) and, for the power
//!   button bit, does `Notify (\_SB_.PWRB, 0x80)`, which Linux's button driver turns into a
//!   `KEY_POWER` input event.
//! * [`AcpiPmDevice`], the FADT's sleep control, sleep status and reset registers at
//!   consecutive I/O ports: the guest's S5 (soft-off) entry and its ACPI reset land here and
//!   become [`PowerRequest::Poweroff`] and [`PowerRequest::Reset`].
//!
//! The register layouts are public constants so the table generator in the VMM describes
//! exactly what these devices decode.

use std::io;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::power::{PowerControl, PowerRequest};
use crate::state::DeviceStateError;

// ---- Generic Event Device ----------------------------------------------------------------------

/// GSI (ISA IRQ) of the Generic Event Device's interrupt.
///
/// IRQ 9 is the SCI's line on PC chipsets, so no legacy driver ever claims it; the other ISA
/// lines are taken or spoken for (0 PIT, 1 i8042 keyboard, 2 PIC cascade, 3/4 serial ports,
/// 8 CMOS RTC, 12 PS/2 mouse, 14/15 IDE). The line is edge-triggered, active-high: the VMM
/// registers the GED's eventfd as an irqfd for this GSI, and each write is one edge.
pub const ACPI_GED_GSI: u32 = 9;

/// Offset of the event register in the GED's MMIO window.
pub const GED_EVENT_REG_OFFSET: u64 = 0;
/// Width of the event register in bytes (what the DSDT's `Field` reads).
pub const GED_EVENT_REG_LEN: u64 = 1;
/// Widest guest read of the event register that is answered (wider reads see zeros).
const GED_MAX_READ_LEN: usize = 4;
/// Event register bit: the power button was pressed.
pub const GED_EVENT_POWER_BUTTON: u8 = 1 << 0;

/// Errors of the ACPI devices.
#[derive(Debug, thiserror::Error)]
pub enum AcpiDeviceError {
    /// The GED's interrupt eventfd could not be written.
    #[error("cannot raise the GED interrupt: {0}")]
    Interrupt(#[source] io::Error),
}

/// Event bits the GED knows; any other bit in a saved state is refused.
const GED_KNOWN_EVENTS: u8 = GED_EVENT_POWER_BUTTON;

/// The saved state of a [`GedDevice`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GedState {
    /// Event bits latched and not yet read by the guest.
    pub pending: u8,
}

impl GedState {
    /// Checks that only known event bits are set.
    pub fn validate(&self) -> Result<(), DeviceStateError> {
        if self.pending & !GED_KNOWN_EVENTS != 0 {
            return Err(DeviceStateError::new(
                "GED",
                format!("unknown event bits {:#04x}", self.pending),
            ));
        }
        Ok(())
    }
}

/// The register of the ACPI Generic Event Device (`ACPI0013`), on the MMIO bus.
///
/// One byte of latched events at [`GED_EVENT_REG_OFFSET`]: the VMM ORs event bits into it and
/// raises the interrupt; a guest read returns the pending bits and clears them, so each event
/// is seen once. Writes are ignored.
#[derive(Debug)]
pub struct GedDevice {
    irq: EventFd,
    pending: u8,
}

impl GedDevice {
    /// Creates the device; `irq` is the eventfd the VMM registers as irqfd for [`ACPI_GED_GSI`].
    pub fn new(irq: EventFd) -> Self {
        Self { irq, pending: 0 }
    }

    /// Presses the power button: latches [`GED_EVENT_POWER_BUTTON`] and raises the interrupt.
    ///
    /// The event stays latched even if raising the interrupt fails, so the guest still sees it
    /// on its next read of the register.
    pub fn notify_power_button(&mut self) -> Result<(), AcpiDeviceError> {
        self.notify(GED_EVENT_POWER_BUTTON)
    }

    /// Latches `events` and raises the interrupt.
    fn notify(&mut self, events: u8) -> Result<(), AcpiDeviceError> {
        self.pending |= events;
        self.irq.write(1).map_err(AcpiDeviceError::Interrupt)
    }

    /// The event bits latched and not yet read by the guest.
    pub fn pending(&self) -> u8 {
        self.pending
    }

    /// The interrupt eventfd (to register it as an irqfd).
    pub fn interrupt_event(&self) -> &EventFd {
        &self.irq
    }

    /// Returns to power-on state (guest reset): no event pending.
    pub fn reset(&mut self) {
        self.pending = 0;
    }

    /// The device's state, for a snapshot.
    pub fn state(&self) -> GedState {
        GedState {
            pending: self.pending,
        }
    }

    /// Puts the device in a saved state, after checking it. The interrupt is not raised
    /// again: the interrupt controller's state is restored separately.
    pub fn restore(&mut self, state: &GedState) -> Result<(), DeviceStateError> {
        state.validate()?;
        self.pending = state.pending;
        Ok(())
    }
}

impl BusDevice for GedDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset != GED_EVENT_REG_OFFSET || data.len() > GED_MAX_READ_LEN {
            log::debug!(
                "ged: ignored {}-byte read at offset {offset:#x}",
                data.len()
            );
            return;
        }
        if let Some(first) = data.first_mut() {
            *first = self.pending;
            self.pending = 0;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "ged: ignored {}-byte write at offset {offset:#x}",
            data.len()
        );
    }
}

// ---- Sleep control, sleep status and reset registers --------------------------------------------

/// Number of I/O ports the [`AcpiPmDevice`] answers, from the VMM's `ACPI_PM_PORT`.
pub const ACPI_PM_PORT_LEN: u64 = 3;
/// Offset of the sleep control register (FADT `SLEEP_CONTROL_REG`), one byte.
pub const PM_SLEEP_CONTROL_OFFSET: u64 = 0;
/// Offset of the sleep status register (FADT `SLEEP_STATUS_REG`), one byte.
pub const PM_SLEEP_STATUS_OFFSET: u64 = 1;
/// Offset of the reset register (FADT `RESET_REG`), one byte.
pub const PM_RESET_OFFSET: u64 = 2;
/// Width in bits of each of the three registers (the FADT's GAS `Register Bit Width`).
pub const PM_REGISTER_BIT_WIDTH: u8 = 8;

/// Value the guest writes to the reset register to reset the machine (FADT `RESET_VALUE`).
pub const ACPI_RESET_VALUE: u8 = 0x01;

/// Sleep control register: first bit of the 3-bit `SLP_TYPx` field (ACPI 6.5, 4.8.3.7).
pub const SLP_TYP_SHIFT: u8 = 2;
/// Sleep control register: mask of the `SLP_TYPx` field.
pub const SLP_TYP_MASK: u8 = 0b111 << SLP_TYP_SHIFT;
/// Sleep control register: `SLP_EN`, write-only, enters the sleep state given by `SLP_TYPx`.
pub const SLP_EN: u8 = 1 << 5;
/// The `SLP_TYPx` value of S5 (soft off); the DSDT's `\_S5_` package must hold this value.
pub const SLP_TYP_S5: u8 = 5;
/// Sleep status register: `WAK_STS`, set when the platform woke up; write 1 to clear.
pub const WAK_STS: u8 = 1 << 7;

/// The saved state of an [`AcpiPmDevice`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiPmState {
    /// The sleep status register (only [`WAK_STS`] is ever set).
    pub sleep_status: u8,
}

impl AcpiPmState {
    /// Checks that only [`WAK_STS`] is set in the sleep status.
    pub fn validate(&self) -> Result<(), DeviceStateError> {
        if self.sleep_status & !WAK_STS != 0 {
            return Err(DeviceStateError::new(
                "ACPI PM",
                format!("unknown sleep status bits {:#04x}", self.sleep_status),
            ));
        }
        Ok(())
    }
}

/// The hardware-reduced ACPI sleep and reset registers, on the PIO bus at `ACPI_PM_PORT`.
///
/// Layout, one byte each: [`PM_SLEEP_CONTROL_OFFSET`], [`PM_SLEEP_STATUS_OFFSET`],
/// [`PM_RESET_OFFSET`].
///
/// * Writing `SLP_EN | SLP_TYP_S5 << SLP_TYP_SHIFT` (0x34) to the sleep control register
///   requests [`PowerRequest::Poweroff`]. Other sleep types are not supported (the DSDT
///   declares only `\_S5_`): the machine "wakes up" at once by setting `WAK_STS`, so a guest
///   polling for the wake-up does not hang.
/// * Writing [`ACPI_RESET_VALUE`] to the reset register requests [`PowerRequest::Reset`].
#[derive(Debug)]
pub struct AcpiPmDevice {
    power: Arc<PowerControl>,
    sleep_status: u8,
}

impl AcpiPmDevice {
    /// Creates the registers; power-off and reset requests go to `power`.
    pub fn new(power: Arc<PowerControl>) -> Self {
        Self {
            power,
            sleep_status: 0,
        }
    }

    /// Returns to power-on state (guest reset).
    pub fn reset(&mut self) {
        self.sleep_status = 0;
    }

    /// The device's state, for a snapshot.
    pub fn state(&self) -> AcpiPmState {
        AcpiPmState {
            sleep_status: self.sleep_status,
        }
    }

    /// Puts the device in a saved state, after checking it.
    pub fn restore(&mut self, state: &AcpiPmState) -> Result<(), DeviceStateError> {
        state.validate()?;
        self.sleep_status = state.sleep_status;
        Ok(())
    }

    fn write_sleep_control(&mut self, value: u8) {
        if value & SLP_EN == 0 {
            return;
        }
        let sleep_type = (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT;
        if sleep_type == SLP_TYP_S5 {
            self.power.request(PowerRequest::Poweroff);
        } else {
            log::warn!("acpi: sleep type {sleep_type} is not supported; waking up at once");
            self.sleep_status |= WAK_STS;
        }
    }

    fn write_reset(&self, value: u8) {
        if value == ACPI_RESET_VALUE {
            self.power.request(PowerRequest::Reset);
        } else {
            log::debug!("acpi: ignored write of {value:#04x} to the reset register");
        }
    }
}

impl BusDevice for AcpiPmDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(first) = data.first_mut() else {
            return;
        };
        match offset {
            PM_SLEEP_STATUS_OFFSET => *first = self.sleep_status,
            // SLP_EN reads as zero, SLP_TYP is not kept, the reset register is write-only.
            PM_SLEEP_CONTROL_OFFSET | PM_RESET_OFFSET => {}
            _ => log::debug!("acpi: read of unimplemented PM offset {offset:#x}"),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        match offset {
            PM_SLEEP_CONTROL_OFFSET => self.write_sleep_control(value),
            PM_SLEEP_STATUS_OFFSET => self.sleep_status &= !(value & WAK_STS),
            PM_RESET_OFFSET => self.write_reset(value),
            _ => log::debug!("acpi: write of {value:#04x} to unimplemented PM offset {offset:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn ged() -> GedDevice {
        GedDevice::new(EventFd::new(EFD_NONBLOCK).unwrap())
    }

    fn read_ged(dev: &mut GedDevice, offset: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0xaa; len];
        dev.read(offset, &mut data);
        data
    }

    fn pm() -> (AcpiPmDevice, Arc<PowerControl>) {
        let power = Arc::new(PowerControl::new().unwrap());
        (AcpiPmDevice::new(power.clone()), power)
    }

    fn read_pm(dev: &mut AcpiPmDevice, offset: u64) -> u8 {
        let mut data = [0xaa];
        dev.read(offset, &mut data);
        data[0]
    }

    #[test]
    fn ged_gsi_is_a_free_isa_line() {
        // Not the PIT, keyboard, cascade, serial ports or RTC; an ISA line (< 16).
        assert_eq!(ACPI_GED_GSI, 9);
        assert_eq!(GED_EVENT_POWER_BUTTON, 0x01);
    }

    #[test]
    fn ged_is_quiet_until_notified() {
        let mut dev = ged();
        assert_eq!(read_ged(&mut dev, 0, 1), [0]);
        assert_eq!(
            dev.interrupt_event().read().unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    #[test]
    fn power_button_latches_the_bit_and_raises_the_irq() {
        let mut dev = ged();
        dev.notify_power_button().unwrap();
        assert_eq!(dev.pending(), GED_EVENT_POWER_BUTTON);
        assert_eq!(dev.interrupt_event().read().unwrap(), 1);
        // The guest's read returns the bit and clears it.
        assert_eq!(read_ged(&mut dev, 0, 1), [GED_EVENT_POWER_BUTTON]);
        assert_eq!(read_ged(&mut dev, 0, 1), [0]);
        assert_eq!(dev.pending(), 0);
    }

    #[test]
    fn presses_before_the_read_are_merged_but_each_raises_the_irq() {
        let mut dev = ged();
        dev.notify_power_button().unwrap();
        dev.notify_power_button().unwrap();
        assert_eq!(dev.interrupt_event().read().unwrap(), 2);
        assert_eq!(read_ged(&mut dev, 0, 1), [GED_EVENT_POWER_BUTTON]);
        assert_eq!(read_ged(&mut dev, 0, 1), [0]);
    }

    #[test]
    fn ged_reads_of_up_to_four_bytes_see_the_byte_zero_extended() {
        for len in 1..=4 {
            let mut dev = ged();
            dev.notify_power_button().unwrap();
            let mut expected = vec![0; len];
            expected[0] = GED_EVENT_POWER_BUTTON;
            assert_eq!(read_ged(&mut dev, 0, len), expected);
            assert_eq!(dev.pending(), 0);
        }
    }

    #[test]
    fn ged_ignores_other_offsets_wide_reads_writes_and_empty_accesses() {
        let mut dev = ged();
        dev.notify_power_button().unwrap();
        assert_eq!(read_ged(&mut dev, 1, 1), [0]);
        assert_eq!(read_ged(&mut dev, 0xfff, 1), [0]);
        assert_eq!(read_ged(&mut dev, 0, 8), [0; 8]);
        assert_eq!(read_ged(&mut dev, 0, 0), Vec::<u8>::new());
        dev.write(0, &[0]);
        dev.write(0, &[]);
        // None of those consumed the event.
        assert_eq!(dev.pending(), GED_EVENT_POWER_BUTTON);
        assert_eq!(read_ged(&mut dev, 0, 1), [GED_EVENT_POWER_BUTTON]);
    }

    #[test]
    fn ged_reset_drops_pending_events() {
        let mut dev = ged();
        dev.notify_power_button().unwrap();
        dev.reset();
        assert_eq!(read_ged(&mut dev, 0, 1), [0]);
    }

    #[test]
    fn pm_register_layout() {
        assert_eq!(PM_SLEEP_CONTROL_OFFSET, 0);
        assert_eq!(PM_SLEEP_STATUS_OFFSET, 1);
        assert_eq!(PM_RESET_OFFSET, 2);
        assert_eq!(ACPI_PM_PORT_LEN, 3);
        assert_eq!(SLP_TYP_MASK, 0x1c);
        assert_eq!(SLP_EN, 0x20);
        assert_eq!(WAK_STS, 0x80);
    }

    #[test]
    fn s5_requests_poweroff() {
        let (mut dev, power) = pm();
        // What ACPICA's acpi_hw_extended_sleep() writes for S5: clear WAK_STS, then
        // SLP_TYP=5 | SLP_EN.
        dev.write(PM_SLEEP_STATUS_OFFSET, &[WAK_STS]);
        assert!(!power.is_pending());
        dev.write(PM_SLEEP_CONTROL_OFFSET, &[0x34]);
        assert_eq!(power.take(), Some(PowerRequest::Poweroff));
    }

    #[test]
    fn sleep_type_without_slp_en_does_nothing() {
        let (mut dev, power) = pm();
        dev.write(PM_SLEEP_CONTROL_OFFSET, &[SLP_TYP_S5 << SLP_TYP_SHIFT]);
        assert!(!power.is_pending());
        assert_eq!(read_pm(&mut dev, PM_SLEEP_STATUS_OFFSET), 0);
    }

    #[test]
    fn unsupported_sleep_wakes_up_at_once() {
        let (mut dev, power) = pm();
        // S3.
        dev.write(PM_SLEEP_CONTROL_OFFSET, &[(3 << SLP_TYP_SHIFT) | SLP_EN]);
        assert!(!power.is_pending());
        assert_eq!(read_pm(&mut dev, PM_SLEEP_STATUS_OFFSET), WAK_STS);
        // Write 1 to clear; writing 0 leaves it set.
        dev.write(PM_SLEEP_STATUS_OFFSET, &[0]);
        assert_eq!(read_pm(&mut dev, PM_SLEEP_STATUS_OFFSET), WAK_STS);
        dev.write(PM_SLEEP_STATUS_OFFSET, &[WAK_STS]);
        assert_eq!(read_pm(&mut dev, PM_SLEEP_STATUS_OFFSET), 0);
        // Guest reset also clears it.
        dev.write(PM_SLEEP_CONTROL_OFFSET, &[(1 << SLP_TYP_SHIFT) | SLP_EN]);
        dev.reset();
        assert_eq!(read_pm(&mut dev, PM_SLEEP_STATUS_OFFSET), 0);
    }

    #[test]
    fn reset_value_requests_reset_and_others_are_ignored() {
        let (mut dev, power) = pm();
        dev.write(PM_RESET_OFFSET, &[0x06]);
        dev.write(PM_RESET_OFFSET, &[0x00]);
        assert!(!power.is_pending());
        dev.write(PM_RESET_OFFSET, &[ACPI_RESET_VALUE]);
        assert_eq!(power.take(), Some(PowerRequest::Reset));
    }

    #[test]
    fn pm_reads_and_odd_accesses() {
        let (mut dev, power) = pm();
        assert_eq!(read_pm(&mut dev, PM_SLEEP_CONTROL_OFFSET), 0);
        assert_eq!(read_pm(&mut dev, PM_RESET_OFFSET), 0);
        assert_eq!(read_pm(&mut dev, 7), 0);
        let mut wide = [0xaa; 4];
        dev.read(PM_SLEEP_STATUS_OFFSET, &mut wide);
        assert_eq!(wide, [0; 4]);
        dev.read(PM_SLEEP_STATUS_OFFSET, &mut []);
        dev.write(PM_SLEEP_CONTROL_OFFSET, &[]);
        dev.write(7, &[ACPI_RESET_VALUE]);
        assert!(!power.is_pending());
    }

    #[test]
    fn ged_state_round_trips_and_bad_bits_are_refused() {
        let mut dev = ged();
        dev.notify_power_button().unwrap();
        let json = serde_json::to_string(&dev.state()).unwrap();
        let state: GedState = serde_json::from_str(&json).unwrap();
        let mut fresh = ged();
        fresh.restore(&state).unwrap();
        // The guest sees the latched press on the fresh device, once.
        assert_eq!(read_ged(&mut fresh, 0, 1), [GED_EVENT_POWER_BUTTON]);
        assert_eq!(read_ged(&mut fresh, 0, 1), [0]);

        let err = fresh.restore(&GedState { pending: 0x82 }).unwrap_err();
        assert_eq!(err.device, "GED");
        assert_eq!(fresh.pending(), 0);
    }

    #[test]
    fn pm_state_round_trips_and_bad_bits_are_refused() {
        let (mut dev, _) = pm();
        dev.write(PM_SLEEP_CONTROL_OFFSET, &[(1 << SLP_TYP_SHIFT) | SLP_EN]);
        let json = serde_json::to_string(&dev.state()).unwrap();
        let state: AcpiPmState = serde_json::from_str(&json).unwrap();
        let (mut fresh, power) = pm();
        fresh.restore(&state).unwrap();
        assert_eq!(read_pm(&mut fresh, PM_SLEEP_STATUS_OFFSET), WAK_STS);
        fresh.write(PM_SLEEP_STATUS_OFFSET, &[WAK_STS]);
        assert_eq!(read_pm(&mut fresh, PM_SLEEP_STATUS_OFFSET), 0);
        assert!(!power.is_pending());

        assert!(fresh.restore(&AcpiPmState { sleep_status: 0x01 }).is_err());
        assert!(serde_json::from_str::<AcpiPmState>(r#"{"sleep_status":-1}"#).is_err());
        assert!(serde_json::from_str::<AcpiPmState>("{}").is_err());
    }
}
