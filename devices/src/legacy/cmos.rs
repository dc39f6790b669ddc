//! MC146818 RTC and CMOS RAM at ports 0x70 (index) and 0x71 (data).
//!
//! The date/time registers read the host's UTC time at each access (writes
//! to them are ignored), in BCD or binary and 12h or 24h as register B
//! selects. The alarm, periodic and update interrupts are not implemented
//! (no IRQ 8 is wired). Every other index is plain battery-backed RAM, with
//! the memory-size bytes filled in at creation.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::state::DeviceStateError;

/// First I/O port of the RTC (the index port).
pub const CMOS_PORT_BASE: u16 = 0x70;
/// Number of I/O ports used by the RTC (index and data).
pub const CMOS_PORT_LEN: u64 = 2;

/// Offset of the index port (0x70).
const OFFSET_INDEX: u64 = 0;
/// Offset of the data port (0x71).
const OFFSET_DATA: u64 = 1;
/// Index bits; bit 7 is the NMI disable bit, which is ignored.
const INDEX_MASK: u8 = 0x7f;
/// Size of the CMOS RAM.
const CMOS_SIZE: usize = 128;
/// Value returned by reads of the write-only index port.
const INDEX_PORT_READ_VALUE: u8 = 0xff;

/// Register: seconds.
const REG_SECONDS: u8 = 0x00;
/// Register: minutes.
const REG_MINUTES: u8 = 0x02;
/// Register: hours.
const REG_HOURS: u8 = 0x04;
/// Register: day of week (1-7, Sunday = 1).
const REG_DAY_OF_WEEK: u8 = 0x06;
/// Register: day of month.
const REG_DAY_OF_MONTH: u8 = 0x07;
/// Register: month.
const REG_MONTH: u8 = 0x08;
/// Register: year within the century.
const REG_YEAR: u8 = 0x09;
/// Register A: update in progress and divider/rate selection.
const REG_A: u8 = 0x0a;
/// Register B: mode and interrupt enables.
const REG_B: u8 = 0x0b;
/// Register C: interrupt flags.
const REG_C: u8 = 0x0c;
/// Register D: valid RAM and time.
const REG_D: u8 = 0x0d;
/// Register: century.
const REG_CENTURY: u8 = 0x32;

/// Register A: update in progress.
const REG_A_UIP: u8 = 0x80;
/// Register A at power-on: 32.768 kHz time base, 1024 Hz periodic rate.
const REG_A_DEFAULT: u8 = 0x26;
/// Register B: data mode binary (clear = BCD).
const REG_B_DM_BINARY: u8 = 0x04;
/// Register B: 24-hour mode (clear = 12-hour).
const REG_B_24H: u8 = 0x02;
/// Register B at power-on: 24-hour, BCD.
const REG_B_DEFAULT: u8 = REG_B_24H;
/// Register C value: no interrupt flags ever set.
const REG_C_VALUE: u8 = 0x00;
/// Register D: valid RAM and time.
const REG_D_VRT: u8 = 0x80;
/// Hours register: PM flag in 12-hour mode.
const HOURS_PM: u8 = 0x80;

/// The update cycle (UIP set) lasts this long at the end of each second.
const UIP_WINDOW_NANOS: u32 = 244_000;
/// Nanoseconds per second.
const NANOS_PER_SEC: u32 = 1_000_000_000;

/// CMOS: base memory in KiB (low, high byte at +1).
const CMOS_BASE_MEM: u8 = 0x15;
/// CMOS: extended memory above 1 MiB in KiB, IBM AT copy (low, high at +1).
const CMOS_EXT_MEM_AT: u8 = 0x17;
/// CMOS: extended memory above 1 MiB in KiB, up to 64 MiB (low, high at +1).
const CMOS_EXT_MEM: u8 = 0x30;
/// CMOS: memory between 16 MiB and 4 GiB in 64 KiB units (low, high at +1).
const CMOS_MEM_ABOVE_16M: u8 = 0x34;
/// CMOS: memory above 4 GiB in 64 KiB units (three bytes, low first).
const CMOS_MEM_ABOVE_4G: u8 = 0x5b;

