//! The big VMM lock and what it protects: the device model (PIO and MMIO buses), the VM run
//! state and the vCPUs' run requests. Like QEMU's BQL, vCPU threads run KVM_RUN without it and
//! take it only to emulate an exit; the event loop takes it to serve device back-ends.

use std::sync::Arc;
use std::time::Duration;

use devices::acpi::{
    AcpiPmDevice, AcpiPmState, GedDevice, GedState, ACPI_GED_GSI, ACPI_PM_PORT_LEN,
};
use devices::bus::{Bus, BusError, DeviceId};
use devices::legacy::cmos::{CmosState, CMOS_PORT_BASE, CMOS_PORT_LEN};
use devices::legacy::exit::{EXIT_DEVICE_PORT, EXIT_DEVICE_PORT_LEN};
use devices::legacy::i8042::{I8042State, I8042_PORT_BASE, I8042_PORT_LEN};
use devices::legacy::port80::{Port80State, PORT80_PORT_BASE, PORT80_PORT_LEN};
use devices::legacy::serial::{SerialDeviceState, COM1_PORT_BASE, COM1_PORT_LEN};
use devices::state::DeviceStateError;
use serde::{Deserialize, Serialize};

use crate::arch::layout::{ACPI_GED_SIZE, ACPI_GED_START, ACPI_PM_PORT};
use devices::legacy::serial::COM1_GSI;
use devices::legacy::{
    CmosDevice, ExitDevice, I8042Device, Port80Device, SerialDevice, SerialOutput,
};
use devices::power::PowerControl;
use vmm_sys_util::eventfd::EventFd;

use crate::runstate::RunState;
use crate::vcpu::VcpuSlot;
use crate::virtio::{
    self, DiskInfo, VirtioDeviceState, VirtioSetupError, VirtioSlot, VirtioSpec, VirtioStateError,
};
use crate::vm::VmAction;
use devices::virtio::GuestMemory;

