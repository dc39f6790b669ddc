//! virtio-blk request headers and discard/write-zeroes segments (virtio 1.2, section 5.2.6).

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};

/// Size of the request header (`type`, `reserved`, `sector`).
pub const HEADER_LEN: usize = 16;
/// Size of one discard / write-zeroes segment.
pub const SEGMENT_LEN: usize = 16;
/// Sector size of the virtio-blk protocol, as a shift.
pub const SECTOR_SHIFT: u32 = 9;
/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Write-zeroes segment flag: the device may deallocate the range.
pub const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors into the driver's buffers.
    In,
    /// Write the driver's buffers to sectors.
    Out,
    /// Make earlier writes durable.
    Flush,
    /// Return the device ID string.
    GetId,
    /// Discard sector ranges.
    Discard,
    /// Zero sector ranges.
    WriteZeroes,
    /// Any other type (answered with UNSUPP).
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(value: u32) -> Self {
        match value {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            VIRTIO_BLK_T_DISCARD => Self::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Self::WriteZeroes,
            other => Self::Unsupported(other),
        }
    }
}

/// A decoded request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// The request type.
    pub request_type: RequestType,
    /// First sector (512-byte units) for reads and writes.
    pub sector: u64,
}

impl RequestHeader {
    /// Decodes the 16 little-endian header bytes.
    pub fn parse(bytes: &[u8; HEADER_LEN]) -> Self {
        let [t0, t1, t2, t3, _, _, _, _, s @ ..] = *bytes;
        Self {
            request_type: RequestType::from(u32::from_le_bytes([t0, t1, t2, t3])),
            sector: u64::from_le_bytes(s),
        }
    }
}

/// One range of a discard or write-zeroes request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Flags ([`WRITE_ZEROES_FLAG_UNMAP`]; the other bits are reserved).
    pub flags: u32,
}

impl Segment {
    /// Decodes the 16 little-endian segment bytes.
    pub fn parse(bytes: &[u8; SEGMENT_LEN]) -> Self {
        let [s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, f0, f1, f2, f3] = *bytes;
        Self {
            sector: u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
            num_sectors: u32::from_le_bytes([n0, n1, n2, n3]),
            flags: u32::from_le_bytes([f0, f1, f2, f3]),
        }
    }
}

/// Converts a sector range to a byte range `(offset, len)` if it lies within `capacity` bytes.
pub fn byte_range(sector: u64, len_bytes: u64, capacity: u64) -> Option<(u64, u64)> {
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    let end = offset.checked_add(len_bytes)?;
    (end <= capacity).then_some((offset, len_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_segment_decode() {
        let mut b = [0u8; 16];
        b[0] = 1;
        b[8..].copy_from_slice(&0x1234u64.to_le_bytes());
        let h = RequestHeader::parse(&b);
        assert_eq!(h.request_type, RequestType::Out);
        assert_eq!(h.sector, 0x1234);
        b[0] = 99;
        assert_eq!(
            RequestHeader::parse(&b).request_type,
            RequestType::Unsupported(99)
        );
        let mut s = [0u8; 16];
        s[..8].copy_from_slice(&7u64.to_le_bytes());
        s[8..12].copy_from_slice(&3u32.to_le_bytes());
        s[12] = 1;
        assert_eq!(
            Segment::parse(&s),
            Segment {
                sector: 7,
                num_sectors: 3,
                flags: 1
            }
        );
    }

    #[test]
    fn byte_ranges_are_checked() {
        assert_eq!(byte_range(1, 512, 1024), Some((512, 512)));
        assert_eq!(byte_range(1, 1024, 1024), None);
        assert_eq!(byte_range(u64::MAX, 512, u64::MAX), None);
        assert_eq!(byte_range(u64::MAX >> 9, 512, u64::MAX), None);
    }
}