/// Base (conventional) memory reported, in KiB.
const BASE_MEM_KIB: u16 = 640;
/// One KiB.
const KIB: u64 = 1 << 10;
/// One MiB.
const MIB: u64 = 1 << 20;
/// Unit of the above-16 MiB and above-4 GiB counters.
const MEM_UNIT_64K: u64 = 64 * KIB;
/// Largest value of a three-byte counter.
const MAX_24BIT: u64 = 0xff_ffff;

/// Seconds per day.
const SECS_PER_DAY: u64 = 86_400;
/// Seconds per hour.
const SECS_PER_HOUR: u64 = 3_600;
/// Seconds per minute.
const SECS_PER_MINUTE: u64 = 60;

/// Source of the current time as a duration since the UNIX epoch.
type Clock = Box<dyn Fn() -> Duration + Send>;

/// A broken-down UTC date and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DateTime {
    year: u64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    /// 1-7, Sunday = 1.
    weekday: u8,
}

impl DateTime {
    /// Converts seconds since the UNIX epoch (UTC) to a civil date and time.
    ///
    /// Uses Howard Hinnant's days-to-civil algorithm for the proleptic
    /// Gregorian calendar.
    fn from_unix(secs: u64) -> Self {
        let days = secs / SECS_PER_DAY;
        let rem = secs % SECS_PER_DAY;
        // 1970-01-01 was a Thursday (weekday 5 with Sunday = 1).
        let weekday = ((days + 4) % 7) as u8 + 1;

        // Shift the epoch to 0000-03-01 so leap days fall at the end of a year.
        let z = days + 719_468;
        let era = z / 146_097;
        let doe = z - era * 146_097; // [0, 146096]
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
        let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
        let day = (doy - (153 * mp + 2) / 5 + 1) as u8; // [1, 31]
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8; // [1, 12]
        let year = yoe + era * 400 + u64::from(month <= 2);

        Self {
            year,
            month,
            day,
            hour: (rem / SECS_PER_HOUR) as u8,
            minute: (rem % SECS_PER_HOUR / SECS_PER_MINUTE) as u8,
            second: (rem % SECS_PER_MINUTE) as u8,
            weekday,
        }
    }
}

/// Converts a binary value below 100 to packed BCD.
fn to_bcd(value: u8) -> u8 {
    ((value / 10) << 4) | (value % 10)
}

/// Returns the current host time since the UNIX epoch.
fn system_clock() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// The saved state of a [`CmosDevice`]. The date and time are not part of it: they always
/// read the host's clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosState {
    /// The selected register (the index port, without the NMI bit).
    pub index: u8,
    /// The 128 bytes of CMOS RAM, including registers A and B.
    pub ram: Vec<u8>,
}

impl CmosState {
    /// Checks the RAM size and the index range.
    pub fn validate(&self) -> Result<(), DeviceStateError> {
        if self.ram.len() != CMOS_SIZE {
            return Err(DeviceStateError::new(
                "CMOS",
                format!("{} bytes of RAM, expected {CMOS_SIZE}", self.ram.len()),
            ));
        }
        if self.index & !INDEX_MASK != 0 {
            return Err(DeviceStateError::new(
                "CMOS",
                format!("index {:#04x} out of range", self.index),
            ));
        }
        Ok(())
    }
}

/// MC146818 RTC with 128 bytes of CMOS RAM.
pub struct CmosDevice {
    index: u8,
    ram: [u8; CMOS_SIZE],
    clock: Clock,
}

impl fmt::Debug for CmosDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CmosDevice")
            .field("index", &self.index)
            .field("ram", &self.ram)
            .finish_non_exhaustive()
    }
}

impl CmosDevice {
    /// Creates the RTC reading the host clock, with the memory-size bytes filled:
    /// 0x34/0x35 = RAM between 16 MiB and `mem_below_4g` in 64 KiB units
    /// (saturating at 0xffff), 0x5b..0x5d = RAM above 4 GiB in 64 KiB units,
    /// 0x30/0x31 (and the AT copy at 0x17/0x18) = extended memory in KiB above
    /// 1 MiB up to 64 MiB, 0x15/0x16 = 640 KiB of base memory.
    pub fn new(mem_below_4g: u64, mem_above_4g: u64) -> Self {
        Self::with_clock(mem_below_4g, mem_above_4g, Box::new(system_clock))
    }

