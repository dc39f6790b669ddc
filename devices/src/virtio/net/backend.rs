//! Where virtio-net frames go: the [`NetBackend`] trait and the in-memory loopback back end.

use std::collections::VecDeque;
use std::io;

/// Length of the virtio-net header (`struct virtio_net_hdr_v1`) that starts every frame.
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame (header included) the device moves: a 64 KiB IP packet plus Ethernet header.
pub const MAX_FRAME_LEN: usize = VNET_HDR_LEN + 65_550;

/// A packet back end. Frames in both directions start with the [`VNET_HDR_LEN`]-byte
/// virtio-net header, so a tap opened with `IFF_VNET_HDR` passes them through unchanged.
pub trait NetBackend: Send + 'static {
    /// Receives one frame into `buf`; `Ok(None)` when none is pending. A frame longer than
    /// `buf` may be truncated.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;

    /// Sends one frame. A back end that is momentarily full may drop it (like a NIC).
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
}

/// Bytes of frame data the loopback holds before it drops frames.
pub const LOOPBACK_CAPACITY: usize = 1 << 20;
/// Frames the loopback holds before it drops frames.
pub const LOOPBACK_FRAMES: usize = 1024;

/// An in-memory back end that hands every sent frame back on receive (tests and benches).
///
/// Storage is allocated once; sending to a full loopback drops the frame.
#[derive(Debug)]
pub struct LoopbackBackend {
    data: VecDeque<u8>,
    lengths: VecDeque<usize>,
    dropped: u64,
}

impl Default for LoopbackBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl LoopbackBackend {
    /// Creates an empty loopback.
    pub fn new() -> Self {
        Self {
            data: VecDeque::with_capacity(LOOPBACK_CAPACITY),
            lengths: VecDeque::with_capacity(LOOPBACK_FRAMES),
            dropped: 0,
        }
    }

    /// Queues a frame for the guest, as if it came from the network. Returns whether it fit.
    pub fn inject(&mut self, frame: &[u8]) -> bool {
        if self.lengths.len() == LOOPBACK_FRAMES
            || self.data.len() + frame.len() > LOOPBACK_CAPACITY
        {
            self.dropped += 1;
            return false;
        }
        self.data.extend(frame);
        self.lengths.push_back(frame.len());
        true
    }

    /// Number of frames waiting to be received.
    pub fn pending(&self) -> usize {
        self.lengths.len()
    }

    /// Number of frames dropped because the loopback was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

impl NetBackend for LoopbackBackend {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let Some(len) = self.lengths.pop_front() else {
            return Ok(None);
        };
        let n = len.min(buf.len());
        for (dst, src) in buf[..n].iter_mut().zip(self.data.drain(..len)) {
            *dst = src;
        }
        Ok(Some(n))
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.inject(frame);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_returns_frames_in_order_and_drops_when_full() {
        let mut lo = LoopbackBackend::new();
        lo.send(&[1, 2, 3]).unwrap();
        lo.send(&[4; 5]).unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(lo.recv(&mut buf).unwrap(), Some(3));
        assert_eq!(&buf[..3], &[1, 2, 3]);
        // Truncated into a short buffer; the rest of the frame is discarded.
        assert_eq!(lo.recv(&mut buf).unwrap(), Some(4));
        assert_eq!(lo.recv(&mut buf).unwrap(), None);
        for _ in 0..LOOPBACK_FRAMES {
            assert!(lo.inject(&[0]));
        }
        assert!(!lo.inject(&[0]));
        assert_eq!(lo.dropped(), 1);
        assert_eq!(lo.pending(), LOOPBACK_FRAMES);
    }
}
