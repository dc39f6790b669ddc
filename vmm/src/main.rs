//! The `skiff` command: parses the command line, builds the VM and runs it.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use qmp::ListenAddr;
use skiff::config::{self, SerialConfig, VmConfig, DEFAULT_CMDLINE};
use skiff::Vmm;

/// A minimal KVM virtual machine monitor for x86_64 Linux guests, with QMP built in.
#[derive(Parser, Debug)]
#[command(name = "skiff", version, about)]
struct Cli {
    /// Kernel image: ELF vmlinux (PVH or 64-bit entry) or bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Initramfs to load.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Guest RAM: a number with an optional K, M, G or T suffix (MiB without one).
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = config::parse_memory)]
    memory: u64,
    /// Number of vCPUs (1 to 32).
    #[arg(long, value_name = "N", default_value = "1", value_parser = config::parse_cpus)]
    cpus: u8,
    /// COM1 back-end: stdio, file:PATH, unix:PATH (listening socket) or none.
    #[arg(long, value_name = "BACKEND", default_value = "stdio")]
    serial: SerialConfig,
    /// A QMP monitor: unix:PATH or tcp:HOST:PORT. Repeatable.
    #[arg(long, value_name = "ADDRESS")]
    qmp: Vec<ListenAddr>,
    /// Start paused (QMP run state prelaunch); `cont` starts the vCPUs.
    #[arg(short = 'S', long)]
    paused: bool,
    /// Exit (status 0) instead of re-booting when the guest resets.
    #[arg(long)]
    no_reboot: bool,
    /// Populate all guest RAM at start-up, as QEMU's -mem-prealloc (a migration destination
    /// then loads RAM without first-touch page faults).
    #[arg(long = "mem-prealloc")]
    mem_prealloc: bool,
    /// The VM's name, as QMP query-name reports it.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Receive the VM from a migration instead of booting: unix:PATH, tcp:HOST:PORT or
    /// file:PATH, fd:N (an inherited descriptor), or `defer` to wait for QMP migrate-incoming.
    #[arg(long, value_name = "URI")]
    incoming: Option<config::Incoming>,
    /// A virtio-blk disk: path=FILE[,readonly=on][,id=NAME] (a raw image). Repeatable.
    #[arg(long, value_name = "OPTIONS")]
    disk: Vec<config::DiskConfig>,
    /// A virtio-net interface on a tap: tap=IFNAME[,mac=MAC][,id=NAME]. Repeatable.
    #[arg(long, value_name = "OPTIONS")]
    net: Vec<config::NetConfig>,
    /// A virtio-rng device fed from the host's getrandom.
    #[arg(long)]
    rng: bool,
}

/// Writes log records to stderr, one line each: `skiff: LEVEL: message`. The level comes from
/// `SKIFF_LOG` (error, warn, info, debug, trace; default warn).
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            let line = format!(
                "skiff: {}: {}\n",
                record.level().as_str().to_lowercase(),
                record.args()
            );
            // Best effort: stderr being gone is no reason to stop the VM.
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

fn init_logging() {
    let level = std::env::var("SKIFF_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(log::LevelFilter::Warn);
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

fn main() -> ExitCode {
    // Before anything is opened: `fd:N` may only name what was inherited.
    skiff::migration::inherited::record();
    init_logging();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            // One line, not clap's usage block: scripts and CI logs read it.
            let text = e.render().to_string();
            let message: Vec<&str> = text
                .lines()
                .take_while(|line| !line.trim().is_empty())
                .map(str::trim)
                .collect();
            eprintln!(
                "skiff: error: {}",
                message.join(" ").trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
    };
    let config = VmConfig {
        kernel: cli.kernel,
        initrd: cli.initrd,
        cmdline: cli.cmdline,
        memory_bytes: cli.memory,
        cpus: cli.cpus,
        serial: cli.serial,
        qmp: cli.qmp,
        start_paused: cli.paused,
        no_reboot: cli.no_reboot,
        mem_prealloc: cli.mem_prealloc,
        name: cli.name,
        incoming: cli.incoming,
        disks: cli.disk,
        nets: cli.net,
        rng: cli.rng,
    };
    let result = Vmm::new(config).and_then(Vmm::run);
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("skiff: error: {e}");
            ExitCode::FAILURE
        }
    }
}