    /// Like [`CmosDevice::new`], but with a clock returning the time since the
    /// UNIX epoch, so the date registers are testable.
    pub fn with_clock(
        mem_below_4g: u64,
        mem_above_4g: u64,
        clock: Box<dyn Fn() -> Duration + Send>,
    ) -> Self {
        let mut dev = Self {
            index: 0,
            ram: [0; CMOS_SIZE],
            clock,
        };
        dev.ram[usize::from(REG_A)] = REG_A_DEFAULT;
        dev.ram[usize::from(REG_B)] = REG_B_DEFAULT;
        dev.ram[usize::from(REG_D)] = REG_D_VRT;

        let ext_kib = mem_below_4g.min(64 * MIB).saturating_sub(MIB) / KIB;
        let above_16m = (mem_below_4g.saturating_sub(16 * MIB) / MEM_UNIT_64K).min(0xffff);
        let above_4g = (mem_above_4g / MEM_UNIT_64K).min(MAX_24BIT);
        dev.set_le(CMOS_BASE_MEM, u64::from(BASE_MEM_KIB), 2);
        dev.set_le(CMOS_EXT_MEM_AT, ext_kib, 2);
        dev.set_le(CMOS_EXT_MEM, ext_kib, 2);
        dev.set_le(CMOS_MEM_ABOVE_16M, above_16m, 2);
        dev.set_le(CMOS_MEM_ABOVE_4G, above_4g, 3);
        dev
    }

    /// Creates the RTC reading the host clock, in a saved state (checked first).
    pub fn from_state(state: &CmosState) -> Result<Self, DeviceStateError> {
        let mut dev = Self {
            index: 0,
            ram: [0; CMOS_SIZE],
            clock: Box::new(system_clock),
        };
        dev.restore(state)?;
        Ok(dev)
    }

    /// The device's state, for a snapshot.
    pub fn state(&self) -> CmosState {
        CmosState {
            index: self.index,
            ram: self.ram.to_vec(),
        }
    }

    /// Puts the device in a saved state, after checking it.
    pub fn restore(&mut self, state: &CmosState) -> Result<(), DeviceStateError> {
        state.validate()?;
        self.ram.copy_from_slice(&state.ram);
        self.index = state.index;
        Ok(())
    }

    /// Stores the low `bytes` bytes of `value`, little-endian, from RAM index `start`.
    fn set_le(&mut self, start: u8, value: u64, bytes: usize) {
        let start = usize::from(start);
        for (i, byte) in value.to_le_bytes().iter().take(bytes).enumerate() {
            if let Some(slot) = self.ram.get_mut(start + i) {
                *slot = *byte;
            }
        }
    }

    fn reg_b(&self) -> u8 {
        self.ram[usize::from(REG_B)]
    }

    /// Encodes a date/time field in BCD or binary as register B selects.
    fn encode(&self, value: u8) -> u8 {
        if self.reg_b() & REG_B_DM_BINARY != 0 {
            value
        } else {
            to_bcd(value)
        }
    }

    /// Encodes the hours register, in 24-hour or 12-hour (with PM flag) mode.
    fn encode_hours(&self, hour: u8) -> u8 {
        if self.reg_b() & REG_B_24H != 0 {
            return self.encode(hour);
        }
        let hour12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        let pm = if hour >= 12 { HOURS_PM } else { 0 };
        self.encode(hour12) | pm
    }

    fn read_data(&self) -> u8 {
        let now = (self.clock)();
        let time = || DateTime::from_unix(now.as_secs());
        match self.index {
            REG_SECONDS => self.encode(time().second),
            REG_MINUTES => self.encode(time().minute),
            REG_HOURS => self.encode_hours(time().hour),
            REG_DAY_OF_WEEK => self.encode(time().weekday),
            REG_DAY_OF_MONTH => self.encode(time().day),
            REG_MONTH => self.encode(time().month),
            REG_YEAR => self.encode((time().year % 100) as u8),
            REG_CENTURY => self.encode((time().year / 100 % 100) as u8),
            REG_A => {
                let stored = self.ram[usize::from(REG_A)] & !REG_A_UIP;
                if now.subsec_nanos() >= NANOS_PER_SEC - UIP_WINDOW_NANOS {
                    stored | REG_A_UIP
                } else {
                    stored
                }
            }
            REG_C => REG_C_VALUE,
            REG_D => REG_D_VRT,
            index => self.ram[usize::from(index)],
        }
    }

