//! The virtio-mmio transport, version 2 (virtio 1.x) register layout.
//!
//! [`MmioTransport`] answers one [`VIRTIO_MMIO_SIZE`]-byte window on the MMIO bus. It owns the
//! virtqueues and runs the device status state machine:
//!
//! * features can only be written between DRIVER and FEATURES_OK; FEATURES_OK is refused (the
//!   bit stays clear) unless the driver accepted [`VIRTIO_F_VERSION_1`] and nothing the device
//!   did not offer;
//! * queues can only be configured between FEATURES_OK and DRIVER_OK, and not while ready; a
//!   rejected size (zero, above the maximum, not a power of two) or misaligned ring address
//!   marks the queue broken;
//! * at DRIVER_OK every ready queue is checked against guest memory; a broken queue sets
//!   DEVICE_NEEDS_RESET (with a configuration-change interrupt) instead of activating;
//! * queue notifications before activation are ignored (buffers made available before
//!   DRIVER_OK are picked up when the device activates);
//! * writing 0 to Status resets the device and its queues, at any moment.
//!
//! Register accesses must be 32 bits wide and aligned; the configuration space at
//! [`CONFIG_SPACE_OFFSET`] takes any width.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestAddress;

use super::{GuestMemory, VirtioDevice, VirtioError, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;

/// Size of one virtio-mmio register window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// `MagicValue` register contents: "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// `Version` register contents: the virtio 1.x (non-legacy) layout.
pub const MMIO_VERSION: u32 = 2;
/// `VendorID` register contents: "SKIF".
pub const MMIO_VENDOR_ID: u32 = u32::from_le_bytes(*b"SKIF");
/// Offset of the `QueueNotify` register (where the VMM hangs ioeventfds, datamatch = queue).
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
/// Offset of the device-specific configuration space.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

// Register offsets (virtio 1.2, section 4.2.2).
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
const REG_QUEUE_USED_LOW: u64 = 0x0a0;
const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_BASE_HIGH: u64 = 0x0bc;
const REG_CONFIG_GENERATION: u64 = 0x0fc;

/// Interrupt status bit: the device used buffers.
pub const INT_USED_BUFFER: u32 = VIRTIO_MMIO_INT_VRING;
/// Interrupt status bit: the configuration changed (or the device needs a reset).
pub const INT_CONFIG_CHANGE: u32 = VIRTIO_MMIO_INT_CONFIG;

/// Errors restoring a transport from a saved state.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// The saved state is for another kind of device.
    #[error("saved state is for device type {saved}, this device is type {actual}")]
    DeviceType {
        /// Device type in the state.
        saved: u32,
        /// Device type of this transport.
        actual: u32,
    },
    /// The saved queues do not match the device's queues.
    #[error("saved queues do not match the device's: {0}")]
    Queues(String),
    /// The saved driver features include features this device does not offer.
    #[error("saved driver features {saved:#x} not offered by the device ({offered:#x})")]
    Features {
        /// Saved driver features.
        saved: u64,
        /// Features this device offers.
        offered: u64,
    },
    /// The device rejected its part of the state.
    #[error(transparent)]
    Device(#[from] VirtioError),
}

/// Migration state of one virtqueue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Maximum size offered by the device.
    pub max_size: u16,
    /// Size chosen by the driver.
    pub size: u16,
    /// Whether the driver marked the queue ready.
    pub ready: bool,
    /// Whether a queue setup write was rejected (the queue cannot be used).
    pub broken: bool,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the available (driver) ring.
    pub avail_ring: u64,
    /// Guest address of the used (device) ring.
    pub used_ring: u64,
    /// Next available-ring index the device will read.
    pub next_avail: u16,
    /// Next used-ring index the device will write.
    pub next_used: u16,
}

