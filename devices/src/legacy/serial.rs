//! COM1: a 16550A UART built on `vm_superio::Serial`.
//!
//! The interrupt is an eventfd the VMM registers as an irqfd for
//! [`COM1_GSI`]. Input is pushed by the VMM's event loop with
//! [`SerialDevice::enqueue_input`]; when the guest drains the RX FIFO the
//! [input-ready eventfd](SerialDevice::input_ready_event) is written so a
//! back-end that paused reading (FIFO full) can resume.

use std::io::{self, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{Error as SerialError, SerialEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::BusDevice;
use crate::state::DeviceStateError;

/// Base I/O port of COM1.
pub const COM1_PORT_BASE: u16 = 0x3f8;
/// Number of I/O ports used by a 16550 UART.
pub const COM1_PORT_LEN: u64 = 8;
/// GSI (ISA IRQ) of COM1.
pub const COM1_GSI: u32 = 4;

/// Byte returned for reads that hit no UART register (never happens on a correctly sized range).
const INVALID_REGISTER_READ: u8 = 0xff;
/// Size of the 16550A RX FIFO modelled by `vm_superio`.
const RX_FIFO_SIZE: usize = 64;

/// The saved registers and pending input of a [`SerialDevice`] (`vm_superio`'s
/// `SerialState`, as a serde struct).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes the guest has not read yet, oldest first.
    pub in_buffer: Vec<u8>,
}

impl SerialDeviceState {
    /// Checks that the pending input fits in the RX FIFO.
    pub fn validate(&self) -> Result<(), DeviceStateError> {
        if self.in_buffer.len() > RX_FIFO_SIZE {
            return Err(DeviceStateError::new(
                "serial",
                format!(
                    "{} bytes of pending input, the FIFO holds {RX_FIFO_SIZE}",
                    self.in_buffer.len()
                ),
            ));
        }
        Ok(())
    }
}

/// Builds a `$to` ([`SerialState`] or [`SerialDeviceState`]) from `$s`, the other one: the
/// registers have the same names in both; the pending input is `$in_buffer`.
macro_rules! serial_state {
    ($to:ident, $s:ident, in_buffer: $in_buffer:expr) => {
        $to {
            baud_divisor_low: $s.baud_divisor_low,
            baud_divisor_high: $s.baud_divisor_high,
            interrupt_enable: $s.interrupt_enable,
            interrupt_identification: $s.interrupt_identification,
            line_control: $s.line_control,
            line_status: $s.line_status,
            modem_control: $s.modem_control,
            modem_status: $s.modem_status,
            scratch: $s.scratch,
            in_buffer: $in_buffer,
        }
    };
}

impl From<SerialState> for SerialDeviceState {
    fn from(s: SerialState) -> Self {
        serial_state!(Self, s, in_buffer: s.in_buffer)
    }
}

impl From<&SerialDeviceState> for SerialState {
    fn from(s: &SerialDeviceState) -> Self {
        serial_state!(Self, s, in_buffer: s.in_buffer.clone())
    }
}

/// An [`EventFd`] usable as a `vm_superio` interrupt [`Trigger`].
#[derive(Debug, Clone)]
pub struct EventFdTrigger(Arc<EventFd>);

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// `vm_superio` serial event hooks: signals input readiness when the guest drains the RX FIFO.
#[derive(Debug, Clone)]
pub struct SerialEventsImpl {
    input_ready: Arc<EventFd>,
}

impl SerialEvents for SerialEventsImpl {
    fn buffer_read(&self) {}

    fn out_byte(&self) {}

    fn tx_lost_byte(&self) {
        log::debug!("serial: lost an output byte");
    }

    fn in_buffer_empty(&self) {
        if let Err(e) = self.input_ready.write(1) {
            log::warn!("serial: failed to signal input-ready eventfd: {e}");
        }
    }
}

/// Where the guest's serial output goes.
///
/// Writes are best-effort and never fail: errors are logged and the bytes
/// dropped, so the guest is never stalled by a broken back-end.
#[derive(Debug)]
pub enum SerialOutput {
    /// The VMM's standard output.
    Stdout(io::Stdout),
    /// A file (log).
    File(std::fs::File),
    /// A unix socket client, or `None` while none is connected (output dropped).
    ///
    /// The stream must be non-blocking (use [`SerialOutput::set_socket_client`]):
    /// bytes that do not fit in the socket buffer are dropped, and a write
    /// error disconnects the client.
    Socket(Option<UnixStream>),
    /// Discard all output.
    Sink,
}

impl SerialOutput {
    /// Attaches (or with `None`, detaches) the socket client, making it non-blocking.
    ///
    /// Fails with [`io::ErrorKind::InvalidInput`] if this output is not [`SerialOutput::Socket`].
    pub fn set_socket_client(&mut self, client: Option<UnixStream>) -> io::Result<()> {
        let SerialOutput::Socket(slot) = self else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "serial output is not a socket",
            ));
        };
        if let Some(stream) = &client {
            stream.set_nonblocking(true)?;
        }
        *slot = client;
        Ok(())
    }

    /// Returns whether this is a socket output with a connected client.
    pub fn has_socket_client(&self) -> bool {
        matches!(self, SerialOutput::Socket(Some(_)))
    }
}

