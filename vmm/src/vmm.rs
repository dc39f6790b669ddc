//! Building a VM from its configuration and running it: vCPU threads plus the event loop on
//! the calling thread. [`VmController`] is the library API to pause, resume and end it.

use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use api::{Event, ShutdownCause};
use devices::legacy::SerialOutput;
use devices::power::{PowerControl, PowerRequest};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use qmp::{QmpServer, ServerConfig};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::terminal::Terminal;

use crate::arch::layout::MMIO_GAP_START;
use crate::config::{Incoming, SerialConfig, VmConfig};
use crate::kvm_vm::{KvmVm, VmError};
use crate::loader::{GuestImage, LoaderError};
use crate::machine::{Machine, MachineError, MachineGuard};
use crate::memory::{self, MemoryError};
use crate::migration::uri::{Listener, UriError};
use crate::migration::{self, MigrationState};
use crate::monitor::{OobContext, QmpDispatcher, PACKAGE, QEMU_VERSION};
use crate::runstate::RunState;
use crate::serial_backend::{self, SerialBackend};
use crate::vcpu::{self, Vcpu, VcpuError};
use crate::virtio::{self, VirtioEvents, VirtioSetupError};
use crate::vm::{Vm, VmAction, VmOpError};
use devices::virtio::mmio::QUEUE_NOTIFY_OFFSET;
use kvm_ioctls::IoEventAddress;

