//! vCPU threads. Each runs KVM_RUN without any lock and takes the big lock only to emulate an
//! exit. Other threads stop a vCPU by setting its request under the big lock, raising its
//! `attention` flag and kicking it with a signal whose handler sets `immediate_exit`, so the
//! vCPU leaves (or never enters) KVM_RUN and parks on the big lock's condition variable.

use std::cell::Cell;
use std::ptr;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use devices::power::PowerRequest;
use kvm_bindings::{
    kvm_mp_state, kvm_run, kvm_vcpu_events, kvm_xcrs, Msrs, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::{cpuid, regs};
use crate::kvm_vm::KvmVm;
use crate::loader::BootEntry;
use crate::machine::Machine;
use crate::vm::Vm;

/// Longest x86 instruction, in bytes.
const MAX_INSTRUCTION_LEN: usize = 15;
/// MSR holding the local APIC base and its enable/BSP bits.
const MSR_IA32_APICBASE: u32 = 0x1b;
/// Bounds the KVM_RUN calls needed to finish an emulated instruction before parking.
const MAX_COMPLETION_RUNS: usize = 64;

/// Errors of a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A vCPU ioctl failed.
    #[error("vCPU {index}: {step}: {source}")]
    Kvm {
        /// The vCPU.
        index: u8,
        /// What was being done.
        step: &'static str,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
    /// Setting the boot registers failed.
    #[error("vCPU {index}: {source}")]
    Regs {
        /// The vCPU.
        index: u8,
        /// What failed.
        source: regs::RegsError,
    },
    /// The vCPU thread could not be started.
    #[error("cannot start the thread of vCPU {index}: {source}")]
    Spawn {
        /// The vCPU.
        index: u8,
        /// The OS error.
        source: std::io::Error,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    SignalHandler(vmm_sys_util::errno::Error),
}

/// What a vCPU has been asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuRequest {
    /// Run guest code.
    Run,
    /// Park with no exit half-emulated.
    Pause,
    /// End the thread.
    Exit,
}

/// What a vCPU reports doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuState {
    /// Created, thread not yet at its first request check.
    Starting,
    /// Running guest code (or about to).
    Running,
    /// Parked.
    Paused,
    /// Thread finished.
    Exited,
}

/// Work a paused or running vCPU thread performs on its own vCPU the next time it looks at its
/// requests (KVM requires some vCPU ioctls to come from the vCPU's thread to be race-free).
pub type VcpuWork = Box<dyn FnOnce(&mut Vcpu) -> Result<(), VcpuError> + Send>;

/// A vCPU's entry in the machine, under the big lock.
pub struct VcpuSlot {
    /// What it was asked to do.
    pub request: VcpuRequest,
    /// What it last reported.
    pub state: VcpuState,
    /// Work queued for its thread.
    pub work: Vec<VcpuWork>,
}

impl VcpuSlot {
    /// A slot for a vCPU about to start, paused or not.
    pub fn new(start_paused: bool) -> Self {
        VcpuSlot {
            request: if start_paused {
                VcpuRequest::Pause
            } else {
                VcpuRequest::Run
            },
            state: VcpuState::Starting,
            work: Vec::new(),
        }
    }
}

/// Lock-free per-vCPU signalling: the attention flag the vCPU checks before each KVM_RUN and
/// the thread to signal.
pub struct VcpuKick {
    attention: AtomicBool,
    thread: OnceLock<libc::pthread_t>,
    tid: OnceLock<i32>,
}

impl Default for VcpuKick {
    /// A new vCPU's kick handle, with attention set: the vCPU looks at its request before its
    /// first KVM_RUN (it may have been created paused).
    fn default() -> Self {
        VcpuKick {
            attention: AtomicBool::new(true),
            thread: OnceLock::new(),
            tid: OnceLock::new(),
        }
    }
}

impl VcpuKick {
    /// Makes the vCPU look at its requests: sets the attention flag and, once its thread runs,
    /// signals it so KVM_RUN returns (or is not entered).
    pub fn kick(&self) {
        self.attention.store(true, Ordering::Release);
        if let Some(thread) = self.thread.get() {
            // SAFETY: the thread id belongs to a vCPU thread that the VMM joins only after the
            // thread reported `Exited`, and callers only kick threads not yet exited.
            unsafe {
                libc::pthread_kill(*thread, vmm_sys_util::signal::SIGRTMIN());
            }
        }
    }

