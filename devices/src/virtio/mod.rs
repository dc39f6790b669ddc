//! Virtio 1.x devices over the virtio-mmio transport.
//!
//! * [`mmio`]: the virtio-mmio (version 2) register window, a [`BusDevice`](crate::bus::BusDevice)
//!   that owns the queues, negotiates features, runs the status state machine and drives a
//!   [`VirtioDevice`].
//! * [`block`], [`net`], [`rng`]: the device models, each unit-testable without KVM.
//! * [`chain`]: descriptor-chain parsing and guest-memory copies shared by the devices.
//! * [`fuzzing`]: the entry points the `fuzz/` targets (and their corpus-replay unit tests) drive.
//!
//! The transport is generic over how it raises interrupts ([`VirtioInterrupt`], an irqfd
//! [`EventFd`] in the VMM) and receives queue notifications either from guest writes to the
//! `QueueNotify` register or from the VMM calling [`mmio::MmioTransport::notify_queue`] when an
//! ioeventfd fires.

use std::fmt::Debug;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use virtio_queue::Queue;

pub mod block;
pub mod chain;
pub mod fuzzing;
pub mod mmio;
pub mod net;
pub mod rng;

/// The guest memory type the devices operate on.
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// Feature bit: the device conforms to virtio 1.x (mandatory for the mmio version 2 transport).
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Feature bit: the driver may use indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 =
    1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// The features every Skiff device offers: virtio 1.x and indirect descriptors.
pub const BASE_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC;

/// Largest queue size any of Skiff's devices offers.
pub const MAX_QUEUE_SIZE: u16 = 256;

/// How a device's interrupt reaches the guest.
///
/// The VMM uses an [`EventFd`] registered as a KVM irqfd; tests count the calls.
pub trait VirtioInterrupt: Send + 'static {
    /// Raises the device's interrupt line (one edge).
    fn trigger(&self) -> io::Result<()>;
}

impl VirtioInterrupt for EventFd {
    fn trigger(&self) -> io::Result<()> {
        self.write(1)
    }
}

/// An interrupt that only counts how often it was raised (tests, benches, fuzzing).
#[derive(Debug, Clone, Default)]
pub struct CountingInterrupt(Arc<AtomicU64>);

impl CountingInterrupt {
    /// Creates a counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Returns how many times the interrupt was raised.
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl VirtioInterrupt for CountingInterrupt {
    fn trigger(&self) -> io::Result<()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Errors a device reports to the transport.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The device cannot start with the negotiated features.
    #[error("cannot activate the device: {0}")]
    Activate(String),
    /// A saved state does not fit this device.
    #[error("invalid saved state: {0}")]
    InvalidState(String),
}

/// A virtio device model, driven by a transport ([`mmio::MmioTransport`]).
///
/// The transport owns the virtqueues and guest memory and hands them to the device on every
/// event, so the device only holds its back end and configuration. Every method must tolerate
/// arbitrary guest input: malformed chains complete with an error status (or a zero-length used
/// element), never a panic.
pub trait VirtioDevice: Send + 'static {
    /// The device's own migration state (configuration, back-end identity, counters).
    type State: Serialize + DeserializeOwned + Clone + Debug + PartialEq;

    /// The virtio device ID (`VIRTIO_ID_*`).
    const DEVICE_TYPE: u32;

    /// The maximum size of each of the device's queues; its length is the number of queues.
    const QUEUE_MAX_SIZES: &'static [u16];

    /// The virtio device ID: [`VirtioDevice::DEVICE_TYPE`].
    fn device_type(&self) -> u32 {
        Self::DEVICE_TYPE
    }

    /// The maximum size of each queue: [`VirtioDevice::QUEUE_MAX_SIZES`].
    fn queue_max_sizes(&self) -> &[u16] {
        Self::QUEUE_MAX_SIZES
    }

    /// The feature bits the device offers, including [`VIRTIO_F_VERSION_1`].
    fn device_features(&self) -> u64;

    /// Reads the device-specific configuration space at `offset`; bytes past its end read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device-specific configuration space; the default ignores the write.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "virtio: ignored config write at {offset:#x}, {} bytes",
            data.len()
        );
    }

    /// Called when the driver sets DRIVER_OK, with the features it accepted.
    fn activate(&mut self, acked_features: u64) -> Result<(), VirtioError>;

    /// Processes the buffers the driver made available on queue `index`.
    ///
    /// Returns whether used buffers were added that call for an interrupt.
    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemory) -> bool;

    /// Processes back-end input (e.g. a readable tap); the default does nothing.
    ///
    /// Returns whether used buffers were added that call for an interrupt.
    fn process_backend(&mut self, _queues: &mut [Queue], _mem: &GuestMemory) -> bool {
        false
    }

    /// Returns the device to its initial state after a driver reset (the queues are reset by
    /// the transport).
    fn reset(&mut self);

    /// Captures the device's migration state. Requests are processed synchronously, so none is
    /// ever in flight when this is called.
    fn save_state(&self) -> Self::State;

    /// Restores a state captured by [`VirtioDevice::save_state`] on the source.
    fn restore_state(&mut self, state: &Self::State) -> Result<(), VirtioError>;
}

/// Adds a used element, logging instead of failing on a broken used ring.
///
/// Returns whether the element was added.
pub(crate) fn add_used(queue: &mut Queue, mem: &GuestMemory, head: u16, len: u32) -> bool {
    use virtio_queue::QueueT;
    match queue.add_used(mem, head, len) {
        Ok(()) => true,
        Err(e) => {
            log::warn!("virtio: cannot add used element for head {head}: {e}");
            false
        }
    }
}

/// Returns whether the driver wants an interrupt for the used elements added so far.
pub(crate) fn needs_interrupt(queue: &mut Queue, mem: &GuestMemory) -> bool {
    use virtio_queue::QueueT;
    match queue.needs_notification(mem) {
        Ok(needed) => needed,
        Err(e) => {
            log::warn!("virtio: cannot read the interrupt suppression flags: {e}");
            true
        }
    }
}

/// Pops and handles up to one queue's worth of chains; `handle` returns each chain's used length.
///
/// Bounded so a driver that keeps refilling the ring cannot hold the VMM; a driver that is
/// still adding buffers notifies again. Returns whether an interrupt is due.
pub(crate) fn process_chains(
    queue: &mut Queue,
    mem: &GuestMemory,
    mut handle: impl FnMut(virtio_queue::DescriptorChain<&GuestMemory>) -> u32,
) -> bool {
    use virtio_queue::QueueT;
    let mut used = false;
    for _ in 0..queue.size() {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        let len = handle(chain);
        used |= add_used(queue, mem, head, len);
    }
    used && needs_interrupt(queue, mem)
}

#[cfg(test)]
mod test_utils;
#[cfg(test)]
mod tests;
