//! Descriptor-chain parsing and copies between chains and host buffers.
//!
//! A chain popped from a queue is collected into a caller-owned, reused `Vec` (so steady-state
//! processing does not allocate) and validated once: every descriptor lies inside guest memory,
//! device-readable descriptors all precede device-writable ones, the chain was not cut short by
//! a loop or a bad indirect table, and it is not absurdly long. Devices then address the
//! readable and writable parts as two flat byte ranges through [`Segments`].

use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::GuestMemory;

/// Longest chain accepted, in descriptors (Linux never builds chains near this long).
pub const MAX_CHAIN_DESCRIPTORS: usize = 1024;

/// Why a descriptor chain was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// The chain yielded no descriptor (bad head index or indirect table).
    #[error("empty descriptor chain")]
    Empty,
    /// The chain ended on a descriptor that still has NEXT set: a loop, an out-of-range next
    /// index, a bad indirect table or a total length past 4 GiB.
    #[error("descriptor chain cut short (loop, bad next index or length overflow)")]
    Truncated,
    /// The chain has more than [`MAX_CHAIN_DESCRIPTORS`] descriptors.
    #[error("descriptor chain longer than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    TooLong,
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// A descriptor's buffer is not entirely inside guest memory.
    #[error("descriptor buffer {addr:#x}+{len:#x} outside guest memory")]
    OutOfBounds {
        /// Guest address of the buffer.
        addr: u64,
        /// Length of the buffer.
        len: u32,
    },
    /// An access past the end of the readable or writable part.
    #[error("access past the end of the chain's buffers")]
    ShortChain,
    /// Guest memory could not be accessed.
    #[error("guest memory access failed at {0:#x}")]
    Memory(u64),
}

/// A validated chain: its head index and the split point between readable and writable parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedChain {
    /// Index of the head descriptor, for the used ring.
    pub head: u16,
    /// Number of device-readable descriptors (they come first in the collected `Vec`).
    pub readable_count: usize,
}

impl ParsedChain {
    /// The device-readable descriptors of a chain collected by [`collect_chain`].
    pub fn readable<'a>(&self, descs: &'a [Descriptor]) -> Segments<'a> {
        Segments::new(descs.get(..self.readable_count).unwrap_or(&[]))
    }

    /// The device-writable descriptors of a chain collected by [`collect_chain`].
    pub fn writable<'a>(&self, descs: &'a [Descriptor]) -> Segments<'a> {
        Segments::new(descs.get(self.readable_count..).unwrap_or(&[]))
    }
}

/// Collects and validates `chain` into `descs` (cleared first, capacity kept).
pub fn collect_chain<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemory,
    descs: &mut Vec<Descriptor>,
) -> Result<ParsedChain, ChainError>
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    descs.clear();
    let head = chain.head_index();
    let mut readable_count = 0;
    for desc in chain {
        if descs.len() == MAX_CHAIN_DESCRIPTORS {
            return Err(ChainError::TooLong);
        }
        let len = desc.len();
        if len > 0 && !GuestMemoryBackend::check_range(mem, desc.addr(), len as usize) {
            return Err(ChainError::OutOfBounds {
                addr: desc.addr().0,
                len,
            });
        }
        if desc.is_write_only() {
            // Counted below.
        } else if descs.len() == readable_count {
            readable_count += 1;
        } else {
            return Err(ChainError::ReadableAfterWritable);
        }
        descs.push(desc);
    }
    match descs.last() {
        None => Err(ChainError::Empty),
        Some(last) if last.has_next() => Err(ChainError::Truncated),
        Some(_) => Ok(ParsedChain {
            head,
            readable_count,
        }),
    }
}

/// One side (readable or writable) of a chain, addressed as a flat byte range.
#[derive(Debug, Clone, Copy)]
pub struct Segments<'a> {
    descs: &'a [Descriptor],
    len: u64,
}

impl<'a> Segments<'a> {
    /// Wraps descriptors already validated by [`collect_chain`].
    pub fn new(descs: &'a [Descriptor]) -> Self {
        let len = descs.iter().map(|d| u64::from(d.len())).sum();
        Self { descs, len }
    }

    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the total length is zero.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Calls `f(guest_address, length)` for each piece of the range `[offset, offset + len)`.
    ///
    /// Fails with [`ChainError::ShortChain`] (before calling `f`) if the range runs past the end.
    pub fn for_each_range<E>(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(GuestAddress, usize) -> Result<(), E>,
    ) -> Result<(), E>
    where
        E: From<ChainError>,
    {
        let end = offset.checked_add(len).ok_or(ChainError::ShortChain)?;
        if end > self.len {
            return Err(ChainError::ShortChain.into());
        }
        let mut skip = offset;
        let mut left = len;
        for desc in self.descs {
            if left == 0 {
                break;
            }
            let dlen = u64::from(desc.len());
            if skip >= dlen {
                skip -= dlen;
                continue;
            }
            let take = (dlen - skip).min(left);
            // Both fit: `desc.addr() + dlen` was checked to be in guest memory.
            let addr = desc.addr().unchecked_add_raw(skip);
            f(addr, take as usize)?;
            left -= take;
            skip = 0;
        }
        Ok(())
    }