/// Sends `buf` to the socket client without blocking and without raising SIGPIPE.
///
/// Drops the remaining bytes on `WouldBlock`, and the client on any other error.
fn write_socket(slot: &mut Option<UnixStream>, buf: &[u8]) {
    let Some(stream) = slot.as_ref() else {
        return;
    };
    let mut rest = buf;
    while !rest.is_empty() {
        // SAFETY: the fd is owned by `stream`, which outlives the call, and
        // `rest` is a valid readable buffer of `rest.len()` bytes.
        let ret = unsafe {
            libc::send(
                stream.as_raw_fd(),
                rest.as_ptr().cast(),
                rest.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if ret < 0 {
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    log::debug!("serial: socket client busy, dropped {} bytes", rest.len());
                    return;
                }
                _ => {
                    log::info!("serial: socket client disconnected: {err}");
                    *slot = None;
                    return;
                }
            }
        }
        // `ret` is non-negative here and at most `rest.len()`.
        let sent = usize::try_from(ret).unwrap_or(rest.len()).min(rest.len());
        rest = &rest[sent..];
    }
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SerialOutput::Stdout(out) => {
                if let Err(e) = out.write_all(buf) {
                    log::debug!("serial: stdout write failed: {e}");
                }
            }
            SerialOutput::File(file) => {
                if let Err(e) = file.write_all(buf) {
                    log::debug!("serial: file write failed: {e}");
                }
            }
            SerialOutput::Socket(slot) => write_socket(slot, buf),
            SerialOutput::Sink => {}
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if let SerialOutput::Stdout(out) = self {
            if let Err(e) = out.flush() {
                log::debug!("serial: stdout flush failed: {e}");
            }
        }
        Ok(())
    }
}

/// The `vm_superio` serial type used for COM1.
type Uart = Serial<EventFdTrigger, SerialEventsImpl, SerialOutput>;

/// COM1 16550A UART.
#[derive(Debug)]
pub struct SerialDevice {
    serial: Uart,
    irq: Arc<EventFd>,
    events: SerialEventsImpl,
}

impl SerialDevice {
    /// Creates the UART; `irq` is the EventFd registered as irqfd for GSI 4.
    pub fn new(irq: EventFd, output: SerialOutput) -> io::Result<Self> {
        let irq = Arc::new(irq);
        let events = SerialEventsImpl {
            input_ready: Arc::new(EventFd::new(EFD_NONBLOCK)?),
        };
        let serial = Serial::with_events(EventFdTrigger(irq.clone()), events.clone(), output);
        Ok(Self {
            serial,
            irq,
            events,
        })
    }

