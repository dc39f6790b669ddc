//! The running VM as every thread shares it: the big lock, the vCPUs' kick handles, guest
//! memory, the KVM VM and the guest image; and the operations on all vCPUs at once (pause,
//! resume, reset, stop) that the event loop, the library API and later QMP use.

use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use devices::power::PowerControl;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::kvm_vm::{KvmVm, VmError};
use crate::loader::{self, BootEntry, GuestImage, LoaderError};
use crate::machine::{BigLock, Machine};
use crate::memory::{self, MemoryError};
use crate::runstate::RunState;
use crate::vcpu::{Vcpu, VcpuKick, VcpuRequest, VcpuState};

/// How long to wait for a kicked vCPU before kicking it again (a signal can land just before
/// the vCPU blocks in KVM_RUN and be consumed by the previous check).
const REKICK_INTERVAL: Duration = Duration::from_millis(10);

/// Errors of whole-VM operations.
#[derive(Debug, thiserror::Error)]
pub enum VmOpError {
    /// Reloading the guest failed.
    #[error("cannot reload the guest: {0}")]
    Loader(#[from] LoaderError),
    /// Discarding guest memory failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Restoring the irqchip or PIT failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A guest-physical range is outside guest RAM.
    #[error("guest physical range {addr:#x}+{len:#x} is not RAM")]
    BadGuestRange {
        /// Start.
        addr: u64,
        /// Length.
        len: usize,
    },
}

/// The VM shared by the vCPU threads, the event loop and controllers.
pub struct Vm {
    lock: BigLock,
    power: Arc<PowerControl>,
    kicks: Vec<VcpuKick>,
    vcpu_event: EventFd,
    control: EventFd,
    memory: GuestMemoryMmap,
    kvm: KvmVm,
    image: GuestImage,
}

impl Vm {
    /// Assembles the shared VM.
    pub fn new(
        machine: Machine,
        power: Arc<PowerControl>,
        memory: GuestMemoryMmap,
        kvm: KvmVm,
        image: GuestImage,
    ) -> std::io::Result<Self> {
        let kicks = (0..machine.vcpus.len())
            .map(|_| VcpuKick::default())
            .collect();
        Ok(Vm {
            lock: BigLock::new(machine),
            power,
            kicks,
            vcpu_event: EventFd::new(libc::EFD_NONBLOCK)?,
            control: EventFd::new(libc::EFD_NONBLOCK)?,
            memory,
            kvm,
            image,
        })
    }

    /// Takes the big lock.
    pub fn lock(&self) -> MutexGuard<'_, Machine> {
        self.lock.lock()
    }

    /// The big lock itself, for waiting on its condition.
    pub fn big_lock(&self) -> &BigLock {
        &self.lock
    }

    /// Where devices post reset and power-off requests.
    pub fn power(&self) -> &Arc<PowerControl> {
        &self.power
    }

    /// The kick handle of vCPU `index`.
    pub fn kick(&self, index: usize) -> &VcpuKick {
        &self.kicks[index]
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The KVM VM.
    pub fn kvm(&self) -> &KvmVm {
        &self.kvm
    }

    /// The kernel, initrd and command line the guest boots from.
    pub fn image(&self) -> &GuestImage {
        &self.image
    }

    /// Readable when a vCPU reported something the event loop must handle.
    pub fn vcpu_event(&self) -> &EventFd {
        &self.vcpu_event
    }

    /// Readable when a controller asked the event loop to end the VMM.
    pub fn control_event(&self) -> &EventFd {
        &self.control
    }

    /// Asks the event loop to end the VMM with exit status `code` (the first request wins).
    pub fn request_exit(&self, code: i32) {
        let mut machine = self.lock();
        machine.exit_code.get_or_insert(code);
        drop(machine);
        if let Err(e) = self.control.write(1) {
            log::error!("cannot wake the event loop: {e}");
        }
    }

    /// Copies guest RAM at `addr` into `buf`.
    pub fn read_guest_memory(&self, addr: u64, buf: &mut [u8]) -> Result<(), VmOpError> {
        self.memory
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| VmOpError::BadGuestRange {
                addr,
                len: buf.len(),
            })
    }

