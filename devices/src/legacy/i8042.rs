//! A minimal i8042 PS/2 controller at ports 0x60 (data) and 0x64 (status/command).
//!
//! It implements just enough for Linux's i8042 driver (booted with
//! `i8042.noaux i8042.nomux i8042.dumbkbd`) to probe the controller, and for
//! the guest to reset the machine: command 0xFE (pulse the reset line) and a
//! write of the output port with the reset bit clear both raise
//! [`PowerRequest::Reset`].
//!
//! No interrupt line (GSI 1) is wired: Skiff never injects keystrokes, and
//! every controller command is answered synchronously through the output
//! buffer, which the driver polls via the status register. Keyboard commands
//! written to the data port are acknowledged the same way, for drivers that
//! poll for the answer.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::power::{PowerControl, PowerRequest};
use crate::state::DeviceStateError;

/// First I/O port of the i8042 (the data port).
pub const I8042_PORT_BASE: u16 = 0x60;
/// Number of I/O ports in the i8042 range (0x60..=0x64).
pub const I8042_PORT_LEN: u64 = 5;

/// Offset of the data port (0x60) in the range.
const OFFSET_DATA: u64 = 0;
/// Offset of the status (read) / command (write) port (0x64) in the range.
const OFFSET_COMMAND: u64 = 4;

/// Status: the output buffer holds a byte for the host.
const SB_OUT_FULL: u8 = 0x01;
/// Status: system flag (mirrors the command byte's SYS bit).
const SB_SYS: u8 = 0x04;
/// Status: the last write went to the command port.
const SB_LAST_WAS_COMMAND: u8 = 0x08;
/// Status: keyboard not inhibited (key lock off).
const SB_NOT_INHIBITED: u8 = 0x10;

/// Command byte: keyboard interrupt enable.
const CB_KBD_INT: u8 = 0x01;
/// Command byte: system flag.
const CB_SYS: u8 = 0x04;
/// Command byte: keyboard interface disabled.
const CB_KBD_DISABLE: u8 = 0x10;
/// Command byte: auxiliary (mouse) interface disabled.
const CB_AUX_DISABLE: u8 = 0x20;
/// Command byte: scan code set 2 to set 1 translation.
const CB_TRANSLATE: u8 = 0x40;
/// Command byte at power-on.
const CB_DEFAULT: u8 = CB_KBD_INT | CB_SYS | CB_TRANSLATE;

/// Output port: reset line (active low; clearing it resets the CPU).
const OUTPUT_PORT_RESET_N: u8 = 0x01;
/// Output port: A20 gate enabled.
const OUTPUT_PORT_A20: u8 = 0x02;
/// Output port at power-on.
const OUTPUT_PORT_DEFAULT: u8 = OUTPUT_PORT_RESET_N | OUTPUT_PORT_A20;

/// Controller command: read the command byte.
const CMD_READ_CTR: u8 = 0x20;
/// Controller command: write the command byte (parameter follows on the data port).
const CMD_WRITE_CTR: u8 = 0x60;
/// Controller command: disable the auxiliary interface.
const CMD_DISABLE_AUX: u8 = 0xa7;
/// Controller command: enable the auxiliary interface.
const CMD_ENABLE_AUX: u8 = 0xa8;
/// Controller command: self test.
const CMD_SELF_TEST: u8 = 0xaa;
/// Controller command: keyboard interface test.
const CMD_KBD_TEST: u8 = 0xab;
/// Controller command: disable the keyboard interface.
const CMD_DISABLE_KBD: u8 = 0xad;
/// Controller command: enable the keyboard interface.
const CMD_ENABLE_KBD: u8 = 0xae;
/// Controller command: read the output port.
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
/// Controller command: write the output port (parameter follows).
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
/// Controller command: write the keyboard output buffer (parameter follows).
const CMD_WRITE_KBD_OUTBUF: u8 = 0xd2;
/// Controller command: write the auxiliary output buffer (parameter follows).
const CMD_WRITE_AUX_OUTBUF: u8 = 0xd3;
/// Controller command: write to the auxiliary device (parameter follows).
const CMD_WRITE_AUX: u8 = 0xd4;
/// Controller commands 0xF0..=0xFF pulse output port bits 0-3 low (a clear bit = pulsed).
const CMD_PULSE_FIRST: u8 = 0xf0;
/// Controller command: pulse the reset line.
const CMD_PULSE_RESET: u8 = 0xfe;
/// In a pulse command, the bit selecting the reset line (pulsed when clear).
const PULSE_KEEP_RESET: u8 = 0x01;

