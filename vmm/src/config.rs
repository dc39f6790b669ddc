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
    /// A `--disk` value that does not parse.
    #[error("invalid --disk '{text}': {reason} (expected path=FILE[,readonly=on|off][,id=NAME])")]
    BadDisk {
        /// The value given.
        text: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A `--net` value that does not parse.
    #[error("invalid --net '{text}': {reason} (expected tap=IFNAME[,mac=MAC][,id=NAME])")]
    BadNet {
        /// The value given.
        text: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Two devices share an id.
    #[error("device id '{0}' is used twice")]
    DuplicateId(String),
    /// More virtio devices than the machine has slots for.
    #[error("{0} virtio devices requested; Skiff supports at most {max}", max = crate::arch::layout::VIRTIO_MMIO_MAX_DEVICES)]
    TooManyDevices(usize),
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

/// Splits `key=value[,key=value...]` into pairs; a value cannot contain a comma.
fn parse_options(text: &str) -> Result<Vec<(&str, &str)>, String> {
    let mut pairs = Vec::new();
    for item in text.split(',') {
        let Some((key, value)) = item.split_once('=') else {
            return Err(format!("'{item}' is not key=value"));
        };
        if pairs.iter().any(|(k, _)| *k == key) {
            return Err(format!("'{key}' given twice"));
        }
        pairs.push((key, value));
    }
    Ok(pairs)
}

/// Parses an on/off switch as QEMU does (on, off, yes, no, true, false).
fn parse_switch(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(format!("{key}={value}: expected on or off")),
    }
}

/// Checks a device id: 1 to 20 characters among letters, digits, '-', '_' and '.',
/// starting with a letter (QEMU's rule for ids, with the virtio-blk ID's 20-byte limit).
fn check_id(id: &str) -> Result<String, String> {
    let valid = id.len() <= 20
        && id.starts_with(|c: char| c.is_ascii_alphabetic())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(id.to_string())
    } else {
        Err(format!(
            "id '{id}': expected 1 to 20 letters, digits, '-', '_' or '.', starting with a letter"
        ))
    }
}

/// Parses the `key=value,...` list `text` of a device option into a default `T`: `id=` is
/// checked and stored where `id` says, every other key goes to `set`, which answers whether it
/// knows the key.
fn parse_option_list<T: Default>(
    text: &str,
    id: fn(&mut T) -> &mut Option<String>,
    mut set: impl FnMut(&mut T, &str, &str) -> Result<bool, String>,
) -> Result<T, String> {
    let mut config = T::default();
    for (key, value) in parse_options(text)? {
        if key == "id" {
            *id(&mut config) = Some(check_id(value)?);
        } else if !set(&mut config, key, value)? {
            return Err(format!("unknown option '{key}'"));
        }
    }
    Ok(config)
}

/// `--disk`: a raw disk image behind a virtio-blk device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskConfig {
    /// Path of the raw image.
    pub path: PathBuf,
    /// Open read-only (the guest sees a read-only disk).
    pub read_only: bool,
    /// The name QMP reports and the virtio-blk ID string; `None` names it `diskN`.
    pub id: Option<String>,
}

impl DiskConfig {
    fn parse(text: &str) -> Result<Self, String> {
        let disk = parse_option_list(
            text,
            |disk: &mut DiskConfig| &mut disk.id,
            |disk, key, value| {
                match key {
                    "path" | "file" if !value.is_empty() => disk.path = value.into(),
                    "path" | "file" => return Err("empty path".to_string()),
                    "readonly" => disk.read_only = parse_switch(key, value)?,
                    _ => return Ok(false),
                }
                Ok(true)
            },
        )?;
        if disk.path.as_os_str().is_empty() {
            return Err("path= is missing".to_string());
        }
        Ok(disk)
    }
}

impl FromStr for DiskConfig {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text).map_err(|reason| ConfigError::BadDisk {
            text: text.to_string(),
            reason,
        })
    }
}

/// `--net`: a tap interface behind a virtio-net device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetConfig {
    /// The tap interface name.
    pub tap: String,
    /// The guest's MAC address; `None` generates a random locally administered one.
    pub mac: Option<[u8; 6]>,
    /// The device's name; `None` names it `netN`.
    pub id: Option<String>,
}

/// Parses a unicast MAC address `aa:bb:cc:dd:ee:ff` (or with '-').
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let bad = || format!("mac '{text}': expected six hex bytes like 52:54:00:12:34:56");
    let parts: Vec<&str> = text.split([':', '-']).collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("mac '{text}' is a multicast address"));
    }
    Ok(mac)
}

impl NetConfig {
    fn parse(text: &str) -> Result<Self, String> {
        let net = parse_option_list(
            text,
            |net: &mut NetConfig| &mut net.id,
            |net, key, value| {
                match key {
                    "tap" | "ifname" => net.tap = value.to_string(),
                    "mac" => net.mac = Some(parse_mac(value)?),
                    _ => return Ok(false),
                }
                Ok(true)
            },
        )?;
        if net.tap.is_empty() || net.tap.len() >= 16 || net.tap.contains('/') {
            return Err(format!(
                "tap interface name '{}': expected 1 to 15 characters",
                net.tap
            ));
        }
        Ok(net)
    }
}

