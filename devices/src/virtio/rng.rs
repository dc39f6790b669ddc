//! virtio-rng (entropy device): fills the driver's buffers from the host's `getrandom(2)`.
//!
//! One request queue; each chain must be device-writable only. At most [`MAX_BYTES_PER_REQUEST`]
//! bytes are produced per chain so a driver asking for gigabytes cannot stall the VMM.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::desc::split::Descriptor;

use super::chain::{collect_chain, ChainError};
use super::{process_chains, GuestMemory, Queue, VirtioDevice, VirtioError, BASE_FEATURES};

/// Size of the request queue.
pub const RNG_QUEUE_SIZE: u16 = 256;
/// Most bytes of entropy handed out for one request.
pub const MAX_BYTES_PER_REQUEST: u64 = 64 * 1024;
/// Size of the bounce buffer `getrandom` fills.
const CHUNK: usize = 4096;

/// Errors of the entropy source.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// `getrandom(2)` failed.
    #[error("getrandom failed: {0}")]
    GetRandom(#[source] std::io::Error),
    /// The request chain was malformed.
    #[error(transparent)]
    Chain(#[from] ChainError),
}

/// Migration state of the entropy device (it has none beyond the transport's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {}

/// Fills `buf` from the kernel's entropy pool.
pub(crate) fn getrandom(buf: &mut [u8]) -> Result<(), RngError> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes for the whole call.
        let ret = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if ret < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(RngError::GetRandom(err));
        }
        done += usize::try_from(ret).unwrap_or(0).min(rest.len());
    }
    Ok(())
}

/// The virtio entropy device.
#[derive(Debug)]
pub struct Rng {
    buf: Vec<u8>,
    descs: Vec<Descriptor>,
    bytes_served: u64,
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl Rng {
    /// Creates the device.
    pub fn new() -> Self {
        Self {
            buf: vec![0; CHUNK],
            descs: Vec::with_capacity(16),
            bytes_served: 0,
        }
    }

    /// Total bytes of entropy handed to the guest.
    pub fn bytes_served(&self) -> u64 {
        self.bytes_served
    }

    /// Fills one chain; returns the number of bytes written.
    fn fill_chain(
        &mut self,
        chain: virtio_queue::DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
    ) -> Result<u32, RngError> {
        let parsed = collect_chain(chain, mem, &mut self.descs)?;
        if parsed.readable_count != 0 {
            return Err(ChainError::ReadableAfterWritable.into());
        }
        let out = parsed.writable(&self.descs);
        let total = out.len().min(MAX_BYTES_PER_REQUEST);
        let mut offset = 0u64;
        while offset < total {
            let n = usize::try_from(total - offset).unwrap_or(CHUNK).min(CHUNK);
            let chunk = &mut self.buf[..n];
            getrandom(chunk)?;
            out.write_at(mem, offset, chunk)?;
            offset += n as u64;
        }
        // `total` is at most MAX_BYTES_PER_REQUEST.
        Ok(u32::try_from(total).unwrap_or(0))
    }
}

impl VirtioDevice for Rng {
    type State = RngState;

    const DEVICE_TYPE: u32 = VIRTIO_ID_RNG;
    const QUEUE_MAX_SIZES: &'static [u16] = &[RNG_QUEUE_SIZE];

    fn device_features(&self) -> u64 {
        BASE_FEATURES
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, _acked_features: u64) -> Result<(), VirtioError> {
        Ok(())
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        let Some(queue) = queues.get_mut(index) else {
            return false;
        };
        process_chains(queue, mem, |chain| match self.fill_chain(chain, mem) {
            Ok(len) => {
                self.bytes_served += u64::from(len);
                len
            }
            Err(e) => {
                log::warn!("virtio-rng: bad request: {e}");
                0
            }
        })
    }

    fn reset(&mut self) {}

    fn save_state(&self) -> RngState {
        RngState {}
    }

    fn restore_state(&mut self, _state: &RngState) -> Result<(), VirtioError> {
        Ok(())
    }
}