/// Errors while building the device model.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// A device could not be placed on a bus.
    #[error("cannot place a device on the bus: {0}")]
    Bus(#[from] BusError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    /// A device is not on its bus (a bug: the machine always builds it).
    #[error("the {0} device is missing from the machine")]
    MissingDevice(&'static str),
    /// A saved device state was refused.
    #[error(transparent)]
    DeviceState(#[from] DeviceStateError),
    /// A virtio device could not be set up.
    #[error(transparent)]
    Virtio(#[from] VirtioSetupError),
    /// A saved virtio device state was refused.
    #[error(transparent)]
    VirtioState(#[from] VirtioStateError),
}

/// The state of every stateful device, for a snapshot or a migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DevicesState {
    /// COM1.
    pub serial: SerialDeviceState,
    /// The PS/2 controller.
    pub i8042: I8042State,
    /// The RTC's CMOS RAM and index.
    pub cmos: CmosState,
    /// The POST code port.
    pub port80: Port80State,
    /// The ACPI Generic Event Device.
    pub ged: GedState,
    /// The ACPI sleep and reset registers.
    pub acpi_pm: AcpiPmState,
    /// The virtio devices, in slot order (absent from streams of machines without any).
    #[serde(default)]
    pub virtio: Vec<VirtioDeviceState>,
}

impl DevicesState {
    /// Checks every device's state, so a restore changes nothing unless all of it is valid.
    pub fn validate(&self) -> Result<(), DeviceStateError> {
        self.serial.validate()?;
        self.i8042.validate()?;
        self.cmos.validate()?;
        self.ged.validate()?;
        self.acpi_pm.validate()
    }
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
    /// The RTC and CMOS RAM.
    pub cmos: DeviceId<CmosDevice>,
    /// The POST code port.
    pub port80: DeviceId<Port80Device>,
    /// The ACPI Generic Event Device (power button).
    pub ged: DeviceId<GedDevice>,
    /// The ACPI sleep and reset registers.
    pub acpi_pm: DeviceId<AcpiPmDevice>,
    /// The VM's run state.
    pub run_state: RunState,
    /// One slot per vCPU: what it was asked to do and what it is doing.
    pub vcpus: Vec<VcpuSlot>,
    /// Set when the VMM should end, with the process exit status.
    pub exit_code: Option<i32>,
    /// Whole-VM actions waiting for the event loop.
    pub actions: Vec<VmAction>,
    /// Set by a vCPU that hit a KVM internal error, until the event loop handles it.
    pub internal_error: bool,
    /// The virtio devices, in slot order.
    pub virtio: Vec<VirtioSlot>,
    /// Written when the virtio devices' state changed behind the event loop's back (restore,
    /// reset), so it re-checks which taps to poll.
    pub virtio_rearm: EventFd,
}

impl Machine {
    /// Builds the device model. Returns the machine and its interrupt lines: an eventfd per
    /// GSI, to register as irqfds.
    pub fn new(
        power: &Arc<PowerControl>,
        serial_output: SerialOutput,
        mem_below_4g: u64,
        mem_above_4g: u64,
        num_vcpus: usize,
        start_paused: bool,
    ) -> Result<(Self, Vec<(EventFd, u32)>), MachineError> {
        // One eventfd per interrupt line: the VMM registers one end as an irqfd, the device
        // signals the other.
        let line = || -> Result<(EventFd, EventFd), MachineError> {
            let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(MachineError::EventFd)?;
            let for_device = irq.try_clone().map_err(MachineError::EventFd)?;
            Ok((irq, for_device))
        };
        let (serial_irq, serial_irq_for_device) = line()?;
        let (ged_irq, ged_irq_for_device) = line()?;
        let serial = SerialDevice::new(serial_irq_for_device, serial_output)
            .map_err(MachineError::EventFd)?;

        let mut pio = Bus::new("pio");
        let serial = pio.insert(serial, u64::from(COM1_PORT_BASE), COM1_PORT_LEN)?;
        let i8042 = pio.insert(
            I8042Device::new(power.clone()),
            u64::from(I8042_PORT_BASE),
            I8042_PORT_LEN,
        )?;
        let cmos = pio.insert(
            CmosDevice::new(mem_below_4g, mem_above_4g),
            u64::from(CMOS_PORT_BASE),
            CMOS_PORT_LEN,
        )?;
        let port80 = pio.insert(
            Port80Device::new(),
            u64::from(PORT80_PORT_BASE),
            PORT80_PORT_LEN,
        )?;
        pio.insert(
            ExitDevice::new(power.clone()),
            u64::from(EXIT_DEVICE_PORT),
            EXIT_DEVICE_PORT_LEN,
        )?;
        let acpi_pm = pio.insert(
            AcpiPmDevice::new(power.clone()),
            u64::from(ACPI_PM_PORT),
            ACPI_PM_PORT_LEN,
        )?;
        let mut mmio = Bus::new("mmio");
        let ged = mmio.insert(
            GedDevice::new(ged_irq_for_device),
            ACPI_GED_START,
            ACPI_GED_SIZE,
        )?;

        let run_state = if start_paused {
            RunState::Prelaunch
        } else {
            RunState::Running
        };
        let vcpus = (0..num_vcpus)
            .map(|_| VcpuSlot::new(start_paused))
            .collect();
        let virtio_rearm = EventFd::new(libc::EFD_NONBLOCK).map_err(MachineError::EventFd)?;
        Ok((
            Machine {
                pio,
                mmio,
                serial,
                i8042,
                cmos,
                port80,
                ged,
                acpi_pm,
                run_state,
                vcpus,
                exit_code: None,
                actions: Vec::new(),
                internal_error: false,
                virtio: Vec::new(),
                virtio_rearm,
            },
            vec![(serial_irq, COM1_GSI), (ged_irq, ACPI_GED_GSI)],
        ))
    }

    /// Places the virtio devices on the MMIO bus, in slot order, with `mem` as the guest
    /// memory they access. Returns their interrupt lines (eventfd, GSI) to register as irqfds;
    /// their queue ioeventfds are in [`Machine::virtio`].
    pub fn add_virtio(
        &mut self,
        mem: &GuestMemory,
        specs: Vec<VirtioSpec>,
    ) -> Result<Vec<(EventFd, u32)>, MachineError> {
        let mut lines = Vec::with_capacity(specs.len());
        for spec in specs {
            let index = self.virtio.len();
            let (slot, irq) = virtio::place(&mut self.mmio, index, spec, mem)?;
            log::info!(
                "virtio {} ({}) at {:#x}, GSI {}",
                slot.name,
                slot.handle.kind(),
                slot.base,
                slot.gsi
            );
            lines.push((irq, slot.gsi));
            self.virtio.push(slot);
        }
        Ok(lines)
    }

    /// Handles a notification of queue `queue` of virtio device `index`.
    pub fn virtio_notify(&mut self, index: usize, queue: u32) {
        let Some(handle) = self.virtio.get(index).map(|s| s.handle) else {
            return;
        };
        if let Some(t) = virtio::ops_mut(&mut self.mmio, handle) {
            t.notify(queue);
        }
    }

    /// Lets virtio device `index` take its back end's input. A guest that is not running
    /// takes none (as in QEMU): the input waits in the back end until it runs again, so a
    /// migration's saved device state stays what the destination gets.
    pub fn virtio_backend_ready(&mut self, index: usize) {
        if !self.run_state.is_running() {
            return;
        }
        let Some(handle) = self.virtio.get(index).map(|s| s.handle) else {
            return;
        };
        if let Some(t) = virtio::ops_mut(&mut self.mmio, handle) {
            t.backend_ready();
        }
    }

    /// The disks, for `query-block` and `query-blockstats`.
    pub fn disks(&self) -> Vec<DiskInfo> {
        self.virtio
            .iter()
            .filter_map(|slot| virtio::disk_info(&self.mmio, slot))
            .collect()
    }

    /// Asks the virtio event handler to re-check which back ends to watch (after a device,
    /// or the run state, changed).
    pub fn rearm_virtio(&self) {
        if !self.virtio.is_empty() {
            if let Err(e) = self.virtio_rearm.write(1) {
                log::warn!("cannot signal the virtio event handler: {e}");
            }
        }
    }

    /// COM1, for back-ends feeding input or attaching outputs.
    pub fn serial_mut(&mut self) -> Option<&mut SerialDevice> {
        self.pio.get_mut(self.serial)
    }

    /// Presses the ACPI power button: latches the event in the GED and raises its interrupt.
    pub fn press_power_button(&mut self) {
        if let Some(ged) = self.mmio.get_mut(self.ged) {
            if let Err(e) = ged.notify_power_button() {
                log::error!("cannot signal the power button: {e}");
            }
        }
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
        if let Some(ged) = self.mmio.get_mut(self.ged) {
            ged.reset();
        }
        if let Some(acpi_pm) = self.pio.get_mut(self.acpi_pm) {
            acpi_pm.reset();
        }
        for handle in self.virtio.iter().map(|s| s.handle).collect::<Vec<_>>() {
            if let Some(t) = virtio::ops_mut(&mut self.mmio, handle) {
                t.reset_device();
            }
        }
        self.rearm_virtio();
    }
}

impl Machine {
    /// Saves the state of every stateful device (with the vCPUs paused). Call
    /// [`virtio::complete_pending`] first so no queue notification is left unprocessed.
    pub fn save_devices(&self) -> Result<DevicesState, MachineError> {
        let virtio = self
            .virtio
            .iter()
            .map(|slot| {
                virtio::save_slot(&self.mmio, slot).ok_or(MachineError::MissingDevice("virtio"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(DevicesState {
            virtio,
            serial: device(&self.pio, self.serial, "serial")?.state(),
            i8042: device(&self.pio, self.i8042, "i8042")?.state(),
            cmos: device(&self.pio, self.cmos, "CMOS")?.state(),
            port80: device(&self.pio, self.port80, "port 0x80")?.state(),
            ged: device(&self.mmio, self.ged, "GED")?.state(),
            acpi_pm: device(&self.pio, self.acpi_pm, "ACPI PM")?.state(),
        })
    }

    /// Puts every device in its saved state. The whole state is checked first: on an error
    /// no device has changed.
    pub fn restore_devices(&mut self, state: &DevicesState) -> Result<(), MachineError> {
        state.validate()?;
        virtio::check_matches(&self.virtio, &state.virtio)?;
        device_mut(&mut self.pio, self.serial, "serial")?.restore(&state.serial)?;
        device_mut(&mut self.pio, self.i8042, "i8042")?.restore(&state.i8042)?;
        device_mut(&mut self.pio, self.cmos, "CMOS")?.restore(&state.cmos)?;
        device_mut(&mut self.pio, self.port80, "port 0x80")?.restore(&state.port80);
        device_mut(&mut self.mmio, self.ged, "GED")?.restore(&state.ged)?;
        device_mut(&mut self.pio, self.acpi_pm, "ACPI PM")?.restore(&state.acpi_pm)?;
        for (slot, saved) in self.virtio.iter().zip(&state.virtio) {
            virtio::restore_slot(&mut self.mmio, slot, saved)?;
        }
        self.rearm_virtio();
        Ok(())
    }
}

/// The device behind `id` on `bus`, or [`MachineError::MissingDevice`] naming it.
fn device<'a, T: devices::bus::BusDevice>(
    bus: &'a Bus,
    id: DeviceId<T>,
    name: &'static str,
) -> Result<&'a T, MachineError> {
    bus.get(id).ok_or(MachineError::MissingDevice(name))
}

/// The device behind `id` on `bus`, mutably, or [`MachineError::MissingDevice`] naming it.
fn device_mut<'a, T: devices::bus::BusDevice>(
    bus: &'a mut Bus,
    id: DeviceId<T>,
    name: &'static str,
) -> Result<&'a mut T, MachineError> {
    bus.get_mut(id).ok_or(MachineError::MissingDevice(name))
}

/// The big lock held: access to the [`Machine`].
pub type MachineGuard<'a> = parking_lot::MutexGuard<'a, Machine>;

/// The big VMM lock: a mutex around the [`Machine`] plus the condition variable threads wait
/// on for run-state changes (vCPUs parking, the event loop waiting for them), always with the
/// lock released while waiting.
pub struct BigLock {
    machine: parking_lot::Mutex<Machine>,
    changed: parking_lot::Condvar,
}

impl BigLock {
    /// Wraps a machine.
    pub fn new(machine: Machine) -> Self {
        BigLock {
            machine: parking_lot::Mutex::new(machine),
            changed: parking_lot::Condvar::new(),
        }
    }

    /// Takes the lock.
    pub fn lock(&self) -> MachineGuard<'_> {
        self.machine.lock()
    }

    /// Releases the lock until [`BigLock::notify_all`] or the timeout, then retakes it.
    pub fn wait_timeout(&self, guard: &mut MachineGuard<'_>, timeout: Duration) {
        self.changed.wait_for(guard, timeout);
    }

    /// Releases the lock until [`BigLock::notify_all`], then retakes it.
    pub fn wait(&self, guard: &mut MachineGuard<'_>) {
        self.changed.wait(guard);
    }

    /// Wakes every thread waiting on the lock's condition.
    pub fn notify_all(&self) {
        self.changed.notify_all();
    }
}
