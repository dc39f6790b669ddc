//! Errors for device state restored from a snapshot or a migration stream.
//!
//! Each stateful device has a plain serde `*State` struct (what `state()` returns) and a
//! `restore()` that validates it before applying it: state that did not come from a
//! device of this model is refused with [`DeviceStateError`], never a panic.

/// Why a saved device state was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {device} state: {reason}")]
pub struct DeviceStateError {
    /// The device whose state was refused.
    pub device: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl DeviceStateError {
    /// An error for `device` saying `reason`.
    pub fn new(device: &'static str, reason: impl Into<String>) -> Self {
        Self {
            device,
            reason: reason.into(),
        }
    }
}
