//! The running VM as every thread shares it: the big lock, the vCPUs' kick handles, guest
//! memory, the KVM VM and the guest image; and the operations on all vCPUs at once (pause,
//! resume, reset, stop) that the event loop, the library API and later QMP use.

use std::sync::{Arc, OnceLock};

use api::{Event, ShutdownCause};
use std::time::Duration;

use crate::memory::GuestRam;
use devices::power::PowerControl;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::kvm_vm::{KvmVm, VmError};
use crate::loader::{self, BootEntry, GuestImage, LoaderError};
use crate::machine::{BigLock, Machine, MachineGuard};
use crate::memory::{self, MemoryError};
use crate::migration::MigrationState;
use crate::runstate::RunState;
use crate::snapshot::{MachineState, SnapshotError};
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

/// A whole-VM action asked for by the guest or the host and carried out by the event loop
/// (after the reply to the QMP command that asked for it, as QEMU does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmAction {
    /// Re-boot the guest.
    Reset {
        /// Whether the guest asked.
        guest: bool,
        /// QEMU's reason.
        reason: ShutdownCause,
    },
    /// End the VMM.
    Shutdown {
        /// Whether the guest asked.
        guest: bool,
        /// QEMU's reason.
        reason: ShutdownCause,
        /// The process exit status.
        code: i32,
    },
    /// Press the ACPI power button.
    Powerdown,
}

/// Where VM events (QMP's STOP, RESUME, RESET, SHUTDOWN, POWERDOWN) go.
pub type EventSink = Box<dyn Fn(Event) + Send + Sync>;

/// The VM shared by the vCPU threads, the event loop and controllers.
pub struct Vm {
    lock: BigLock,
    power: Arc<PowerControl>,
    kicks: Vec<VcpuKick>,
    vcpu_event: EventFd,
    control: EventFd,
    events: OnceLock<EventSink>,
    memory: GuestRam,
    kvm: KvmVm,
    image: GuestImage,
    name: Option<String>,
    migration: Arc<MigrationState>,
}

