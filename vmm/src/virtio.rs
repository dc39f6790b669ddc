//! The virtio devices of the machine: opening them from the configuration, placing their
//! virtio-mmio transports on the MMIO bus, their migration state, and the event-loop
//! subscriber that serves their queue notifications (ioeventfds) and tap input.
//!
//! Device `N` (disks first, then network interfaces, then the RNG) gets the register window
//! and GSI of [`virtio_mmio_slot`]`(N)`. Its interrupt is an irqfd; each of its queues has an
//! ioeventfd on the `QueueNotify` register with the queue index as datamatch, so a guest kick
//! never exits to the vCPU thread.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

use devices::bus::{Bus, BusError, DeviceId};
use devices::virtio::block::{Block, BlockConfig, BlockError, BlockState, BlockStats};
use devices::virtio::mmio::{MmioError, MmioTransport, MmioTransportState};
use devices::virtio::net::{Net, NetState, Tap, TapError};
use devices::virtio::rng::{Rng, RngState};
use devices::virtio::{GuestMemory, VirtioDevice, VirtioInterrupt};
use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::acpi::VirtioMmioWindow;
use crate::arch::layout::virtio_mmio_slot;
use crate::config::VmConfig;
use crate::machine::Machine;
use crate::vm::Vm;

/// A disk's transport.
pub type BlockTransport = MmioTransport<Block, EventFd>;
/// A network interface's transport.
pub type NetTransport = MmioTransport<Net<Tap>, EventFd>;
/// The RNG's transport.
pub type RngTransport = MmioTransport<Rng, EventFd>;

/// Errors opening or placing the virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum VirtioSetupError {
    /// A disk image could not be opened.
    #[error("--disk {name}: {source}")]
    Block {
        /// The disk's name.
        name: String,
        /// The error.
        source: BlockError,
    },
    /// A tap could not be opened.
    #[error("--net {name}: {source}")]
    Tap {
        /// The interface's name.
        name: String,
        /// The error.
        source: TapError,
    },
    /// More devices than slots.
    #[error("too many virtio devices: no slot for device {0}")]
    NoSlot(usize),
    /// A window does not fit the bus.
    #[error("cannot place a virtio device: {0}")]
    Bus(#[from] BusError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// An opened device model, not yet on the bus.
pub enum VirtioModel {
    /// virtio-blk.
    Block(Block),
    /// virtio-net on a tap.
    Net(Net<Tap>),
    /// virtio-rng.
    Rng(Rng),
}

/// A device to place: its name (QMP's `device`) and model.
pub struct VirtioSpec {
    /// The name: the `id=` given, or `diskN`, `netN`, `rng0`.
    pub name: String,
    /// The model.
    pub model: VirtioModel,
}

/// Opens the devices `config` asks for, in slot order: disks, network interfaces, RNG.
pub fn open_devices(config: &VmConfig) -> Result<Vec<VirtioSpec>, VirtioSetupError> {
    let mut specs = Vec::new();
    for (disk, name) in config.disks.iter().zip(config.disk_names()) {
        let block = Block::open(&BlockConfig {
            path: disk.path.clone(),
            read_only: disk.read_only,
            id: Some(name.clone()),
        })
        .map_err(|source| VirtioSetupError::Block {
            name: name.clone(),
            source,
        })?;
        specs.push(VirtioSpec {
            name,
            model: VirtioModel::Block(block),
        });
    }
    for (net, name) in config.nets.iter().zip(config.net_names()) {
        let tap = Tap::open(&net.tap).map_err(|source| VirtioSetupError::Tap {
            name: name.clone(),
            source,
        })?;
        specs.push(VirtioSpec {
            name,
            model: VirtioModel::Net(Net::new(tap, net.mac)),
        });
    }
    if config.rng {
        specs.push(VirtioSpec {
            name: "rng0".to_string(),
            model: VirtioModel::Rng(Rng::new()),
        });
    }
    Ok(specs)
}

/// The windows (base, GSI) of `count` devices, for the DSDT and the command line.
pub fn windows(count: usize) -> Vec<VirtioMmioWindow> {
    (0..count)
        .filter_map(virtio_mmio_slot)
        .filter_map(|(base, gsi)| {
            Some(VirtioMmioWindow {
                base: u32::try_from(base).ok()?,
                gsi,
            })
        })
        .collect()
}

/// Which transport a slot holds.
#[derive(Debug, Clone, Copy)]
pub enum VirtioHandle {
    /// A disk.
    Block(DeviceId<BlockTransport>),
    /// A network interface.
    Net(DeviceId<NetTransport>),
    /// The RNG.
    Rng(DeviceId<RngTransport>),
}

/// A placed virtio device.
#[derive(Debug)]
pub struct VirtioSlot {
    /// Its name.
    pub name: String,
    /// Base of its register window.
    pub base: u64,
    /// Its GSI.
    pub gsi: u32,
    /// Its transport on the MMIO bus.
    pub handle: VirtioHandle,
    /// One ioeventfd per queue, in queue order (the VMM registers them with KVM).
    pub notify: Vec<EventFd>,
}

/// What the machine needs from a transport, whatever its device.
pub trait TransportOps {
    /// A queue notification.
    fn notify(&mut self, queue: u32);
    /// Back-end input is ready.
    fn backend_ready(&mut self);
    /// A device reset.
    fn reset_device(&mut self);
}

impl<D: VirtioDevice, I: VirtioInterrupt> TransportOps for MmioTransport<D, I> {
    fn notify(&mut self, queue: u32) {
        self.notify_queue(queue);
    }

    fn backend_ready(&mut self) {
        self.process_backend();
    }

    fn reset_device(&mut self) {
        self.reset();
    }
}

/// The transport of `handle` on `bus`, as [`TransportOps`].
pub fn ops_mut(bus: &mut Bus, handle: VirtioHandle) -> Option<&mut dyn TransportOps> {
    Some(match handle {
        VirtioHandle::Block(id) => bus.get_mut(id)?,
        VirtioHandle::Net(id) => bus.get_mut(id)?,
        VirtioHandle::Rng(id) => bus.get_mut(id)?,
    })
}

/// Whether the network interface in `handle` should have its tap polled: the driver is up
/// and no received frame is waiting for a buffer.
pub fn net_wants_input(bus: &Bus, handle: VirtioHandle) -> bool {
    match handle {
        VirtioHandle::Net(id) => bus
            .get(id)
            .is_some_and(|t| t.is_activated() && !t.device().rx_blocked()),
        _ => false,
    }
}

/// One eventfd per queue of a device with `queues` queues.
fn queue_eventfds(queues: usize) -> Result<Vec<EventFd>, VirtioSetupError> {
    (0..queues)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(VirtioSetupError::EventFd))
        .collect()
}

