//! Building a VM from its configuration and running it: vCPU threads plus the event loop on
//! the calling thread. [`VmController`] is the library API to pause, resume and end it.

use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use devices::legacy::serial::COM1_GSI;
use devices::legacy::SerialOutput;
use devices::power::{PowerControl, PowerRequest};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::terminal::Terminal;

use crate::arch::layout::MMIO_GAP_START;
use crate::config::{SerialConfig, VmConfig};
use crate::kvm_vm::{KvmVm, VmError};
use crate::loader::{GuestImage, LoaderError};
use crate::machine::{Machine, MachineError};
use crate::memory::{self, MemoryError};
use crate::runstate::RunState;
use crate::serial_backend::{self, SerialBackend};
use crate::vcpu::{self, Vcpu, VcpuError};
use crate::vm::{Vm, VmOpError};

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
    /// Wiring an interrupt.
    #[error("cannot connect the serial interrupt: {0}")]
    Irqfd(kvm_ioctls::Error),
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
}

/// The eventfd the termination signal handler writes to (-1 until the event loop runs).
static SIGNAL_EVENT_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn handle_terminate(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let fd = SIGNAL_EVENT_FD.load(Ordering::Acquire);
    if fd >= 0 {
        let one = 1u64.to_ne_bytes();
        // SAFETY: write(2) is async-signal-safe; the buffer is a live 8-byte array and the fd
        // is the VM's control eventfd, open for as long as the event loop runs.
        unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
    }
}

/// A VM built from a [`VmConfig`], ready to run.
pub struct Vmm {
    vm: Arc<Vm>,
    vcpus: Vec<Vcpu>,
    serial: SerialConfig,
    exit_on_internal_error: bool,
    no_reboot: bool,
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

impl Vmm {
    /// Builds the VM: guest memory, KVM VM, devices, vCPUs, and the guest loaded and ready
    /// at its entry point. Nothing runs until [`Vmm::run`].
    pub fn new(config: VmConfig) -> Result<Self, Error> {
        let image = GuestImage {
            kernel: config.kernel.clone(),
            initrd: config.initrd.clone(),
            cmdline: config.cmdline.clone(),
            mem_size: config.memory_bytes,
            num_cpus: config.cpus,
        };
        let mem = memory::create_guest_memory(config.memory_bytes)?;
        let kvm = KvmVm::new(&mem)?;
        let entry = crate::loader::load_guest(&mem, &image)?;

        let power = Arc::new(PowerControl::new()?);
        let below_4g = config.memory_bytes.min(MMIO_GAP_START);
        let above_4g = config.memory_bytes - below_4g;
        let (machine, serial_irq) = Machine::new(
            &power,
            serial_output(&config.serial)?,
            below_4g,
            above_4g,
            usize::from(config.cpus),
            config.start_paused,
        )?;
        kvm.fd()
            .register_irqfd(&serial_irq, COM1_GSI)
            .map_err(Error::Irqfd)?;

        let mut vcpus = Vec::with_capacity(usize::from(config.cpus));
        for index in 0..config.cpus {
            let vcpu = Vcpu::new(&kvm, index, config.cpus)?;
            vcpu.configure_boot(entry)?;
            vcpus.push(vcpu);
        }
        let vm = Arc::new(Vm::new(machine, power, mem, kvm, image)?);
        // The irqfd keeps its own reference to the eventfd's file; ours can go.
        drop(serial_irq);
        Ok(Vmm {
            vm,
            vcpus,
            serial: config.serial,
            exit_on_internal_error: config.qmp.is_empty(),
            no_reboot: config.no_reboot,
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
            exit_on_internal_error,
            no_reboot,
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
            exit_on_internal_error,
            no_reboot,
        })));
        if let Some(backend) = serial_backend_for(&vm, &serial)? {
            event_manager.add_subscriber(Arc::new(Mutex::new(backend)));
        }
        install_terminate_handlers(&vm);

        let threads = spawn_vcpu_threads(&vm, vcpus)?;
        let code = loop {
            event_manager
                .run()
                .map_err(|e| Error::EventLoop(format!("{e:?}")))?;
            if let Some(code) = vm.lock().exit_code {
                break code;
            }
        };
        SIGNAL_EVENT_FD.store(-1, Ordering::Release);
        drop(vm.stop_vcpu_threads(vm.lock()));
        for thread in threads {
            if thread.join().is_err() {
                log::error!("a vCPU thread panicked");
            }
        }
        Ok(code)
    }
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

