//! Skiff: a minimal KVM virtual machine monitor for x86_64 Linux guests, with QEMU's monitor
//! protocol built in.
//!
//! Threads: one per vCPU, running KVM_RUN without locks and taking the big VMM lock
//! ([`machine::BigLock`]) only to emulate an exit; the event loop (the thread calling
//! [`Vmm::run`]) serving device back-ends under the same lock.

pub mod arch;
pub mod config;
pub mod kvm_vm;
pub mod loader;
pub mod machine;
pub mod memory;
pub mod migration;
pub mod monitor;
pub mod runstate;
pub mod serial_backend;
pub mod snapshot;
pub mod uffd;
pub mod vcpu;
pub mod vcpu_state;
pub mod virtio;
pub mod vm;
pub mod vmm;

pub use config::{SerialConfig, VmConfig};
pub use runstate::RunState;
pub use vmm::{Error, VmController, Vmm};
