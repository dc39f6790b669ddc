//! The migration stream: Skiff's own format, described in `docs/migration-stream.md`.
//!
//! A stream is a header (magic and version) followed by sections. Every section is framed the
//! same way, in both directions (source to destination, and the return path back):
//!
//! ```text
//! u8 kind | 3 zero bytes | u32 LE payload length | payload | u32 LE CRC-32 of all before it
//! ```
//!
//! The reader checks the kind, the reserved bytes, the length limit and the checksum before
//! any payload is used, so a truncated, corrupted or mismatched stream fails with an error
//! that says which section was bad.

use std::io::{self, Read, Write};

/// The first bytes of every stream.
pub const MAGIC: [u8; 8] = *b"SKIFFMIG";
/// The stream format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Largest payload a section may carry (device state of many vCPUs fits easily).
pub const MAX_SECTION_LEN: usize = 64 << 20;
/// Bytes before the payload.
const SECTION_HEADER_LEN: usize = 8;
/// Bytes of the checksum after the payload.
const SECTION_TRAILER_LEN: usize = 4;
/// Bytes of the stream header.
pub const STREAM_HEADER_LEN: usize = MAGIC.len() + 4;

/// What a section carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Source: the VM's shape (JSON), checked by the destination.
    Config = 1,
    /// Source: a run of pages: u64 LE guest-physical address, then 4 KiB per page.
    RamPages = 2,
    /// Source: runs of zero pages: (u64 LE address, u32 LE page count) each.
    RamZero = 3,
    /// Source: the vCPU, VM and device state (JSON); the guest may run after it.
    DeviceState = 4,
    /// Source: nothing follows; the destination answers `Ack`.
    End = 5,
    /// Source: postcopy may follow; the destination checks it can serve page faults.
    PostcopyAdvise = 6,
    /// Source: runs of pages the destination must drop (same layout as `RamZero`).
    PostcopyDiscard = 7,
    /// Source: device state (JSON), after which the destination runs and pulls the pages
    /// it lacks.
    PostcopyRun = 8,
    /// Source, on a resumed connection: asks for the destination's received-page bitmap.
    ResumeRequest = 9,
    /// Source, on a resumed connection: postcopy goes on.
    PostcopyResume = 10,
    /// Return path: the destination loaded everything it was sent.
    Ack = 0x81,
    /// Return path: the destination failed (UTF-8 reason).
    Error = 0x82,
    /// Return path: send these pages first (u64 LE address, u32 LE page count).
    RequestPages = 0x83,
    /// Return path: the received-page bitmap (u64 LE words, bit i = page i).
    RecvBitmap = 0x84,
    /// Return path: answer to `PostcopyResume`.
    ResumeAck = 0x85,
    /// Return path: the destination loaded the postcopy device state and runs.
    PostcopyRunning = 0x86,
}

impl Kind {
    const ALL: [Kind; 16] = [
        Kind::Config,
        Kind::RamPages,
        Kind::RamZero,
        Kind::DeviceState,
        Kind::End,
        Kind::PostcopyAdvise,
        Kind::PostcopyDiscard,
        Kind::PostcopyRun,
        Kind::ResumeRequest,
        Kind::PostcopyResume,
        Kind::Ack,
        Kind::Error,
        Kind::RequestPages,
        Kind::RecvBitmap,
        Kind::ResumeAck,
        Kind::PostcopyRunning,
    ];

    fn from_u8(value: u8) -> Option<Kind> {
        Kind::ALL.iter().copied().find(|k| *k as u8 == value)
    }
}