    /// Sets the attention flag without signalling (the vCPU is known not to be in KVM_RUN,
    /// or is the caller itself).
    pub fn request_attention(&self) {
        self.attention.store(true, Ordering::Release);
    }

    /// Whether the vCPU must look at its requests before entering KVM_RUN again.
    pub fn needs_attention(&self) -> bool {
        self.attention.load(Ordering::Acquire)
    }

    /// Clears the attention flag; called by the vCPU under the big lock once it runs.
    pub fn clear_attention(&self) {
        self.attention.store(false, Ordering::Release);
    }

    /// The vCPU thread's kernel thread id, once it runs (QMP `query-cpus-fast`).
    pub fn thread_id(&self) -> Option<i32> {
        self.tid.get().copied()
    }

    /// Records the thread to signal.
    pub fn set_thread(&self, thread: libc::pthread_t) {
        // A second call would mean a vCPU started twice; the first id stays.
        let _ = self.thread.set(thread);
    }
}

thread_local! {
    /// This thread's vCPU `kvm_run` mapping, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _ = KVM_RUN.try_with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set by the vCPU thread
            // and valid until the thread clears it before exiting; a volatile byte store is
            // async-signal-safe.
            unsafe { ptr::write_volatile(ptr::addr_of_mut!((*run).immediate_exit), 1) };
        }
    });
    fence(Ordering::Release);
}

/// Installs the kick signal handler (process-wide, once, before any vCPU thread starts).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    vmm_sys_util::signal::register_signal_handler(vmm_sys_util::signal::SIGRTMIN(), handle_kick)
        .map_err(VcpuError::SignalHandler)
}

/// The one-entry MSR list holding IA32_APIC_BASE with `data`.
fn apic_base_msrs(index: u8, data: u64) -> Result<Msrs, VcpuError> {
    Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index: MSR_IA32_APICBASE,
        data,
        ..Default::default()
    }])
    .map_err(|_| VcpuError::Kvm {
        index,
        step: "cannot build the MSR list",
        source: kvm_ioctls::Error::new(libc::ENOMEM),
    })
}

/// vCPU state that KVM gives a new vCPU and a guest reset must restore.
struct PowerOnState {
    lapic: kvm_bindings::kvm_lapic_state,
    mp_state: kvm_mp_state,
    apic_base: u64,
    xcrs: Option<kvm_xcrs>,
}

/// One vCPU: its KVM file descriptor and what it needs to boot and reset.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    msr_index_list: Vec<u32>,
    power_on: PowerOnState,
}

impl Vcpu {
    /// Creates vCPU `index` of `num_cpus`, sets its CPUID and records its power-on state.
    pub fn new(vm: &KvmVm, index: u8, num_cpus: u8) -> Result<Self, VcpuError> {
        let step = |step| {
            move |source| VcpuError::Kvm {
                index,
                step,
                source,
            }
        };
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(step("cannot create the vCPU"))?;
        let cpuid = cpuid::vcpu_cpuid(vm.supported_cpuid(), index, num_cpus);
        fd.set_cpuid2(&cpuid).map_err(step("cannot set CPUID"))?;
        let lapic = fd.get_lapic().map_err(step("cannot read the local APIC"))?;
        let mp_state = fd
            .get_mp_state()
            .map_err(step("cannot read the MP state"))?;
        let mut msrs = apic_base_msrs(index, 0)?;
        fd.get_msrs(&mut msrs)
            .map_err(step("cannot read the APIC base"))?;
        let apic_base = msrs.as_slice()[0].data;
        let xcrs = fd.get_xcrs().ok();
        Ok(Vcpu {
            index,
            fd,
            msr_index_list: vm.msr_index_list().to_vec(),
            power_on: PowerOnState {
                lapic,
                mp_state,
                apic_base,
                xcrs,
            },
        })
    }

    /// This vCPU's index (and APIC id).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The MSRs KVM can save and restore (the VM's index list).
    pub fn msr_index_list(&self) -> &[u32] {
        &self.msr_index_list
    }

