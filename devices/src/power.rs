//! Machine-level power requests from devices to the VMM.
//!
//! Devices (i8042 reset, the test exit device, ...) call
//! [`PowerControl::request`]; the VMM notices through the eventfd or by
//! polling [`PowerControl::is_pending`] after each vCPU I/O exit, then calls
//! [`PowerControl::take`] and acts.

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A machine-level action requested by a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerRequest {
    /// Reset the machine (e.g. the i8042 reset line was pulsed).
    Reset,
    /// Power the machine off.
    Poweroff,
    /// Guest-requested exit through the test exit device, with its status.
    Exit(u8),
}

/// Encoding of "no request pending" in the atomic slot.
const SLOT_EMPTY: u16 = 0;
/// Slot tag for [`PowerRequest::Reset`].
const SLOT_TAG_RESET: u16 = 0x100;
/// Slot tag for [`PowerRequest::Poweroff`].
const SLOT_TAG_POWEROFF: u16 = 0x200;
/// Slot tag for [`PowerRequest::Exit`]; the status lives in the low byte.
const SLOT_TAG_EXIT: u16 = 0x300;
/// Mask selecting the tag part of an encoded slot.
const SLOT_TAG_MASK: u16 = 0xff00;
/// Mask selecting the payload (exit status) part of an encoded slot.
const SLOT_PAYLOAD_MASK: u16 = 0x00ff;

impl PowerRequest {
    /// Packs the request into a non-zero slot value.
    fn encode(self) -> u16 {
        match self {
            PowerRequest::Reset => SLOT_TAG_RESET,
            PowerRequest::Poweroff => SLOT_TAG_POWEROFF,
            PowerRequest::Exit(status) => SLOT_TAG_EXIT | u16::from(status),
        }
    }

    /// Unpacks a slot value; `None` for the empty slot.
    fn decode(raw: u16) -> Option<Self> {
        match raw & SLOT_TAG_MASK {
            SLOT_TAG_RESET => Some(PowerRequest::Reset),
            SLOT_TAG_POWEROFF => Some(PowerRequest::Poweroff),
            // The mask guarantees the payload fits in a byte.
            SLOT_TAG_EXIT => Some(PowerRequest::Exit((raw & SLOT_PAYLOAD_MASK) as u8)),
            _ => None,
        }
    }
}

/// Shared between devices (which request) and the VMM (which acts).
///
/// Holds one pending request: the first request wins until the VMM
/// [takes](PowerControl::take) it. Every request also writes the eventfd so an
/// event loop can wake up.
#[derive(Debug)]
pub struct PowerControl {
    pending: AtomicU16,
    eventfd: EventFd,
}

impl PowerControl {
    /// Creates a control with no pending request and a non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            pending: AtomicU16::new(SLOT_EMPTY),
            eventfd: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Records `req` unless another request is already pending, then writes the eventfd.
    pub fn request(&self, req: PowerRequest) {
        match self.pending.compare_exchange(
            SLOT_EMPTY,
            req.encode(),
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => log::info!("power request: {req:?}"),
            Err(existing) => log::info!(
                "power request {req:?} ignored: {:?} already pending",
                PowerRequest::decode(existing)
            ),
        }
        if let Err(e) = self.eventfd.write(1) {
            log::warn!("power request: failed to signal eventfd: {e}");
        }
    }

    /// Returns whether a request is pending (a cheap atomic load).
    pub fn is_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire) != SLOT_EMPTY
    }

    /// Removes and returns the pending request, if any.
    ///
    /// This does not drain the eventfd; the event loop reads it itself.
    pub fn take(&self) -> Option<PowerRequest> {
        PowerRequest::decode(self.pending.swap(SLOT_EMPTY, Ordering::AcqRel))
    }

    /// The eventfd written on every request.
    pub fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip() {
        for req in [
            PowerRequest::Reset,
            PowerRequest::Poweroff,
            PowerRequest::Exit(0),
            PowerRequest::Exit(0xff),
            PowerRequest::Exit(42),
        ] {
            assert_eq!(PowerRequest::decode(req.encode()), Some(req));
        }
        assert_eq!(PowerRequest::decode(SLOT_EMPTY), None);
    }

    #[test]
    fn first_request_wins_until_taken() {
        let pc = PowerControl::new().unwrap();
        assert!(!pc.is_pending());
        assert_eq!(pc.take(), None);

        pc.request(PowerRequest::Exit(3));
        pc.request(PowerRequest::Reset);
        assert!(pc.is_pending());
        assert_eq!(pc.take(), Some(PowerRequest::Exit(3)));
        assert!(!pc.is_pending());
        assert_eq!(pc.take(), None);

        pc.request(PowerRequest::Poweroff);
        assert_eq!(pc.take(), Some(PowerRequest::Poweroff));
    }

    #[test]
    fn every_request_writes_the_eventfd() {
        let pc = PowerControl::new().unwrap();
        // Non-blocking and nothing written yet.
        assert_eq!(
            pc.eventfd().read().unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        pc.request(PowerRequest::Reset);
        pc.request(PowerRequest::Reset);
        pc.request(PowerRequest::Exit(1));
        assert_eq!(pc.eventfd().read().unwrap(), 3);
        assert_eq!(pc.take(), Some(PowerRequest::Reset));
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<PowerControl>();
    }
}