/// Controller self-test passed.
const RESP_SELF_TEST_OK: u8 = 0x55;
/// Interface test passed.
const RESP_PORT_TEST_OK: u8 = 0x00;

/// Keyboard command: set LEDs (parameter follows).
const KBD_CMD_SET_LEDS: u8 = 0xed;
/// Keyboard command: echo.
const KBD_CMD_ECHO: u8 = 0xee;
/// Keyboard command: get/set scan code set (parameter follows).
const KBD_CMD_SCANCODE_SET: u8 = 0xf0;
/// Keyboard command: identify.
const KBD_CMD_GET_ID: u8 = 0xf2;
/// Keyboard command: set typematic rate (parameter follows).
const KBD_CMD_SET_REPEAT: u8 = 0xf3;
/// Keyboard command: reset and self test.
const KBD_CMD_RESET: u8 = 0xff;
/// Parameter of [`KBD_CMD_SCANCODE_SET`] asking for the current set.
const KBD_SCANCODE_SET_GET: u8 = 0x00;
/// The scan code set the keyboard reports.
const KBD_SCANCODE_SET_2: u8 = 0x02;
/// Keyboard response: acknowledge.
const KBD_ACK: u8 = 0xfa;
/// Keyboard response: basic assurance test passed.
const KBD_BAT_OK: u8 = 0xaa;
/// Keyboard response to echo.
const KBD_ECHO_REPLY: u8 = 0xee;
/// Keyboard identification bytes (MF2 keyboard).
const KBD_ID: [u8; 2] = [0xab, 0x83];

/// Capacity of the output buffer, in bytes.
const OUTPUT_BUFFER_SIZE: usize = 16;

/// Controller commands that wait for a parameter on the data port.
const PARAMETER_COMMANDS: [u8; 5] = [
    CMD_WRITE_CTR,
    CMD_WRITE_OUTPUT_PORT,
    CMD_WRITE_KBD_OUTBUF,
    CMD_WRITE_AUX_OUTBUF,
    CMD_WRITE_AUX,
];
/// Keyboard commands that wait for a parameter.
const KBD_PARAMETER_COMMANDS: [u8; 3] =
    [KBD_CMD_SET_LEDS, KBD_CMD_SCANCODE_SET, KBD_CMD_SET_REPEAT];

/// The saved state of an [`I8042Device`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// The controller's command byte.
    pub command_byte: u8,
    /// The controller's output port.
    pub output_port: u8,
    /// Whether the last write went to the command port.
    pub last_was_command: bool,
    /// Controller command waiting for its parameter.
    pub pending_command: Option<u8>,
    /// Keyboard command waiting for its parameter.
    pub pending_kbd_command: Option<u8>,
    /// Bytes waiting in the output buffer, oldest first.
    pub output: Vec<u8>,
    /// Value data port reads return while the output buffer is empty.
    pub last_read: u8,
}

impl I8042State {
    /// Checks the output buffer size and the pending commands. Restoring never pulses the
    /// reset line, whatever the saved output port holds.
    pub fn validate(&self) -> Result<(), DeviceStateError> {
        let invalid = |reason: String| Err(DeviceStateError::new("i8042", reason));
        if self.output.len() > OUTPUT_BUFFER_SIZE {
            return invalid(format!(
                "{} bytes in the output buffer, at most {OUTPUT_BUFFER_SIZE}",
                self.output.len()
            ));
        }
        if let Some(cmd) = self
            .pending_command
            .filter(|c| !PARAMETER_COMMANDS.contains(c))
        {
            return invalid(format!("pending controller command {cmd:#04x}"));
        }
        if let Some(cmd) = self
            .pending_kbd_command
            .filter(|c| !KBD_PARAMETER_COMMANDS.contains(c))
        {
            return invalid(format!("pending keyboard command {cmd:#04x}"));
        }
        Ok(())
    }
}

