//! What the user asks for: the VM configuration, and parsing of its textual forms.

use std::path::PathBuf;
use std::str::FromStr;

use qmp::ListenAddr;

use crate::arch::layout::MIB;
use crate::arch::mptable::MAX_CPUS;
use crate::migration::uri::MigrationUri;

/// Default guest RAM: 256 MiB.
pub const DEFAULT_MEMORY: u64 = 256 * MIB;
/// Default kernel command line.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
/// Smallest guest RAM Skiff boots: the low structures plus a 1 MiB kernel area.
pub const MIN_MEMORY: u64 = 2 * MIB;
/// Largest guest RAM accepted: 1 TiB.
pub const MAX_MEMORY: u64 = 1 << 40;

/// Errors in configuration values.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A size that does not parse.
    #[error(
        "invalid size '{0}': expected a number with an optional K, M, G or T suffix (default M)"
    )]
    BadSize(String),
    /// A RAM size out of range.
    #[error("memory size {0} bytes is out of range ({MIN_MEMORY} bytes to 1 TiB)")]
    MemoryOutOfRange(u64),
    /// A vCPU count out of range.
    #[error("{0} vCPUs requested; Skiff supports 1 to {MAX_CPUS}")]
    CpusOutOfRange(u64),
    /// A serial back-end that does not parse.
    #[error("invalid serial back-end '{0}': expected stdio, file:PATH, unix:PATH or none")]
    BadSerial(String),
}

/// Parses a size as QEMU's `-m` does: a number with an optional K, M, G or T suffix
/// (binary units), MiB when there is none.
pub fn parse_size(text: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(text.to_string());
    let trimmed = text.trim();
    let (digits, unit) = match trimmed.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => trimmed.split_at(i),
        None => (trimmed, ""),
    };
    let number: u64 = digits.parse().map_err(|_| bad())?;
    let shift = match unit
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" | "M" => 20,
        "K" => 10,
        "G" => 30,
        "T" => 40,
        _ => return Err(bad()),
    };
    number.checked_mul(1 << shift).ok_or_else(bad)
}

/// Parses and checks a guest RAM size.
pub fn parse_memory(text: &str) -> Result<u64, ConfigError> {
    let size = parse_size(text)?;
    if !(MIN_MEMORY..=MAX_MEMORY).contains(&size) {
        return Err(ConfigError::MemoryOutOfRange(size));
    }
    Ok(size)
}

/// Parses and checks a vCPU count.
pub fn parse_cpus(text: &str) -> Result<u8, ConfigError> {
    let n: u64 = text
        .trim()
        .parse()
        .map_err(|_| ConfigError::CpusOutOfRange(0))?;
    if n == 0 || n > u64::from(MAX_CPUS) {
        return Err(ConfigError::CpusOutOfRange(n));
    }
    Ok(n as u8)
}

/// Where COM1's output goes and its input comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialConfig {
    /// The VMM's standard output and input (input in raw mode when it is a terminal).
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// A listening unix socket; one client at a time gets the output and sends input.
    Unix(PathBuf),
    /// Output discarded; no input.
    None,
}

impl FromStr for SerialConfig {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::BadSerial(text.to_string());
        match text {
            "stdio" => Ok(SerialConfig::Stdio),
            "none" => Ok(SerialConfig::None),
            _ => match text.split_once(':') {
                Some(("file", path)) if !path.is_empty() => Ok(SerialConfig::File(path.into())),
                Some(("unix", path)) if !path.is_empty() => Ok(SerialConfig::Unix(path.into())),
                _ => Err(bad()),
            },
        }
    }
}

/// A complete VM configuration.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Kernel image: ELF vmlinux (PVH or 64-bit entry) or bzImage.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Number of vCPUs, 1 to 32.
    pub cpus: u8,
    /// COM1 back-end.
    pub serial: SerialConfig,
    /// QMP monitors to listen on.
    pub qmp: Vec<ListenAddr>,
    /// Start in the `prelaunch` state, vCPUs not running.
    pub start_paused: bool,
    /// End the VMM (status 0) instead of re-booting when the guest resets.
    pub no_reboot: bool,
    /// The VM's name (QMP `query-name`).
    pub name: Option<String>,
    /// Wait for an incoming migration instead of booting the kernel.
    pub incoming: Option<Incoming>,
}

/// `--incoming`: where the VM's state comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// Wait for QMP `migrate-incoming`.
    Defer,
    /// Listen at (or read from) this address at start-up.
    Uri(MigrationUri),
}

impl FromStr for Incoming {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text == "defer" {
            return Ok(Incoming::Defer);
        }
        MigrationUri::parse(text)
            .map(Incoming::Uri)
            .map_err(|e| e.to_string())
    }
}

impl VmConfig {
    /// The defaults for a kernel: 256 MiB, one vCPU, serial on stdio, the default command line.
    pub fn new(kernel: PathBuf) -> Self {
        VmConfig {
            kernel,
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            memory_bytes: DEFAULT_MEMORY,
            cpus: 1,
            serial: SerialConfig::Stdio,
            qmp: Vec::new(),
            start_paused: false,
            no_reboot: false,
            name: None,
            incoming: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256"), Ok(256 << 20));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999T").is_err());
        assert_eq!(
            parse_memory("1M"),
            Err(ConfigError::MemoryOutOfRange(1 << 20))
        );
    }

    #[test]
    fn cpus() {
        assert_eq!(parse_cpus("4"), Ok(4));
        assert_eq!(parse_cpus("0"), Err(ConfigError::CpusOutOfRange(0)));
        assert_eq!(parse_cpus("33"), Err(ConfigError::CpusOutOfRange(33)));
        assert!(parse_cpus("x").is_err());
    }

    #[test]
    fn serial() {
        assert_eq!("stdio".parse(), Ok(SerialConfig::Stdio));
        assert_eq!(
            "file:/tmp/x".parse(),
            Ok(SerialConfig::File("/tmp/x".into()))
        );
        assert_eq!(
            "unix:/tmp/s".parse(),
            Ok(SerialConfig::Unix("/tmp/s".into()))
        );
        assert!("tcp:1".parse::<SerialConfig>().is_err());
        assert!("file:".parse::<SerialConfig>().is_err());
    }
}
