//! A vCPU's complete KVM state, saved and restored for live migration and snapshots.
//!
//! The GET and SET orders follow the KVM rules Firecracker and QEMU rely on (see
//! `migration.md` 6.4): MP_STATE is read first (it runs `kvm_apic_accept_events`) and
//! VCPU_EVENTS last; on restore CPUID goes first, REGS before VCPU_EVENTS, SREGS (APIC base)
//! before LAPIC, LAPIC before the MSRs, TSC_DEADLINE in a final MSR chunk after IA32_TSC,
//! VCPU_EVENTS last, then KVM_KVMCLOCK_CTRL. Both run on the vCPU's own thread (see
//! [`crate::vm::Vm::run_on_vcpu`]) while every vCPU is paused.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MAX_MSR_ENTRIES, KVM_VCPUEVENT_VALID_NMI_PENDING,
};
use serde::{Deserialize, Serialize};

use crate::vcpu::Vcpu;

/// IA32_TSC.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_TSC_DEADLINE, restored in a chunk of its own after IA32_TSC and the LAPIC.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// A TSC frequency this close to the saved one (in parts per million) is left alone, as QEMU
/// and Firecracker do.
const TSC_KHZ_TOLERANCE_PPM: u64 = 250;

/// Errors while saving or restoring a vCPU's state; each names the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// A KVM vCPU ioctl of the save or restore failed (for KVM_GET_XCRS, on a host that has
    /// XCRs; for KVM_GET_MSRS and KVM_SET_MSRS, outright, not just refusing one MSR; for
    /// KVM_KVMCLOCK_CTRL, with something other than EINVAL, kvmclock not in use).
    #[error("vCPU {index}: cannot {step}: {source}")]
    Kvm {
        /// The vCPU.
        index: u8,
        /// What the ioctl does, e.g. "read the MP state" for KVM_GET_MP_STATE.
        step: &'static str,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
    /// The state belongs to another vCPU (its APIC id would be wrong here).
    #[error("vCPU {index}: the state was saved from vCPU {saved}")]
    WrongVcpu {
        /// The vCPU being restored.
        index: u8,
        /// The vCPU the state came from.
        saved: u8,
    },
    /// A state list is longer than KVM accepts.
    #[error("vCPU {index}: {what} has {len} entries, more than KVM accepts")]
    TooManyEntries {
        /// The vCPU.
        index: u8,
        /// Which list.
        what: &'static str,
        /// Its length.
        len: usize,
    },
    /// The TSC frequency differs from the saved one and cannot be set.
    #[error("vCPU {index}: cannot set the TSC frequency to the saved {saved} kHz (host: {host} kHz): {source}")]
    SetTscKhz {
        /// The vCPU.
        index: u8,
        /// The saved frequency.
        saved: u32,
        /// This vCPU's frequency.
        host: u32,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
    /// KVM_SET_MSRS refused one MSR of the saved state.
    #[error("vCPU {index}: KVM refuses to set MSR {msr:#x} to {data:#x}")]
    MsrRefused {
        /// The vCPU.
        index: u8,
        /// The MSR.
        msr: u32,
        /// The value.
        data: u64,
    },
}

impl VcpuStateError {
    /// For `map_err`: a failed KVM ioctl of vCPU `index`, doing `step`.
    fn kvm(index: u8, step: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Self {
        move |source| VcpuStateError::Kvm {
            index,
            step,
            source,
        }
    }
}

/// One MSR and its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    /// The MSR's index.
    pub index: u32,
    /// Its value.
    pub data: u64,
}

/// One CPUID leaf as KVM_GET_CPUID2 reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    /// EAX input (leaf).
    pub function: u32,
    /// ECX input (sub-leaf).
    pub index: u32,
    /// KVM_CPUID_FLAG_* bits.
    pub flags: u32,
    /// EAX output.
    pub eax: u32,
    /// EBX output.
    pub ebx: u32,
    /// ECX output.
    pub ecx: u32,
    /// EDX output.
    pub edx: u32,
}

/// Builds a `$to` ([`CpuidEntry`] or [`kvm_cpuid_entry2`]) from `$e`, the other one: the
/// fields have the same names in both; `$rest` fills what only the target has.
macro_rules! cpuid_entry {
    ($to:ident, $e:ident $(, ..$rest:expr)?) => {
        $to {
            function: $e.function,
            index: $e.index,
            flags: $e.flags,
            eax: $e.eax,
            ebx: $e.ebx,
            ecx: $e.ecx,
            edx: $e.edx,
            $(..$rest)?
        }
    };
}