    fn write_data(&mut self, value: u8) {
        match self.index {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_DAY_OF_WEEK | REG_DAY_OF_MONTH
            | REG_MONTH | REG_YEAR | REG_CENTURY => {
                log::debug!(
                    "cmos: write of {value:#04x} to time register {:#04x} ignored",
                    self.index
                );
            }
            REG_A => self.ram[usize::from(REG_A)] = value & !REG_A_UIP,
            REG_C | REG_D => {
                log::debug!(
                    "cmos: write of {value:#04x} to read-only register {:#04x} ignored",
                    self.index
                );
            }
            index => self.ram[usize::from(index)] = value,
        }
    }
}

impl BusDevice for CmosDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some((first, rest)) = data.split_first_mut() else {
            return;
        };
        *first = match offset {
            OFFSET_DATA => self.read_data(),
            _ => INDEX_PORT_READ_VALUE,
        };
        rest.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        match offset {
            OFFSET_INDEX => self.index = value & INDEX_MASK,
            OFFSET_DATA => self.write_data(value),
            _ => log::debug!("cmos: write to invalid offset {offset:#x} ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-22 02:13:07 UTC, a Sunday.
    const FIXED_SECS: u64 = 1_795_313_587;
    /// 2026-11-22 14:13:07 UTC (12 hours later).
    const FIXED_SECS_PM: u64 = FIXED_SECS + 12 * SECS_PER_HOUR;
    const GIB: u64 = 1 << 30;

    fn fixed(secs: u64, nanos: u32) -> CmosDevice {
        CmosDevice::with_clock(256 * MIB, 0, Box::new(move || Duration::new(secs, nanos)))
    }

    fn read(dev: &mut CmosDevice, index: u8) -> u8 {
        dev.write(OFFSET_INDEX, &[index]);
        let mut data = [0u8];
        dev.read(OFFSET_DATA, &mut data);
        data[0]
    }

    fn write(dev: &mut CmosDevice, index: u8, value: u8) {
        dev.write(OFFSET_INDEX, &[index]);
        dev.write(OFFSET_DATA, &[value]);
    }

    fn time_regs(dev: &mut CmosDevice) -> [u8; 8] {
        [
            REG_SECONDS,
            REG_MINUTES,
            REG_HOURS,
            REG_DAY_OF_WEEK,
            REG_DAY_OF_MONTH,
            REG_MONTH,
            REG_YEAR,
            REG_CENTURY,
        ]
        .map(|r| read(dev, r))
    }

    #[test]
    fn civil_date_conversion() {
        let epoch = DateTime::from_unix(0);
        assert_eq!(
            epoch,
            DateTime {
                year: 1970,
                month: 1,
                day: 1,
                hour: 0,
                minute: 0,
                second: 0,
                weekday: 5
            }
        );
        // 2000-02-29 23:59:59 UTC, a Tuesday.
        let leap = DateTime::from_unix(951_868_799);
        assert_eq!((leap.year, leap.month, leap.day), (2000, 2, 29));
        assert_eq!((leap.hour, leap.minute, leap.second), (23, 59, 59));
        assert_eq!(leap.weekday, 3);
        // 2100-03-01 00:00:00 UTC (2100 is not a leap year), a Monday.
        let c = DateTime::from_unix(4_107_542_400);
        assert_eq!((c.year, c.month, c.day, c.weekday), (2100, 3, 1, 2));
    }

    #[test]
    fn time_in_bcd_24h() {
        let mut dev = fixed(FIXED_SECS, 0);
        assert_eq!(
            time_regs(&mut dev),
            [0x07, 0x13, 0x02, 0x01, 0x22, 0x11, 0x26, 0x20]
        );
    }

    #[test]
    fn time_in_binary() {
        let mut dev = fixed(FIXED_SECS, 0);
        write(&mut dev, REG_B, REG_B_24H | REG_B_DM_BINARY);
        assert_eq!(time_regs(&mut dev), [7, 13, 2, 1, 22, 11, 26, 20]);
    }

    #[test]
    fn time_in_12h() {
        let mut dev = fixed(FIXED_SECS, 0);
        write(&mut dev, REG_B, 0);
        assert_eq!(read(&mut dev, REG_HOURS), 0x02);
        let mut dev = fixed(FIXED_SECS_PM, 0);
        write(&mut dev, REG_B, 0);
        assert_eq!(read(&mut dev, REG_HOURS), HOURS_PM | 0x02);
        write(&mut dev, REG_B, REG_B_DM_BINARY);
        assert_eq!(read(&mut dev, REG_HOURS), HOURS_PM | 2);
        // Midnight and noon are 12 AM / 12 PM.
        let mut dev = fixed(FIXED_SECS - 2 * SECS_PER_HOUR, 0);
        write(&mut dev, REG_B, 0);
        assert_eq!(read(&mut dev, REG_HOURS), 0x12);
        let mut dev = fixed(FIXED_SECS + 10 * SECS_PER_HOUR, 0);
        write(&mut dev, REG_B, 0);
        assert_eq!(read(&mut dev, REG_HOURS), HOURS_PM | 0x12);
    }

    #[test]
    fn time_writes_are_ignored() {
        let mut dev = fixed(FIXED_SECS, 0);
        write(&mut dev, REG_SECONDS, 0x59);
        assert_eq!(read(&mut dev, REG_SECONDS), 0x07);
    }

    #[test]
    fn register_a_uip_window() {
        let mut dev = fixed(FIXED_SECS, 0);
        assert_eq!(read(&mut dev, REG_A), REG_A_DEFAULT);
        let mut dev = fixed(FIXED_SECS, NANOS_PER_SEC - UIP_WINDOW_NANOS - 1);
        assert_eq!(read(&mut dev, REG_A), REG_A_DEFAULT);
        let mut dev = fixed(FIXED_SECS, NANOS_PER_SEC - UIP_WINDOW_NANOS);
        assert_eq!(read(&mut dev, REG_A), REG_A_DEFAULT | REG_A_UIP);
        // UIP is read-only.
        let mut dev = fixed(FIXED_SECS, 0);
        write(&mut dev, REG_A, 0xa6);
        assert_eq!(read(&mut dev, REG_A), 0x26);
    }

    #[test]
    fn status_registers() {
        let mut dev = fixed(FIXED_SECS, 0);
        assert_eq!(read(&mut dev, REG_B), REG_B_DEFAULT);
        assert_eq!(read(&mut dev, REG_C), 0);
        assert_eq!(read(&mut dev, REG_D), REG_D_VRT);
        write(&mut dev, REG_D, 0);
        assert_eq!(read(&mut dev, REG_D), REG_D_VRT);
        // NMI disable bit in the index is ignored.
        assert_eq!(read(&mut dev, REG_D | 0x80), REG_D_VRT);
    }

    #[test]
    fn ram_and_port_edge_cases() {
        let mut dev = fixed(FIXED_SECS, 0);
        write(&mut dev, 0x40, 0xab);
        write(&mut dev, 0x7f, 0xcd);
        assert_eq!(read(&mut dev, 0x40), 0xab);
        assert_eq!(read(&mut dev, 0xff), 0xcd);
        let mut data = [0u8; 2];
        dev.read(OFFSET_INDEX, &mut data);
        assert_eq!(data, [INDEX_PORT_READ_VALUE, 0]);
        dev.write(OFFSET_DATA, &[]);
        dev.read(OFFSET_DATA, &mut []);
        dev.write(7, &[1]);
    }

    #[test]
    fn memory_bytes_for_256_mib() {
        let mut dev = CmosDevice::new(256 * MIB, 0);
        // 63 MiB above 1 MiB = 64512 KiB = 0xfc00.
        assert_eq!([read(&mut dev, 0x30), read(&mut dev, 0x31)], [0x00, 0xfc]);
        assert_eq!([read(&mut dev, 0x17), read(&mut dev, 0x18)], [0x00, 0xfc]);
        // 240 MiB above 16 MiB = 3840 x 64 KiB = 0x0f00.
        assert_eq!([read(&mut dev, 0x34), read(&mut dev, 0x35)], [0x00, 0x0f]);
        assert_eq!(
            [
                read(&mut dev, 0x5b),
                read(&mut dev, 0x5c),
                read(&mut dev, 0x5d)
            ],
            [0, 0, 0]
        );
        assert_eq!([read(&mut dev, 0x15), read(&mut dev, 0x16)], [0x80, 0x02]);
    }

    #[test]
    fn memory_bytes_for_6_gib() {
        // 6 GiB split as 3 GiB below the 32-bit hole and 3 GiB above 4 GiB.
        let mut dev = CmosDevice::new(3 * GIB, 3 * GIB);
        assert_eq!([read(&mut dev, 0x30), read(&mut dev, 0x31)], [0x00, 0xfc]);
        // 3056 MiB above 16 MiB = 48896 x 64 KiB = 0xbf00.
        assert_eq!([read(&mut dev, 0x34), read(&mut dev, 0x35)], [0x00, 0xbf]);
        // 3 GiB = 49152 x 64 KiB = 0x00c000.
        assert_eq!(
            [
                read(&mut dev, 0x5b),
                read(&mut dev, 0x5c),
                read(&mut dev, 0x5d)
            ],
            [0x00, 0xc0, 0x00]
        );
    }

    #[test]
    fn memory_bytes_saturate_and_handle_tiny_ram() {
        let mut dev = CmosDevice::new(u64::MAX, u64::MAX);
        assert_eq!([read(&mut dev, 0x34), read(&mut dev, 0x35)], [0xff, 0xff]);
        assert_eq!(
            [
                read(&mut dev, 0x5b),
                read(&mut dev, 0x5c),
                read(&mut dev, 0x5d)
            ],
            [0xff, 0xff, 0xff]
        );
        let mut dev = CmosDevice::new(512 * KIB, 0);
        assert_eq!([read(&mut dev, 0x30), read(&mut dev, 0x31)], [0, 0]);
        assert_eq!([read(&mut dev, 0x34), read(&mut dev, 0x35)], [0, 0]);
    }

    #[test]
    fn system_clock_date_is_plausible() {
        let mut dev = CmosDevice::new(256 * MIB, 0);
        assert_eq!(read(&mut dev, REG_CENTURY), 0x20);
    }

    #[test]
    fn state_round_trips_into_a_fresh_device() {
        let mut dev = fixed(FIXED_SECS, 0);
        write(&mut dev, 0x40, 0xab);
        write(&mut dev, REG_B, REG_B_24H | REG_B_DM_BINARY);
        write(&mut dev, 0x41, 0xcd);
        let json = serde_json::to_string(&dev.state()).unwrap();
        let state: CmosState = serde_json::from_str(&json).unwrap();
        let mut fresh = fixed(FIXED_SECS, 0);
        fresh.restore(&state).unwrap();
        assert_eq!(fresh.state(), dev.state());
        // The selected index survives: a data read without a new index write sees it.
        let mut data = [0u8];
        fresh.read(OFFSET_DATA, &mut data);
        assert_eq!(data[0], 0xcd);
        assert_eq!(read(&mut fresh, 0x40), 0xab);
        // Binary mode survives.
        assert_eq!(read(&mut fresh, REG_SECONDS), 7);
        assert_eq!(CmosDevice::from_state(&state).unwrap().state(), state);
    }

    #[test]
    fn malformed_state_is_refused() {
        let mut dev = fixed(FIXED_SECS, 0);
        let good = dev.state();
        let short = CmosState {
            ram: vec![0; 64],
            ..good.clone()
        };
        assert!(dev.restore(&short).is_err());
        let bad_index = CmosState {
            index: 0x80,
            ..good.clone()
        };
        assert!(dev.restore(&bad_index).is_err());
        assert!(CmosDevice::from_state(&bad_index).is_err());
        assert_eq!(dev.state(), good);
        assert!(serde_json::from_str::<CmosState>(r#"{"index":1,"ram":[300]}"#).is_err());
    }
}