    /// The KVM vCPU, for reading or setting state while the vCPU is paused.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The KVM vCPU, mutably (tests run guest code on it directly).
    #[cfg(test)]
    pub(crate) fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// Puts the vCPU in its boot state. The boot vCPU starts at `entry`; the others wait for
    /// the INIT/SIPI sequence of the guest, as on hardware.
    pub fn configure_boot(&self, entry: BootEntry) -> Result<(), VcpuError> {
        let regs_err = |source| VcpuError::Regs {
            index: self.index,
            source,
        };
        regs::setup_msrs(&self.fd, &self.msr_index_list).map_err(regs_err)?;
        if self.index == 0 {
            regs::setup_registers(&self.fd, entry.entry, entry.protocol).map_err(regs_err)?;
        }
        regs::setup_fpu(&self.fd).map_err(regs_err)?;
        regs::setup_lint(&self.fd).map_err(regs_err)
    }

    /// Returns the vCPU to its power-on state and then its boot state (guest reset).
    pub fn reset(&mut self, entry: BootEntry) -> Result<(), VcpuError> {
        let index = self.index;
        let step = |step| {
            move |source| VcpuError::Kvm {
                index,
                step,
                source,
            }
        };
        let apic_base = apic_base_msrs(index, self.power_on.apic_base)?;
        self.fd
            .set_msrs(&apic_base)
            .map_err(step("cannot restore the APIC base"))?;
        self.fd
            .set_lapic(&self.power_on.lapic)
            .map_err(step("cannot restore the local APIC"))?;
        if let Some(xcrs) = &self.power_on.xcrs {
            self.fd
                .set_xcrs(xcrs)
                .map_err(step("cannot restore XCR0"))?;
        }
        self.fd
            .set_vcpu_events(&kvm_vcpu_events::default())
            .map_err(step("cannot clear pending events"))?;
        self.fd
            .set_mp_state(self.power_on.mp_state)
            .map_err(step("cannot restore the MP state"))?;
        self.configure_boot(entry)
    }