impl From<&kvm_cpuid_entry2> for CpuidEntry {
    fn from(e: &kvm_cpuid_entry2) -> Self {
        cpuid_entry!(CpuidEntry, e)
    }
}

impl From<&CpuidEntry> for kvm_cpuid_entry2 {
    fn from(e: &CpuidEntry) -> Self {
        cpuid_entry!(kvm_cpuid_entry2, e, ..Default::default())
    }
}

/// Everything KVM holds for one x86 vCPU. The KVM structures are serialised as their raw
/// bytes (kvm-bindings' `serde` feature), checked for their exact size on the way back in.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU (and APIC id) this state was saved from.
    pub index: u8,
    /// KVM_GET_MP_STATE.
    #[serde(with = "kvm_bytes")]
    pub mp_state: kvm_mp_state,
    /// KVM_GET_REGS.
    #[serde(with = "kvm_bytes")]
    pub regs: kvm_regs,
    /// KVM_GET_SREGS.
    #[serde(with = "kvm_bytes")]
    pub sregs: kvm_sregs,
    /// KVM_GET_XSAVE (the legacy 4 KiB area: Skiff never enables AMX-sized state).
    #[serde(with = "kvm_bytes")]
    pub xsave: kvm_xsave,
    /// KVM_GET_XCRS, when the host has XCRs.
    #[serde(with = "kvm_bytes_option")]
    pub xcrs: Option<kvm_xcrs>,
    /// KVM_GET_DEBUGREGS.
    #[serde(with = "kvm_bytes")]
    pub debugregs: kvm_debugregs,
    /// KVM_GET_LAPIC.
    #[serde(with = "kvm_bytes")]
    pub lapic: kvm_lapic_state,
    /// The MSRs of [`crate::kvm_vm::KvmVm::msr_index_list`] that KVM let us read, in that
    /// order.
    pub msrs: Vec<MsrValue>,
    /// KVM_GET_VCPU_EVENTS.
    #[serde(with = "kvm_bytes")]
    pub vcpu_events: kvm_vcpu_events,
    /// KVM_GET_TSC_KHZ, when the host reports it.
    pub tsc_khz: Option<u32>,
    /// KVM_GET_CPUID2.
    pub cpuid: Vec<CpuidEntry>,
}

impl Clone for VcpuState {
    fn clone(&self) -> Self {
        let mut xsave = kvm_xsave::default();
        xsave.region = self.xsave.region;
        VcpuState {
            index: self.index,
            mp_state: self.mp_state,
            regs: self.regs,
            sregs: self.sregs,
            xsave,
            xcrs: self.xcrs,
            debugregs: self.debugregs,
            lapic: self.lapic,
            msrs: self.msrs.clone(),
            vcpu_events: self.vcpu_events,
            tsc_khz: self.tsc_khz,
            cpuid: self.cpuid.clone(),
        }
    }
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("index", &self.index)
            .field("mp_state", &self.mp_state.mp_state)
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .field("tsc_khz", &self.tsc_khz)
            .field("cpuid", &self.cpuid.len())
            .finish_non_exhaustive()
    }
}

impl VcpuState {
    /// The saved value of `msr`, if it was saved.
    pub fn msr(&self, msr: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.index == msr).map(|m| m.data)
    }
}

/// Serde for a KVM structure as its exact raw bytes: kvm-bindings' own `Deserialize` pads or
/// truncates input of the wrong length, which would hide a corrupt or foreign stream.
pub(crate) mod kvm_bytes {
    use serde::de::{self, DeserializeOwned, Deserializer, SeqAccess, Visitor};
    use serde::{Deserialize, Serialize, Serializer};

    /// Serialises `value` with kvm-bindings' byte encoding.
    pub fn serialize<T: Serialize, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
        value.serialize(s)
    }

    /// Deserialises bytes (or a sequence of bytes) of exactly `size_of::<T>()`.
    pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(
        d: D,
    ) -> Result<T, D::Error> {
        let bytes = d.deserialize_bytes(ByteVisitor)?;
        let expected = std::mem::size_of::<T>();
        if bytes.len() != expected {
            return Err(de::Error::invalid_length(
                bytes.len(),
                &format!("{expected} bytes of {}", std::any::type_name::<T>()).as_str(),
            ));
        }
        T::deserialize(de::value::BytesDeserializer::<D::Error>::new(&bytes))
    }

    /// Collects bytes given either as a byte string or as a sequence of numbers.
    struct ByteVisitor;

    impl<'de> Visitor<'de> for ByteVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("the raw bytes of a KVM structure")
        }

        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
            while let Some(byte) = seq.next_element::<u8>()? {
                bytes.push(byte);
            }
            Ok(bytes)
        }
    }

    /// A wrapper so `Option<T>` can reuse the exact-size functions.
    #[derive(Serialize, Deserialize)]
    #[serde(transparent)]
    pub(crate) struct Exact<T: Serialize + DeserializeOwned>(
        #[serde(with = "self", bound = "")] pub T,
    );
}