/// Errors that stop a VM from being built or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// KVM VM creation.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Loading the guest.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// The device model.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// A vCPU.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A whole-VM operation.
    #[error(transparent)]
    VmOp(#[from] VmOpError),
    /// The QMP server could not start.
    #[error("cannot start the QMP monitor: {0}")]
    Qmp(#[from] qmp::ServerError),
    /// Wiring an interrupt.
    #[error("cannot connect interrupt line GSI {gsi}: {source}")]
    Irqfd {
        /// The line.
        gsi: u32,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
    /// A serial back-end could not be opened.
    #[error("cannot open the serial back-end {what}: {source}")]
    Serial {
        /// Which back-end.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The event loop failed.
    #[error("event loop: {0}")]
    EventLoop(String),
    /// Some other OS resource could not be created.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The VM is not in a state that allows the operation.
    #[error("the VM is {0}")]
    BadState(RunState),
    /// `--incoming` could not listen.
    #[error("--incoming: {0}")]
    Incoming(#[from] UriError),
    /// The incoming migration could not start.
    #[error("--incoming: {0}")]
    Migration(String),
    /// The configuration is inconsistent.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A virtio device could not be opened.
    #[error(transparent)]
    Virtio(#[from] VirtioSetupError),
    /// Wiring a queue notification.
    #[error("cannot register the ioeventfd of virtio {name} queue {queue}: {source}")]
    Ioeventfd {
        /// The device.
        name: String,
        /// The queue.
        queue: usize,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
}

/// The eventfd the termination signal handler writes to (-1 while there is none).
static SIGNAL_EVENT_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn handle_terminate(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let fd = SIGNAL_EVENT_FD.load(Ordering::Acquire);
    if fd >= 0 {
        let one = 1u64.to_ne_bytes();
        // SAFETY: write(2) is async-signal-safe; the buffer is a live 8-byte array and the fd
        // is a TerminateSignal's eventfd, open until that value dropped and reset this.
        unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
    }
}

/// A VM built from a [`VmConfig`], ready to run.
pub struct Vmm {
    vm: Arc<Vm>,
    vcpus: Vec<Vcpu>,
    serial: SerialConfig,
    qmp: Option<(QmpServer, Arc<OobContext>)>,
    signal: TerminateSignal,
    no_reboot: bool,
    incoming: Option<Listener>,
}

fn serial_output(config: &SerialConfig) -> Result<SerialOutput, Error> {
    Ok(match config {
        SerialConfig::Stdio => SerialOutput::Stdout(std::io::stdout()),
        SerialConfig::File(path) => SerialOutput::File(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| Error::Serial {
                    what: path.display().to_string(),
                    source,
                })?,
        ),
        SerialConfig::Unix(_) => SerialOutput::Socket(None),
        SerialConfig::None => SerialOutput::Sink,
    })
}

/// Starts the QMP monitors first of all, so clients get their greeting while the VM is still
/// being built; in-band commands wait for the event loop.
fn start_qmp(
    config: &VmConfig,
    migration: &Arc<MigrationState>,
) -> Result<Option<(QmpServer, Arc<OobContext>)>, Error> {
    if config.qmp.is_empty() {
        return Ok(None);
    }
    let (major, minor, micro) = QEMU_VERSION;
    let server = QmpServer::start(
        ServerConfig {
            addrs: config.qmp.clone(),
            version: qmp::VersionInfo {
                major: major as u32,
                minor: minor as u32,
                micro: micro as u32,
                package: PACKAGE.to_string(),
            },
        },
        Arc::new(api::Commands(OobContext::new(migration.clone()))),
    )?;
    Ok(Some((server, Arc::new(OobContext::new(migration.clone())))))
}

impl Vmm {
    /// Builds the VM: QMP monitors, guest memory, KVM VM, devices, vCPUs, and the guest
    /// loaded at its entry point. Nothing runs until [`Vmm::run`].
    pub fn new(config: VmConfig) -> Result<Self, Error> {
        // Termination signals are caught before anything else (QMP clients may connect from
        // here on); one that arrives before the event loop runs is handled when it starts.
        let signal = TerminateSignal::install()?;
        let migration = Arc::new(MigrationState::new());
        let qmp = start_qmp(&config, &migration)?;
        // The incoming address is taken before anything else, so a bad one fails start-up.
        let incoming = match &config.incoming {
            Some(Incoming::Uri(uri)) => {
                // `fd:N` on the command line: the descriptor N Skiff inherited (QEMU's too).
                if let Some(number) = uri.fd_name() {
                    uri.attach_fd(migration::inherited::take(number)?, false)?;
                }
                Some(uri.listen()?)
            }
            _ => None,
        };
        migration.set_autostart(!config.start_paused);
        config.check_devices()?;
        let virtio_specs = virtio::open_devices(&config)?;
        let image = GuestImage {
            kernel: config.kernel.clone(),
            initrd: config.initrd.clone(),
            cmdline: config.cmdline.clone(),
            mem_size: config.memory_bytes,
            num_cpus: config.cpus,
            virtio: virtio::windows(virtio_specs.len()),
        };
        let mem = memory::create_guest_memory(config.memory_bytes)?;
        if config.mem_prealloc {
            memory::populate_guest_memory(&mem)?;
            migration.note_ram_preallocated();
        }
        let kvm = KvmVm::new(&mem)?;
        // An incoming VM gets its RAM and registers from the migration stream.
        let entry = match config.incoming {
            None => Some(crate::loader::load_guest(&mem, &image)?),
            Some(_) => None,
        };

        let power = Arc::new(PowerControl::new()?);
        let below_4g = config.memory_bytes.min(MMIO_GAP_START);
        let above_4g = config.memory_bytes - below_4g;
        let (mut machine, mut irq_lines) = Machine::new(
            &power,
            serial_output(&config.serial)?,
            below_4g,
            above_4g,
            usize::from(config.cpus),
            config.start_paused || config.incoming.is_some(),
        )?;
        irq_lines.extend(machine.add_virtio(&mem, virtio_specs)?);
        register_ioeventfds(&kvm, &machine)?;
        for (irq, gsi) in &irq_lines {
            kvm.fd()
                .register_irqfd(irq, *gsi)
                .map_err(|source| Error::Irqfd { gsi: *gsi, source })?;
        }

        let mut vcpus = Vec::with_capacity(usize::from(config.cpus));
        for index in 0..config.cpus {
            let vcpu = Vcpu::new(&kvm, index, config.cpus)?;
            if let Some(entry) = entry {
                vcpu.configure_boot(entry)?;
            }
            vcpus.push(vcpu);
        }
        let vm = Arc::new(Vm::new(
            machine,
            power,
            mem,
            kvm,
            image,
            config.name,
            migration,
        )?);
        if config.incoming.is_some() {
            vm.lock().run_state = RunState::Inmigrate;
        }
        // Each irqfd keeps its own reference to its eventfd's file; ours can go.
        drop(irq_lines);
        if let Some((server, _)) = &qmp {
            let vm_server = server.clone();
            vm.set_event_sink(Box::new(move |event: Event| {
                vm_server.emit_event(event.name(), event.data());
            }));
            let server = server.clone();
            vm.migration().set_event_sink(Box::new(move |event: Event| {
                log::info!("event {}", event.name());
                server.emit_event(event.name(), event.data());
            }));
        }
        Ok(Vmm {
            vm,
            vcpus,
            serial: config.serial,
            qmp,
            signal,
            no_reboot: config.no_reboot,
            incoming,
        })
    }

    /// A handle to control the VM from other threads.
    pub fn controller(&self) -> VmController {
        VmController {
            vm: self.vm.clone(),
        }
    }

    /// Runs the VM until it ends; returns the process exit status it asks for.
    pub fn run(self) -> Result<i32, Error> {
        let Vmm {
            vm,
            vcpus,
            serial,
            qmp,
            signal,
            no_reboot,
            incoming,
        } = self;
        vcpu::install_kick_handler()?;
        let _terminal = match serial {
            SerialConfig::Stdio => TerminalGuard::raw_if_tty(),
            _ => None,
        };
        let mut event_manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
            .map_err(|e| Error::EventLoop(format!("{e:?}")))?;
        event_manager.add_subscriber(Arc::new(Mutex::new(ControlHandler {
            vm: vm.clone(),
            signal,
            exit_on_internal_error: qmp.is_none(),
            no_reboot,
        })));
        if let Some(handler) = VirtioEvents::new(vm.clone())? {
            event_manager.add_subscriber(Arc::new(Mutex::new(handler)));
        }
        if let Some(backend) = serial_backend_for(&vm, &serial)? {
            event_manager.add_subscriber(Arc::new(Mutex::new(backend)));
        }
        if let Some((server, oob)) = &qmp {
            event_manager.add_subscriber(Arc::new(Mutex::new(QmpDispatcher::new(
                vm.clone(),
                server.clone(),
                oob.clone(),
            ))));
        }

        let threads = spawn_vcpu_threads(&vm, vcpus)?;
        if let Some(listener) = incoming {
            migration::dest::start(vm.clone(), listener, true).map_err(Error::Migration)?;
        }
        let result = loop {
            if let Err(e) = event_manager.run() {
                break Err(Error::EventLoop(format!("{e:?}")));
            }
            if let Some(code) = vm.lock().exit_code {
                break Ok(code);
            }
        };
        vm.stop_vcpu_threads(&mut vm.lock());
        for thread in threads {
            if thread.join().is_err() {
                log::error!("a vCPU thread panicked");
            }
        }
        if let Some((server, _)) = qmp {
            server.shutdown();
        }
        result
    }
}

/// Registers each virtio queue's ioeventfd on its device's `QueueNotify` register, with the
/// queue index as datamatch.
fn register_ioeventfds(kvm: &KvmVm, machine: &Machine) -> Result<(), Error> {
    for slot in &machine.virtio {
        let addr = IoEventAddress::Mmio(slot.base + QUEUE_NOTIFY_OFFSET);
        for (queue, fd) in slot.notify.iter().enumerate() {
            kvm.fd()
                .register_ioevent(fd, &addr, queue as u32)
                .map_err(|source| Error::Ioeventfd {
                    name: slot.name.clone(),
                    queue,
                    source,
                })?;
        }
    }
    Ok(())
}

fn serial_backend_for(vm: &Arc<Vm>, serial: &SerialConfig) -> Result<Option<SerialBackend>, Error> {
    let input_ready = {
        let mut machine = vm.lock();
        match machine.serial_mut() {
            Some(serial) => serial.input_ready_event().try_clone()?,
            None => return Ok(None),
        }
    };
    Ok(match serial {
        SerialConfig::Stdio => Some(SerialBackend::stdin(
            vm.clone(),
            input_ready,
            std::io::stdin().is_terminal(),
        )),
        SerialConfig::Unix(path) => {
            let listener = serial_backend::bind_socket(path).map_err(|source| Error::Serial {
                what: path.display().to_string(),
                source,
            })?;
            Some(SerialBackend::socket(
                vm.clone(),
                input_ready,
                listener,
                path.clone(),
            ))
        }
        SerialConfig::File(_) | SerialConfig::None => None,
    })
}

/// SIGTERM, SIGINT and SIGHUP turned into an eventfd the event loop watches. Dropping it
/// detaches the handler from the eventfd before the eventfd closes.
struct TerminateSignal {
    event: EventFd,
}

impl TerminateSignal {
    fn install() -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let event = EventFd::new(libc::EFD_NONBLOCK)?;
        SIGNAL_EVENT_FD.store(event.as_raw_fd(), Ordering::Release);
        for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            if let Err(e) = vmm_sys_util::signal::register_signal_handler(signal, handle_terminate)
            {
                log::warn!("cannot handle signal {signal}: {e}");
            }
        }
        Ok(TerminateSignal { event })
    }
}

impl Drop for TerminateSignal {
    fn drop(&mut self) {
        SIGNAL_EVENT_FD.store(-1, Ordering::Release);
    }
}

fn spawn_vcpu_threads(vm: &Arc<Vm>, vcpus: Vec<Vcpu>) -> Result<Vec<JoinHandle<()>>, Error> {
    let mut threads = Vec::with_capacity(vcpus.len());
    // Each thread reports once it has published its thread id, so that monitors asking for
    // vCPU thread ids (query-cpus-fast) never see a vCPU without one.
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    for vcpu in vcpus {
        let index = vcpu.index();
        let thread_vm = vm.clone();
        let started = started_tx.clone();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || vcpu::run_vcpu(vcpu, thread_vm, started))
            .map_err(|source| VcpuError::Spawn { index, source })?;
        vm.kick(usize::from(index))
            .set_thread(handle.as_pthread_t());
        threads.push(handle);
    }
    drop(started_tx);
    // Ends early only if a thread died before reporting; its join then reports it.
    for _ in started_rx.iter().take(threads.len()) {}
    Ok(threads)
}

/// Puts a terminal stdin in raw mode and restores canonical mode when dropped.
struct TerminalGuard;

impl TerminalGuard {
    fn raw_if_tty() -> Option<Self> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        match stdin.lock().set_raw_mode() {
            Ok(()) => Some(TerminalGuard),
            Err(e) => {
                log::warn!("cannot put the terminal in raw mode: {e}");
                None
            }
        }
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        if let Err(e) = std::io::stdin().lock().set_canon_mode() {
            log::warn!("cannot restore the terminal: {e}");
        }
    }
}

const TOKEN_POWER: u32 = 0;
const TOKEN_VCPU: u32 = 1;
const TOKEN_CONTROL: u32 = 2;
const TOKEN_SIGNAL: u32 = 3;

/// Carries out what the guest (through devices and vCPUs), the host (QMP, the library,
/// signals) asks of the whole VM: reset, power button, shutdown, internal errors.
struct ControlHandler {
    vm: Arc<Vm>,
    signal: TerminateSignal,
    exit_on_internal_error: bool,
    no_reboot: bool,
}

impl ControlHandler {
    fn act(&self, machine: &mut MachineGuard<'_>, action: VmAction) {
        match action {
            // With --no-reboot every reset, the guest's or the host's, ends the VMM (QEMU's
            // -no-reboot does the same).
            VmAction::Reset { guest, reason } if !self.no_reboot => {
                match self.vm.reset_guest(machine) {
                    Ok(()) => self.vm.emit(Event::Reset { guest, reason }),
                    Err(e) => {
                        log::error!("guest reset failed: {e}");
                        self.shut_down(machine, false, ShutdownCause::HostError, 1);
                    }
                }
            }
            VmAction::Reset { guest, reason } => self.shut_down(machine, guest, reason, 0),
            VmAction::Shutdown {
                guest,
                reason,
                code,
            } => self.shut_down(machine, guest, reason, code),
            VmAction::Powerdown => {
                self.vm.emit(Event::Powerdown);
                self.vm.press_power_button(machine);
            }
        }
    }

    fn shut_down(
        &self,
        machine: &mut MachineGuard<'_>,
        guest: bool,
        reason: ShutdownCause,
        code: i32,
    ) {
        if machine.exit_code.is_some() {
            return;
        }
        self.vm.pause_vcpus(machine);
        machine.run_state = RunState::Shutdown;
        machine.exit_code = Some(code);
        self.vm.emit(Event::Shutdown { guest, reason });
    }

    fn handle_power(&self) {
        let _ = self.vm.power().eventfd().read();
        let mut machine = self.vm.lock();
        let Some(request) = self.vm.power().take() else {
            return;
        };
        log::info!("guest requested {request:?}");
        let action = match request {
            PowerRequest::Reset => VmAction::Reset {
                guest: true,
                reason: ShutdownCause::GuestReset,
            },
            PowerRequest::Poweroff => VmAction::Shutdown {
                guest: true,
                reason: ShutdownCause::GuestShutdown,
                code: 0,
            },
            PowerRequest::Exit(code) => VmAction::Shutdown {
                guest: true,
                reason: ShutdownCause::GuestShutdown,
                code: i32::from(code),
            },
        };
        self.act(&mut machine, action);
    }

    fn handle_actions(&self) {
        let _ = self.vm.control_event().read();
        let mut machine = self.vm.lock();
        for action in std::mem::take(&mut machine.actions) {
            self.act(&mut machine, action);
        }
    }

    fn handle_vcpu_event(&self) {
        let _ = self.vm.vcpu_event().read();
        let mut machine = self.vm.lock();
        if !std::mem::take(&mut machine.internal_error) {
            return;
        }
        self.vm.pause_vcpus(&mut machine);
        machine.run_state = RunState::InternalError;
        self.vm.emit(Event::Stop);
        if self.exit_on_internal_error {
            machine.exit_code.get_or_insert(1);
        }
    }
}

impl MutEventSubscriber for ControlHandler {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            TOKEN_POWER => self.handle_power(),
            TOKEN_VCPU => self.handle_vcpu_event(),
            TOKEN_CONTROL => self.handle_actions(),
            TOKEN_SIGNAL => {
                let _ = self.signal.event.read();
                log::warn!("terminating on signal");
                let mut machine = self.vm.lock();
                self.shut_down(&mut machine, false, ShutdownCause::HostSignal, 0);
            }
            other => log::warn!("control: unexpected event token {other}"),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let fds = [
            (self.vm.power().eventfd(), TOKEN_POWER),
            (self.vm.vcpu_event(), TOKEN_VCPU),
            (self.vm.control_event(), TOKEN_CONTROL),
            (&self.signal.event, TOKEN_SIGNAL),
        ];
        for (fd, token) in fds {
            if let Err(e) = ops.add(Events::with_data(fd, token, EventSet::IN)) {
                log::error!("cannot watch a control event: {e:?}");
            }
        }
    }
}