/// A minimal PS/2 controller with a keyboard that only acknowledges commands.
#[derive(Debug)]
pub struct I8042Device {
    power: Arc<PowerControl>,
    command_byte: u8,
    output_port: u8,
    last_was_command: bool,
    /// Controller command waiting for its parameter on the data port.
    pending_command: Option<u8>,
    /// Keyboard command waiting for its parameter.
    pending_kbd_command: Option<u8>,
    output: VecDeque<u8>,
    /// Value returned by data port reads when the output buffer is empty.
    last_read: u8,
}

impl I8042Device {
    /// Creates the controller; reset requests go to `power`.
    pub fn new(power: Arc<PowerControl>) -> Self {
        Self {
            power,
            command_byte: CB_DEFAULT,
            output_port: OUTPUT_PORT_DEFAULT,
            last_was_command: false,
            pending_command: None,
            pending_kbd_command: None,
            output: VecDeque::with_capacity(OUTPUT_BUFFER_SIZE),
            last_read: 0,
        }
    }

    /// Returns to power-on state (guest reset).
    pub fn reset(&mut self) {
        self.command_byte = CB_DEFAULT;
        self.output_port = OUTPUT_PORT_DEFAULT;
        self.last_was_command = false;
        self.pending_command = None;
        self.pending_kbd_command = None;
        self.output.clear();
        self.last_read = 0;
    }

    /// The device's state, for a snapshot.
    pub fn state(&self) -> I8042State {
        I8042State {
            command_byte: self.command_byte,
            output_port: self.output_port,
            last_was_command: self.last_was_command,
            pending_command: self.pending_command,
            pending_kbd_command: self.pending_kbd_command,
            output: self.output.iter().copied().collect(),
            last_read: self.last_read,
        }
    }

    /// Puts the device in a saved state, after checking it.
    pub fn restore(&mut self, state: &I8042State) -> Result<(), DeviceStateError> {
        state.validate()?;
        self.command_byte = state.command_byte;
        self.output_port = state.output_port;
        self.last_was_command = state.last_was_command;
        self.pending_command = state.pending_command;
        self.pending_kbd_command = state.pending_kbd_command;
        self.output.clear();
        self.output.extend(state.output.iter().copied());
        self.last_read = state.last_read;
        Ok(())
    }

    fn status(&self) -> u8 {
        let mut status = SB_NOT_INHIBITED;
        if !self.output.is_empty() {
            status |= SB_OUT_FULL;
        }
        if self.command_byte & CB_SYS != 0 {
            status |= SB_SYS;
        }
        if self.last_was_command {
            status |= SB_LAST_WAS_COMMAND;
        }
        status
    }

    fn push(&mut self, byte: u8) {
        if self.output.len() >= OUTPUT_BUFFER_SIZE {
            log::debug!("i8042: output buffer full, dropping {byte:#04x}");
            return;
        }
        self.output.push_back(byte);
    }

    fn read_data(&mut self) -> u8 {
        if let Some(byte) = self.output.pop_front() {
            self.last_read = byte;
        }
        self.last_read
    }

    fn request_reset(&self) {
        log::info!("i8042: guest pulsed the reset line");
        self.power.request(PowerRequest::Reset);
    }

