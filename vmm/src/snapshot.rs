//! The whole machine's state: every vCPU, the VM-wide KVM state and the devices, as
//! [`crate::vm::Vm::save_machine_state`] captures it and
//! [`crate::vm::Vm::restore_machine_state`] puts it back. It is a serde structure: the
//! migration stream carries it as JSON, and a JSON round trip is exact.

use serde::{Deserialize, Serialize};

use crate::kvm_vm::{VmError, VmState};
use crate::machine::{DevicesState, MachineError};
use crate::vcpu_state::{VcpuState, VcpuStateError};

/// Everything needed to resume a paused machine elsewhere, guest RAM aside.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineState {
    /// One state per vCPU, in vCPU index order.
    pub vcpus: Vec<VcpuState>,
    /// The PIT, kvmclock and irqchips.
    pub vm: VmState,
    /// The emulated devices.
    pub devices: DevicesState,
}

/// Errors while saving or restoring the machine's state.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A vCPU is not paused; the caller must pause the VM first.
    #[error("vCPU {index} is not paused: pause the VM before saving or restoring its state")]
    NotPaused {
        /// The vCPU.
        index: usize,
    },
    /// A vCPU's thread has ended, so its state cannot be reached.
    #[error("the thread of vCPU {index} has ended")]
    VcpuGone {
        /// The vCPU.
        index: usize,
    },
    /// The state has a different number of vCPUs than this VM.
    #[error("the state has {saved} vCPUs, this VM has {ours}")]
    VcpuCount {
        /// vCPUs in the state.
        saved: usize,
        /// vCPUs in this VM.
        ours: usize,
    },
    /// The vCPU states are not in vCPU index order.
    #[error("vCPU state {position} was saved from vCPU {saved}")]
    VcpuOrder {
        /// Its position in the state.
        position: usize,
        /// The vCPU it came from.
        saved: u8,
    },
    /// A vCPU's state could not be saved or restored.
    #[error(transparent)]
    Vcpu(#[from] VcpuStateError),
    /// The VM-wide state could not be saved or restored.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The devices' state could not be saved or restored.
    #[error(transparent)]
    Devices(#[from] MachineError),
}

impl MachineState {
    /// Checks everything that can be checked before touching the VM: the vCPU count and
    /// order, the irqchip ids and every device's state.
    pub fn validate(&self, num_vcpus: usize) -> Result<(), SnapshotError> {
        if self.vcpus.len() != num_vcpus {
            return Err(SnapshotError::VcpuCount {
                saved: self.vcpus.len(),
                ours: num_vcpus,
            });
        }
        for (position, vcpu) in self.vcpus.iter().enumerate() {
            if usize::from(vcpu.index) != position {
                return Err(SnapshotError::VcpuOrder {
                    position,
                    saved: vcpu.index,
                });
            }
        }
        self.vm.validate()?;
        self.devices.validate().map_err(MachineError::from)?;
        Ok(())
    }
}