    /// Describes a KVM internal error: the exit, the vCPU's RIP and the instruction's bytes.
    fn describe_internal_error(&mut self, vm: &Vm, what: &str) -> String {
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        let linear = self
            .fd
            .get_sregs()
            .map(|s| s.cs.base.wrapping_add(rip))
            .unwrap_or(rip);
        let bytes = self
            .fd
            .translate_gva(linear)
            .ok()
            .filter(|t| t.valid != 0)
            .map(|t| {
                let mut buf = [0u8; MAX_INSTRUCTION_LEN];
                let n = vm
                    .memory()
                    .read(&mut buf, GuestAddress(t.physical_address))
                    .unwrap_or(0);
                buf[..n]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_else(|| "unavailable".to_string());
        format!(
            "KVM internal error on vCPU {}: {what}, rip={rip:#x}, instruction bytes: {bytes}",
            self.index
        )
    }

    /// The suberror of a KVM_EXIT_INTERNAL_ERROR, from the run structure.
    fn internal_error_suberror(&mut self) -> u32 {
        let run = self.fd.get_kvm_run();
        // SAFETY: called right after KVM_RUN returned KVM_EXIT_INTERNAL_ERROR, so the kernel
        // filled the `internal` member of the exit union.
        unsafe { run.__bindgen_anon_1.internal.suberror }
    }

    /// Runs KVM_RUN with `immediate_exit` set until KVM reports it returned without entering
    /// the guest, so any exit already seen is complete before the vCPU parks or its state is
    /// read. Exits that still come out of that are emulated with the held lock.
    fn complete_pending_exit(&mut self, machine: &mut Machine) {
        self.fd.set_kvm_immediate_exit(1);
        for _ in 0..MAX_COMPLETION_RUNS {
            match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => machine.pio.read(u64::from(port), data),
                Ok(VcpuExit::IoOut(port, data)) => machine.pio.write(u64::from(port), data),
                Ok(VcpuExit::MmioRead(addr, data)) => machine.mmio.read(addr, data),
                Ok(VcpuExit::MmioWrite(addr, data)) => machine.mmio.write(addr, data),
                Ok(_) | Err(_) => break,
            }
        }
        self.fd.set_kvm_immediate_exit(0);
    }
}

/// What the run loop does after looking at its requests.
enum Flow {
    Continue,
    Exit,
}

/// Why an exit stops the guest (handled after the exit's borrow of the vCPU ends).
enum Stop {
    Power(PowerRequest),
    InternalError(String),
}

/// The vCPU thread's body. `started` is told once the thread id is published.
pub fn run_vcpu(mut vcpu: Vcpu, vm: Arc<Vm>, started: std::sync::mpsc::Sender<u8>) {
    let index = usize::from(vcpu.index);
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    let _ = vm.kick(index).tid.set(tid);
    // The spawner may have given up waiting; nothing to do then.
    let _ = started.send(vcpu.index);
    KVM_RUN.with(|run| run.set(vcpu.fd.get_kvm_run() as *mut kvm_run));
    loop {
        if vm.kick(index).needs_attention() {
            if let Flow::Exit = service_requests(&mut vcpu, &vm) {
                break;
            }
        }
        let stop = match vcpu.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    vm.lock().pio.read(u64::from(port), data);
                    None
                }
                VcpuExit::IoOut(port, data) => {
                    vm.lock().pio.write(u64::from(port), data);
                    None
                }
                VcpuExit::MmioRead(addr, data) => {
                    vm.lock().mmio.read(addr, data);
                    None
                }
                VcpuExit::MmioWrite(addr, data) => {
                    vm.lock().mmio.write(addr, data);
                    None
                }
                // A triple fault: the machine resets, as on hardware.
                VcpuExit::Shutdown => Some(Stop::Power(PowerRequest::Reset)),
                VcpuExit::SystemEvent(kind, _) if kind == KVM_SYSTEM_EVENT_RESET => {
                    Some(Stop::Power(PowerRequest::Reset))
                }
                VcpuExit::SystemEvent(kind, _) if kind == KVM_SYSTEM_EVENT_SHUTDOWN => {
                    Some(Stop::Power(PowerRequest::Poweroff))
                }
                VcpuExit::InternalError => Some(Stop::InternalError(String::new())),
                VcpuExit::FailEntry(reason, cpu) => Some(Stop::InternalError(format!(
                    "entry failure (hardware reason {reason:#x} on host CPU {cpu})"
                ))),
                other => Some(Stop::InternalError(format!("unexpected exit {other:?}"))),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(Stop::InternalError(format!("KVM_RUN failed: {e}"))),
        };
        match stop {
            None => {}
            Some(Stop::Power(request)) => vm.power().request(request),
            Some(Stop::InternalError(what)) => {
                let what = if what.is_empty() {
                    format!(
                        "emulation failure (suberror {})",
                        vcpu.internal_error_suberror()
                    )
                } else {
                    what
                };
                let line = vcpu.describe_internal_error(&vm, &what);
                vm.report_internal_error(index, &line);
            }
        }
        if vm.power().is_pending() {
            vm.park_for_power_request(index);
        }
    }
    KVM_RUN.with(|run| run.set(ptr::null_mut()));
}

/// Looks at the vCPU's requests under the big lock: runs queued work, parks while paused,
/// and tells the run loop whether to continue or end.
fn service_requests(vcpu: &mut Vcpu, vm: &Vm) -> Flow {
    let index = usize::from(vcpu.index);
    let mut machine = vm.lock();
    loop {
        let work = std::mem::take(&mut machine.vcpus[index].work);
        if !work.is_empty() {
            for item in work {
                if let Err(e) = item(vcpu) {
                    log::error!("{e}");
                }
            }
            vm.big_lock().notify_all();
        }
        match machine.vcpus[index].request {
            VcpuRequest::Run => {
                machine.vcpus[index].state = VcpuState::Running;
                vm.kick(index).clear_attention();
                vm.big_lock().notify_all();
                return Flow::Continue;
            }
            VcpuRequest::Pause => {
                if machine.vcpus[index].state != VcpuState::Paused {
                    vcpu.complete_pending_exit(&mut machine);
                    machine.vcpus[index].state = VcpuState::Paused;
                    vm.big_lock().notify_all();
                }
                vm.big_lock().wait(&mut machine);
            }
            VcpuRequest::Exit => {
                machine.vcpus[index].state = VcpuState::Exited;
                vm.big_lock().notify_all();
                return Flow::Exit;
            }
        }
    }
}
