//! Helpers shared by the integration tests (tiny guests, Linux boot, and later QMP and
//! migration tests).
//!
//! Included with `mod common;` from every test crate. Not every test crate uses every helper,
//! hence the crate-wide `dead_code` allowance below.
//!
//! - [`bench`]: QEMU's version and medians for the benchmarks.
//! - [`elf`]: packs machine code into a minimal ELF64 executable the VMM can boot.
//! - [`fd_passing`]: sends bytes with descriptors attached (SCM_RIGHTS).
//! - [`guest`]: a 64-bit [`iced_x86::code_asm::CodeAssembler`] wrapper with helpers for the
//!   devices of the Skiff machine (serial, exit port, CMOS, i8042), and the AP trampoline.
//! - [`process`]: runs the `skiff` binary with hard timeouts and captures its output.
//! - [`kvm`]: detects whether this host's KVM is hardware-assisted.
//! - [`migration_guest`]: the migration test guest (QEMU's a-b guest) and its RAM check.

#![allow(dead_code)]

pub mod bench;
pub mod elf;
pub mod fd_passing;
pub mod guest;
pub mod kvm;
pub mod migration_guest;
pub mod process;
pub mod qmp_client;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Reports a test that cannot run on this host: writes `message` (which starts with
/// `SKIPPED:` and gives the reason) straight to the process's stderr, past the test
/// harness's output capture, so the skip shows in every test log instead of passing silently.
pub fn skipped(message: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{message}");
}

/// Path of the `skiff` binary built by Cargo for this test run.
pub fn skiff_bin() -> &'static str {
    env!("CARGO_BIN_EXE_skiff")
}

/// The repository root (the workspace directory holding `vmm/`, `tests/`, `resources/`).
pub fn repo_root() -> PathBuf {
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    root.canonicalize().unwrap_or(root)
}

/// A fresh temporary directory, removed (with its contents) when dropped, unless the
/// environment variable `SKIFF_TEST_KEEP` is set (then its path is printed, to re-run a guest
/// by hand).
///
/// The name contains the process id, a per-process counter and a caller-chosen tag, so tests
/// running in parallel threads and processes never share one.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `$TMPDIR/skiff-test-<pid>-<n>-<tag>`.
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "skiff-test-{}-{n}-{nanos:x}-{tag}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create temp dir {}: {e}", path.display()));
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("SKIFF_TEST_KEEP").is_some() {
            eprintln!("kept {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