    /// Pushes what fits of `bytes` in the RX FIFO and returns how many were taken.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || self.serial.fifo_capacity() == 0 {
            return 0;
        }
        let fitting = bytes.len().min(self.serial.fifo_capacity());
        match self.serial.enqueue_raw_bytes(bytes) {
            Ok(taken) => taken,
            Err(SerialError::FullFifo) => 0,
            Err(SerialError::Trigger(e)) => {
                // The bytes are queued; only the interrupt was lost.
                log::warn!("serial: failed to raise the RX interrupt: {e}");
                fitting
            }
            Err(SerialError::IOError(e)) => {
                log::warn!("serial: input error: {e}");
                0
            }
        }
    }

    /// Free space in the RX FIFO, in bytes.
    pub fn fifo_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// EventFd written when the guest has drained the RX FIFO, so a back-end
    /// that stopped reading because the FIFO was full can resume.
    pub fn input_ready_event(&self) -> &EventFd {
        &self.events.input_ready
    }

    /// The output back-end, e.g. to attach or detach the socket client.
    pub fn output_mut(&mut self) -> &mut SerialOutput {
        self.serial.writer_mut()
    }

    /// Returns to power-on register state (guest reset), keeping the output and the eventfds.
    ///
    /// Pending input is discarded.
    pub fn reset(&mut self) {
        let placeholder = Serial::with_events(
            EventFdTrigger(self.irq.clone()),
            self.events.clone(),
            SerialOutput::Sink,
        );
        let output = std::mem::replace(&mut self.serial, placeholder).into_writer();
        self.serial = Serial::with_events(
            EventFdTrigger(self.irq.clone()),
            self.events.clone(),
            output,
        );
    }
}

impl SerialDevice {
    /// The UART's registers and pending input, for a snapshot.
    pub fn state(&self) -> SerialDeviceState {
        self.serial.state().into()
    }