/// Puts `spec` on `bus` as device number `index`; returns the slot and the interrupt's
/// eventfd to register as an irqfd on the slot's GSI.
pub fn place(
    bus: &mut Bus,
    index: usize,
    spec: VirtioSpec,
    mem: &GuestMemory,
) -> Result<(VirtioSlot, EventFd), VirtioSetupError> {
    let (base, gsi) = virtio_mmio_slot(index).ok_or(VirtioSetupError::NoSlot(index))?;
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VirtioSetupError::EventFd)?;
    let for_device = irq.try_clone().map_err(VirtioSetupError::EventFd)?;
    let size = devices::virtio::mmio::VIRTIO_MMIO_SIZE;
    let (handle, queues) = match spec.model {
        VirtioModel::Block(d) => {
            let queues = d.queue_max_sizes().len();
            let t = MmioTransport::new(d, mem.clone(), for_device);
            (VirtioHandle::Block(bus.insert(t, base, size)?), queues)
        }
        VirtioModel::Net(d) => {
            let queues = d.queue_max_sizes().len();
            let t = MmioTransport::new(d, mem.clone(), for_device);
            (VirtioHandle::Net(bus.insert(t, base, size)?), queues)
        }
        VirtioModel::Rng(d) => {
            let queues = d.queue_max_sizes().len();
            let t = MmioTransport::new(d, mem.clone(), for_device);
            (VirtioHandle::Rng(bus.insert(t, base, size)?), queues)
        }
    };
    let slot = VirtioSlot {
        name: spec.name,
        base,
        gsi,
        handle,
        notify: queue_eventfds(queues)?,
    };
    Ok((slot, irq))
}

/// A transport's saved state, by device type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "state", rename_all = "lowercase")]
pub enum TransportState {
    /// A disk.
    Block(MmioTransportState<BlockState>),
    /// A network interface.
    Net(MmioTransportState<NetState>),
    /// The RNG.
    Rng(MmioTransportState<RngState>),
}

/// A virtio device's migration state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VirtioDeviceState {
    /// The device's name (must match on the destination).
    pub name: String,
    /// Base of its window (must match on the destination).
    pub base: u64,
    /// The transport's and device's state.
    pub transport: TransportState,
}

