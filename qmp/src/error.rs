//! Errors as QMP puts them on the wire: `{"error": {"class": ..., "desc": ...}}`.

use std::fmt;

/// The QMP error classes, exactly QEMU's `QapiErrorClass` enum (qapi/error.json), in its order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Any error without a more specific class.
    GenericError,
    /// The command does not exist, is disabled, or is not available in the current mode.
    CommandNotFound,
    /// A device exists but is not active.
    DeviceNotActive,
    /// A named device does not exist.
    DeviceNotFound,
    /// KVM lacks a capability the command needs.
    KvmMissingCap,
}

impl ErrorClass {
    /// The class name as QEMU writes it on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KvmMissingCap => "KVMMissingCap",
        }
    }
}

/// An error answer to a QMP request: a class and a human-readable description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    /// The error class.
    pub class: ErrorClass,
    /// The description, worded as QEMU words it where QEMU has the same error.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError` with the given description.
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// An error of a given class.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }
}

impl fmt::Display for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.class.as_str(), self.desc)
    }
}

impl std::error::Error for QmpError {}