/// Errors reading or writing a stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The connection or file failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The stream ended where no section may end.
    #[error("the stream ends in the middle of {0}")]
    Truncated(&'static str),
    /// The stream ended cleanly at a section boundary but more was expected.
    #[error("the stream ended before the migration was complete")]
    Eof,
    /// Not a Skiff migration stream.
    #[error("not a Skiff migration stream (bad magic)")]
    BadMagic,
    /// A stream of another format version.
    #[error(
        "migration stream version {found} is not supported (this build reads version {VERSION})"
    )]
    BadVersion {
        /// The version in the stream.
        found: u32,
    },
    /// A section of unknown kind.
    #[error("unknown section kind {0:#04x}")]
    UnknownKind(u8),
    /// The reserved bytes of a section header are not zero.
    #[error("corrupt section header (reserved bytes {0:02x?})")]
    Reserved([u8; 3]),
    /// A section longer than any valid one.
    #[error("{kind:?} section of {len} bytes is longer than the {MAX_SECTION_LEN} byte limit")]
    TooLong {
        /// The section.
        kind: Kind,
        /// Its declared length.
        len: usize,
    },
    /// The checksum does not match.
    #[error("{kind:?} section of {len} bytes fails its checksum (stream corrupted)")]
    Checksum {
        /// The section.
        kind: Kind,
        /// Its length.
        len: usize,
    },
    /// The payload does not have the layout its kind requires.
    #[error("bad {kind:?} section: {reason}")]
    Payload {
        /// The section.
        kind: Kind,
        /// What is wrong.
        reason: String,
    },
    /// A section that is not valid at this point of the stream.
    #[error("unexpected {kind:?} section {when}")]
    Unexpected {
        /// The section.
        kind: Kind,
        /// Where it appeared.
        when: &'static str,
    },
}

/// Writes the stream header.
pub fn write_header(out: &mut impl Write) -> io::Result<()> {
    let mut header = [0u8; STREAM_HEADER_LEN];
    header[..MAGIC.len()].copy_from_slice(&MAGIC);
    header[MAGIC.len()..].copy_from_slice(&VERSION.to_le_bytes());
    out.write_all(&header)
}

/// Reads and checks the stream header.
pub fn read_header(input: &mut impl Read) -> Result<(), StreamError> {
    let mut header = [0u8; STREAM_HEADER_LEN];
    read_exact_or(input, &mut header, "the stream header", true)?;
    if header[..MAGIC.len()] != MAGIC {
        return Err(StreamError::BadMagic);
    }
    let mut version = [0u8; 4];
    version.copy_from_slice(&header[MAGIC.len()..]);
    let found = u32::from_le_bytes(version);
    if found != VERSION {
        return Err(StreamError::BadVersion { found });
    }
    Ok(())
}

/// Writes one section whose payload is the concatenation of `parts`. Returns the bytes
/// written.
pub fn write_section(out: &mut impl Write, kind: Kind, parts: &[&[u8]]) -> io::Result<u64> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let len32 = u32::try_from(len)
        .ok()
        .filter(|l| *l as usize <= MAX_SECTION_LEN)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "section too long"))?;
    let mut header = [0u8; SECTION_HEADER_LEN];
    header[0] = kind as u8;
    header[4..].copy_from_slice(&len32.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header);
    out.write_all(&header)?;
    for part in parts {
        crc.update(part);
        out.write_all(part)?;
    }
    out.write_all(&crc.finalize().to_le_bytes())?;
    Ok((SECTION_HEADER_LEN + len + SECTION_TRAILER_LEN) as u64)
}

/// A section whose header was read and checked; its payload is read with
/// [`SectionBody::read`] and its checksum checked by [`SectionBody::finish`].
pub struct SectionBody {
    /// What the section carries.
    pub kind: Kind,
    /// Payload length.
    pub len: usize,
    unread: usize,
    crc: crc32fast::Hasher,
}

impl SectionBody {
    /// Reads the next section header. [`StreamError::Eof`] means the stream ended cleanly
    /// before a section.
    pub fn start(input: &mut impl Read) -> Result<SectionBody, StreamError> {
        let mut header = [0u8; SECTION_HEADER_LEN];
        read_exact_or(input, &mut header, "a section header", true)?;
        let kind = Kind::from_u8(header[0]).ok_or(StreamError::UnknownKind(header[0]))?;
        let reserved = [header[1], header[2], header[3]];
        if reserved != [0; 3] {
            return Err(StreamError::Reserved(reserved));
        }
        let mut len = [0u8; 4];
        len.copy_from_slice(&header[4..]);
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_SECTION_LEN {
            return Err(StreamError::TooLong { kind, len });
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&header);
        Ok(SectionBody {
            kind,
            len,
            unread: len,
            crc,
        })
    }