impl FromStr for NetConfig {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text).map_err(|reason| ConfigError::BadNet {
            text: text.to_string(),
            reason,
        })
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
    /// Populate all guest RAM at start-up (QEMU's `-mem-prealloc`): no page fault on first
    /// touch later, at the price of the whole RAM being resident at once.
    pub mem_prealloc: bool,
    /// The VM's name (QMP `query-name`).
    pub name: Option<String>,
    /// Wait for an incoming migration instead of booting the kernel.
    pub incoming: Option<Incoming>,
    /// virtio-blk disks, in order.
    pub disks: Vec<DiskConfig>,
    /// virtio-net interfaces, in order.
    pub nets: Vec<NetConfig>,
    /// Add a virtio-rng device.
    pub rng: bool,
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
            mem_prealloc: false,
            name: None,
            incoming: None,
            disks: Vec::new(),
            nets: Vec::new(),
            rng: false,
        }
    }

    /// The QMP names of the disks: their ids, or `diskN` for those without one.
    pub fn disk_names(&self) -> Vec<String> {
        self.disks
            .iter()
            .enumerate()
            .map(|(i, d)| d.id.clone().unwrap_or_else(|| format!("disk{i}")))
            .collect()
    }

    /// The names of the network devices: their ids, or `netN` for those without one.
    pub fn net_names(&self) -> Vec<String> {
        self.nets
            .iter()
            .enumerate()
            .map(|(i, n)| n.id.clone().unwrap_or_else(|| format!("net{i}")))
            .collect()
    }

    /// Checks the virtio devices as a whole: unique names, and no more than the machine holds.
    pub fn check_devices(&self) -> Result<(), ConfigError> {
        let count = self.disks.len() + self.nets.len() + usize::from(self.rng);
        if count > crate::arch::layout::VIRTIO_MMIO_MAX_DEVICES {
            return Err(ConfigError::TooManyDevices(count));
        }
        let mut seen = std::collections::BTreeSet::new();
        for name in self.disk_names().into_iter().chain(self.net_names()) {
            if !seen.insert(name.clone()) {
                return Err(ConfigError::DuplicateId(name));
            }
        }
        Ok(())
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

    #[test]
    fn disks() {
        assert_eq!(
            "path=/tmp/a.img".parse(),
            Ok(DiskConfig {
                path: "/tmp/a.img".into(),
                read_only: false,
                id: None
            })
        );
        assert_eq!(
            "path=a.img,readonly=on,id=root".parse(),
            Ok(DiskConfig {
                path: "a.img".into(),
                read_only: true,
                id: Some("root".into())
            })
        );
        assert!(matches!(
            "readonly=on".parse::<DiskConfig>(),
            Err(ConfigError::BadDisk { .. })
        ));
        for bad in [
            "",
            "a.img",
            "path=",
            "path=a,readonly=maybe",
            "path=a,id=",
            "path=a,id=1abc",
            "path=a,id=abcdefghijklmnopqrstu",
            "path=a,path=b",
            "path=a,cache=none",
        ] {
            let err = bad.parse::<DiskConfig>().unwrap_err();
            assert!(
                err.to_string().starts_with("invalid --disk"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn nets() {
        assert_eq!(
            "tap=tap0,mac=52:54:00:12:34:56,id=n0".parse(),
            Ok(NetConfig {
                tap: "tap0".into(),
                mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
                id: Some("n0".into())
            })
        );
        assert_eq!("tap=t".parse::<NetConfig>().map(|n| n.mac), Ok(None));
        for bad in [
            "",
            "tap=",
            "tap=averyveryverylongname",
            "tap=t,mac=01:00:00:00:00:00",
            "tap=t,mac=52:54:00:12:34",
            "tap=t,mac=52:54:00:12:34:5g",
            "tap=t,mac=520:54:00:12:34:5",
            "mac=52:54:00:12:34:56",
            "tap=t,vhost=on",
        ] {
            let err = bad.parse::<NetConfig>().unwrap_err();
            assert!(err.to_string().starts_with("invalid --net"), "{bad}: {err}");
        }
    }

    #[test]
    fn device_names_are_unique_and_bounded() {
        let mut config = VmConfig::new("k".into());
        config.disks = vec![
            "path=a".parse().unwrap(),
            "path=b,id=disk0".parse().unwrap(),
        ];
        assert_eq!(
            config.check_devices(),
            Err(ConfigError::DuplicateId("disk0".into()))
        );
        config.disks[1].id = Some("data".into());
        config.nets = vec!["tap=t0".parse().unwrap()];
        config.rng = true;
        assert_eq!(config.check_devices(), Ok(()));
        assert_eq!(config.disk_names(), ["disk0", "data"]);
        assert_eq!(config.net_names(), ["net0"]);
        config.disks = (0..40)
            .map(|i| format!("path=a,id=d{i}").parse().unwrap())
            .collect();
        assert_eq!(config.check_devices(), Err(ConfigError::TooManyDevices(42)));
    }
}