/// Serde for an optional KVM structure as its exact raw bytes.
pub(crate) mod kvm_bytes_option {
    use serde::de::DeserializeOwned;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::kvm_bytes::Exact;

    /// Serialises `None` or the structure's bytes.
    pub fn serialize<T, S>(value: &Option<T>, s: S) -> Result<S::Ok, S::Error>
    where
        T: Serialize + DeserializeOwned + Copy,
        S: Serializer,
    {
        value.map(Exact).serialize(s)
    }

    /// Deserialises `None` or exactly `size_of::<T>()` bytes.
    pub fn deserialize<'de, T, D>(d: D) -> Result<Option<T>, D::Error>
    where
        T: Serialize + DeserializeOwned,
        D: Deserializer<'de>,
    {
        Ok(Option::<Exact<T>>::deserialize(d)?.map(|e| e.0))
    }
}

/// The MSRs to restore before the LAPIC-dependent TSC deadline, and the deferred rest.
fn split_deferred(msrs: &[MsrValue]) -> (Vec<MsrValue>, Vec<MsrValue>) {
    msrs.iter().partition(|m| m.index != MSR_IA32_TSC_DEADLINE)
}

/// Whether `host` is more than [`TSC_KHZ_TOLERANCE_PPM`] away from `saved`.
fn tsc_khz_differs(saved: u32, host: u32) -> bool {
    let diff = u64::from(saved.abs_diff(host));
    diff * 1_000_000 > u64::from(saved) * TSC_KHZ_TOLERANCE_PPM
}

impl Vcpu {
    /// Reads the vCPU's complete state. Call it on the vCPU's own thread with every vCPU
    /// paused (no exit half-emulated). MP_STATE is read first and VCPU_EVENTS last.
    pub fn save_state(&mut self) -> Result<VcpuState, VcpuStateError> {
        let index = self.index();
        let failed = |step| VcpuStateError::kvm(index, step);
        let fd = self.fd();
        let mp_state = fd.get_mp_state().map_err(failed("read the MP state"))?;
        let regs = fd.get_regs().map_err(failed("read the registers"))?;
        let sregs = fd
            .get_sregs()
            .map_err(failed("read the special registers"))?;
        let xsave = fd.get_xsave().map_err(failed("read the XSAVE area"))?;
        let xcrs = self.save_xcrs()?;
        let debugregs = fd
            .get_debug_regs()
            .map_err(failed("read the debug registers"))?;
        let lapic = fd.get_lapic().map_err(failed("read the local APIC"))?;
        let tsc_khz = fd.get_tsc_khz().ok();
        let cpuid = self.save_cpuid()?;
        let msrs = self.save_msrs()?;
        let vcpu_events = fd
            .get_vcpu_events()
            .map_err(failed("read the pending events"))?;
        Ok(VcpuState {
            index,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            vcpu_events,
            tsc_khz,
            cpuid,
        })
    }

    /// XCR0 and friends, or `None` on a host without XCRs (KVM_CAP_XCRS).
    fn save_xcrs(&self) -> Result<Option<kvm_xcrs>, VcpuStateError> {
        match self.fd().get_xcrs() {
            Err(e) if e.errno() == libc::EINVAL || e.errno() == libc::ENOTTY => Ok(None),
            result => result
                .map(Some)
                .map_err(VcpuStateError::kvm(self.index(), "read the XCRs")),
        }
    }

    fn save_cpuid(&self) -> Result<Vec<CpuidEntry>, VcpuStateError> {
        let cpuid = self
            .fd()
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(VcpuStateError::kvm(self.index(), "read CPUID"))?;
        Ok(cpuid.as_slice().iter().map(CpuidEntry::from).collect())
    }