impl Vm {
    /// Assembles the shared VM.
    pub fn new(
        machine: Machine,
        power: Arc<PowerControl>,
        memory: GuestRam,
        kvm: KvmVm,
        image: GuestImage,
        name: Option<String>,
        migration: Arc<MigrationState>,
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
            events: OnceLock::new(),
            memory,
            kvm,
            image,
            name,
            migration,
        })
    }

    /// Takes the big lock.
    pub fn lock(&self) -> MachineGuard<'_> {
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
    pub fn memory(&self) -> &GuestRam {
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

    /// The migration state the monitor and migration threads share.
    pub fn migration(&self) -> &Arc<MigrationState> {
        &self.migration
    }

    /// The VM's name (`--name`).
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Readable when a vCPU reported something the event loop must handle.
    pub fn vcpu_event(&self) -> &EventFd {
        &self.vcpu_event
    }

    /// Readable when an action waits in [`Machine::actions`] for the event loop.
    pub fn control_event(&self) -> &EventFd {
        &self.control
    }

    /// Queues a whole-VM action for the event loop.
    pub fn request(&self, machine: &mut Machine, action: VmAction) {
        machine.actions.push(action);
        if let Err(e) = self.control.write(1) {
            log::error!("cannot wake the event loop: {e}");
        }
    }

    /// Sets where events go (once; later calls are ignored).
    pub fn set_event_sink(&self, sink: EventSink) {
        if self.events.set(sink).is_err() {
            log::warn!("the VM's event sink was already set");
        }
    }

    /// Emits a VM event.
    pub fn emit(&self, event: Event) {
        log::info!("event {}", event.name());
        if let Some(sink) = self.events.get() {
            sink(event);
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
    pub fn pause_vcpus(&self, machine: &mut MachineGuard<'_>) {
        for slot in machine.vcpus.iter_mut() {
            if slot.request == VcpuRequest::Run {
                slot.request = VcpuRequest::Pause;
            }
        }
        self.wait_for_vcpus(machine, &[VcpuState::Paused, VcpuState::Exited]);
        machine.rearm_virtio();
    }

    /// Lets every paused vCPU run again.
    pub fn resume_vcpus(&self, machine: &mut Machine) {
        machine.rearm_virtio();
        for slot in machine.vcpus.iter_mut() {
            if slot.request == VcpuRequest::Pause {
                slot.request = VcpuRequest::Run;
            }
        }
        self.lock.notify_all();
    }

    /// Ends every vCPU thread and waits until each has reported it.
    pub fn stop_vcpu_threads(&self, machine: &mut MachineGuard<'_>) {
        for slot in machine.vcpus.iter_mut() {
            slot.request = VcpuRequest::Exit;
        }
        self.wait_for_vcpus(machine, &[VcpuState::Exited]);
    }

    /// Kicks every vCPU not yet in one of `states`, then waits (re-kicking every
    /// [`REKICK_INTERVAL`]) until all are.
    fn wait_for_vcpus(&self, machine: &mut MachineGuard<'_>, states: &[VcpuState]) {
        loop {
            for (index, slot) in machine.vcpus.iter().enumerate() {
                if !states.contains(&slot.state) && slot.state != VcpuState::Exited {
                    self.kicks[index].kick();
                }
            }
            self.lock.notify_all();
            if Self::all_vcpus_in(machine, states) {
                return;
            }
            self.lock.wait_timeout(machine, REKICK_INTERVAL);
            if Self::all_vcpus_in(machine, states) {
                return;
            }
        }
    }

    /// Runs `work` on vCPU `index`'s own thread (where its state can be read consistently)
    /// and returns its result, or `None` if the vCPU thread has ended. The big lock is
    /// released while waiting.
    pub fn run_on_vcpu<R: Send + 'static>(
        &self,
        machine: &mut MachineGuard<'_>,
        index: usize,
        work: impl FnOnce(&mut Vcpu) -> R + Send + 'static,
    ) -> Option<R> {
        let (tx, rx) = std::sync::mpsc::channel();
        machine
            .vcpus
            .get_mut(index)?
            .work
            .push(Box::new(move |vcpu: &mut Vcpu| {
                // The requester may have given up; nothing to do then.
                let _ = tx.send(work(vcpu));
                Ok(())
            }));
        loop {
            match rx.try_recv() {
                Ok(result) => return Some(result),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return None,
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
            }
            if machine.vcpus[index].state == VcpuState::Exited {
                return None;
            }
            self.kicks[index].kick();
            self.lock.notify_all();
            self.lock.wait_timeout(machine, REKICK_INTERVAL);
        }
    }

    /// Stops a running VM (QMP `stop`): pauses the vCPUs, then emits STOP. Does nothing when
    /// the VM is already stopped or not started.
    pub fn stop(&self, machine: &mut MachineGuard<'_>) {
        if machine.run_state == RunState::Inmigrate {
            // As QEMU: the guest will not run when the incoming migration completes.
            self.migration.set_autostart(false);
        }
        if machine.run_state == RunState::Running {
            self.pause_vcpus(machine);
            machine.run_state = RunState::Paused;
            self.emit(Event::Stop);
        }
    }

    /// Starts or resumes the VM (QMP `cont`): emits RESUME and lets the vCPUs run. Fails in
    /// states that need a reset first, with QEMU's message.
    pub fn cont(&self, machine: &mut MachineGuard<'_>) -> Result<(), &'static str> {
        match machine.run_state {
            RunState::Inmigrate => {
                // As QEMU: the guest will run when the incoming migration completes.
                self.migration.set_autostart(true);
                Ok(())
            }
            RunState::FinishMigrate => Err("The VM is being migrated"),
            RunState::Paused | RunState::Prelaunch | RunState::Postmigrate => {
                machine.run_state = RunState::Running;
                self.emit(Event::Resume);
                self.resume_vcpus(machine);
                Ok(())
            }
            RunState::Running => Ok(()),
            RunState::Shutdown | RunState::InternalError => {
                Err("Resetting the Virtual Machine is required")
            }
        }
    }

    /// Presses the ACPI power button: the guest sees a power-button event.
    pub fn press_power_button(&self, machine: &mut Machine) {
        machine.press_power_button();
    }

    /// Loads the guest image into (zeroed) memory and returns the boot entry.
    pub fn load_guest(&self) -> Result<BootEntry, LoaderError> {
        loader::load_guest(&self.memory, &self.image)
    }

    /// Re-boots the guest from its kernel: all vCPUs pause, RAM is discarded and the guest
    /// reloaded, the irqchip, PIT, devices and vCPUs return to their power-on state, and the
    /// vCPUs run again if the VM was running.
    pub fn reset_guest(&self, machine: &mut MachineGuard<'_>) -> Result<(), VmOpError> {
        self.pause_vcpus(machine);
        self.migration.note_ram_rewritten();
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
            self.resume_vcpus(machine);
        } else {
            // As QEMU: a VM reset while not running waits in prelaunch for `cont`.
            machine.run_state = RunState::Prelaunch;
            self.lock.notify_all();
        }
        Ok(())
    }

    /// Fails unless every vCPU has parked (a snapshot needs no exit half-emulated).
    fn check_paused(machine: &Machine) -> Result<(), SnapshotError> {
        match machine
            .vcpus
            .iter()
            .position(|slot| slot.state != VcpuState::Paused)
        {
            Some(index) => Err(SnapshotError::NotPaused { index }),
            None => Ok(()),
        }
    }

    /// Captures the whole machine: each vCPU's state (read on its own thread), the PIT,
    /// kvmclock and irqchips, and the devices. The vCPUs must be paused
    /// ([`Vm::pause_vcpus`]) and stay so; the big lock is released while each vCPU thread
    /// does its part. Guest RAM is not included.
    pub fn save_machine_state(
        &self,
        machine: &mut MachineGuard<'_>,
    ) -> Result<MachineState, SnapshotError> {
        Self::check_paused(machine)?;
        let mut vcpus = Vec::with_capacity(machine.vcpus.len());
        for index in 0..machine.vcpus.len() {
            let state = self
                .run_on_vcpu(machine, index, |vcpu| vcpu.save_state())
                .ok_or(SnapshotError::VcpuGone { index })??;
            vcpus.push(state);
        }
        // A vCPU that ran in between would make the states inconsistent.
        Self::check_paused(machine)?;
        let vm = self.kvm.save_state()?;
        // Queue notifications still in their ioeventfds are processed now, so the saved
        // queues hold no request the destination would never hear about. What the devices
        // write to guest RAM meanwhile is in the VMM's dirty bitmap, which migration reads
        // after this.
        crate::virtio::complete_pending(machine);
        let devices = machine.save_devices()?;
        Ok(MachineState { vcpus, vm, devices })
    }

    /// Puts a captured machine state into this VM, whose guest RAM must already hold the
    /// saved contents: the TSC frequency on every vCPU, then each vCPU's state (on its own
    /// thread), the PIT, kvmclock and irqchips, and the devices. The vCPUs must be paused.
    /// The vCPU count and order, the irqchip ids and the device states are checked before
    /// anything changes.
    pub fn restore_machine_state(
        &self,
        machine: &mut MachineGuard<'_>,
        state: &MachineState,
    ) -> Result<(), SnapshotError> {
        state.validate(machine.vcpus.len())?;
        Self::check_paused(machine)?;
        for (index, vcpu_state) in state.vcpus.iter().enumerate() {
            let tsc_khz = vcpu_state.tsc_khz;
            self.run_on_vcpu(machine, index, move |vcpu| vcpu.restore_tsc_khz(tsc_khz))
                .ok_or(SnapshotError::VcpuGone { index })??;
        }
        for (index, vcpu_state) in state.vcpus.iter().enumerate() {
            let vcpu_state = vcpu_state.clone();
            self.run_on_vcpu(machine, index, move |vcpu| vcpu.restore_state(&vcpu_state))
                .ok_or(SnapshotError::VcpuGone { index })??;
        }
        self.kvm.restore_state(&state.vm)?;
        machine.restore_devices(&state.devices)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout::MIB;
    use crate::vcpu::run_vcpu;
    use crate::vcpu_state::tests::{test_vm, TestVm};
    use devices::legacy::SerialOutput;
    use std::os::unix::thread::JoinHandleExt;
    use std::time::Instant;

    /// Real mode at 0x1000: `inc eax; out 0x80, al; jmp back`.
    const LOOP_CODE: [u8; 6] = [0x66, 0x40, 0xe6, 0x80, 0xeb, 0xfa];
    const LOOP_ADDR: u64 = 0x1000;
    /// Generous, for a slow and loaded machine.
    const TIMEOUT: Duration = Duration::from_secs(60);

    /// A VM of `num_cpus` paused vCPU threads, or `None` without /dev/kvm.
    fn running_vm(num_cpus: u8) -> Option<(Arc<Vm>, Vec<std::thread::JoinHandle<()>>)> {
        let TestVm { vcpus, kvm, mem } = test_vm(num_cpus)?;
        crate::vcpu::install_kick_handler().unwrap();
        let power = Arc::new(PowerControl::new().unwrap());
        let (machine, _irqs) =
            Machine::new(&power, SerialOutput::Sink, MIB, 0, vcpus.len(), true).unwrap();
        let image = GuestImage {
            kernel: "/nonexistent".into(),
            initrd: None,
            cmdline: String::new(),
            mem_size: MIB,
            num_cpus,
            virtio: Vec::new(),
        };
        let vm = Arc::new(
            Vm::new(
                machine,
                power,
                mem,
                kvm,
                image,
                None,
                Arc::new(MigrationState::new()),
            )
            .unwrap(),
        );
        let threads = vcpus
            .into_iter()
            .enumerate()
            .map(|(index, vcpu)| {
                let thread_vm = vm.clone();
                let (tx, _rx) = std::sync::mpsc::channel();
                let handle = std::thread::spawn(move || run_vcpu(vcpu, thread_vm, tx));
                vm.kick(index).set_thread(handle.as_pthread_t());
                handle
            })
            .collect();
        vm.pause_vcpus(&mut vm.lock());
        Some((vm, threads))
    }

    fn stop(vm: &Vm, threads: Vec<std::thread::JoinHandle<()>>) {
        vm.stop_vcpu_threads(&mut vm.lock());
        threads.into_iter().for_each(|t| t.join().unwrap());
    }

    /// Points vCPU 0 at the loop.
    fn start_loop(vm: &Vm) {
        vm.memory()
            .write_slice(&LOOP_CODE, GuestAddress(LOOP_ADDR))
            .unwrap();
        let mut machine = vm.lock();
        vm.run_on_vcpu(&mut machine, 0, |vcpu| {
            let mut sregs = vcpu.fd().get_sregs().unwrap();
            sregs.cs.base = 0;
            sregs.cs.selector = 0;
            vcpu.fd().set_sregs(&sregs).unwrap();
            let regs = kvm_bindings::kvm_regs {
                rip: LOOP_ADDR,
                rflags: 2,
                ..Default::default()
            };
            vcpu.fd().set_regs(&regs).unwrap();
        })
        .unwrap();
    }

    /// The loop counter (EAX) of vCPU 0.
    fn counter(vm: &Vm) -> u64 {
        let mut machine = vm.lock();
        vm.run_on_vcpu(&mut machine, 0, |vcpu| vcpu.fd().get_regs().unwrap().rax)
            .unwrap()
    }

    /// Lets the vCPUs run until the loop counter has gone a few steps past `after`, then
    /// pauses them.
    fn run_past(vm: &Vm, after: u64) {
        let start = Instant::now();
        loop {
            vm.resume_vcpus(&mut vm.lock());
            std::thread::sleep(Duration::from_millis(20));
            vm.pause_vcpus(&mut vm.lock());
            if counter(vm) > after + 2 {
                return;
            }
            assert!(start.elapsed() < TIMEOUT, "the guest did not run");
        }
    }

    #[test]
    fn machine_state_moves_a_running_guest_to_another_vm() {
        let Some((a, a_threads)) = running_vm(2) else {
            return;
        };
        let Some((b, b_threads)) = running_vm(2) else {
            return;
        };
        start_loop(&a);
        run_past(&a, 0);
        let saved = a.save_machine_state(&mut a.lock()).unwrap();
        let json = serde_json::to_string(&saved).unwrap();
        let state: MachineState = serde_json::from_str(&json).unwrap();
        assert_eq!(serde_json::to_string(&state).unwrap(), json);
        let count = saved.vcpus[0].regs.rax;
        assert!(count > 2);
        // The POST code is the counter's low byte, unless the pause came between the
        // increment and the OUT.
        let code = saved.devices.port80.last_code.map(u64::from);
        assert!(
            code == Some(count & 0xff) || code == Some((count - 1) & 0xff),
            "POST code {code:?}, counter {count}"
        );

        let mut ram = vec![0u8; MIB as usize];
        a.read_guest_memory(0, &mut ram).unwrap();
        b.memory().write_slice(&ram, GuestAddress(0)).unwrap();
        b.restore_machine_state(&mut b.lock(), &state).unwrap();
        assert_eq!(counter(&b), count);
        let restored = b.save_machine_state(&mut b.lock()).unwrap();
        assert_eq!(restored.devices, saved.devices);
        assert_eq!(restored.vcpus[1].mp_state, saved.vcpus[1].mp_state);
        assert_eq!(restored.vcpus[0].regs, saved.vcpus[0].regs);

        // B picks up where A stopped.
        run_past(&b, count);
        stop(&a, a_threads);
        stop(&b, b_threads);
    }

    #[test]
    fn mismatched_or_unpaused_machines_are_refused() {
        let Some((one, one_threads)) = running_vm(1) else {
            return;
        };
        let Some((two, two_threads)) = running_vm(2) else {
            return;
        };
        let state = two.save_machine_state(&mut two.lock()).unwrap();
        let err = one
            .restore_machine_state(&mut one.lock(), &state)
            .unwrap_err();
        assert!(
            matches!(err, SnapshotError::VcpuCount { saved: 2, ours: 1 }),
            "{err}"
        );
        let mut swapped = state.clone();
        swapped.vcpus.swap(0, 1);
        let err = two
            .restore_machine_state(&mut two.lock(), &swapped)
            .unwrap_err();
        assert!(
            matches!(
                err,
                SnapshotError::VcpuOrder {
                    position: 0,
                    saved: 1
                }
            ),
            "{err}"
        );
        let mut bad_device = state.clone();
        bad_device.devices.cmos.ram.truncate(3);
        let err = two
            .restore_machine_state(&mut two.lock(), &bad_device)
            .unwrap_err();
        assert!(err.to_string().contains("CMOS"), "{err}");

        stop(&one, one_threads);
        let err = one.save_machine_state(&mut one.lock()).unwrap_err();
        assert!(
            matches!(err, SnapshotError::NotPaused { index: 0 }),
            "{err}"
        );
        stop(&two, two_threads);
    }
}