    /// Reads the next `buf.len()` bytes of the payload.
    pub fn read(&mut self, input: &mut impl Read, buf: &mut [u8]) -> Result<(), StreamError> {
        if buf.len() > self.unread {
            return Err(StreamError::Payload {
                kind: self.kind,
                reason: format!("{} bytes is shorter than its content", self.len),
            });
        }
        read_exact_or(input, buf, "a section", false)?;
        self.crc.update(buf);
        self.unread -= buf.len();
        Ok(())
    }

    /// Reads the checksum (all the payload must have been read) and checks it.
    pub fn finish(self, input: &mut impl Read) -> Result<Kind, StreamError> {
        if self.unread != 0 {
            return Err(StreamError::Payload {
                kind: self.kind,
                reason: format!("{} bytes left unread", self.unread),
            });
        }
        let mut trailer = [0u8; SECTION_TRAILER_LEN];
        read_exact_or(input, &mut trailer, "a section checksum", false)?;
        if self.crc.finalize() != u32::from_le_bytes(trailer) {
            return Err(StreamError::Checksum {
                kind: self.kind,
                len: self.len,
            });
        }
        Ok(self.kind)
    }

    /// Reads the whole payload into `payload` (resized to it) and checks the checksum.
    pub fn read_all(
        mut self,
        input: &mut impl Read,
        payload: &mut Vec<u8>,
    ) -> Result<Kind, StreamError> {
        payload.resize(self.len, 0);
        self.read(input, payload)?;
        self.finish(input)
    }
}

/// Reads one section into `payload` (resized to its length) and returns its kind.
/// [`StreamError::Eof`] means the stream ended cleanly before a section.
pub fn read_section(input: &mut impl Read, payload: &mut Vec<u8>) -> Result<Kind, StreamError> {
    SectionBody::start(input)?.read_all(input, payload)
}

/// `read_exact`, telling a clean end of stream (nothing read, where allowed) from a cut.
fn read_exact_or(
    input: &mut impl Read,
    buf: &mut [u8],
    what: &'static str,
    eof_allowed: bool,
) -> Result<(), StreamError> {
    let mut done = 0;
    while done < buf.len() {
        match input.read(&mut buf[done..]) {
            Ok(0) if done == 0 && eof_allowed => return Err(StreamError::Eof),
            Ok(0) => return Err(StreamError::Truncated(what)),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(StreamError::Io(e)),
        }
    }
    Ok(())
}

/// A run of pages: first guest-physical address and page count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    /// Guest-physical address of the first page.
    pub addr: u64,
    /// Number of pages.
    pub count: u32,
}

/// Bytes of one encoded [`PageRun`].
const PAGE_RUN_LEN: usize = 12;

impl PageRun {
    /// Appends the run's encoding to `out`.
    pub fn encode(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.addr.to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
    }

    /// Decodes a payload made of runs.
    pub fn decode_all(kind: Kind, payload: &[u8]) -> Result<Vec<PageRun>, StreamError> {
        if payload.len() % PAGE_RUN_LEN != 0 {
            return Err(StreamError::Payload {
                kind,
                reason: format!("{} bytes is not a whole number of page runs", payload.len()),
            });
        }
        Ok(payload
            .chunks_exact(PAGE_RUN_LEN)
            .map(|c| {
                let mut addr = [0u8; 8];
                addr.copy_from_slice(&c[..8]);
                let mut count = [0u8; 4];
                count.copy_from_slice(&c[8..]);
                PageRun {
                    addr: u64::from_le_bytes(addr),
                    count: u32::from_le_bytes(count),
                }
            })
            .collect())
    }
}