    fn write_command(&mut self, cmd: u8) {
        self.last_was_command = true;
        // A new command aborts a command still waiting for its parameter.
        self.pending_command = None;
        match cmd {
            CMD_READ_CTR => self.push(self.command_byte),
            CMD_WRITE_CTR
            | CMD_WRITE_OUTPUT_PORT
            | CMD_WRITE_KBD_OUTBUF
            | CMD_WRITE_AUX_OUTBUF
            | CMD_WRITE_AUX => self.pending_command = Some(cmd),
            CMD_DISABLE_AUX => self.command_byte |= CB_AUX_DISABLE,
            CMD_ENABLE_AUX => self.command_byte &= !CB_AUX_DISABLE,
            CMD_SELF_TEST => {
                self.command_byte |= CB_SYS;
                self.push(RESP_SELF_TEST_OK);
            }
            CMD_KBD_TEST => self.push(RESP_PORT_TEST_OK),
            CMD_DISABLE_KBD => self.command_byte |= CB_KBD_DISABLE,
            CMD_ENABLE_KBD => self.command_byte &= !CB_KBD_DISABLE,
            CMD_READ_OUTPUT_PORT => self.push(self.output_port),
            CMD_PULSE_RESET => self.request_reset(),
            CMD_PULSE_FIRST..=u8::MAX => {
                if cmd & PULSE_KEEP_RESET == 0 {
                    self.request_reset();
                }
            }
            _ => log::debug!("i8042: unsupported command {cmd:#04x} ignored"),
        }
    }

    fn write_data(&mut self, value: u8) {
        self.last_was_command = false;
        match self.pending_command.take() {
            Some(CMD_WRITE_CTR) => self.command_byte = value,
            Some(CMD_WRITE_OUTPUT_PORT) => {
                self.output_port = value;
                if value & OUTPUT_PORT_RESET_N == 0 {
                    self.request_reset();
                }
            }
            Some(CMD_WRITE_KBD_OUTBUF) => self.push(value),
            Some(cmd) => {
                log::debug!(
                    "i8042: no auxiliary device, parameter {value:#04x} of {cmd:#04x} dropped"
                )
            }
            None => self.write_keyboard(value),
        }
    }

    fn write_keyboard(&mut self, value: u8) {
        if let Some(cmd) = self.pending_kbd_command.take() {
            self.push(KBD_ACK);
            if cmd == KBD_CMD_SCANCODE_SET && value == KBD_SCANCODE_SET_GET {
                self.push(KBD_SCANCODE_SET_2);
            }
            return;
        }
        match value {
            KBD_CMD_SET_LEDS | KBD_CMD_SCANCODE_SET | KBD_CMD_SET_REPEAT => {
                self.pending_kbd_command = Some(value);
                self.push(KBD_ACK);
            }
            KBD_CMD_ECHO => self.push(KBD_ECHO_REPLY),
            KBD_CMD_GET_ID => {
                self.push(KBD_ACK);
                KBD_ID.iter().for_each(|&b| self.push(b));
            }
            KBD_CMD_RESET => {
                self.push(KBD_ACK);
                self.push(KBD_BAT_OK);
            }
            // Enable/disable scanning, set defaults and anything else: acknowledge.
            _ => self.push(KBD_ACK),
        }
    }
}