fn install_terminate_handlers(vm: &Vm) {
    use std::os::fd::AsRawFd;
    SIGNAL_EVENT_FD.store(vm.control_event().as_raw_fd(), Ordering::Release);
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(signal, handle_terminate) {
            log::warn!("cannot handle signal {signal}: {e}");
        }
    }
}

fn spawn_vcpu_threads(vm: &Arc<Vm>, vcpus: Vec<Vcpu>) -> Result<Vec<JoinHandle<()>>, Error> {
    let mut threads = Vec::with_capacity(vcpus.len());
    for vcpu in vcpus {
        let index = vcpu.index();
        let thread_vm = vm.clone();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || vcpu::run_vcpu(vcpu, thread_vm))
            .map_err(|source| VcpuError::Spawn { index, source })?;
        vm.kick(usize::from(index))
            .set_thread(handle.as_pthread_t());
        threads.push(handle);
    }
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

/// Acts on what devices, vCPUs and controllers ask of the whole VM: reset, power-off, exit,
/// internal errors.
struct ControlHandler {
    vm: Arc<Vm>,
    exit_on_internal_error: bool,
    no_reboot: bool,
}

impl ControlHandler {
    fn end(&self, code: i32) {
        let mut machine = self.vm.pause_vcpus(self.vm.lock());
        machine.run_state = RunState::Shutdown;
        machine.exit_code.get_or_insert(code);
    }

    fn handle_power(&self) {
        let _ = self.vm.power().eventfd().read();
        let machine = self.vm.lock();
        let Some(request) = self.vm.power().take() else {
            return;
        };
        log::info!("guest requested {request:?}");
        match request {
            PowerRequest::Reset if !self.no_reboot => match self.vm.reset_guest(machine) {
                Ok(_) => {}
                Err(e) => {
                    log::error!("guest reset failed: {e}");
                    self.vm.request_exit(1);
                }
            },
            PowerRequest::Reset | PowerRequest::Poweroff => {
                drop(machine);
                self.end(0);
            }
            PowerRequest::Exit(code) => {
                drop(machine);
                self.end(i32::from(code));
            }
        }
    }

    fn handle_vcpu_event(&self) {
        let _ = self.vm.vcpu_event().read();
        let mut machine = self.vm.lock();
        if !std::mem::take(&mut machine.internal_error) {
            return;
        }
        let mut machine = self.vm.pause_vcpus(machine);
        machine.run_state = RunState::InternalError;
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
            TOKEN_CONTROL => {
                let signalled = self.vm.control_event().read().is_ok();
                let requested = self.vm.lock().exit_code.is_some();
                if signalled && !requested {
                    log::info!("terminating on signal");
                    self.end(0);
                }
            }
            other => log::warn!("control: unexpected event token {other}"),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let fds = [
            (self.vm.power().eventfd(), TOKEN_POWER),
            (self.vm.vcpu_event(), TOKEN_VCPU),
            (self.vm.control_event(), TOKEN_CONTROL),
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
    /// Stops all vCPUs; returns once none runs guest code. Pausing a paused VM does nothing.
    pub fn pause(&self) -> Result<(), Error> {
        let machine = self.vm.lock();
        match machine.run_state {
            RunState::Running => {
                let mut machine = self.vm.pause_vcpus(machine);
                machine.run_state = RunState::Paused;
                Ok(())
            }
            RunState::Paused | RunState::Prelaunch => Ok(()),
            other => Err(Error::BadState(other)),
        }
    }

    /// Lets a paused or never-started VM run.
    pub fn resume(&self) -> Result<(), Error> {
        let mut machine = self.vm.lock();
        match machine.run_state {
            RunState::Paused | RunState::Prelaunch => {
                machine.run_state = RunState::Running;
                self.vm.resume_vcpus(&mut machine);
                Ok(())
            }
            RunState::Running => Ok(()),
            other => Err(Error::BadState(other)),
        }
    }

    /// The VM's run state.
    pub fn run_state(&self) -> RunState {
        self.vm.lock().run_state
    }

    /// Copies guest RAM at guest-physical `addr` into `buf`.
    pub fn read_guest_memory(&self, addr: u64, buf: &mut [u8]) -> Result<(), Error> {
        Ok(self.vm.read_guest_memory(addr, buf)?)
    }

    /// Ends the VM: [`Vmm::run`] returns `Ok(0)`.
    pub fn quit(&self) {
        self.vm.request_exit(0);
    }
}