    /// Puts the UART in a saved state, after checking it, keeping the output and the
    /// eventfds. As `vm_superio` does, the interrupt is raised again if the restored
    /// registers say one is pending.
    pub fn restore(&mut self, state: &SerialDeviceState) -> Result<(), DeviceStateError> {
        state.validate()?;
        let mut restored = Serial::from_state(
            &SerialState::from(state),
            EventFdTrigger(self.irq.clone()),
            self.events.clone(),
            SerialOutput::Sink,
        )
        .map_err(|e| DeviceStateError::new("serial", e.to_string()))?;
        std::mem::swap(restored.writer_mut(), self.serial.writer_mut());
        self.serial = restored;
        Ok(())
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some((first, rest)) = data.split_first_mut() else {
            return;
        };
        *first = match u8::try_from(offset) {
            Ok(reg) if offset < COM1_PORT_LEN => self.serial.read(reg),
            _ => INVALID_REGISTER_READ,
        };
        rest.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        let reg = match u8::try_from(offset) {
            Ok(reg) if offset < COM1_PORT_LEN => reg,
            _ => {
                log::debug!("serial: write to invalid offset {offset:#x} ignored");
                return;
            }
        };
        if let Err(e) = self.serial.write(reg, value) {
            log::warn!("serial: write of {value:#04x} to register {reg} failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use vmm_sys_util::tempfile::TempFile;

    /// Receive buffer / transmit holding register.
    const REG_DATA: u64 = 0;
    /// Interrupt enable register.
    const REG_IER: u64 = 1;
    /// Line control register.
    const REG_LCR: u64 = 3;
    /// Line status register.
    const REG_LSR: u64 = 5;
    /// Scratch register.
    const REG_SCR: u64 = 7;
    /// IER: received data available interrupt.
    const IER_RDA: u8 = 0x01;
    /// LCR: divisor latch access.
    const LCR_DLAB: u8 = 0x80;
    /// LCR power-on value (8N1).
    const LCR_DEFAULT: u8 = 0x03;
    /// LSR: data ready.
    const LSR_DATA_READY: u8 = 0x01;
    /// LSR power-on value (THR empty, transmitter idle).
    const LSR_DEFAULT: u8 = 0x60;
    /// RX FIFO size of the 16550A model.
    const FIFO_SIZE: usize = 64;

    fn irq() -> EventFd {
        EventFd::new(EFD_NONBLOCK).unwrap()
    }

    fn read_reg(dev: &mut SerialDevice, reg: u64) -> u8 {
        let mut data = [0u8];
        BusDevice::read(dev, reg, &mut data);
        data[0]
    }

    fn is_signalled(fd: &EventFd) -> bool {
        fd.read().is_ok()
    }

    #[test]
    fn output_reaches_file() {
        let tmp = TempFile::new().unwrap();
        let file = tmp.as_file().try_clone().unwrap();
        let mut dev = SerialDevice::new(irq(), SerialOutput::File(file)).unwrap();
        for &b in b"hello\n" {
            BusDevice::write(&mut dev, REG_DATA, &[b]);
        }
        let mut contents = String::new();
        std::fs::File::open(tmp.as_path())
            .unwrap()
            .read_to_string(&mut contents)
            .unwrap();
        assert_eq!(contents, "hello\n");
    }

    #[test]
    fn input_enqueue_capacity_and_data_ready() {
        let irq_fd = irq();
        let irq_probe = irq_fd.try_clone().unwrap();
        let mut dev = SerialDevice::new(irq_fd, SerialOutput::Sink).unwrap();
        assert_eq!(dev.fifo_capacity(), FIFO_SIZE);
        assert_eq!(read_reg(&mut dev, REG_LSR) & LSR_DATA_READY, 0);

        BusDevice::write(&mut dev, REG_IER, &[IER_RDA]);
        let _ = irq_probe.read();
        assert_eq!(dev.enqueue_input(&[]), 0);
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        assert!(is_signalled(&irq_probe));
        assert_eq!(dev.fifo_capacity(), FIFO_SIZE - 2);
        assert_eq!(read_reg(&mut dev, REG_LSR) & LSR_DATA_READY, LSR_DATA_READY);

        let big = [b'x'; 100];
        assert_eq!(dev.enqueue_input(&big), FIFO_SIZE - 2);
        assert_eq!(dev.fifo_capacity(), 0);
        assert_eq!(dev.enqueue_input(b"y"), 0);

        assert_eq!(read_reg(&mut dev, REG_DATA), b'a');
        assert_eq!(read_reg(&mut dev, REG_DATA), b'b');
        assert_eq!(dev.fifo_capacity(), 2);
    }

    #[test]
    fn input_ready_fires_when_guest_drains_fifo() {
        let mut dev = SerialDevice::new(irq(), SerialOutput::Sink).unwrap();
        assert_eq!(dev.enqueue_input(b"xyz"), 3);
        assert_eq!(read_reg(&mut dev, REG_DATA), b'x');
        assert_eq!(read_reg(&mut dev, REG_DATA), b'y');
        assert!(!is_signalled(dev.input_ready_event()));
        assert_eq!(read_reg(&mut dev, REG_DATA), b'z');
        assert!(is_signalled(dev.input_ready_event()));
        assert_eq!(read_reg(&mut dev, REG_LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn reset_restores_power_on_state_and_keeps_output() {
        let tmp = TempFile::new().unwrap();
        let file = tmp.as_file().try_clone().unwrap();
        let mut dev = SerialDevice::new(irq(), SerialOutput::File(file)).unwrap();
        BusDevice::write(&mut dev, REG_SCR, &[0x55]);
        BusDevice::write(&mut dev, REG_IER, &[IER_RDA]);
        BusDevice::write(&mut dev, REG_LCR, &[LCR_DLAB]);
        dev.enqueue_input(b"pending");

        dev.reset();
        assert_eq!(read_reg(&mut dev, REG_SCR), 0);
        assert_eq!(read_reg(&mut dev, REG_IER), 0);
        assert_eq!(read_reg(&mut dev, REG_LCR), LCR_DEFAULT);
        assert_eq!(read_reg(&mut dev, REG_LSR), LSR_DEFAULT);
        assert_eq!(dev.fifo_capacity(), FIFO_SIZE);

        BusDevice::write(&mut dev, REG_DATA, b"!");
        let contents = std::fs::read(tmp.as_path()).unwrap();
        assert_eq!(contents, b"!");
        // The input-ready eventfd still belongs to the device.
        dev.enqueue_input(b"q");
        read_reg(&mut dev, REG_DATA);
        assert!(is_signalled(dev.input_ready_event()));
    }

    #[test]
    fn odd_access_sizes_do_not_panic() {
        let mut dev = SerialDevice::new(irq(), SerialOutput::Sink).unwrap();
        BusDevice::write(&mut dev, REG_SCR, &[]);
        BusDevice::write(&mut dev, REG_SCR, &[0x12, 0x34]);
        BusDevice::write(&mut dev, 100, &[1]);
        let mut empty = [];
        BusDevice::read(&mut dev, REG_SCR, &mut empty);
        let mut wide = [0xaau8; 2];
        BusDevice::read(&mut dev, REG_SCR, &mut wide);
        assert_eq!(wide, [0x12, 0]);
        let mut bad = [0u8; 1];
        BusDevice::read(&mut dev, 1 << 40, &mut bad);
        assert_eq!(bad, [INVALID_REGISTER_READ]);
    }

    #[test]
    fn socket_output_reaches_client_and_drops_on_error() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mut dev = SerialDevice::new(irq(), SerialOutput::Socket(None)).unwrap();
        // No client: dropped silently.
        BusDevice::write(&mut dev, REG_DATA, b"-");
        dev.output_mut().set_socket_client(Some(ours)).unwrap();
        assert!(dev.output_mut().has_socket_client());
        BusDevice::write(&mut dev, REG_DATA, b"o");
        BusDevice::write(&mut dev, REG_DATA, b"k");
        let mut buf = [0u8; 2];
        theirs.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ok");

        drop(theirs);
        BusDevice::write(&mut dev, REG_DATA, b"x");
        assert!(!dev.output_mut().has_socket_client());
    }

    #[test]
    fn socket_output_never_blocks() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let mut out = SerialOutput::Socket(None);
        out.set_socket_client(Some(ours)).unwrap();
        // Far more than any socket buffer: the excess is dropped, not blocked on.
        let big = vec![b'z'; 16 << 20];
        assert_eq!(out.write(&big).unwrap(), big.len());
        assert!(out.has_socket_client());
        assert!(SerialOutput::Sink
            .set_socket_client(None)
            .is_err_and(|e| e.kind() == io::ErrorKind::InvalidInput));
    }

    #[test]
    fn state_round_trips_into_a_fresh_device() {
        let tmp = TempFile::new().unwrap();
        let file = tmp.as_file().try_clone().unwrap();
        let mut dev = SerialDevice::new(irq(), SerialOutput::Sink).unwrap();
        BusDevice::write(&mut dev, REG_SCR, &[0x5a]);
        BusDevice::write(&mut dev, REG_LCR, &[LCR_DLAB]);
        BusDevice::write(&mut dev, REG_DATA, &[0x0c]);
        BusDevice::write(&mut dev, REG_LCR, &[LCR_DEFAULT]);
        BusDevice::write(&mut dev, REG_IER, &[IER_RDA]);
        dev.enqueue_input(b"hi");
        let json = serde_json::to_string(&dev.state()).unwrap();
        let state: SerialDeviceState = serde_json::from_str(&json).unwrap();

        let irq_fd = irq();
        let irq_probe = irq_fd.try_clone().unwrap();
        let mut fresh = SerialDevice::new(irq_fd, SerialOutput::File(file)).unwrap();
        fresh.restore(&state).unwrap();
        assert_eq!(fresh.state(), dev.state());
        // Input was pending with its interrupt enabled: the interrupt is raised again.
        assert!(is_signalled(&irq_probe));
        assert_eq!(read_reg(&mut fresh, REG_SCR), 0x5a);
        assert_eq!(read_reg(&mut fresh, REG_DATA), b'h');
        assert_eq!(read_reg(&mut fresh, REG_DATA), b'i');
        assert_eq!(fresh.fifo_capacity(), FIFO_SIZE);
        BusDevice::write(&mut fresh, REG_LCR, &[LCR_DLAB]);
        assert_eq!(read_reg(&mut fresh, REG_DATA), 0x0c);
        BusDevice::write(&mut fresh, REG_LCR, &[LCR_DEFAULT]);
        // The output back-end of the fresh device is kept.
        BusDevice::write(&mut fresh, REG_DATA, b"!");
        assert_eq!(std::fs::read(tmp.as_path()).unwrap(), b"!");
    }

    #[test]
    fn malformed_state_is_refused() {
        let mut dev = SerialDevice::new(irq(), SerialOutput::Sink).unwrap();
        let good = dev.state();
        let too_much_input = SerialDeviceState {
            in_buffer: vec![0; FIFO_SIZE + 1],
            ..good.clone()
        };
        let err = dev.restore(&too_much_input).unwrap_err();
        assert_eq!(err.device, "serial");
        assert_eq!(dev.state(), good);
        assert!(serde_json::from_str::<SerialDeviceState>(r#"{"scratch":1}"#).is_err());
    }
}
