//! virtio-net over a [`NetBackend`] (a tap device, or the in-memory loopback).
//!
//! Two queues, receive (0) and transmit (1); no offloads, no mergeable buffers, no control
//! queue. Frames are copied through two buffers allocated once per device, so moving a packet
//! never allocates. TX frames are sent as soon as the driver notifies; RX runs when the back
//! end has input ([`MmioTransport::process_backend`](super::mmio::MmioTransport::process_backend))
//! or the driver adds receive buffers. A frame that arrives while the guest has no receive
//! buffer is held until it posts one; [`Net::rx_blocked`] tells the event loop to stop polling
//! the back end meanwhile.

mod backend;
mod tap;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, QueueT};

pub use backend::{
    LoopbackBackend, NetBackend, LOOPBACK_CAPACITY, LOOPBACK_FRAMES, MAX_FRAME_LEN, VNET_HDR_LEN,
};
pub use tap::{Tap, TapError};

use super::block::read_config_bytes;
use super::chain::{collect_chain, ChainError};
use super::{
    add_used, needs_interrupt, process_chains, GuestMemory, Queue, VirtioDevice, VirtioError,
    BASE_FEATURES,
};

/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// Size of each queue.
pub const NET_QUEUE_SIZE: u16 = 256;
/// Offset of `num_buffers` in the virtio-net header.
const NUM_BUFFERS_OFFSET: usize = 10;

/// A MAC address.
pub type MacAddr = [u8; 6];

/// Packet counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_packets: u64,
    /// Bytes delivered to the guest (headers included).
    pub rx_bytes: u64,
    /// Frames dropped on receive (no room in the guest's buffer, back-end error).
    pub rx_dropped: u64,
    /// Frames sent by the guest.
    pub tx_packets: u64,
    /// Bytes sent by the guest (headers included).
    pub tx_bytes: u64,
    /// Frames the guest sent that were dropped (malformed, too large, back-end error).
    pub tx_dropped: u64,
    /// Malformed descriptor chains.
    pub invalid_chains: u64,
}

/// Migration state of a network device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The MAC address the guest sees.
    pub mac: MacAddr,
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// Returns a random locally administered unicast MAC address.
pub fn generate_mac() -> MacAddr {
    let mut mac = [0u8; 6];
    if super::rng::getrandom(&mut mac).is_err() {
        let pid = std::process::id().to_le_bytes();
        mac = [0, 0, pid[0], pid[1], pid[2], pid[3]];
    }
    // Unicast, locally administered.
    mac[0] = (mac[0] & 0xfc) | 0x02;
    mac
}

/// The virtio network device.
#[derive(Debug)]
pub struct Net<B: NetBackend> {
    backend: B,
    mac: MacAddr,
    acked_features: u64,
    rx_buf: Vec<u8>,
    /// Length of the frame in `rx_buf` waiting for a receive buffer.
    rx_pending: Option<usize>,
    tx_buf: Vec<u8>,
    descs: Vec<Descriptor>,
    stats: NetStats,
}

impl<B: NetBackend> Net<B> {
    /// Creates the device on `backend`; `mac` of `None` generates one.
    pub fn new(backend: B, mac: Option<MacAddr>) -> Self {
        Self {
            backend,
            mac: mac.unwrap_or_else(generate_mac),
            acked_features: 0,
            rx_buf: vec![0; MAX_FRAME_LEN],
            rx_pending: None,
            tx_buf: vec![0; MAX_FRAME_LEN],
            descs: Vec::with_capacity(usize::from(NET_QUEUE_SIZE)),
            stats: NetStats::default(),
        }
    }

    /// The MAC address.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The back end.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The back end, mutably.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// The packet counters.
    pub fn stats(&self) -> &NetStats {
        &self.stats
    }

    /// Whether a received frame is waiting for the guest to post a receive buffer (the event
    /// loop should stop polling the back end until the RX queue is notified).
    pub fn rx_blocked(&self) -> bool {
        self.rx_pending.is_some()
    }

