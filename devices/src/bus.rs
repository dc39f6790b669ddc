//! An address-range bus (port I/O or MMIO) dispatching accesses to devices.
//!
//! A [`Bus`] owns its devices. Each device answers one range `[base, base + len)`
//! and sees offsets relative to `base`. Accesses that hit no range, or that
//! start inside a range but run past its end, are logged at debug level:
//! reads return all-ones (like an unclaimed ISA/PCI cycle) and writes are
//! dropped.

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

/// Value returned for every byte of a read that no device answers.
pub const UNMAPPED_READ_BYTE: u8 = 0xff;

/// A device that can be placed on a [`Bus`].
pub trait BusDevice: Send + 'static {
    /// Handles a read; `offset` is relative to the base of the range that matched.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a write; `offset` is relative to the base of the range that matched.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Private extension of [`BusDevice`] giving `Any` access for typed lookups.
///
/// Blanket-implemented, so implementors of [`BusDevice`] only write `read`/`write`.
trait AnyBusDevice: BusDevice {
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

impl<T: BusDevice> AnyBusDevice for T {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// Typed handle to a device inserted in a [`Bus`], returned by [`Bus::insert`].
///
/// A handle is only meaningful for the bus that returned it.
pub struct DeviceId<T> {
    index: usize,
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for DeviceId<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for DeviceId<T> {}

impl<T> PartialEq for DeviceId<T> {
    fn eq(&self, other: &Self) -> bool {
        self.index == other.index
    }
}

impl<T> Eq for DeviceId<T> {}

impl<T> fmt::Debug for DeviceId<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceId")
            .field("index", &self.index)
            .field("type", &std::any::type_name::<T>())
            .finish()
    }
}

/// Errors returned by [`Bus::insert`].
#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps a range already on the bus.
    #[error(
        "{bus} bus: range {base:#x}+{len:#x} overlaps existing range {existing_base:#x}+{existing_len:#x}"
    )]
    Overlap {
        /// Name of the bus.
        bus: &'static str,
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
        /// Base of the range it collides with.
        existing_base: u64,
        /// Length of the range it collides with.
        existing_len: u64,
    },
    /// The new range has length zero.
    #[error("{bus} bus: zero-length range at {base:#x}")]
    ZeroLength {
        /// Name of the bus.
        bus: &'static str,
        /// Base of the rejected range.
        base: u64,
    },
    /// The new range runs past the end of the 64-bit address space.
    #[error("{bus} bus: range {base:#x}+{len:#x} wraps past the end of the address space")]
    AddressOverflow {
        /// Name of the bus.
        bus: &'static str,
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

/// One mapped range: its inclusive last address and the index of its device.
#[derive(Debug, Clone, Copy)]
struct Range {
    last: u64,
    device: usize,
}

/// Dispatches guest accesses in an address space to the devices mapped in it.
pub struct Bus {
    name: &'static str,
    /// Ranges keyed by their base address.
    ranges: BTreeMap<u64, Range>,
    devices: Vec<Box<dyn AnyBusDevice>>,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bus")
            .field("name", &self.name)
            .field("ranges", &self.ranges)
            .field("devices", &self.devices.len())
            .finish()
    }
}