    /// Reads the MSRs of the VM's index list in chunks. When KVM stops at an MSR it refuses,
    /// that MSR is left out and reading goes on after it.
    fn save_msrs(&self) -> Result<Vec<MsrValue>, VcpuStateError> {
        let mut saved = Vec::with_capacity(self.msr_index_list().len());
        let mut rest = self.msr_index_list();
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
            let entries: Vec<MsrValue> = chunk
                .iter()
                .map(|&i| MsrValue { index: i, data: 0 })
                .collect();
            let mut msrs = self.msr_list(&entries, "the MSR list")?;
            let read = self
                .fd()
                .get_msrs(&mut msrs)
                .map_err(VcpuStateError::kvm(self.index(), "read the MSRs"))?
                .min(chunk.len());
            saved.extend(msrs.as_slice()[..read].iter().map(|e| MsrValue {
                index: e.index,
                data: e.data,
            }));
            if read < chunk.len() {
                log::debug!(
                    "vCPU {}: KVM refuses to read MSR {:#x}",
                    self.index(),
                    chunk[read]
                );
                rest = &rest[read + 1..];
            } else {
                rest = &rest[chunk.len()..];
            }
        }
        Ok(saved)
    }

    /// A KVM MSR list holding `entries` (at most [`KVM_MAX_MSR_ENTRIES`]).
    fn msr_list(&self, entries: &[MsrValue], what: &'static str) -> Result<Msrs, VcpuStateError> {
        let entries: Vec<kvm_msr_entry> = entries
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        Msrs::from_entries(&entries).map_err(|_| VcpuStateError::TooManyEntries {
            index: self.index(),
            what,
            len: entries.len(),
        })
    }

    /// Puts a saved state into this vCPU. Call it on the vCPU's own thread with every vCPU
    /// paused, after guest memory is in place. The order is: TSC frequency (if it differs),
    /// CPUID, MP_STATE, REGS, SREGS, XSAVE, XCRS, DEBUGREGS, LAPIC, MSRs, TSC_DEADLINE,
    /// VCPU_EVENTS, then KVM_KVMCLOCK_CTRL.
    pub fn restore_state(&mut self, state: &VcpuState) -> Result<(), VcpuStateError> {
        let index = self.index();
        if state.index != index {
            return Err(VcpuStateError::WrongVcpu {
                index,
                saved: state.index,
            });
        }
        self.restore_tsc_khz(state.tsc_khz)?;
        self.restore_cpuid(&state.cpuid)?;
        let failed = |step| VcpuStateError::kvm(index, step);
        let fd = self.fd();
        fd.set_mp_state(state.mp_state)
            .map_err(failed("set the MP state"))?;
        fd.set_regs(&state.regs)
            .map_err(failed("set the registers"))?;
        fd.set_sregs(&state.sregs)
            .map_err(failed("set the special registers"))?;
        // SAFETY: Skiff never asks for dynamically enabled XSTATE features
        // (ARCH_REQ_XCOMP_GUEST_PERM), so KVM's XSAVE size is at most the 4 KiB of
        // `kvm_xsave` and the kernel reads no further than the structure passed.
        unsafe { fd.set_xsave(&state.xsave) }.map_err(failed("set the XSAVE area"))?;
        if let Some(xcrs) = &state.xcrs {
            fd.set_xcrs(xcrs).map_err(failed("set the XCRs"))?;
        }
        fd.set_debug_regs(&state.debugregs)
            .map_err(failed("set the debug registers"))?;
        fd.set_lapic(&state.lapic)
            .map_err(failed("set the local APIC"))?;
        let (msrs, deferred) = split_deferred(&state.msrs);
        self.restore_msrs(&msrs)?;
        self.restore_msrs(&deferred)?;
        self.restore_vcpu_events(&state.vcpu_events)?;
        self.notify_kvmclock_paused()
    }

    /// Sets the saved TSC frequency when this vCPU's differs by more than 250 ppm (call on
    /// every vCPU before restoring any vCPU state). Nothing to do without a saved frequency.
    pub fn restore_tsc_khz(&self, saved: Option<u32>) -> Result<(), VcpuStateError> {
        let Some(saved) = saved else {
            return Ok(());
        };
        let host = match self.fd().get_tsc_khz() {
            Ok(host) if !tsc_khz_differs(saved, host) => return Ok(()),
            Ok(host) => host,
            Err(_) => 0,
        };
        log::info!(
            "vCPU {}: setting the TSC frequency to the saved {saved} kHz (was {host} kHz)",
            self.index()
        );
        self.fd()
            .set_tsc_khz(saved)
            .map_err(|source| VcpuStateError::SetTscKhz {
                index: self.index(),
                saved,
                host,
                source,
            })
    }

    fn restore_cpuid(&self, entries: &[CpuidEntry]) -> Result<(), VcpuStateError> {
        let entries: Vec<kvm_cpuid_entry2> = entries.iter().map(kvm_cpuid_entry2::from).collect();
        let cpuid = CpuId::from_entries(&entries).map_err(|_| VcpuStateError::TooManyEntries {
            index: self.index(),
            what: "CPUID",
            len: entries.len(),
        })?;
        self.fd()
            .set_cpuid2(&cpuid)
            .map_err(VcpuStateError::kvm(self.index(), "set CPUID"))
    }

    /// Writes `msrs` in chunks, in order; an MSR KVM refuses is an error naming it.
    fn restore_msrs(&self, msrs: &[MsrValue]) -> Result<(), VcpuStateError> {
        for chunk in msrs.chunks(KVM_MAX_MSR_ENTRIES) {
            let list = self.msr_list(chunk, "the MSR list")?;
            let written = self
                .fd()
                .set_msrs(&list)
                .map_err(VcpuStateError::kvm(self.index(), "set the MSRs"))?;
            if let Some(refused) = chunk.get(written) {
                return Err(VcpuStateError::MsrRefused {
                    index: self.index(),
                    msr: refused.index,
                    data: refused.data,
                });
            }
        }
        Ok(())
    }

    /// Sets the pending events, including the pending NMI (which KVM_GET_VCPU_EVENTS reports
    /// without marking it valid), as QEMU does. The SIPI vector is never reported (a received
    /// SIPI is already applied by KVM_GET_MP_STATE), so it is left alone.
    fn restore_vcpu_events(&self, events: &kvm_vcpu_events) -> Result<(), VcpuStateError> {
        let mut events = *events;
        events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING;
        self.fd()
            .set_vcpu_events(&events)
            .map_err(VcpuStateError::kvm(self.index(), "set the pending events"))
    }

    /// KVM_KVMCLOCK_CTRL: tells a guest using kvmclock that it was paused, so its watchdogs
    /// do not fire. EINVAL (the guest does not use kvmclock) is not an error.
    pub fn notify_kvmclock_paused(&self) -> Result<(), VcpuStateError> {
        match self.fd().kvmclock_ctrl() {
            Err(e) if e.errno() == libc::EINVAL => Ok(()),
            result => result.map_err(VcpuStateError::kvm(
                self.index(),
                "tell the guest's kvmclock it was paused",
            )),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::arch::layout::MIB;
    use crate::arch::regs::BootProtocol;
    use crate::kvm_vm::KvmVm;
    use crate::loader::BootEntry;
    use crate::memory::GuestRam;
    use kvm_bindings::{KVM_VCPUEVENT_VALID_SHADOW, KVM_X86_SHADOW_INT_MOV_SS};
    use kvm_ioctls::VcpuExit;
    use vm_memory::{Bytes, GuestAddress};

    /// LAPIC registers compared after a restore (ID, TPR, LDR, DFR, SVR, LVT timer, LINT0,
    /// LINT1, LVT error, timer divide).
    const LAPIC_COMPARED: [usize; 10] = [
        0x20, 0x80, 0xd0, 0xe0, 0xf0, 0x320, 0x350, 0x360, 0x370, 0x3e0,
    ];
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_SYSENTER_CS: u32 = 0x174;
    const MSR_SYSENTER_EIP: u32 = 0x176;
    const MSR_PAT: u32 = 0x277;
    /// Distinctive MSR values set before saving (only those in KVM's index list are used).
    const DISTINCT_MSRS: [(u32, u64); 7] = [
        (MSR_STAR, 0x0023_0010_0000_0000),
        (MSR_LSTAR, 0xffff_ffff_8100_1234),
        (MSR_SYSCALL_MASK, 0x4_7700),
        (MSR_KERNEL_GS_BASE, 0xffff_8880_1234_5000),
        (MSR_SYSENTER_CS, 0x10),
        (MSR_SYSENTER_EIP, 0xffff_ffff_8100_0040),
        (MSR_PAT, 0x0007_0106_0007_0406),
    ];
    /// A TSC far from the power-on one, to see it carried over.
    const TSC_VALUE: u64 = 1 << 52;
    /// How far the TSC may move between save and read-back (many seconds at any frequency
    /// a host has; the test machine is slow and loaded).
    const TSC_SLACK: u64 = 1 << 38;

    /// A KVM VM with its RAM and vCPUs (dropped in that order: vCPUs, VM, RAM).
    pub(crate) struct TestVm {
        pub vcpus: Vec<Vcpu>,
        pub kvm: KvmVm,
        pub mem: GuestRam,
    }

    /// A VM with `num_cpus` vCPUs and 1 MiB of RAM, or `None` without /dev/kvm.
    pub(crate) fn test_vm(num_cpus: u8) -> Option<TestVm> {
        if kvm_ioctls::Kvm::new().is_err() {
            eprintln!("SKIPPED: /dev/kvm is not available");
            return None;
        }
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), MIB as usize)]).unwrap();
        let kvm = KvmVm::new(&mem).unwrap();
        let vcpus = (0..num_cpus)
            .map(|i| Vcpu::new(&kvm, i, num_cpus).unwrap())
            .collect();
        Some(TestVm { vcpus, kvm, mem })
    }

    fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
        let b = &lapic.regs[offset..offset + 4];
        u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
    }

    fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
        for (i, byte) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *byte as i8;
        }
    }

    fn get_msr(vcpu: &Vcpu, index: u32) -> Option<u64> {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .unwrap();
        match vcpu.fd().get_msrs(&mut msrs).unwrap() {
            1 => Some(msrs.as_slice()[0].data),
            _ => None,
        }
    }

    fn set_msrs(vcpu: &Vcpu, values: &[(u32, u64)]) {
        let entries: Vec<_> = values
            .iter()
            .filter(|(i, _)| vcpu.msr_index_list().contains(i))
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let written = vcpu
            .fd()
            .set_msrs(&Msrs::from_entries(&entries).unwrap())
            .unwrap();
        assert_eq!(written, entries.len());
    }

    /// Boot state plus distinctive values in every kind of register.
    fn set_distinctive_state(vcpu: &mut Vcpu) {
        vcpu.configure_boot(BootEntry {
            entry: GuestAddress(0x20_0000),
            protocol: BootProtocol::Linux64,
        })
        .unwrap();
        let fd = vcpu.fd();
        let mut regs = fd.get_regs().unwrap();
        let values: Vec<u64> = (1..=16)
            .map(|i| 0x1111_0000_0000_0000 * (i % 8 + 1) + i)
            .collect();
        [
            &mut regs.rax,
            &mut regs.rbx,
            &mut regs.rcx,
            &mut regs.rdx,
            &mut regs.rsi,
            &mut regs.rdi,
            &mut regs.rsp,
            &mut regs.rbp,
            &mut regs.r8,
            &mut regs.r9,
            &mut regs.r10,
            &mut regs.r11,
            &mut regs.r12,
            &mut regs.r13,
            &mut regs.r14,
            &mut regs.r15,
        ]
        .into_iter()
        .zip(values)
        .for_each(|(r, v)| *r = v);
        regs.rip = 0x20_1234;
        regs.rflags = 0x2 | 0x40 | 0x4;
        fd.set_regs(&regs).unwrap();

        let mut sregs = fd.get_sregs().unwrap();
        sregs.cr2 = 0xdead_b000;
        sregs.idt.base = 0x7_0000;
        sregs.idt.limit = 0xfff;
        sregs.fs.base = 0x7fff_1234_0000;
        sregs.gs.base = 0xffff_8880_0000_1000;
        fd.set_sregs(&sregs).unwrap();

        let mut debugregs = fd.get_debug_regs().unwrap();
        debugregs.db = [0x1000, 0x2000, 0x3000, 0x4000];
        debugregs.dr7 = 0x405;
        fd.set_debug_regs(&debugregs).unwrap();

        if let Ok(mut xcrs) = fd.get_xcrs() {
            xcrs.xcrs[0].value = 0x3;
            // A host without SSE state in XCR0 keeps its default: compared as saved anyway.
            let _ = fd.set_xcrs(&xcrs);
        }

        let mut lapic = fd.get_lapic().unwrap();
        set_lapic_reg(&mut lapic, 0x80, 0x20);
        set_lapic_reg(&mut lapic, 0xf0, 0x1ff);
        set_lapic_reg(&mut lapic, 0x320, 0x4_00ec);
        set_lapic_reg(&mut lapic, 0x370, 0xfe);
        set_lapic_reg(&mut lapic, 0x3e0, 0x3);
        fd.set_lapic(&lapic).unwrap();

        set_msrs(vcpu, &DISTINCT_MSRS);
        set_msrs(vcpu, &[(MSR_IA32_TSC, TSC_VALUE)]);
        // Far in the future: it never fires during the test.
        set_msrs(vcpu, &[(MSR_IA32_TSC_DEADLINE, TSC_VALUE + (1 << 50))]);

        let mut events = vcpu.fd().get_vcpu_events().unwrap();
        events.nmi.masked = 1;
        events.interrupt.shadow = KVM_X86_SHADOW_INT_MOV_SS as u8;
        events.flags = KVM_VCPUEVENT_VALID_SHADOW;
        vcpu.fd().set_vcpu_events(&events).unwrap();
    }

    /// Saves, and checks that the JSON round trip is exact.
    fn save_through_json(vcpu: &mut Vcpu) -> VcpuState {
        let state = vcpu.save_state().unwrap();
        let json = serde_json::to_string(&state).unwrap();
        let back: VcpuState = serde_json::from_str(&json).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
        back
    }

    /// Compares what `vcpu` reads back with the saved state.
    fn assert_matches_saved(vcpu: &Vcpu, saved: &VcpuState) {
        let fd = vcpu.fd();
        assert_eq!(fd.get_regs().unwrap(), saved.regs);
        let sregs = fd.get_sregs().unwrap();
        assert_eq!(sregs, saved.sregs);
        let debugregs = fd.get_debug_regs().unwrap();
        assert_eq!(
            (debugregs.db, debugregs.dr7),
            (saved.debugregs.db, saved.debugregs.dr7)
        );
        if let Some(xcrs) = saved.xcrs {
            assert_eq!(fd.get_xcrs().unwrap().xcrs[0], xcrs.xcrs[0]);
        }
        let lapic = fd.get_lapic().unwrap();
        for offset in LAPIC_COMPARED {
            assert_eq!(
                lapic_reg(&lapic, offset),
                lapic_reg(&saved.lapic, offset),
                "LAPIC register {offset:#x}"
            );
        }
        let events = fd.get_vcpu_events().unwrap();
        assert_eq!(events.nmi.masked, saved.vcpu_events.nmi.masked);
        assert_eq!(events.interrupt.shadow, saved.vcpu_events.interrupt.shadow);
        assert_eq!(fd.get_mp_state().unwrap(), saved.mp_state);
        for (index, _) in DISTINCT_MSRS {
            assert_eq!(get_msr(vcpu, index), saved.msr(index), "MSR {index:#x}");
        }
        let tsc = get_msr(vcpu, MSR_IA32_TSC).unwrap();
        let saved_tsc = saved.msr(MSR_IA32_TSC).unwrap();
        assert!(
            tsc >= saved_tsc && tsc - saved_tsc < TSC_SLACK,
            "TSC {tsc:#x} vs saved {saved_tsc:#x}"
        );
    }

    #[test]
    fn state_survives_a_restore_into_another_vm() {
        let Some(mut a) = test_vm(1) else { return };
        let Some(mut b) = test_vm(1) else { return };
        set_distinctive_state(&mut a.vcpus[0]);
        let saved = save_through_json(&mut a.vcpus[0]);
        // What was set is what was saved.
        assert_eq!(saved.regs.rip, 0x20_1234);
        assert_eq!(saved.debugregs.db, [0x1000, 0x2000, 0x3000, 0x4000]);
        assert_eq!(lapic_reg(&saved.lapic, 0x80), 0x20);
        assert_eq!(saved.vcpu_events.nmi.masked, 1);
        assert_eq!(
            saved.vcpu_events.interrupt.shadow,
            KVM_X86_SHADOW_INT_MOV_SS as u8
        );
        for (index, data) in DISTINCT_MSRS {
            if a.vcpus[0].msr_index_list().contains(&index) {
                assert_eq!(saved.msr(index), Some(data), "MSR {index:#x}");
            }
        }
        let tsc = saved.msr(MSR_IA32_TSC).unwrap();
        if !(TSC_VALUE..TSC_VALUE + TSC_SLACK).contains(&tsc) {
            // kvm_pvm (this project's CI) ignores host writes of IA32_TSC: every vCPU sees
            // the host's TSC, so only the read-back check below applies.
            eprintln!("note: this host ignores IA32_TSC writes (TSC {tsc:#x})");
        }
        assert!(!saved.cpuid.is_empty());

        b.vcpus[0].restore_state(&saved).unwrap();
        assert_matches_saved(&b.vcpus[0], &saved);
        if let (Some(deadline), Some(_)) =
            (saved.msr(MSR_IA32_TSC_DEADLINE), saved.msr(MSR_IA32_TSC))
        {
            // Restored after the TSC and the LAPIC: still armed, at the same deadline.
            assert_eq!(get_msr(&b.vcpus[0], MSR_IA32_TSC_DEADLINE), Some(deadline));
        }
    }

    #[test]
    fn state_of_another_vcpu_is_refused() {
        let Some(mut a) = test_vm(2) else { return };
        let saved = a.vcpus[0].save_state().unwrap();
        let err = a.vcpus[1].restore_state(&saved).unwrap_err();
        assert!(
            matches!(err, VcpuStateError::WrongVcpu { index: 1, saved: 0 }),
            "{err}"
        );
    }

    #[test]
    fn truncated_or_padded_kvm_structures_are_refused() {
        let Some(mut a) = test_vm(1) else { return };
        let saved = a.vcpus[0].save_state().unwrap();
        let mut value = serde_json::to_value(&saved).unwrap();
        let lapic = value["lapic"].as_array_mut().unwrap();
        lapic.pop();
        let err = serde_json::from_value::<VcpuState>(value.clone()).unwrap_err();
        assert!(err.to_string().contains("1023"), "{err}");
        value["lapic"]
            .as_array_mut()
            .unwrap()
            .extend([0.into(), 0.into()]);
        assert!(serde_json::from_value::<VcpuState>(value.clone()).is_err());
        value["lapic"] = serde_json::to_value(saved.lapic.regs.map(|b| b as u8).to_vec()).unwrap();
        value["regs"] = serde_json::json!([1, 2, 300]);
        assert!(serde_json::from_value::<VcpuState>(value).is_err());
    }

    #[test]
    fn tsc_frequency_tolerance() {
        assert!(!tsc_khz_differs(2_000_000, 2_000_000));
        assert!(!tsc_khz_differs(2_000_000, 2_000_500));
        assert!(tsc_khz_differs(2_000_000, 2_000_501));
        assert!(tsc_khz_differs(2_000_000, 1_000_000));
    }

    #[test]
    fn tsc_deadline_is_deferred() {
        let msrs = [
            MsrValue {
                index: MSR_IA32_TSC_DEADLINE,
                data: 5,
            },
            MsrValue {
                index: MSR_IA32_TSC,
                data: 1,
            },
            MsrValue {
                index: MSR_PAT,
                data: 2,
            },
        ];
        let (first, deferred) = split_deferred(&msrs);
        assert_eq!(
            first.iter().map(|m| m.index).collect::<Vec<_>>(),
            [MSR_IA32_TSC, MSR_PAT]
        );
        assert_eq!(deferred, [msrs[0]]);
    }

    /// Real mode at 0x1000: `inc ax; out 0x10, al; jmp back`.
    const LOOP_CODE: [u8; 5] = [0x40, 0xe6, 0x10, 0xeb, 0xfb];
    const LOOP_ADDR: u64 = 0x1000;
    const LOOP_PORT: u16 = 0x10;

    /// Points the vCPU at the real-mode loop.
    fn start_loop(vm: &mut TestVm) {
        vm.mem
            .write_slice(&LOOP_CODE, GuestAddress(LOOP_ADDR))
            .unwrap();
        let fd = vm.vcpus[0].fd();
        let mut sregs = fd.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        fd.set_sregs(&sregs).unwrap();
        let regs = kvm_regs {
            rip: LOOP_ADDR,
            rflags: 0x2,
            ..Default::default()
        };
        fd.set_regs(&regs).unwrap();
    }

    /// Runs until the loop's next OUT and returns the byte written.
    pub(crate) fn next_out(vcpu: &mut Vcpu) -> u8 {
        loop {
            match vcpu.fd_mut().run() {
                Ok(VcpuExit::IoOut(port, data)) if port == LOOP_PORT => return data[0],
                Ok(exit) => panic!("unexpected exit {exit:?}"),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => panic!("KVM_RUN: {e}"),
            }
        }
    }

    /// Finishes the exit in progress without entering the guest, as a paused vCPU does.
    pub(crate) fn complete_exit(vcpu: &mut Vcpu) {
        let fd = vcpu.fd_mut();
        fd.set_kvm_immediate_exit(1);
        let result = fd.run().map(|_| ()).map_err(|e| e.errno());
        fd.set_kvm_immediate_exit(0);
        assert_eq!(result, Err(libc::EINTR));
    }

    #[test]
    fn guest_continues_in_another_vm() {
        let Some(mut a) = test_vm(1) else { return };
        let Some(mut b) = test_vm(1) else { return };
        start_loop(&mut a);
        for expected in 1..=5 {
            assert_eq!(next_out(&mut a.vcpus[0]), expected);
        }
        complete_exit(&mut a.vcpus[0]);
        let vcpu_state = save_through_json(&mut a.vcpus[0]);
        let vm_state = a.kvm.save_state().unwrap();
        let mut ram = vec![0u8; MIB as usize];
        a.mem.read_slice(&mut ram, GuestAddress(0)).unwrap();

        b.mem.write_slice(&ram, GuestAddress(0)).unwrap();
        b.vcpus[0].restore_state(&vcpu_state).unwrap();
        b.kvm.restore_state(&vm_state).unwrap();
        for expected in 6..=8 {
            assert_eq!(next_out(&mut b.vcpus[0]), expected);
        }
        // The source, had it gone on, would have said the same.
        assert_eq!(next_out(&mut a.vcpus[0]), 6);
    }
}
