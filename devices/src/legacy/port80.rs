//! POST code port 0x80.
//!
//! Firmware and kernels write progress codes here (Linux also uses it as an
//! I/O delay). Writes are recorded, reads return 0.

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;

/// I/O port of the POST code register.
pub const PORT80_PORT_BASE: u16 = 0x80;
/// Number of I/O ports used by the POST code register.
pub const PORT80_PORT_LEN: u64 = 1;

/// Value returned by reads of the POST code port.
const PORT80_READ_VALUE: u8 = 0;

/// The saved state of a [`Port80Device`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port80State {
    /// The last POST code written, if any.
    pub last_code: Option<u8>,
}

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

    /// The device's state, for a snapshot.
    pub fn state(&self) -> Port80State {
        Port80State {
            last_code: self.last_code,
        }
    }

    /// Creates a device from saved state (every value is valid).
    pub fn from_state(state: &Port80State) -> Self {
        Self {
            last_code: state.last_code,
        }
    }

    /// Puts the device in a saved state (every value is valid).
    pub fn restore(&mut self, state: &Port80State) {
        self.last_code = state.last_code;
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

    #[test]
    fn state_round_trips() {
        let mut dev = Port80Device::new();
        dev.write(0, &[0x42]);
        let json = serde_json::to_string(&dev.state()).unwrap();
        let state: Port80State = serde_json::from_str(&json).unwrap();
        assert_eq!(Port80Device::from_state(&state).last_code(), Some(0x42));
        let mut fresh = Port80Device::new();
        fresh.restore(&state);
        assert_eq!(fresh.state(), dev.state());
        assert!(serde_json::from_str::<Port80State>(r#"{"last_code":256}"#).is_err());
    }
}
