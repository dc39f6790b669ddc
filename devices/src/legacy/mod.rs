//! PC legacy devices on the port I/O bus.

pub mod cmos;
pub mod exit;
pub mod i8042;
pub mod port80;
pub mod serial;

pub use cmos::CmosDevice;
pub use exit::ExitDevice;
pub use i8042::I8042Device;
pub use port80::Port80Device;
pub use serial::{SerialDevice, SerialOutput};
