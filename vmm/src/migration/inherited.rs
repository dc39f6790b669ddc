//! Descriptors the process inherited at start-up, which an `fd:N` migration URI may name by
//! number (`--incoming fd:N`, or `migrate-incoming` with a name that starts with a digit, as
//! in QEMU). Only descriptors recorded by [`record`] can be taken, and each only once, so a
//! number can never take over a descriptor Skiff opened itself.

use std::collections::BTreeSet;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use super::uri::UriError;

/// The inherited descriptors not taken yet.
static INHERITED: Mutex<BTreeSet<RawFd>> = Mutex::new(BTreeSet::new());

/// Whether `fd` is open.
fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the descriptor's flags; any number is allowed.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// Records the descriptors open now, except standard input, output and error. Call it first
/// thing in `main`, before Skiff opens anything.
pub fn record() {
    let numbers: Vec<RawFd> = match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(e) => {
            log::warn!("cannot list inherited descriptors: {e}");
            return;
        }
    };
    // The directory's own descriptor is closed by now, so it is left out.
    let open = numbers.into_iter().filter(|&fd| fd > 2 && is_open(fd));
    INHERITED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(open);
}

/// Takes inherited descriptor `number` (decimal digits, as in `fd:5`): the caller owns it.
pub fn take(number: &str) -> Result<OwnedFd, UriError> {
    let fd: RawFd = number
        .parse()
        .ok()
        .filter(|_| number.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| UriError::FdNumber(number.to_string()))?;
    if !INHERITED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&fd)
    {
        return Err(UriError::Fd {
            name: number.to_string(),
            reason: "not a descriptor Skiff inherited at start-up, or one already used".into(),
        });
    }
    // SAFETY: `fd` was open when the process started, before Skiff opened anything, so no
    // object of Skiff's owns it; it was just removed from the set, so it is taken only once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_numbers_that_were_inherited() {
        assert_eq!(
            take("9x").unwrap_err().to_string(),
            "Invalid file descriptor number '9x'"
        );
        assert_eq!(
            take("+3").unwrap_err().to_string(),
            "Invalid file descriptor number '+3'"
        );
        // Never recorded in this test process: refused, whatever is open under that number.
        let err = take("1").unwrap_err().to_string();
        assert!(err.contains("not a descriptor Skiff inherited"), "{err}");
    }
}
