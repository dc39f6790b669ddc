//! The big VMM lock and what it protects: the device model (PIO and MMIO buses), the VM run
//! state and the vCPUs' run requests. Like QEMU's BQL, vCPU threads run KVM_RUN without it and
//! take it only to emulate an exit; the event loop takes it to serve device back-ends.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use devices::bus::{Bus, BusError, DeviceId};
use devices::legacy::cmos::{CMOS_PORT_BASE, CMOS_PORT_LEN};
use devices::legacy::exit::{EXIT_DEVICE_PORT, EXIT_DEVICE_PORT_LEN};
use devices::legacy::i8042::{I8042_PORT_BASE, I8042_PORT_LEN};
use devices::legacy::port80::{PORT80_PORT_BASE, PORT80_PORT_LEN};
use devices::legacy::serial::{COM1_PORT_BASE, COM1_PORT_LEN};
use devices::legacy::{
    CmosDevice, ExitDevice, I8042Device, Port80Device, SerialDevice, SerialOutput,
};
use devices::power::PowerControl;
use vmm_sys_util::eventfd::EventFd;

use crate::runstate::RunState;
use crate::vcpu::VcpuSlot;

/// Errors while building the device model.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// A device could not be placed on a bus.
    #[error("cannot place a device on the bus: {0}")]
    Bus(#[from] BusError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
}

/// Everything behind the big lock.
pub struct Machine {
    /// Port I/O bus.
    pub pio: Bus,
    /// Memory-mapped I/O bus.
    pub mmio: Bus,
    /// COM1.
    pub serial: DeviceId<SerialDevice>,
    /// The PS/2 controller (reset line).
    pub i8042: DeviceId<I8042Device>,
    /// The VM's run state.
    pub run_state: RunState,
    /// One slot per vCPU: what it was asked to do and what it is doing.
    pub vcpus: Vec<VcpuSlot>,
    /// Set when the VMM should end, with the process exit status.
    pub exit_code: Option<i32>,
    /// Set by a vCPU that hit a KVM internal error, until the event loop handles it.
    pub internal_error: bool,
}

impl Machine {
    /// Builds the legacy device model. Returns the machine and the eventfd that raises COM1's
    /// interrupt (to register as an irqfd).
    pub fn new(
        power: &Arc<PowerControl>,
        serial_output: SerialOutput,
        mem_below_4g: u64,
        mem_above_4g: u64,
        num_vcpus: usize,
        start_paused: bool,
    ) -> Result<(Self, EventFd), MachineError> {
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(MachineError::EventFd)?;
        let serial_irq_for_device = serial_irq.try_clone().map_err(MachineError::EventFd)?;
        let serial = SerialDevice::new(serial_irq_for_device, serial_output)
            .map_err(MachineError::EventFd)?;

        let mut pio = Bus::new("pio");
        let serial = pio.insert(serial, u64::from(COM1_PORT_BASE), COM1_PORT_LEN)?;
        let i8042 = pio.insert(
            I8042Device::new(power.clone()),
            u64::from(I8042_PORT_BASE),
            I8042_PORT_LEN,
        )?;
        pio.insert(
            CmosDevice::new(mem_below_4g, mem_above_4g),
            u64::from(CMOS_PORT_BASE),
            CMOS_PORT_LEN,
        )?;
        pio.insert(
            Port80Device::new(),
            u64::from(PORT80_PORT_BASE),
            PORT80_PORT_LEN,
        )?;
        pio.insert(
            ExitDevice::new(power.clone()),
            u64::from(EXIT_DEVICE_PORT),
            EXIT_DEVICE_PORT_LEN,
        )?;
        let mmio = Bus::new("mmio");

        let run_state = if start_paused {
            RunState::Prelaunch
        } else {
            RunState::Running
        };
        let vcpus = (0..num_vcpus)
            .map(|_| VcpuSlot::new(start_paused))
            .collect();
        Ok((
            Machine {
                pio,
                mmio,
                serial,
                i8042,
                run_state,
                vcpus,
                exit_code: None,
                internal_error: false,
            },
            serial_irq,
        ))
    }

    /// COM1, for back-ends feeding input or attaching outputs.
    pub fn serial_mut(&mut self) -> Option<&mut SerialDevice> {
        self.pio.get_mut(self.serial)
    }

    /// Puts the devices that a guest reset affects back in their power-on state. CMOS RAM
    /// keeps its contents, as on real hardware.
    pub fn reset_devices(&mut self) {
        if let Some(serial) = self.pio.get_mut(self.serial) {
            serial.reset();
        }
        if let Some(i8042) = self.pio.get_mut(self.i8042) {
            i8042.reset();
        }
    }
}

/// The big VMM lock: a mutex around the [`Machine`] plus the condition variable threads wait
/// on for run-state changes (vCPUs parking, the event loop waiting for them), always with the
/// lock released while waiting.
pub struct BigLock {
    machine: Mutex<Machine>,
    changed: Condvar,
}

impl BigLock {
    /// Wraps a machine.
    pub fn new(machine: Machine) -> Self {
        BigLock {
            machine: Mutex::new(machine),
            changed: Condvar::new(),
        }
    }

    /// Takes the lock. A thread that panicked while holding it does not make the VM
    /// unusable: the machine is still consistent between exits.
    pub fn lock(&self) -> MutexGuard<'_, Machine> {
        self.machine.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Releases the lock until [`BigLock::notify_all`] or the timeout, then retakes it.
    pub fn wait_timeout<'a>(
        &self,
        guard: MutexGuard<'a, Machine>,
        timeout: Duration,
    ) -> MutexGuard<'a, Machine> {
        match self.changed.wait_timeout(guard, timeout) {
            Ok((guard, _)) => guard,
            Err(e) => e.into_inner().0,
        }
    }

    /// Releases the lock until [`BigLock::notify_all`], then retakes it.
    pub fn wait<'a>(&self, guard: MutexGuard<'a, Machine>) -> MutexGuard<'a, Machine> {
        self.changed.wait(guard).unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes every thread waiting on the lock's condition.
    pub fn notify_all(&self) {
        self.changed.notify_all();
    }
}
