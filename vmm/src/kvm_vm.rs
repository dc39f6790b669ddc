//! The KVM virtual machine: its file descriptor, in-kernel irqchip and PIT, memory slots, and
//! the power-on state of the irqchip and PIT that a guest reset restores.

use crate::memory::GuestRam;
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, CpuId, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use serde::{Deserialize, Serialize};

use crate::arch::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};
use crate::memory::{self, MemoryError};
use crate::vcpu_state::kvm_bytes;

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
    /// A saved VM state does not fit this VM.
    #[error("invalid VM state: {0}")]
    InvalidState(String),
}

fn kvm_step(step: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { step, source }
}

/// Power-on state of the in-kernel interrupt controllers and timer.
struct PowerOnState {
    irqchips: Vec<kvm_irqchip>,
    pit: kvm_pit_state2,
}

/// The VM-wide KVM state: the in-kernel PIT, the kvmclock and the three irqchips. The KVM
/// structures are serialised as their exact raw bytes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct VmState {
    /// KVM_GET_PIT2.
    #[serde(with = "kvm_bytes")]
    pub pit: kvm_pit_state2,
    /// KVM_GET_CLOCK (restored with flags 0, see [`KvmVm::restore_state`]).
    #[serde(with = "kvm_bytes")]
    pub clock: kvm_clock_data,
    /// KVM_GET_IRQCHIP of the master PIC.
    #[serde(with = "kvm_bytes")]
    pub pic_master: kvm_irqchip,
    /// KVM_GET_IRQCHIP of the slave PIC.
    #[serde(with = "kvm_bytes")]
    pub pic_slave: kvm_irqchip,
    /// KVM_GET_IRQCHIP of the IOAPIC.
    #[serde(with = "kvm_bytes")]
    pub ioapic: kvm_irqchip,
}

impl VmState {
    /// The irqchips in restore order, each with the chip id it must carry.
    fn irqchips(&self) -> [(&'static str, u32, &kvm_irqchip); 3] {
        [
            ("master PIC", KVM_IRQCHIP_PIC_MASTER, &self.pic_master),
            ("slave PIC", KVM_IRQCHIP_PIC_SLAVE, &self.pic_slave),
            ("IOAPIC", KVM_IRQCHIP_IOAPIC, &self.ioapic),
        ]
    }

    /// Checks that each irqchip carries its own chip id.
    pub fn validate(&self) -> Result<(), VmError> {
        for (name, chip_id, chip) in self.irqchips() {
            if chip.chip_id != chip_id {
                return Err(VmError::InvalidState(format!(
                    "the {name} state has chip id {}, expected {chip_id}",
                    chip.chip_id
                )));
            }
        }
        Ok(())
    }
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
    pub fn new(mem: &GuestRam) -> Result<Self, VmError> {
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
            irqchips.push(Self::read_irqchip(fd, chip_id)?);
        }
        let pit = fd
            .get_pit2()
            .map_err(kvm_step("cannot read the PIT state"))?;
        Ok(PowerOnState { irqchips, pit })
    }

    fn read_irqchip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip, VmError> {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        fd.get_irqchip(&mut chip)
            .map_err(kvm_step("cannot read the irqchip state"))?;
        Ok(chip)
    }

    /// Reads the PIT, the kvmclock and the three irqchips (with the vCPUs paused).
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let pit = self
            .fd
            .get_pit2()
            .map_err(kvm_step("cannot read the PIT state"))?;
        let clock = self
            .fd
            .get_clock()
            .map_err(kvm_step("cannot read the kvmclock"))?;
        Ok(VmState {
            pit,
            clock,
            pic_master: Self::read_irqchip(&self.fd, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: Self::read_irqchip(&self.fd, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: Self::read_irqchip(&self.fd, KVM_IRQCHIP_IOAPIC)?,
        })
    }

    /// Puts a saved PIT, kvmclock and irqchips into this VM (after the vCPUs' state, with the
    /// vCPUs paused). The clock is set with flags 0: the flags KVM_GET_CLOCK reported (such
    /// as TSC_STABLE) are not valid input, and the saved value is restored as is rather than
    /// advanced by wall time.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        state.validate()?;
        self.fd
            .set_pit2(&state.pit)
            .map_err(kvm_step("cannot restore the PIT state"))?;
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        self.fd
            .set_clock(&clock)
            .map_err(kvm_step("cannot restore the kvmclock"))?;
        for (_, _, chip) in state.irqchips() {
            self.fd
                .set_irqchip(chip)
                .map_err(kvm_step("cannot restore the irqchip state"))?;
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout::MIB;
    use vm_memory::GuestAddress;

    fn vm() -> Option<(KvmVm, GuestRam)> {
        if Kvm::new().is_err() {
            eprintln!("SKIPPED: /dev/kvm is not available");
            return None;
        }
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), MIB as usize)]).unwrap();
        Some((KvmVm::new(&mem).unwrap(), mem))
    }

    fn chip_bytes(chip: &kvm_irqchip) -> Vec<u8> {
        serde_json::from_value(serde_json::to_value(chip).unwrap()).unwrap()
    }

    #[test]
    fn vm_state_round_trips_into_another_vm() {
        let Some((a, _mem_a)) = vm() else { return };
        let Some((b, _mem_b)) = vm() else { return };
        // Distinctive state: IOAPIC redirection entry 4 routed and unmasked, PIT channel 0
        // reloaded with another count, the clock moved on.
        let mut ioapic = KvmVm::read_irqchip(a.fd(), KVM_IRQCHIP_IOAPIC).unwrap();
        // SAFETY: chip 2 is the IOAPIC, so `ioapic` is the union member KVM filled.
        unsafe { ioapic.chip.ioapic.redirtbl[4].bits = 0x0000_0000_0000_0024 };
        a.fd().set_irqchip(&ioapic).unwrap();
        let mut pit = a.fd().get_pit2().unwrap();
        pit.channels[0].count = 0x1234;
        a.fd().set_pit2(&pit).unwrap();
        let clock = kvm_clock_data {
            clock: 123_456_789_000,
            ..Default::default()
        };
        a.fd().set_clock(&clock).unwrap();

        let saved = a.save_state().unwrap();
        let json = serde_json::to_string(&saved).unwrap();
        let back: VmState = serde_json::from_str(&json).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
        b.restore_state(&back).unwrap();

        let restored = b.save_state().unwrap();
        assert_eq!(chip_bytes(&restored.ioapic), chip_bytes(&saved.ioapic));
        assert_eq!(
            chip_bytes(&restored.pic_master),
            chip_bytes(&saved.pic_master)
        );
        assert_eq!(
            chip_bytes(&restored.pic_slave),
            chip_bytes(&saved.pic_slave)
        );
        assert_eq!(restored.pit.channels[0].count, 0x1234);
        // The clock runs on from the saved value (seconds at most on a loaded machine).
        let delta = restored.clock.clock.wrapping_sub(saved.clock.clock);
        assert!(
            saved.clock.clock >= clock.clock && delta < 60_000_000_000,
            "{delta}"
        );
    }

    #[test]
    fn swapped_irqchips_are_refused() {
        let Some((a, _mem)) = vm() else { return };
        let mut state = a.save_state().unwrap();
        std::mem::swap(&mut state.pic_master, &mut state.ioapic);
        assert!(matches!(
            a.restore_state(&state),
            Err(VmError::InvalidState(_))
        ));
        let mut value = serde_json::to_value(a.save_state().unwrap()).unwrap();
        value["pit"].as_array_mut().unwrap().truncate(8);
        assert!(serde_json::from_value::<VmState>(value).is_err());
    }
}