/// Migration state of a virtio-mmio device: transport registers, queues and the device's part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound = "S: Serialize + serde::de::DeserializeOwned")]
pub struct MmioTransportState<S> {
    /// Virtio device type, checked on restore.
    pub device_type: u32,
    /// Device status register.
    pub status: u32,
    /// Features accepted by the driver.
    pub driver_features: u64,
    /// `DeviceFeaturesSel` register.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel` register.
    pub driver_features_sel: u32,
    /// `QueueSel` register.
    pub queue_sel: u32,
    /// Pending interrupt status bits.
    pub interrupt_status: u32,
    /// `ConfigGeneration` register.
    pub config_generation: u32,
    /// Whether the device was activated (DRIVER_OK accepted).
    pub activated: bool,
    /// The queues, in order.
    pub queues: Vec<QueueSnapshot>,
    /// The device's own state.
    pub device: S,
}

/// A virtio device behind a virtio-mmio register window.
pub struct MmioTransport<D: VirtioDevice, I: VirtioInterrupt> {
    device: D,
    interrupt: I,
    mem: GuestMemory,
    queues: Vec<Queue>,
    /// Per queue: a setup write was rejected, so the queue must not be activated.
    broken: Vec<bool>,
    status: u32,
    driver_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    activated: bool,
}

impl<D: VirtioDevice, I: VirtioInterrupt> std::fmt::Debug for MmioTransport<D, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("driver_features", &self.driver_features)
            .field("activated", &self.activated)
            .finish_non_exhaustive()
    }
}

/// Builds the queues for `max_sizes`; sizes the queue crate rejects become broken queues.
fn new_queues(max_sizes: &[u16]) -> (Vec<Queue>, Vec<bool>) {
    let mut queues = Vec::with_capacity(max_sizes.len());
    let mut broken = Vec::with_capacity(max_sizes.len());
    for &max in max_sizes {
        match Queue::new(max) {
            Ok(q) => {
                queues.push(q);
                broken.push(false);
            }
            Err(e) => {
                log::error!("virtio: invalid queue maximum size {max}: {e}");
                // A 1-entry queue that is never activated keeps the indices consistent.
                if let Ok(q) = Queue::new(1) {
                    queues.push(q);
                    broken.push(true);
                }
            }
        }
    }
    (queues, broken)
}

impl<D: VirtioDevice, I: VirtioInterrupt> MmioTransport<D, I> {
    /// Wraps `device`; `mem` is guest memory and `interrupt` the device's interrupt line.
    pub fn new(device: D, mem: GuestMemory, interrupt: I) -> Self {
        let (queues, broken) = new_queues(device.queue_max_sizes());
        Self {
            device,
            interrupt,
            mem,
            queues,
            broken,
            status: 0,
            driver_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            activated: false,
        }
    }

    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device model, mutably (e.g. to read its back end in the event loop).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The interrupt line.
    pub fn interrupt(&self) -> &I {
        &self.interrupt
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the driver set DRIVER_OK and the device accepted it.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// The queues (for inspection).
    pub fn queues(&self) -> &[Queue] {
        &self.queues
    }

    /// Handles a notification for queue `index` (a `QueueNotify` write or an ioeventfd).
    ///
    /// Ignored before activation, after DEVICE_NEEDS_RESET, and for unknown or unready queues.
    pub fn notify_queue(&mut self, index: u32) {
        if !self.activated || self.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
            log::debug!("virtio-mmio: notification for queue {index} before DRIVER_OK ignored");
            return;
        }
        let Ok(i) = usize::try_from(index) else {
            return;
        };
        if !self.queues.get(i).is_some_and(|q| q.ready()) {
            log::debug!("virtio-mmio: notification for missing or unready queue {index} ignored");
            return;
        }
        if self.device.process_queue(i, &mut self.queues, &self.mem) {
            self.signal_used_buffers();
        }
    }