    fn config_space(&self) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        // max_virtqueue_pairs (only meaningful with VIRTIO_NET_F_MQ).
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c
    }

    /// Moves frames from the back end into the receive queue; returns whether to interrupt.
    fn process_rx(&mut self, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        let Some(queue) = queues.get_mut(RX_QUEUE).filter(|q| q.ready()) else {
            return false;
        };
        let mut used = false;
        for _ in 0..queue.size() {
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.backend.recv(&mut self.rx_buf) {
                    Ok(Some(len)) => len.min(self.rx_buf.len()),
                    Ok(None) => break,
                    Err(e) => {
                        log::warn!("virtio-net: back-end receive failed: {e}");
                        self.stats.rx_dropped += 1;
                        break;
                    }
                },
            };
            if len < VNET_HDR_LEN {
                log::debug!("virtio-net: runt frame of {len} bytes from the back end dropped");
                self.rx_pending = None;
                self.stats.rx_dropped += 1;
                continue;
            }
            // Without VIRTIO_NET_F_MRG_RXBUF every frame uses exactly one buffer.
            self.rx_buf[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
            self.rx_pending = Some(len);
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                // No receive buffer: hold the frame until the driver posts one.
                break;
            };
            let head = chain.head_index();
            let written = match self.deliver(chain, mem, len) {
                Ok(()) => {
                    self.stats.rx_packets += 1;
                    self.stats.rx_bytes += len as u64;
                    self.rx_pending = None;
                    len
                }
                Err(ChainError::ShortChain) => {
                    log::debug!(
                        "virtio-net: {len}-byte frame does not fit the receive buffer; dropped"
                    );
                    self.stats.rx_dropped += 1;
                    self.rx_pending = None;
                    0
                }
                Err(e) => {
                    // The buffer is returned unused; the frame waits for the next one.
                    log::warn!("virtio-net: malformed receive buffer: {e}");
                    self.stats.invalid_chains += 1;
                    0
                }
            };
            // `written` is at most MAX_FRAME_LEN.
            used |= add_used(queue, mem, head, u32::try_from(written).unwrap_or(0));
        }
        used && needs_interrupt(queue, mem)
    }

    /// Copies the pending frame (`len` bytes of `rx_buf`) into a receive chain.
    fn deliver(
        &mut self,
        chain: DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
        len: usize,
    ) -> Result<(), ChainError> {
        let parsed = collect_chain(chain, mem, &mut self.descs)?;
        if parsed.readable_count != 0 {
            return Err(ChainError::ReadableAfterWritable);
        }
        let frame = self.rx_buf.get(..len).ok_or(ChainError::ShortChain)?;
        parsed.writable(&self.descs).write_at(mem, 0, frame)
    }

    /// Sends one transmit chain; returns the used length (always 0: TX writes nothing).
    fn transmit(&mut self, chain: DescriptorChain<&GuestMemory>, mem: &GuestMemory) -> u32 {
        let result = collect_chain(chain, mem, &mut self.descs).and_then(|parsed| {
            if parsed.readable_count != self.descs.len() {
                return Err(ChainError::ReadableAfterWritable);
            }
            let src = parsed.readable(&self.descs);
            let len = usize::try_from(src.len()).unwrap_or(usize::MAX);
            let buf = self.tx_buf.get_mut(..len).ok_or(ChainError::ShortChain)?;
            src.read_at(mem, 0, buf)?;
            Ok(len)
        });
        match result {
            Ok(len) if len < VNET_HDR_LEN => {
                log::debug!("virtio-net: {len}-byte transmit without a full header dropped");
                self.stats.tx_dropped += 1;
            }
            Ok(len) => match self.backend.send(&self.tx_buf[..len]) {
                Ok(()) => {
                    self.stats.tx_packets += 1;
                    self.stats.tx_bytes += len as u64;
                }
                Err(e) => {
                    log::warn!("virtio-net: back-end send failed: {e}");
                    self.stats.tx_dropped += 1;
                }
            },
            Err(ChainError::ShortChain) => {
                log::debug!("virtio-net: oversized transmit frame dropped");
                self.stats.tx_dropped += 1;
            }
            Err(e) => {
                log::warn!("virtio-net: malformed transmit chain: {e}");
                self.stats.invalid_chains += 1;
                self.stats.tx_dropped += 1;
            }
        }
        0
    }
}

impl<B: NetBackend> VirtioDevice for Net<B> {
    type State = NetState;

    const DEVICE_TYPE: u32 = VIRTIO_ID_NET;
    const QUEUE_MAX_SIZES: &'static [u16] = &[NET_QUEUE_SIZE; 2];

    fn device_features(&self) -> u64 {
        BASE_FEATURES | (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn activate(&mut self, acked_features: u64) -> Result<(), VirtioError> {
        self.acked_features = acked_features;
        Ok(())
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        match index {
            RX_QUEUE => self.process_rx(queues, mem),
            TX_QUEUE => {
                let Some(queue) = queues.get_mut(TX_QUEUE) else {
                    return false;
                };
                process_chains(queue, mem, |chain| self.transmit(chain, mem))
            }
            _ => false,
        }
    }

    fn process_backend(&mut self, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        self.process_rx(queues, mem)
    }

    fn reset(&mut self) {
        self.acked_features = 0;
        self.rx_pending = None;
    }

    fn save_state(&self) -> NetState {
        NetState {
            mac: self.mac,
            acked_features: self.acked_features,
        }
    }

    fn restore_state(&mut self, state: &NetState) -> Result<(), VirtioError> {
        if state.acked_features & !self.device_features() != 0 {
            return Err(VirtioError::InvalidState(format!(
                "saved features {:#x} not offered by the network device",
                state.acked_features
            )));
        }
        self.mac = state.mac;
        self.acked_features = state.acked_features;
        Ok(())
    }
}