/// Controls a VM from any thread: the library API behind QMP's stop, cont and quit.
#[derive(Clone)]
pub struct VmController {
    vm: Arc<Vm>,
}

impl VmController {
    /// Stops all vCPUs (emitting STOP); returns once none runs guest code. Pausing a stopped
    /// VM does nothing.
    pub fn pause(&self) -> Result<(), Error> {
        self.vm.stop(&mut self.vm.lock());
        Ok(())
    }

    /// Lets a paused or never-started VM run (emitting RESUME).
    pub fn resume(&self) -> Result<(), Error> {
        let mut machine = self.vm.lock();
        self.vm
            .cont(&mut machine)
            .map_err(|_| Error::BadState(machine.run_state))
    }

    /// The VM's run state.
    pub fn run_state(&self) -> RunState {
        self.vm.lock().run_state
    }

    /// Copies guest RAM at guest-physical `addr` into `buf`.
    pub fn read_guest_memory(&self, addr: u64, buf: &mut [u8]) -> Result<(), Error> {
        Ok(self.vm.read_guest_memory(addr, buf)?)
    }

    /// Ends the VM as QMP `quit` does: [`Vmm::run`] returns `Ok(0)`.
    pub fn quit(&self) {
        let mut machine = self.vm.lock();
        self.vm.request(
            &mut machine,
            VmAction::Shutdown {
                guest: false,
                reason: ShutdownCause::HostQmpQuit,
                code: 0,
            },
        );
    }
}