impl Bus {
    /// Creates an empty bus; `name` (e.g. `"pio"`, `"mmio"`) is used in logs and errors.
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            ranges: BTreeMap::new(),
            devices: Vec::new(),
        }
    }

    /// Returns the bus name given to [`Bus::new`].
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Inserts a device that answers `[base, base + len)`.
    pub fn insert<T: BusDevice>(
        &mut self,
        device: T,
        base: u64,
        len: u64,
    ) -> Result<DeviceId<T>, BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength {
                bus: self.name,
                base,
            });
        }
        let last = base.checked_add(len - 1).ok_or(BusError::AddressOverflow {
            bus: self.name,
            base,
            len,
        })?;
        // The only candidate for overlap is the last range starting at or before `last`.
        if let Some((&existing_base, existing)) = self.ranges.range(..=last).next_back() {
            if existing.last >= base {
                return Err(BusError::Overlap {
                    bus: self.name,
                    base,
                    len,
                    existing_base,
                    existing_len: existing.last - existing_base + 1,
                });
            }
        }
        let index = self.devices.len();
        self.devices.push(Box::new(device));
        self.ranges.insert(
            base,
            Range {
                last,
                device: index,
            },
        );
        Ok(DeviceId {
            index,
            _type: PhantomData,
        })
    }

    /// Returns the device behind `id`, or `None` if `id` does not name a `T` on this bus.
    pub fn get<T: BusDevice>(&self, id: DeviceId<T>) -> Option<&T> {
        self.devices
            .get(id.index)
            .and_then(|device| device.as_any().downcast_ref::<T>())
    }

    /// Returns the device behind `id` mutably, or `None` if `id` does not name a `T` on this
    /// bus.
    pub fn get_mut<T: BusDevice>(&mut self, id: DeviceId<T>) -> Option<&mut T> {
        self.devices
            .get_mut(id.index)
            .and_then(|device| device.as_any_mut().downcast_mut::<T>())
    }

    /// Finds the device and offset for an access of `size` bytes at `addr`.
    ///
    /// Returns `None` if `addr` is unmapped or the access runs past the range end.
    fn resolve(&self, addr: u64, size: usize) -> Option<(usize, u64)> {
        let (&base, range) = self.ranges.range(..=addr).next_back()?;
        if addr > range.last {
            return None;
        }
        let size = u64::try_from(size).ok()?;
        let access_last = addr.checked_add(size.checked_sub(1)?)?;
        if access_last > range.last {
            return None;
        }
        Some((range.device, addr - base))
    }

    /// Dispatches a read of `data.len()` bytes at `addr`.
    ///
    /// If no device answers the whole access, logs at debug level and fills
    /// `data` with [`UNMAPPED_READ_BYTE`]. A zero-length access does nothing.
    pub fn read(&mut self, addr: u64, data: &mut [u8]) {
        if data.is_empty() {
            log::debug!("{} bus: zero-length read at {addr:#x} ignored", self.name);
            return;
        }
        match self.resolve(addr, data.len()) {
            Some((index, offset)) => match self.devices.get_mut(index) {
                Some(device) => device.read(offset, data),
                None => data.fill(UNMAPPED_READ_BYTE),
            },
            None => {
                log::debug!(
                    "{} bus: unmapped read at {addr:#x}, size {}",
                    self.name,
                    data.len()
                );
                data.fill(UNMAPPED_READ_BYTE);
            }
        }
    }

    /// Dispatches a write of `data` at `addr`.
    ///
    /// If no device answers the whole access, logs at debug level and drops it.
    /// A zero-length access does nothing.
    pub fn write(&mut self, addr: u64, data: &[u8]) {
        if data.is_empty() {
            log::debug!("{} bus: zero-length write at {addr:#x} ignored", self.name);
            return;
        }
        match self.resolve(addr, data.len()) {
            Some((index, offset)) => {
                if let Some(device) = self.devices.get_mut(index) {
                    device.write(offset, data);
                }
            }
            None => log::debug!(
                "{} bus: unmapped write at {addr:#x}, size {}, data {data:02x?}",
                self.name,
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records accesses; reads return the offset as bytes.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
        reads: Vec<(u64, usize)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            self.reads.push((offset, data.len()));
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    struct Other;

    impl BusDevice for Other {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0x11);
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {}
    }

    #[test]
    fn insert_and_dispatch_with_relative_offsets() {
        let mut bus = Bus::new("pio");
        let a = bus.insert(Recorder::default(), 0x3f8, 8).unwrap();
        let b = bus.insert(Recorder::default(), 0x60, 5).unwrap();

        let mut data = [0u8; 1];
        bus.read(0x3fd, &mut data);
        assert_eq!(data, [5]);
        bus.write(0x64, &[0xfe]);
        bus.write(0x60, &[1, 2]);

        assert_eq!(bus.get_mut(a).unwrap().reads, vec![(5, 1)]);
        let b = bus.get_mut(b).unwrap();
        assert_eq!(b.writes, vec![(4, vec![0xfe]), (0, vec![1, 2])]);
    }

    #[test]
    fn overlapping_ranges_are_rejected() {
        let mut bus = Bus::new("mmio");
        bus.insert(Other, 0x1000, 0x100).unwrap();
        for (base, len) in [
            (0x1000, 1),
            (0xfff, 2),
            (0x10ff, 1),
            (0x800, 0x1000),
            (0x1080, 4),
        ] {
            let err = bus.insert(Other, base, len).unwrap_err();
            assert_eq!(
                err,
                BusError::Overlap {
                    bus: "mmio",
                    base,
                    len,
                    existing_base: 0x1000,
                    existing_len: 0x100
                }
            );
        }
        // Adjacent ranges on both sides are fine.
        bus.insert(Other, 0xfff, 1).unwrap();
        bus.insert(Other, 0x1100, 1).unwrap();
    }

    #[test]
    fn zero_length_and_overflowing_ranges_are_rejected() {
        let mut bus = Bus::new("pio");
        assert_eq!(
            bus.insert(Other, 0x10, 0).unwrap_err(),
            BusError::ZeroLength {
                bus: "pio",
                base: 0x10
            }
        );
        assert!(matches!(
            bus.insert(Other, u64::MAX, 2),
            Err(BusError::AddressOverflow { .. })
        ));
        // A range ending exactly at the top of the address space is valid.
        let id = bus.insert(Recorder::default(), u64::MAX, 1).unwrap();
        let mut data = [0u8; 1];
        bus.read(u64::MAX, &mut data);
        assert_eq!(bus.get_mut(id).unwrap().reads, vec![(0, 1)]);
        let mut wide = [0u8; 2];
        bus.read(u64::MAX, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
    }

    #[test]
    fn unmapped_and_crossing_accesses() {
        let mut bus = Bus::new("pio");
        let id = bus.insert(Recorder::default(), 0x70, 2).unwrap();

        let mut data = [0u8; 4];
        bus.read(0x80, &mut data);
        assert_eq!(data, [0xff; 4]);
        bus.read(0x10, &mut data);
        assert_eq!(data, [0xff; 4]);

        // Starts in the range but crosses its end.
        let mut data = [0u8; 2];
        bus.read(0x71, &mut data);
        assert_eq!(data, [0xff; 2]);
        bus.write(0x71, &[1, 2]);
        bus.write(0x90, &[1]);

        // Zero-length accesses are ignored and never reach the device.
        bus.read(0x70, &mut []);
        bus.write(0x70, &[]);

        // A huge slice does not overflow the arithmetic.
        let mut big = vec![0u8; 4096];
        bus.read(0x70, &mut big);
        assert!(big.iter().all(|&b| b == 0xff));

        let dev = bus.get_mut(id).unwrap();
        assert!(dev.reads.is_empty());
        assert!(dev.writes.is_empty());
    }

    #[test]
    fn get_mut_checks_type() {
        let mut bus = Bus::new("pio");
        let rec = bus.insert(Recorder::default(), 0, 1).unwrap();
        let _other = bus.insert(Other, 1, 1).unwrap();
        // Forge a handle of the wrong type for index 1.
        let wrong: DeviceId<Recorder> = DeviceId {
            index: 1,
            _type: PhantomData,
        };
        assert!(bus.get_mut(wrong).is_none());
        assert!(bus.get(wrong).is_none());
        assert!(bus.get_mut(rec).is_some());
        assert!(bus.get(rec).is_some());
        let missing: DeviceId<Recorder> = DeviceId {
            index: 7,
            _type: PhantomData,
        };
        assert!(bus.get_mut(missing).is_none());
        assert!(bus.get(missing).is_none());
        assert!(format!("{rec:?}").contains("Recorder"));
    }
}