impl BusDevice for I8042Device {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some((first, rest)) = data.split_first_mut() else {
            return;
        };
        *first = match offset {
            OFFSET_DATA => self.read_data(),
            OFFSET_COMMAND => self.status(),
            _ => {
                log::debug!("i8042: read of unimplemented offset {offset:#x}");
                0xff
            }
        };
        rest.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        match offset {
            OFFSET_DATA => self.write_data(value),
            OFFSET_COMMAND => self.write_command(value),
            _ => log::debug!("i8042: write of {value:#04x} to unimplemented offset {offset:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (I8042Device, Arc<PowerControl>) {
        let power = Arc::new(PowerControl::new().unwrap());
        (I8042Device::new(power.clone()), power)
    }

    fn status(dev: &mut I8042Device) -> u8 {
        let mut data = [0u8];
        dev.read(OFFSET_COMMAND, &mut data);
        data[0]
    }

    fn read_data(dev: &mut I8042Device) -> u8 {
        let mut data = [0u8];
        dev.read(OFFSET_DATA, &mut data);
        data[0]
    }

    #[test]
    fn self_test_and_interface_test() {
        let (mut dev, _) = device();
        assert_eq!(status(&mut dev) & SB_OUT_FULL, 0);
        dev.write(OFFSET_COMMAND, &[CMD_SELF_TEST]);
        let st = status(&mut dev);
        assert_ne!(st & SB_OUT_FULL, 0);
        assert_ne!(st & SB_SYS, 0);
        assert_ne!(st & SB_LAST_WAS_COMMAND, 0);
        assert_eq!(read_data(&mut dev), RESP_SELF_TEST_OK);
        assert_eq!(status(&mut dev) & SB_OUT_FULL, 0);
        dev.write(OFFSET_COMMAND, &[CMD_KBD_TEST]);
        assert_eq!(read_data(&mut dev), RESP_PORT_TEST_OK);
    }

    #[test]
    fn command_byte_round_trip() {
        let (mut dev, _) = device();
        dev.write(OFFSET_COMMAND, &[CMD_READ_CTR]);
        assert_eq!(read_data(&mut dev), CB_DEFAULT);
        dev.write(OFFSET_COMMAND, &[CMD_WRITE_CTR]);
        dev.write(OFFSET_DATA, &[0x65]);
        assert_eq!(status(&mut dev) & SB_LAST_WAS_COMMAND, 0);
        dev.write(OFFSET_COMMAND, &[CMD_READ_CTR]);
        assert_eq!(read_data(&mut dev), 0x65);

        dev.write(OFFSET_COMMAND, &[CMD_DISABLE_KBD]);
        dev.write(OFFSET_COMMAND, &[CMD_READ_CTR]);
        assert_ne!(read_data(&mut dev) & CB_KBD_DISABLE, 0);
        dev.write(OFFSET_COMMAND, &[CMD_ENABLE_KBD]);
        dev.write(OFFSET_COMMAND, &[CMD_READ_CTR]);
        assert_eq!(read_data(&mut dev) & CB_KBD_DISABLE, 0);
    }

    #[test]
    fn output_port_round_trip() {
        let (mut dev, power) = device();
        dev.write(OFFSET_COMMAND, &[CMD_READ_OUTPUT_PORT]);
        assert_eq!(read_data(&mut dev), OUTPUT_PORT_DEFAULT);
        dev.write(OFFSET_COMMAND, &[CMD_WRITE_OUTPUT_PORT]);
        dev.write(OFFSET_DATA, &[0xdf]);
        dev.write(OFFSET_COMMAND, &[CMD_READ_OUTPUT_PORT]);
        assert_eq!(read_data(&mut dev), 0xdf);
        assert!(!power.is_pending());
        // Clearing the reset bit resets the machine.
        dev.write(OFFSET_COMMAND, &[CMD_WRITE_OUTPUT_PORT]);
        dev.write(OFFSET_DATA, &[0xde]);
        assert_eq!(power.take(), Some(PowerRequest::Reset));
    }

    #[test]
    fn pulse_reset_requests_reset() {
        let (mut dev, power) = device();
        // 0xFF pulses nothing.
        dev.write(OFFSET_COMMAND, &[0xff]);
        assert!(!power.is_pending());
        dev.write(OFFSET_COMMAND, &[CMD_PULSE_RESET]);
        assert_eq!(power.take(), Some(PowerRequest::Reset));
    }

    #[test]
    fn keyboard_commands_are_acknowledged() {
        let (mut dev, _) = device();
        dev.write(OFFSET_DATA, &[KBD_CMD_RESET]);
        assert_eq!(read_data(&mut dev), KBD_ACK);
        assert_eq!(read_data(&mut dev), KBD_BAT_OK);
        dev.write(OFFSET_DATA, &[0xf5]);
        dev.write(OFFSET_DATA, &[0xf4]);
        assert_eq!(read_data(&mut dev), KBD_ACK);
        assert_eq!(read_data(&mut dev), KBD_ACK);
        dev.write(OFFSET_DATA, &[KBD_CMD_SCANCODE_SET]);
        dev.write(OFFSET_DATA, &[KBD_SCANCODE_SET_GET]);
        assert_eq!(read_data(&mut dev), KBD_ACK);
        assert_eq!(read_data(&mut dev), KBD_ACK);
        assert_eq!(read_data(&mut dev), KBD_SCANCODE_SET_2);
        assert_eq!(status(&mut dev) & SB_OUT_FULL, 0);
        // Empty buffer: the last byte is read again.
        assert_eq!(read_data(&mut dev), KBD_SCANCODE_SET_2);
    }

    #[test]
    fn output_buffer_is_bounded_and_unknown_commands_ignored() {
        let (mut dev, _) = device();
        for _ in 0..(OUTPUT_BUFFER_SIZE * 2) {
            dev.write(OFFSET_DATA, &[KBD_CMD_ECHO]);
        }
        assert_eq!(dev.output.len(), OUTPUT_BUFFER_SIZE);
        dev.write(OFFSET_COMMAND, &[0x05]);
        assert_eq!(dev.output.len(), OUTPUT_BUFFER_SIZE);
        dev.write(OFFSET_DATA, &[]);
        let mut empty = [];
        dev.read(OFFSET_DATA, &mut empty);
    }

    #[test]
    fn reset_restores_power_on_state() {
        let (mut dev, _) = device();
        dev.write(OFFSET_COMMAND, &[CMD_WRITE_CTR]);
        dev.write(OFFSET_DATA, &[0]);
        dev.write(OFFSET_DATA, &[KBD_CMD_RESET]);
        dev.write(OFFSET_COMMAND, &[CMD_WRITE_OUTPUT_PORT]);
        dev.reset();
        assert_eq!(status(&mut dev), SB_NOT_INHIBITED | SB_SYS);
        dev.write(OFFSET_COMMAND, &[CMD_READ_CTR]);
        assert_eq!(read_data(&mut dev), CB_DEFAULT);
    }

    #[test]
    fn state_round_trips_into_a_fresh_device() {
        let (mut dev, _) = device();
        dev.write(OFFSET_COMMAND, &[CMD_WRITE_CTR]);
        dev.write(OFFSET_DATA, &[0x47]);
        dev.write(OFFSET_DATA, &[KBD_CMD_GET_ID]);
        assert_eq!(read_data(&mut dev), KBD_ACK);
        // A keyboard command and a controller command both wait for their parameters.
        dev.write(OFFSET_DATA, &[KBD_CMD_SCANCODE_SET]);
        dev.write(OFFSET_COMMAND, &[CMD_WRITE_OUTPUT_PORT]);
        let json = serde_json::to_string(&dev.state()).unwrap();
        let state: I8042State = serde_json::from_str(&json).unwrap();
        let (mut fresh, power) = device();
        fresh.restore(&state).unwrap();
        assert_eq!(fresh.state(), dev.state());
        assert_eq!(status(&mut fresh), status(&mut dev));
        for dev in [&mut dev, &mut fresh] {
            // The rest of the ID, then the ACK of the scan code set command.
            assert_eq!(read_data(dev), KBD_ID[0]);
            assert_eq!(read_data(dev), KBD_ID[1]);
            assert_eq!(read_data(dev), KBD_ACK);
            assert_eq!(read_data(dev), KBD_ACK);
            // The pending output-port write takes its parameter.
            dev.write(OFFSET_DATA, &[0xdf]);
            dev.write(OFFSET_COMMAND, &[CMD_READ_OUTPUT_PORT]);
            assert_eq!(read_data(dev), 0xdf);
            dev.write(OFFSET_COMMAND, &[CMD_READ_CTR]);
            assert_eq!(read_data(dev), 0x47);
        }
        assert!(!power.is_pending());
    }

    #[test]
    fn malformed_state_is_refused() {
        let (mut dev, power) = device();
        let good = dev.state();
        let bad = [
            I8042State {
                output: vec![0; OUTPUT_BUFFER_SIZE + 1],
                ..good.clone()
            },
            I8042State {
                pending_command: Some(CMD_SELF_TEST),
                ..good.clone()
            },
            I8042State {
                pending_kbd_command: Some(KBD_CMD_ECHO),
                ..good.clone()
            },
        ];
        for state in &bad {
            assert!(dev.restore(state).is_err(), "{state:?}");
        }
        assert_eq!(dev.state(), good);
        assert!(!power.is_pending());
        assert!(serde_json::from_str::<I8042State>(r#"{"command_byte":1}"#).is_err());
    }
}
