//! The KVM virtual machine: its file descriptor, in-kernel irqchip and PIT, memory slots, and
//! the power-on state of the irqchip and PIT that a guest reset restores.

use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, kvm_pit_state2, CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::GuestMemoryMmap;

use crate::arch::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};
use crate::memory::{self, MemoryError};

/// The KVM API version this VMM was written against (the only one Linux has ever shipped).
const KVM_API_VERSION: i32 = 12;

/// Errors while creating or resetting the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM available, and may this user open /dev/kvm?)")]
    OpenKvm(kvm_ioctls::Error),
    /// KVM's API version is not 12.
    #[error("unsupported KVM API version {0}")]
    ApiVersion(i32),
    /// A KVM capability Skiff needs is missing.
    #[error("KVM lacks a required capability: {0:?}")]
    MissingCap(Cap),
    /// A VM-level ioctl failed.
    #[error("{step}: {source}")]
    Kvm {
        /// What was being done.
        step: &'static str,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

fn kvm_step(step: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { step, source }
}

/// Power-on state of the in-kernel interrupt controllers and timer.
struct PowerOnState {
    irqchips: Vec<kvm_irqchip>,
    pit: kvm_pit_state2,
}

/// A KVM VM with its irqchip, PIT and memory slots.
pub struct KvmVm {
    fd: VmFd,
    supported_cpuid: CpuId,
    msr_index_list: Vec<u32>,
    power_on: PowerOnState,
}

const REQUIRED_CAPS: [Cap; 6] = [
    Cap::Irqchip,
    Cap::Pit2,
    Cap::Irqfd,
    Cap::Ioeventfd,
    Cap::UserMemory,
    Cap::SetTssAddr,
];

impl KvmVm {
    /// Opens /dev/kvm, creates the VM, its irqchip and PIT, and registers `mem`.
    pub fn new(mem: &GuestMemoryMmap) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION {
            return Err(VmError::ApiVersion(version));
        }
        if let Some(cap) = REQUIRED_CAPS.iter().find(|c| !kvm.check_extension(**c)) {
            return Err(VmError::MissingCap(*cap));
        }
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_step("cannot read the supported CPUID"))?;
        let msr_index_list = kvm
            .get_msr_index_list()
            .map_err(kvm_step("cannot read the MSR index list"))?
            .as_slice()
            .to_vec();
        let fd = kvm.create_vm().map_err(kvm_step("cannot create the VM"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_step("cannot set the identity map address"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_step("cannot set the TSS address"))?;
        fd.create_irq_chip()
            .map_err(kvm_step("cannot create the in-kernel irqchip"))?;
        let pit_config = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit_config)
            .map_err(kvm_step("cannot create the in-kernel PIT"))?;
        memory::register_memory_slots(&fd, mem)?;
        let power_on = Self::read_power_on_state(&fd)?;
        Ok(KvmVm {
            fd,
            supported_cpuid,
            msr_index_list,
            power_on,
        })
    }

    fn read_power_on_state(fd: &VmFd) -> Result<PowerOnState, VmError> {
        let mut irqchips = Vec::new();
        for chip_id in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            fd.get_irqchip(&mut chip)
                .map_err(kvm_step("cannot read the irqchip state"))?;
            irqchips.push(chip);
        }
        let pit = fd
            .get_pit2()
            .map_err(kvm_step("cannot read the PIT state"))?;
        Ok(PowerOnState { irqchips, pit })
    }

    /// Puts the PIC, IOAPIC and PIT back in their power-on state (guest reset).
    pub fn reset_platform(&self) -> Result<(), VmError> {
        for chip in &self.power_on.irqchips {
            self.fd
                .set_irqchip(chip)
                .map_err(kvm_step("cannot restore the irqchip state"))?;
        }
        self.fd
            .set_pit2(&self.power_on.pit)
            .map_err(kvm_step("cannot restore the PIT state"))
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// CPUID entries KVM supports, before per-vCPU normalisation.
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// MSRs KVM can save and restore.
    pub fn msr_index_list(&self) -> &[u32] {
        &self.msr_index_list
    }
}
