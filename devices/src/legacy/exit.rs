//! Skiff's test exit device.
//!
//! A guest `OUT` of a byte N (any access size; the low byte is used) to
//! [`EXIT_DEVICE_PORT`] ends the VM, and the skiff process exits with status N.
//! Reads return 0xff.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::power::{PowerControl, PowerRequest};

/// I/O port of the test exit device: writing a byte N ends the VM and skiff exits with status N.
pub const EXIT_DEVICE_PORT: u16 = 0x501;
/// Number of I/O ports used by the test exit device.
pub const EXIT_DEVICE_PORT_LEN: u64 = 1;

/// Value returned by reads of the exit port.
const EXIT_READ_VALUE: u8 = 0xff;

/// Turns a guest write into [`PowerRequest::Exit`].
#[derive(Debug)]
pub struct ExitDevice {
    power: Arc<PowerControl>,
}

impl ExitDevice {
    /// Creates the device; writes are reported to `power`.
    pub fn new(power: Arc<PowerControl>) -> Self {
        Self { power }
    }
}

impl BusDevice for ExitDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(EXIT_READ_VALUE);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        // Port I/O data is little-endian, so the low byte comes first.
        if let Some(&status) = data.first() {
            log::info!("guest requested exit with status {status}");
            self.power.request(PowerRequest::Exit(status));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_requests_exit_with_low_byte() {
        let power = Arc::new(PowerControl::new().unwrap());
        let mut dev = ExitDevice::new(power.clone());
        dev.write(0, &[]);
        assert!(!power.is_pending());
        dev.write(0, &0x1234u16.to_le_bytes());
        assert_eq!(power.take(), Some(PowerRequest::Exit(0x34)));
        dev.write(0, &[7]);
        assert_eq!(power.take(), Some(PowerRequest::Exit(7)));
        let mut data = [0u8; 4];
        dev.read(0, &mut data);
        assert_eq!(data, [0xff; 4]);
    }
}