/// Errors restoring the virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum VirtioStateError {
    /// The saved devices are not this machine's.
    #[error("the saved virtio devices ({saved}) do not match this machine's ({actual})")]
    Mismatch {
        /// The saved devices.
        saved: String,
        /// This machine's.
        actual: String,
    },
    /// A transport refused its state.
    #[error("virtio device {name}: {source}")]
    Transport {
        /// The device.
        name: String,
        /// The error.
        source: MmioError,
    },
}

/// Lists devices as `name(type)@base`, for error messages.
fn describe<'a>(devices: impl Iterator<Item = (&'a str, &'static str, u64)>) -> String {
    let list: Vec<String> = devices
        .map(|(name, kind, base)| format!("{name}({kind})@{base:#x}"))
        .collect();
    if list.is_empty() {
        "none".to_string()
    } else {
        list.join(", ")
    }
}

impl VirtioHandle {
    /// The device type's name.
    pub fn kind(&self) -> &'static str {
        match self {
            VirtioHandle::Block(_) => "block",
            VirtioHandle::Net(_) => "net",
            VirtioHandle::Rng(_) => "rng",
        }
    }
}

impl TransportState {
    /// The device type's name.
    pub fn kind(&self) -> &'static str {
        match self {
            TransportState::Block(_) => "block",
            TransportState::Net(_) => "net",
            TransportState::Rng(_) => "rng",
        }
    }
}

/// Saves one slot's transport; `None` if it is missing from the bus.
pub fn save_slot(bus: &Bus, slot: &VirtioSlot) -> Option<VirtioDeviceState> {
    let transport = match slot.handle {
        VirtioHandle::Block(id) => TransportState::Block(bus.get(id)?.save_state()),
        VirtioHandle::Net(id) => TransportState::Net(bus.get(id)?.save_state()),
        VirtioHandle::Rng(id) => TransportState::Rng(bus.get(id)?.save_state()),
    };
    Some(VirtioDeviceState {
        name: slot.name.clone(),
        base: slot.base,
        transport,
    })
}

/// Checks that `saved` describes exactly the devices in `slots` (names, types, windows).
pub fn check_matches(
    slots: &[VirtioSlot],
    saved: &[VirtioDeviceState],
) -> Result<(), VirtioStateError> {
    let same = slots.len() == saved.len()
        && slots.iter().zip(saved).all(|(slot, state)| {
            slot.name == state.name
                && slot.base == state.base
                && slot.handle.kind() == state.transport.kind()
        });
    if same {
        return Ok(());
    }
    Err(VirtioStateError::Mismatch {
        saved: describe(
            saved
                .iter()
                .map(|s| (s.name.as_str(), s.transport.kind(), s.base)),
        ),
        actual: describe(
            slots
                .iter()
                .map(|s| (s.name.as_str(), s.handle.kind(), s.base)),
        ),
    })
}

/// Restores one slot's transport (after [`check_matches`]).
pub fn restore_slot(
    bus: &mut Bus,
    slot: &VirtioSlot,
    state: &VirtioDeviceState,
) -> Result<(), VirtioStateError> {
    let err = |source| VirtioStateError::Transport {
        name: slot.name.clone(),
        source,
    };
    let missing = || VirtioStateError::Mismatch {
        saved: slot.name.clone(),
        actual: "no such device on the bus".to_string(),
    };
    match (slot.handle, &state.transport) {
        (VirtioHandle::Block(id), TransportState::Block(s)) => {
            bus.get_mut(id).ok_or_else(missing)?.restore_state(s)
        }
        (VirtioHandle::Net(id), TransportState::Net(s)) => {
            bus.get_mut(id).ok_or_else(missing)?.restore_state(s)
        }
        (VirtioHandle::Rng(id), TransportState::Rng(s)) => {
            bus.get_mut(id).ok_or_else(missing)?.restore_state(s)
        }
        _ => return Err(missing()),
    }
    .map_err(err)
}

/// A disk as `query-block` and `query-blockstats` report it.
#[derive(Debug, Clone)]
pub struct DiskInfo {
    /// The disk's name.
    pub name: String,
    /// The image path.
    pub path: String,
    /// Whether it is read-only.
    pub read_only: bool,
    /// Its size in bytes.
    pub size: u64,
    /// Its counters.
    pub stats: BlockStats,
}

/// The disk in `slot`, if it holds one.
pub fn disk_info(bus: &Bus, slot: &VirtioSlot) -> Option<DiskInfo> {
    let VirtioHandle::Block(id) = slot.handle else {
        return None;
    };
    let block = bus.get(id)?.device();
    Some(DiskInfo {
        name: slot.name.clone(),
        path: block.path().display().to_string(),
        read_only: block.read_only(),
        size: block.capacity_sectors() << 9,
        stats: block.stats().clone(),
    })
}

