//! tern's KVM virtual machine monitor: guest memory, vCPUs, boot and devices.
//!
//! A [`Vm`] is built from a [`VmConfig`]: guest RAM in a memfd (split around the 32-bit PCI hole),
//! an in-kernel irqchip and PIT, a 16550 serial port, an ELF kernel booted through its PVH entry,
//! and one thread per vCPU. Pause and resume are handshakes with the vCPU threads.

pub mod announce;
pub mod boot;
pub mod boot_linux;
pub mod cpuid;
pub mod devices;
mod dirty;
pub mod dirty_ring;
pub mod disk;
mod error;
pub mod machine;
pub mod memory;
mod migration;
pub mod migration_block;
mod postcopy;
pub mod serial;
pub mod tap;
mod throttle;
pub mod uffd;
mod vcpu;
mod vm;

pub use announce::{AnnounceParams, NicInfo};
pub use dirty::DirtyBitmap;
pub use disk::{Disk, DiskConfig};
pub use error::{Error, Result};
pub use memory::MemoryBackend;
pub use serial::SerialOutput;
pub use tap::NetConfig;
pub use vm::{MachineConfig, RunState, Vm, VmConfig, VmExit};

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u32 = 32;