    /// Copies `buf.len()` bytes starting at `offset` from guest memory into `buf`.
    pub fn read_at(
        &self,
        mem: &GuestMemory,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ChainError> {
        let mut done = 0usize;
        self.for_each_range(offset, buf.len() as u64, |addr, n| {
            let dst = buf.get_mut(done..done + n).ok_or(ChainError::ShortChain)?;
            mem.read_slice(dst, addr)
                .map_err(|_| ChainError::Memory(addr.0))?;
            done += n;
            Ok(())
        })
    }

    /// Copies `data` into guest memory starting at `offset`.
    pub fn write_at(&self, mem: &GuestMemory, offset: u64, data: &[u8]) -> Result<(), ChainError> {
        let mut done = 0usize;
        self.for_each_range(offset, data.len() as u64, |addr, n| {
            let src = data.get(done..done + n).ok_or(ChainError::ShortChain)?;
            mem.write_slice(src, addr)
                .map_err(|_| ChainError::Memory(addr.0))?;
            done += n;
            Ok(())
        })
    }
}

/// `GuestAddress` addition of an offset known not to overflow.
trait UncheckedAddRaw {
    fn unchecked_add_raw(self, offset: u64) -> GuestAddress;
}

impl UncheckedAddRaw for GuestAddress {
    fn unchecked_add_raw(self, offset: u64) -> GuestAddress {
        GuestAddress(self.0.wrapping_add(offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn raw(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next))
    }

    fn parse(mem: &GuestMemory, descs: &[RawDescriptor]) -> Result<ParsedChain, ChainError> {
        let vq = MockSplitQueue::new(mem, 16);
        vq.add_desc_chains(descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(mem).unwrap().next().unwrap();
        let mut out = Vec::new();
        collect_chain(chain, mem, &mut out)
    }

    #[test]
    fn valid_chain_splits_readable_and_writable() {
        let m = mem();
        let p = parse(
            &m,
            &[
                raw(0x1000, 16, VRING_DESC_F_NEXT, 1),
                raw(0x2000, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2),
                raw(0x3000, 1, VRING_DESC_F_WRITE, 0),
            ],
        )
        .unwrap();
        assert_eq!(p.readable_count, 1);
    }

    #[test]
    fn loops_out_of_bounds_and_order_are_rejected() {
        let m = mem();
        // Descriptor 1 points back at 0: a loop.
        assert_eq!(
            parse(
                &m,
                &[
                    raw(0x1000, 16, VRING_DESC_F_NEXT, 1),
                    raw(0x2000, 16, VRING_DESC_F_NEXT, 0)
                ]
            ),
            Err(ChainError::Truncated)
        );
        // Next index past the queue size.
        assert_eq!(
            parse(&m, &[raw(0x1000, 16, VRING_DESC_F_NEXT, 200)]),
            Err(ChainError::Truncated)
        );
        // Buffer outside guest RAM, and one straddling its end.
        assert!(matches!(
            parse(&m, &[raw(0x4000_0000, 16, 0, 0)]),
            Err(ChainError::OutOfBounds { .. })
        ));
        assert!(matches!(
            parse(&m, &[raw(0xf_fff0, 0x20, 0, 0)]),
            Err(ChainError::OutOfBounds { .. })
        ));
        assert!(matches!(
            parse(&m, &[raw(u64::MAX - 4, 0x20, 0, 0)]),
            Err(ChainError::OutOfBounds { .. })
        ));
        // Readable after writable.
        assert_eq!(
            parse(
                &m,
                &[
                    raw(0x1000, 16, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 1),
                    raw(0x2000, 16, 0, 0)
                ]
            ),
            Err(ChainError::ReadableAfterWritable)
        );
        // A total length overflowing 32 bits ends the chain early.
        assert_eq!(
            parse(
                &m,
                &[
                    raw(0x1000, 16, VRING_DESC_F_NEXT, 1),
                    raw(0x1000, u32::MAX - 8, 0, 0)
                ]
            ),
            Err(ChainError::Truncated)
        );
    }

    #[test]
    fn segments_read_and_write_across_descriptors() {
        let m = mem();
        let descs = [
            Descriptor::new(0x1000, 3, 0, 0),
            Descriptor::new(0x2000, 5, 0, 0),
        ];
        let seg = Segments::new(&descs);
        assert_eq!(seg.len(), 8);
        seg.write_at(&m, 1, &[1, 2, 3, 4]).unwrap();
        let mut buf = [0u8; 8];
        seg.read_at(&m, 0, &mut buf).unwrap();
        assert_eq!(buf, [0, 1, 2, 3, 4, 0, 0, 0]);
        assert_eq!(
            seg.read_at(&m, 5, &mut [0u8; 4]),
            Err(ChainError::ShortChain)
        );
        assert_eq!(
            seg.write_at(&m, u64::MAX, &[0u8; 2]),
            Err(ChainError::ShortChain)
        );
    }
}