/// Event token of the re-arm eventfd.
const TOKEN_REARM: u32 = u32::MAX;
/// Event tokens from here on are taps (token - base = index in `taps`).
const TOKEN_TAP_BASE: u32 = 1 << 24;

/// A tap the subscriber may poll.
struct TapWatch {
    fd: RawFd,
    slot: usize,
    watched: bool,
}

/// The event-loop subscriber of the virtio devices: queue notifications (ioeventfds) and tap
/// input, each handled under the big lock.
///
/// A tap is polled only while its device is activated and has no received frame waiting
/// for a guest buffer (otherwise its readability would wake the loop forever); whether to
/// poll is re-checked after every event of this subscriber and when the machine signals its
/// re-arm eventfd (after a restore or reset).
pub struct VirtioEvents {
    vm: Arc<Vm>,
    notifies: Vec<(EventFd, usize, u32)>,
    taps: Vec<TapWatch>,
    rearm: EventFd,
}

impl VirtioEvents {
    /// Collects the eventfds and taps of the machine's virtio devices; `None` without any.
    pub fn new(vm: Arc<Vm>) -> std::io::Result<Option<Self>> {
        let machine = vm.lock();
        if machine.virtio.is_empty() {
            return Ok(None);
        }
        let mut notifies = Vec::new();
        let mut taps = Vec::new();
        for (index, slot) in machine.virtio.iter().enumerate() {
            for (queue, fd) in slot.notify.iter().enumerate() {
                notifies.push((fd.try_clone()?, index, queue as u32));
            }
            if let VirtioHandle::Net(id) = slot.handle {
                if let Some(t) = machine.mmio.get(id) {
                    taps.push(TapWatch {
                        fd: t.device().backend().as_raw_fd(),
                        slot: index,
                        watched: false,
                    });
                }
            }
        }
        let rearm = machine.virtio_rearm.try_clone()?;
        drop(machine);
        Ok(Some(Self {
            vm,
            notifies,
            taps,
            rearm,
        }))
    }

    fn handle_notify(&self, index: usize) {
        let Some((fd, slot, queue)) = self.notifies.get(index) else {
            return;
        };
        // Drained under the big lock: a migration's save (`complete_pending`, under the same
        // lock) then either finds the kick still in the eventfd or sees its requests done.
        // Read first, the kick could be taken here, wait for the lock while the state is
        // saved without it, and be processed on the source after the save: lost.
        let mut machine = self.vm.lock();
        if fd.read().is_err() {
            return; // Already drained (e.g. by a migration's save).
        }
        machine.virtio_notify(*slot, *queue);
    }

    fn handle_tap(&self, index: usize) {
        let Some(tap) = self.taps.get(index) else {
            return;
        };
        self.vm.lock().virtio_backend_ready(tap.slot);
    }

    /// Polls each tap exactly when its device can take input.
    fn update_taps(&mut self, ops: &mut EventOps) {
        let machine = self.vm.lock();
        for (i, tap) in self.taps.iter_mut().enumerate() {
            let Some(slot) = machine.virtio.get(tap.slot) else {
                continue;
            };
            // A stopped guest takes no input: its tap is not watched until it runs.
            let want =
                machine.run_state.is_running() && net_wants_input(&machine.mmio, slot.handle);
            if want == tap.watched {
                continue;
            }
            let token = TOKEN_TAP_BASE + i as u32;
            let events = Events::with_data_raw(tap.fd, token, EventSet::IN);
            let result = if want {
                ops.add(events)
            } else {
                ops.remove(events)
            };
            match result {
                Ok(()) => tap.watched = want,
                Err(e) => log::error!("virtio-net: cannot (un)watch the tap: {e:?}"),
            }
        }
    }
}

impl MutEventSubscriber for VirtioEvents {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_REARM => {
                let _ = self.rearm.read();
            }
            token if token >= TOKEN_TAP_BASE => self.handle_tap((token - TOKEN_TAP_BASE) as usize),
            token => self.handle_notify(token as usize),
        }
        self.update_taps(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (token, (fd, _, _)) in self.notifies.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(fd, token as u32, EventSet::IN)) {
                log::error!("cannot watch a virtio queue notification: {e:?}");
            }
        }
        if let Err(e) = ops.add(Events::with_data(&self.rearm, TOKEN_REARM, EventSet::IN)) {
            log::error!("cannot watch the virtio re-arm event: {e:?}");
        }
        self.update_taps(ops);
    }
}

