//! x86_64 specifics: the memory map, CPUID, boot registers and tables.

pub mod acpi;
pub mod boot_params;
pub mod cpuid;
pub mod dump;
pub mod layout;
pub mod mptable;
pub mod regs;