    /// Called by vCPU `index` after a KVM internal error: prints the description, stops this
    /// vCPU and tells the event loop.
    pub fn report_internal_error(&self, index: usize, description: &str) {
        log::error!("{description}");
        let mut machine = self.lock();
        machine.internal_error = true;
        if machine.vcpus[index].request == VcpuRequest::Run {
            machine.vcpus[index].request = VcpuRequest::Pause;
        }
        self.kicks[index].request_attention();
        drop(machine);
        if let Err(e) = self.vcpu_event.write(1) {
            log::error!("cannot notify the event loop of vCPU {index}'s error: {e}");
        }
    }

    /// Called by vCPU `index` when a device asked for a reset or power-off: the vCPU stops
    /// running guest code until the event loop has acted on the request.
    pub fn park_for_power_request(&self, index: usize) {
        let mut machine = self.lock();
        // Checked again under the lock: the event loop takes requests with the lock held.
        if self.power.is_pending() && machine.vcpus[index].request == VcpuRequest::Run {
            machine.vcpus[index].request = VcpuRequest::Pause;
            self.kicks[index].request_attention();
        }
    }

    fn all_vcpus_in(machine: &Machine, states: &[VcpuState]) -> bool {
        machine.vcpus.iter().all(|s| states.contains(&s.state))
    }

    /// Pauses every vCPU and returns once each has parked with no exit half-emulated. The big
    /// lock is released while waiting so a vCPU in the middle of an exit can finish it.
    pub fn pause_vcpus<'a>(
        &'a self,
        mut machine: MutexGuard<'a, Machine>,
    ) -> MutexGuard<'a, Machine> {
        for slot in machine.vcpus.iter_mut() {
            if slot.request == VcpuRequest::Run {
                slot.request = VcpuRequest::Pause;
            }
        }
        self.wait_for_vcpus(machine, &[VcpuState::Paused, VcpuState::Exited])
    }

    /// Lets every paused vCPU run again.
    pub fn resume_vcpus(&self, machine: &mut Machine) {
        for slot in machine.vcpus.iter_mut() {
            if slot.request == VcpuRequest::Pause {
                slot.request = VcpuRequest::Run;
            }
        }
        self.lock.notify_all();
    }

    /// Ends every vCPU thread and waits until each has reported it.
    pub fn stop_vcpu_threads<'a>(
        &'a self,
        mut machine: MutexGuard<'a, Machine>,
    ) -> MutexGuard<'a, Machine> {
        for slot in machine.vcpus.iter_mut() {
            slot.request = VcpuRequest::Exit;
        }
        self.wait_for_vcpus(machine, &[VcpuState::Exited])
    }

    /// Kicks every vCPU not yet in one of `states`, then waits (re-kicking every
    /// [`REKICK_INTERVAL`]) until all are.
    fn wait_for_vcpus<'a>(
        &'a self,
        mut machine: MutexGuard<'a, Machine>,
        states: &[VcpuState],
    ) -> MutexGuard<'a, Machine> {
        loop {
            for (index, slot) in machine.vcpus.iter().enumerate() {
                if !states.contains(&slot.state) && slot.state != VcpuState::Exited {
                    self.kicks[index].kick();
                }
            }
            self.lock.notify_all();
            if Self::all_vcpus_in(&machine, states) {
                return machine;
            }
            machine = self.lock.wait_timeout(machine, REKICK_INTERVAL);
            if Self::all_vcpus_in(&machine, states) {
                return machine;
            }
        }
    }

    /// Loads the guest image into (zeroed) memory and returns the boot entry.
    pub fn load_guest(&self) -> Result<BootEntry, LoaderError> {
        loader::load_guest(&self.memory, &self.image)
    }

    /// Re-boots the guest from its kernel: all vCPUs pause, RAM is discarded and the guest
    /// reloaded, the irqchip, PIT, devices and vCPUs return to their power-on state, and the
    /// vCPUs run again if the VM was running.
    pub fn reset_guest<'a>(
        &'a self,
        machine: MutexGuard<'a, Machine>,
    ) -> Result<MutexGuard<'a, Machine>, VmOpError> {
        let mut machine = self.pause_vcpus(machine);
        memory::discard_guest_memory(&self.memory)?;
        let entry = self.load_guest()?;
        self.kvm.reset_platform()?;
        machine.reset_devices();
        for slot in machine.vcpus.iter_mut() {
            slot.work
                .push(Box::new(move |vcpu: &mut Vcpu| vcpu.reset(entry)));
        }
        for kick in &self.kicks {
            kick.request_attention();
        }
        if machine.run_state == RunState::Running {
            self.resume_vcpus(&mut machine);
        } else {
            self.lock.notify_all();
        }
        Ok(machine)
    }
}
