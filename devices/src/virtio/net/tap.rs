//! A Linux tap device as a [`NetBackend`].
//!
//! Opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, a 12-byte vnet header (matching
//! `virtio_net_hdr_v1`) and all offloads off, so frames pass between the tap and the virtqueues
//! unchanged and never carry GSO or partial checksums the device did not negotiate.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};

use super::backend::{NetBackend, VNET_HDR_LEN};

/// Errors opening a tap device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is empty or too long for `IFNAMSIZ`.
    #[error("invalid tap interface name {0:?}")]
    InvalidName(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(#[source] io::Error),
    /// An ioctl on the tap failed.
    #[error("{op} on tap {name} failed: {source}")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// The interface name.
        name: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq` with the flags member of its union (the only one used here).
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to (or creates, given CAP_NET_ADMIN) the tap interface `name`.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(TapError::InvalidName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        let tap = Self {
            file,
            name: name.to_string(),
        };
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is a properly sized,
        // initialised ifreq that lives across the call.
        tap.ioctl("TUNSETIFF", || unsafe {
            libc::ioctl(tap.file.as_raw_fd(), libc::TUNSETIFF, &mut req)
        })?;
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which is valid.
        tap.ioctl("TUNSETVNETHDRSZ", || unsafe {
            libc::ioctl(tap.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len)
        })?;
        // SAFETY: TUNSETOFFLOAD takes its flags (none) by value.
        tap.ioctl("TUNSETOFFLOAD", || unsafe {
            libc::ioctl(
                tap.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                0 as libc::c_ulong,
            )
        })?;
        Ok(tap)
    }

    fn ioctl(&self, op: &'static str, f: impl FnOnce() -> libc::c_int) -> Result<(), TapError> {
        if f() < 0 {
            return Err(TapError::Ioctl {
                op,
                name: self.name.clone(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            match self.file.read(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        loop {
            match self.file.write(frame) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    log::debug!("virtio-net: tap {} full, frame dropped", self.name);
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_rejected_before_any_syscall() {
        assert!(matches!(Tap::open(""), Err(TapError::InvalidName(_))));
        assert!(matches!(
            Tap::open("a-very-long-interface-name"),
            Err(TapError::InvalidName(_))
        ));
    }

    #[test]
    fn open_fails_cleanly_without_privileges_or_succeeds() {
        // Without CAP_NET_ADMIN (or /dev/net/tun) this must be an error, never a panic.
        match Tap::open("skifftest0") {
            Ok(tap) => assert_eq!(tap.name(), "skifftest0"),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
}