/// Splits a `RamPages` payload into its address and page data.
pub fn decode_pages(payload: &[u8], page_size: usize) -> Result<(u64, &[u8]), StreamError> {
    let bad = |reason: String| StreamError::Payload {
        kind: Kind::RamPages,
        reason,
    };
    if payload.len() < 8 + page_size || (payload.len() - 8) % page_size != 0 {
        return Err(bad(format!(
            "{} bytes is not an address and whole pages",
            payload.len()
        )));
    }
    let mut addr = [0u8; 8];
    addr.copy_from_slice(&payload[..8]);
    Ok((u64::from_le_bytes(addr), &payload[8..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(sections: &[(Kind, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        write_header(&mut out).unwrap();
        for (kind, payload) in sections {
            write_section(&mut out, *kind, &[payload]).unwrap();
        }
        out
    }

    fn read_all(mut bytes: &[u8]) -> Result<Vec<(Kind, Vec<u8>)>, StreamError> {
        read_header(&mut bytes)?;
        let mut sections = Vec::new();
        loop {
            let mut payload = Vec::new();
            match read_section(&mut bytes, &mut payload) {
                Ok(kind) => sections.push((kind, payload)),
                Err(StreamError::Eof) => return Ok(sections),
                Err(e) => return Err(e),
            }
        }
    }

    #[test]
    fn round_trip() {
        let sections = vec![
            (Kind::Config, b"{}".to_vec()),
            (Kind::RamPages, vec![7u8; 8 + 4096]),
            (Kind::End, Vec::new()),
        ];
        assert_eq!(read_all(&stream(&sections)).unwrap(), sections);
    }

    #[test]
    fn every_cut_is_detected() {
        let bytes = stream(&[(Kind::Config, b"{}".to_vec()), (Kind::End, Vec::new())]);
        let boundaries = [0, STREAM_HEADER_LEN, STREAM_HEADER_LEN + 8 + 2 + 4];
        for cut in 0..bytes.len() {
            let result = read_all(&bytes[..cut]);
            if boundaries.contains(&cut) && cut != 0 {
                // A cut at a section boundary reads as a clean end; the destination then
                // fails because End never came.
                assert!(result.is_ok(), "cut at {cut}");
            } else {
                assert!(result.is_err(), "cut at {cut} was accepted");
            }
        }
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let bytes = stream(&[
            (Kind::Config, b"{\"a\":1}".to_vec()),
            (Kind::RamPages, vec![3u8; 8 + 4096]),
        ]);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(read_all(&bad).is_err(), "flip at {i} was accepted");
        }
    }

    #[test]
    fn header_errors_are_specific() {
        assert!(matches!(
            read_all(b"NOTSKIFF\x01\0\0\0"),
            Err(StreamError::BadMagic)
        ));
        assert!(matches!(
            read_all(b"SKIFFMIG\x09\0\0\0"),
            Err(StreamError::BadVersion { found: 9 })
        ));
    }

    #[test]
    fn oversized_and_unknown_sections_are_refused_before_reading() {
        let mut bytes = Vec::new();
        write_header(&mut bytes).unwrap();
        bytes.extend_from_slice(&[Kind::RamPages as u8, 0, 0, 0]);
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(read_all(&bytes), Err(StreamError::TooLong { .. })));
        bytes[STREAM_HEADER_LEN] = 0x42;
        assert!(matches!(
            read_all(&bytes),
            Err(StreamError::UnknownKind(0x42))
        ));
    }

    #[test]
    fn page_runs_decode_and_reject_partial() {
        let mut payload = Vec::new();
        PageRun {
            addr: 0x1000,
            count: 3,
        }
        .encode(&mut payload);
        assert_eq!(
            PageRun::decode_all(Kind::RamZero, &payload).unwrap(),
            vec![PageRun {
                addr: 0x1000,
                count: 3
            }]
        );
        assert!(PageRun::decode_all(Kind::RamZero, &payload[..11]).is_err());
        assert!(decode_pages(&[0u8; 8 + 100], 4096).is_err());
        assert!(decode_pages(&[0u8; 8], 4096).is_err());
    }
}