/// Drains the ioeventfds of `slots` and processes the notifications that were pending, so no
/// request is left half-seen (before a migration's device save). Returns whether any was.
pub fn complete_pending(machine: &mut Machine) -> bool {
    let mut pending = Vec::new();
    for (index, slot) in machine.virtio.iter().enumerate() {
        for (queue, fd) in slot.notify.iter().enumerate() {
            if fd.read().is_ok() {
                pending.push((index, queue as u32));
            }
        }
    }
    for (index, queue) in &pending {
        machine.virtio_notify(*index, *queue);
    }
    !pending.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::DevicesState;
    use devices::legacy::SerialOutput;
    use devices::power::PowerControl;
    use vm_memory::GuestAddress;

    fn machine(mem: &GuestMemory, specs: Vec<VirtioSpec>) -> Machine {
        let power = Arc::new(PowerControl::new().unwrap());
        let (mut m, _) = Machine::new(&power, SerialOutput::Sink, 1 << 24, 0, 1, true).unwrap();
        let lines = m.add_virtio(mem, specs).unwrap();
        assert_eq!(
            lines.iter().map(|(_, gsi)| *gsi).collect::<Vec<_>>(),
            (0..m.virtio.len())
                .map(|i| virtio_mmio_slot(i).unwrap().1)
                .collect::<Vec<_>>()
        );
        m
    }

    fn rng() -> VirtioSpec {
        VirtioSpec {
            name: "rng0".into(),
            model: VirtioModel::Rng(Rng::new()),
        }
    }

    fn write(m: &mut Machine, addr: u64, value: u32) {
        m.mmio.write(addr, &value.to_le_bytes());
    }

    /// Brings the RNG at `base` to DRIVER_OK with queue 0 at 0x10000.
    fn activate(m: &mut Machine, base: u64) {
        for (reg, value) in [
            (0x70, 1),
            (0x70, 3),
            (0x24, 1),
            (0x20, 1),
            (0x70, 0xb),
            (0x30, 0),
            (0x38, 8),
            (0x80, 0x10000),
            (0x90, 0x11000),
            (0xa0, 0x12000),
            (0x44, 1),
            (0x70, 0xf),
        ] {
            write(m, base + reg, value);
        }
    }

    #[test]
    fn state_moves_between_machines_and_old_streams_still_load() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut source = machine(&mem, vec![rng()]);
        let base = source.virtio[0].base;
        activate(&mut source, base);
        // A kick left in the ioeventfd is processed before the save.
        source.virtio[0].notify[0].write(1).unwrap();
        assert!(complete_pending(&mut source));
        assert!(!complete_pending(&mut source));
        let saved = source.save_devices().unwrap();
        assert_eq!(saved.virtio.len(), 1);
        let TransportState::Rng(rng_state) = &saved.virtio[0].transport else {
            panic!("not an rng: {saved:?}");
        };
        assert!(rng_state.activated && rng_state.queues[0].ready);

        let json = serde_json::to_string(&saved).unwrap();
        let loaded: DevicesState = serde_json::from_str(&json).unwrap();
        let mut dest = machine(&mem, vec![rng()]);
        dest.restore_devices(&loaded).unwrap();
        assert_eq!(dest.save_devices().unwrap(), saved);

        // A stream from a machine without virtio devices has no "virtio" member.
        let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
        value.as_object_mut().unwrap().remove("virtio");
        let old: DevicesState = serde_json::from_value(value).unwrap();
        assert!(old.virtio.is_empty());
        // ... and does not fit a machine with one.
        let err = dest.restore_devices(&old).unwrap_err();
        assert!(err.to_string().contains("do not match"), "{err}");
    }

    #[test]
    fn mismatched_devices_are_refused_before_anything_changes() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let source = machine(&mem, vec![rng()]);
        let mut saved = source.save_devices().unwrap();
        saved.virtio[0].name = "other".into();
        let mut dest = machine(&mem, vec![rng()]);
        let err = dest.restore_devices(&saved).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the saved virtio devices (other(rng)@0xc0001000) do not match this machine's \
             (rng0(rng)@0xc0001000)"
        );
    }

    #[test]
    fn windows_follow_the_slots() {
        assert_eq!(
            windows(2),
            vec![
                VirtioMmioWindow {
                    base: 0xc000_1000,
                    gsi: 5
                },
                VirtioMmioWindow {
                    base: 0xc000_2000,
                    gsi: 6
                }
            ]
        );
    }
}