    /// Lets the device process back-end input (e.g. the tap became readable).
    pub fn process_backend(&mut self) {
        if !self.activated || self.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
            return;
        }
        if self.device.process_backend(&mut self.queues, &self.mem) {
            self.signal_used_buffers();
        }
    }

    /// Signals a configuration change (e.g. a resized disk) to the driver.
    pub fn signal_config_change(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.raise(INT_CONFIG_CHANGE);
    }

    fn signal_used_buffers(&mut self) {
        self.raise(INT_USED_BUFFER);
    }

    fn raise(&mut self, bit: u32) {
        self.interrupt_status |= bit;
        if let Err(e) = self.interrupt.trigger() {
            log::warn!("virtio-mmio: cannot raise the interrupt: {e}");
        }
    }

    /// Resets the device, its queues and the transport registers (a write of 0 to Status).
    pub fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.broken.fill(false);
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.activated = false;
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(usize::try_from(self.queue_sel).ok()?)
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MMIO_MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => MMIO_VENDOR_ID,
            REG_DEVICE_FEATURES => {
                let features = self.device.device_features();
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            REG_INTERRUPT_STATUS => self.interrupt_status,
            REG_STATUS => self.status,
            REG_QUEUE_DESC_LOW => self.selected_queue().map_or(0, |q| q.desc_table() as u32),
            REG_QUEUE_DESC_HIGH => self
                .selected_queue()
                .map_or(0, |q| (q.desc_table() >> 32) as u32),
            REG_QUEUE_AVAIL_LOW => self.selected_queue().map_or(0, |q| q.avail_ring() as u32),
            REG_QUEUE_AVAIL_HIGH => self
                .selected_queue()
                .map_or(0, |q| (q.avail_ring() >> 32) as u32),
            REG_QUEUE_USED_LOW => self.selected_queue().map_or(0, |q| q.used_ring() as u32),
            REG_QUEUE_USED_HIGH => self
                .selected_queue()
                .map_or(0, |q| (q.used_ring() >> 32) as u32),
            // No shared memory regions: a length of all ones means "absent".
            REG_SHM_LEN_LOW..=REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                log::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_DRIVER_FEATURES => self.write_driver_features(value),
            REG_QUEUE_NUM | REG_QUEUE_READY | REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_AVAIL_LOW | REG_QUEUE_AVAIL_HIGH | REG_QUEUE_USED_LOW
            | REG_QUEUE_USED_HIGH => self.write_queue_register(offset, value),
            QUEUE_NOTIFY_OFFSET => self.notify_queue(value),
            REG_INTERRUPT_ACK => self.interrupt_status &= !value,
            REG_STATUS => self.write_status(value),
            _ => log::debug!(
                "virtio-mmio: write of {value:#x} to read-only or unknown register {offset:#x}"
            ),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & VIRTIO_CONFIG_S_DRIVER == 0
            || self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
        {
            log::debug!("virtio-mmio: driver features write outside feature negotiation ignored");
            return;
        }
        let value = u64::from(value);
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (value << 32),
            sel => log::debug!("virtio-mmio: driver features write to bank {sel} ignored"),
        }
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0
            || self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
        {
            log::debug!(
                "virtio-mmio: queue setup write to {offset:#x} outside queue setup ignored"
            );
            return;
        }
        let Some(index) = usize::try_from(self.queue_sel)
            .ok()
            .filter(|&i| i < self.queues.len())
        else {
            log::debug!(
                "virtio-mmio: queue setup write for missing queue {}",
                self.queue_sel
            );
            return;
        };
        let queue = &mut self.queues[index];
        if offset == REG_QUEUE_READY {
            queue.set_ready(value == 1);
            return;
        }
        if queue.ready() {
            log::debug!("virtio-mmio: setup write to ready queue {index} ignored");
            return;
        }
        let low = |old: u64| GuestAddress((old & !0xffff_ffff) | u64::from(value));
        let high = |old: u64| GuestAddress((old & 0xffff_ffff) | (u64::from(value) << 32));
        let result = match offset {
            REG_QUEUE_NUM => u16::try_from(value)
                .map_err(|_| virtio_queue::Error::InvalidSize)
                .and_then(|size| queue.try_set_size(size)),
            REG_QUEUE_DESC_LOW => queue.try_set_desc_table_address(low(queue.desc_table())),
            REG_QUEUE_DESC_HIGH => queue.try_set_desc_table_address(high(queue.desc_table())),
            REG_QUEUE_AVAIL_LOW => queue.try_set_avail_ring_address(low(queue.avail_ring())),
            REG_QUEUE_AVAIL_HIGH => queue.try_set_avail_ring_address(high(queue.avail_ring())),
            REG_QUEUE_USED_LOW => queue.try_set_used_ring_address(low(queue.used_ring())),
            REG_QUEUE_USED_HIGH => queue.try_set_used_ring_address(high(queue.used_ring())),
            _ => Ok(()),
        };
        match result {
            Ok(()) => {}
            // Sticky until reset: later writes cannot be trusted to have repaired it.
            Err(e) => {
                log::warn!("virtio-mmio: queue {index}: rejected setup value {value:#x} at {offset:#x}: {e}");
                self.broken[index] = true;
            }
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if value & old != old {
            log::warn!("virtio-mmio: driver cleared status bits ({old:#x} -> {value:#x}) without a reset; ignored");
            return;
        }
        let new = value & !old;
        if new & VIRTIO_CONFIG_S_FAILED != 0 {
            log::warn!(
                "virtio-mmio: driver gave up on device type {}",
                self.device.device_type()
            );
            self.status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        // Each step needs the previous one, in spec order.
        let steps = [
            (VIRTIO_CONFIG_S_ACKNOWLEDGE, 0),
            (VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_ACKNOWLEDGE),
            (VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_DRIVER),
            (VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK),
        ];
        let known: u32 = steps.iter().map(|(bit, _)| bit).sum();
        if new & !known != 0 {
            log::debug!(
                "virtio-mmio: driver set unknown status bits {:#x}; ignored",
                new & !known
            );
        }
        for (bit, needs) in steps {
            if new & bit == 0 {
                continue;
            }
            if self.status & needs != needs {
                log::warn!(
                    "virtio-mmio: status bit {bit:#x} set out of order (status {:#x}); ignored",
                    self.status
                );
                return;
            }
            match bit {
                VIRTIO_CONFIG_S_FEATURES_OK => {
                    if !self.features_acceptable() {
                        // FEATURES_OK stays clear: the driver sees the refusal.
                        return;
                    }
                    self.status |= bit;
                }
                VIRTIO_CONFIG_S_DRIVER_OK => {
                    self.status |= bit;
                    self.activate();
                }
                _ => self.status |= bit,
            }
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.device_features();
        let unknown = self.driver_features & !offered;
        if unknown != 0 {
            log::warn!("virtio-mmio: driver accepted features {unknown:#x} that were not offered; refusing FEATURES_OK");
            return false;
        }
        if self.driver_features & VIRTIO_F_VERSION_1 == 0 {
            log::warn!("virtio-mmio: driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported); refusing FEATURES_OK");
            return false;
        }
        true
    }

    fn activate(&mut self) {
        for (i, q) in self.queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            if self.broken.get(i).copied().unwrap_or(true) || !q.is_valid(&self.mem) {
                log::warn!("virtio-mmio: queue {i} is misconfigured; device needs reset");
                self.needs_reset();
                return;
            }
        }
        if let Err(e) = self.device.activate(self.driver_features) {
            log::warn!("virtio-mmio: {e}; device needs reset");
            self.needs_reset();
            return;
        }
        self.activated = true;
        // Buffers made available before DRIVER_OK (whose notifications were ignored).
        for i in 0..self.queues.len() {
            if self.queues[i].ready() && self.device.process_queue(i, &mut self.queues, &self.mem) {
                self.signal_used_buffers();
            }
        }
    }

    fn needs_reset(&mut self) {
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.signal_config_change();
    }

    /// Captures the transport's and the device's migration state.
    pub fn save_state(&self) -> MmioTransportState<D::State> {
        let queues = self
            .queues
            .iter()
            .zip(&self.broken)
            .map(|(q, &broken)| QueueSnapshot {
                max_size: q.max_size(),
                size: q.size(),
                ready: q.ready(),
                broken,
                desc_table: q.desc_table(),
                avail_ring: q.avail_ring(),
                used_ring: q.used_ring(),
                next_avail: q.next_avail(),
                next_used: q.next_used(),
            })
            .collect();
        MmioTransportState {
            device_type: self.device.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            activated: self.activated,
            queues,
            device: self.device.save_state(),
        }
    }

    /// Restores a state captured by [`MmioTransport::save_state`] (validated: it is untrusted).
    ///
    /// On error the transport is left reset.
    pub fn restore_state(&mut self, state: &MmioTransportState<D::State>) -> Result<(), MmioError> {
        let result = self.try_restore(state);
        if result.is_err() {
            self.reset();
        }
        result
    }

    fn try_restore(&mut self, state: &MmioTransportState<D::State>) -> Result<(), MmioError> {
        let actual = self.device.device_type();
        if state.device_type != actual {
            return Err(MmioError::DeviceType {
                saved: state.device_type,
                actual,
            });
        }
        let offered = self.device.device_features();
        if state.driver_features & !offered != 0 {
            return Err(MmioError::Features {
                saved: state.driver_features,
                offered,
            });
        }
        let max_sizes = self.device.queue_max_sizes();
        if state.queues.len() != max_sizes.len() {
            return Err(MmioError::Queues(format!(
                "{} saved, {} on this device",
                state.queues.len(),
                max_sizes.len()
            )));
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (i, (snap, &max)) in state.queues.iter().zip(max_sizes).enumerate() {
            if snap.max_size != max {
                return Err(MmioError::Queues(format!(
                    "queue {i}: saved maximum size {}, device has {max}",
                    snap.max_size
                )));
            }
            let q = Queue::try_from(QueueState {
                max_size: snap.max_size,
                next_avail: snap.next_avail,
                next_used: snap.next_used,
                event_idx_enabled: false,
                size: snap.size,
                ready: snap.ready,
                desc_table: snap.desc_table,
                avail_ring: snap.avail_ring,
                used_ring: snap.used_ring,
            })
            .map_err(|e| MmioError::Queues(format!("queue {i}: {e}")))?;
            if state.activated && q.ready() && !snap.broken && !q.is_valid(&self.mem) {
                return Err(MmioError::Queues(format!(
                    "queue {i} is outside guest memory"
                )));
            }
            queues.push(q);
        }
        self.device.restore_state(&state.device)?;
        if state.activated {
            self.device.activate(state.driver_features)?;
        }
        self.queues = queues;
        self.broken = state.queues.iter().map(|q| q.broken).collect();
        self.status = state.status;
        self.driver_features = state.driver_features;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.queue_sel = state.queue_sel;
        self.interrupt_status = state.interrupt_status;
        self.config_generation = state.config_generation;
        self.activated = state.activated;
        // Interrupt status not yet acknowledged: the line is still up. Its edge may not have
        // reached the saved interrupt controller (an irqfd is injected asynchronously, and a
        // save completes pending requests after the vCPUs and irqchips are captured), so
        // raise it again; a driver that already took it reads a zero status and ignores it.
        if self.activated && self.interrupt_status != 0 {
            if let Err(e) = self.interrupt.trigger() {
                log::warn!("virtio-mmio: cannot raise the interrupt: {e}");
            }
        }
        Ok(())
    }
}

impl<D: VirtioDevice, I: VirtioInterrupt> BusDevice for MmioTransport<D, I> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            log::debug!(
                "virtio-mmio: {}-byte read at {offset:#x} is not an aligned 32-bit access",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::debug!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        if offset % 4 != 0 {
            log::debug!("virtio-mmio: unaligned write at {offset:#x} ignored");
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}
