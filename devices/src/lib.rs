//! Skiff's device models and the buses that dispatch guest I/O to them.
//!
//! All devices live behind the VMM's single big lock, so they are plain
//! `&mut self` objects without any interior locking:
//!
//! * [`bus`]: the PIO/MMIO address-range dispatcher.
//! * [`power`]: how a device asks the VMM for a machine-level action
//!   (reset, power-off, test exit).
//! * [`legacy`]: the PC legacy devices (serial, i8042, CMOS/RTC, port 0x80,
//!   Skiff's test exit device).
//! * [`state`]: the error for device state that cannot be restored.
//! * [`virtio`]: the virtio-mmio transport and the block, network and entropy devices.

#![deny(missing_docs)]

pub mod acpi;
pub mod bus;
pub mod legacy;
pub mod power;
pub mod state;
pub mod virtio;
