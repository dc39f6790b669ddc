//! POST code port 0x80.
//!
//! Firmware and kernels write progress codes here (Linux also uses it as an
//! I/O delay). Writes are recorded, reads return 0.

use crate::bus::BusDevice;

/// I/O port of the POST code register.
pub const PORT80_PORT_BASE: u16 = 0x80;
/// Number of I/O ports used by the POST code register.
pub const PORT80_PORT_LEN: u64 = 1;

/// Value returned by reads of the POST code port.
const PORT80_READ_VALUE: u8 = 0;

/// Records the last POST code written by the guest.
#[derive(Debug, Default)]
pub struct Port80Device {
    last_code: Option<u8>,
}

impl Port80Device {
    /// Creates the device with no code recorded.
    pub fn new() -> Self {
        Self::default()
    }

    /// The last POST code written, if any.
    pub fn last_code(&self) -> Option<u8> {
        self.last_code
    }
}

impl BusDevice for Port80Device {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(PORT80_READ_VALUE);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&code) = data.first() {
            log::trace!("POST code {code:#04x}");
            self.last_code = Some(code);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_last_code_and_reads_zero() {
        let mut dev = Port80Device::new();
        assert_eq!(dev.last_code(), None);
        dev.write(0, &[0x12]);
        dev.write(0, &[0x34, 0x56]);
        dev.write(0, &[]);
        assert_eq!(dev.last_code(), Some(0x34));
        let mut data = [0xffu8; 2];
        dev.read(0, &mut data);
        assert_eq!(data, [0, 0]);
    }
}
