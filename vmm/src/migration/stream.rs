//! The migration stream: Skiff's own format, described in `docs/migration-stream.md`.
//!
//! A stream is a header (magic and version) followed by sections. Every section is framed the
//! same way, in both directions (source to destination, and the return path back):
//!
//! ```text
//! u8 kind | 3 zero bytes | u32 LE payload length | payload | u32 LE CRC-32 of all before it
//! ```
//!
//! (except that the CRC of a `RamPages` section stops at its pages: each page has its own
//! in the section's head).
//!
//! The reader checks the kind, the reserved bytes, the length limit and the checksum before
//! any payload is used, so a truncated, corrupted or mismatched stream fails with an error
//! that says which section was bad. The one exception is the page data of a `RamPages`
//! section sent while the guest runs: the source reads it straight from guest RAM, which the
//! guest may change under the send, so a page that misses its own checksum only means "send
//! this page again" (its address and the page checksums have a check of their own; see
//! [`RamPagesHead`]).

use std::io::{self, IoSlice, Read, Write};

/// The first bytes of every stream.
pub const MAGIC: [u8; 8] = *b"SKIFFMIG";
/// The stream format version this build writes and reads.
pub const VERSION: u32 = 2;
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
    /// Source: a run of pages: the head ([`RamPagesHead`]: u64 LE guest-physical address,
    /// u32 LE CRC-32 per page, u32 LE check), then 4 KiB per page.
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
    /// Source, before the first pass: runs (as `RamZero`) of the pages it will send data
    /// for, which the destination may populate ahead of them.
    RamPlan = 11,
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
    const ALL: [Kind; 17] = [
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
        Kind::RamPlan,
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

/// The stream header: magic and version.
fn stream_header() -> [u8; STREAM_HEADER_LEN] {
    let mut header = [0u8; STREAM_HEADER_LEN];
    header[..MAGIC.len()].copy_from_slice(&MAGIC);
    header[MAGIC.len()..].copy_from_slice(&VERSION.to_le_bytes());
    header
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

/// The header and checksum trailer of a section whose payload is the concatenation of
/// `parts`.
fn frame(
    kind: Kind,
    parts: &[&[u8]],
) -> io::Result<([u8; SECTION_HEADER_LEN], [u8; SECTION_TRAILER_LEN], usize)> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let header = section_header(kind, payload_len(len)?);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header);
    for part in parts {
        crc.update(part);
    }
    Ok((header, crc.finalize().to_le_bytes(), len))
}

/// A payload length as a section header carries it; longer than a section may be is an
/// error.
fn payload_len(len: usize) -> io::Result<u32> {
    u32::try_from(len)
        .ok()
        .filter(|l| *l as usize <= MAX_SECTION_LEN)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "section too long"))
}

fn section_header(kind: Kind, len: u32) -> [u8; SECTION_HEADER_LEN] {
    let mut header = [0u8; SECTION_HEADER_LEN];
    header[0] = kind as u8;
    header[4..].copy_from_slice(&len.to_le_bytes());
    header
}

/// Writes one section whose payload is the concatenation of `parts`. Returns the bytes
/// written.
pub fn write_section(out: &mut impl Write, kind: Kind, parts: &[&[u8]]) -> io::Result<u64> {
    let (header, trailer, len) = frame(kind, parts)?;
    out.write_all(&header)?;
    for part in parts {
        out.write_all(part)?;
    }
    out.write_all(&trailer)?;
    Ok((SECTION_HEADER_LEN + len + SECTION_TRAILER_LEN) as u64)
}

/// The head of a `RamPages` payload: the address of the first page, a CRC-32 of each page,
/// and a check: a CRC-32 of the section header, the address and the page checksums. The
/// destination trusts where the pages go and how many there are only once the check
/// passes; a page whose data then misses its own checksum was written during its send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamPagesHead {
    /// Guest-physical address of the first page.
    pub addr: u64,
    /// CRC-32 of each page, as the source read it.
    pub page_crcs: Vec<u32>,
}

impl RamPagesHead {
    /// Encoded length of the head of a section of `pages` pages.
    pub fn len(pages: usize) -> usize {
        12 + 4 * pages
    }

    /// How many pages of `page_size` a `RamPages` payload of `payload_len` bytes carries:
    /// it must be a head and one or more whole pages.
    pub fn pages_in(payload_len: usize, page_size: usize) -> Result<usize, StreamError> {
        let per_page = page_size + 4;
        match payload_len.checked_sub(12) {
            Some(rest) if rest >= per_page && rest % per_page == 0 => Ok(rest / per_page),
            _ => Err(StreamError::Payload {
                kind: Kind::RamPages,
                reason: format!("{payload_len} bytes is not an address and whole pages"),
            }),
        }
    }

    /// For each page of `data` (the section's pages, of `page_size`), whether it matches its
    /// checksum.
    pub fn intact_pages<'a>(
        &'a self,
        data: &'a [u8],
        page_size: usize,
    ) -> impl Iterator<Item = bool> + 'a {
        data.chunks(page_size)
            .zip(&self.page_crcs)
            .map(|(page, crc)| page_crc(page) == *crc)
    }

    /// The check over the section header (kind and `payload_len`), the address and the
    /// page checksums.
    fn check(&self, payload_len: u32) -> u32 {
        let mut crc = crc32fast::Hasher::new();
        crc.update(&section_header(Kind::RamPages, payload_len));
        crc.update(&self.addr.to_le_bytes());
        for page in &self.page_crcs {
            crc.update(&page.to_le_bytes());
        }
        crc.finalize()
    }

    /// The head of a section whose pages take `data_len` bytes.
    pub fn encode(&self, data_len: usize) -> io::Result<Vec<u8>> {
        let head_len = Self::len(self.page_crcs.len());
        let len = payload_len(head_len + data_len)?;
        let mut out = Vec::with_capacity(head_len);
        out.extend_from_slice(&self.addr.to_le_bytes());
        for page in &self.page_crcs {
            out.extend_from_slice(&page.to_le_bytes());
        }
        out.extend_from_slice(&self.check(len).to_le_bytes());
        Ok(out)
    }

    /// Decodes and checks the head (`bytes`, of [`RamPagesHead::len`]) of a `RamPages`
    /// payload of `payload_len` bytes.
    pub fn decode(
        bytes: &[u8],
        payload_len: usize,
        page_size: usize,
    ) -> Result<RamPagesHead, StreamError> {
        let pages = Self::pages_in(payload_len, page_size)?;
        let corrupt = || StreamError::Payload {
            kind: Kind::RamPages,
            reason: "its address or length is corrupt".to_string(),
        };
        if bytes.len() != Self::len(pages) {
            return Err(corrupt());
        }
        let word = |at: usize| {
            let mut w = [0u8; 4];
            w.copy_from_slice(&bytes[at..at + 4]);
            u32::from_le_bytes(w)
        };
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&bytes[..8]);
        let head = RamPagesHead {
            addr: u64::from_le_bytes(addr),
            page_crcs: (0..pages).map(|i| word(8 + 4 * i)).collect(),
        };
        // payload_len fits u32: the section header it came from is one.
        if head.check(payload_len as u32) != word(8 + 4 * pages) {
            return Err(corrupt());
        }
        Ok(head)
    }
}

/// The CRC-32 of one page, as a `RamPages` head carries it.
pub fn page_crc(page: &[u8]) -> u32 {
    crc32fast::hash(page)
}

/// Writes sections to a channel. Small sections are gathered and go out together; a large
/// one goes out in one vectored write with whatever was gathered before it, so its payload
/// (guest RAM, for pages) is copied once, by the kernel, and never in user space.
pub struct SectionWriter<W: Write> {
    inner: W,
    gathered: Vec<u8>,
}

/// Bytes of small sections gathered before they are written.
const GATHER_LIMIT: usize = 64 << 10;
/// Most parts a section is written from.
const MAX_SECTION_PARTS: usize = 4;

impl<W: Write> SectionWriter<W> {
    /// A writer on `inner` that starts with the stream header.
    pub fn new(inner: W) -> Self {
        let mut gathered = Vec::with_capacity(GATHER_LIMIT);
        gathered.extend_from_slice(&stream_header());
        SectionWriter { inner, gathered }
    }

    /// The channel written to.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// Writes (or gathers) one section whose payload is the concatenation of `parts`.
    /// Returns its length on the wire.
    pub fn section(&mut self, kind: Kind, parts: &[&[u8]]) -> io::Result<u64> {
        let (header, trailer, _) = frame(kind, parts)?;
        self.emit(&header, parts, &trailer)
    }

    /// Writes a `RamPages` section of `data` (whole pages of `page_size`) at guest-physical
    /// `addr`. Each page is read once, for its checksum in the head; the section checksum
    /// covers the header and the head; the kernel then copies the pages as they are then.
    pub fn ram_pages(&mut self, addr: u64, data: &[u8], page_size: usize) -> io::Result<u64> {
        let head = RamPagesHead {
            addr,
            page_crcs: data.chunks(page_size).map(page_crc).collect(),
        }
        .encode(data.len())?;
        let header = section_header(Kind::RamPages, payload_len(head.len() + data.len())?);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&header);
        crc.update(&head);
        self.emit(&header, &[&head, data], &crc.finalize().to_le_bytes())
    }

    /// Gathers a section, or writes it with what was gathered.
    fn emit(
        &mut self,
        header: &[u8; SECTION_HEADER_LEN],
        parts: &[&[u8]],
        trailer: &[u8; SECTION_TRAILER_LEN],
    ) -> io::Result<u64> {
        if parts.len() > MAX_SECTION_PARTS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "section in too many parts",
            ));
        }
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let wire = SECTION_HEADER_LEN + len + SECTION_TRAILER_LEN;
        if self.gathered.len() + wire <= GATHER_LIMIT {
            self.gathered.extend_from_slice(header);
            for part in parts {
                self.gathered.extend_from_slice(part);
            }
            self.gathered.extend_from_slice(trailer);
            return Ok(wire as u64);
        }
        let mut slices = [IoSlice::new(&[]); MAX_SECTION_PARTS + 3];
        slices[0] = IoSlice::new(&self.gathered);
        slices[1] = IoSlice::new(header);
        for (slice, part) in slices[2..].iter_mut().zip(parts) {
            *slice = IoSlice::new(part);
        }
        slices[parts.len() + 2] = IoSlice::new(trailer);
        write_all_vectored(&mut self.inner, &mut slices[..parts.len() + 3])?;
        self.gathered.clear();
        Ok(wire as u64)
    }

    /// Writes what was gathered.
    pub fn flush(&mut self) -> io::Result<()> {
        if !self.gathered.is_empty() {
            self.inner.write_all(&self.gathered)?;
            self.gathered.clear();
        }
        self.inner.flush()
    }
}

/// Writes every byte of `slices` (`Write::write_all_vectored` is not stable).
fn write_all_vectored(out: &mut impl Write, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match out.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
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
        self.read_unhashed(input, buf)?;
        self.crc.update(buf);
        Ok(())
    }

    /// Reads the next `buf.len()` bytes of the payload without adding them to the section
    /// checksum: the pages of a `RamPages` section, which the checksums in its head cover.
    pub fn read_unhashed(
        &mut self,
        input: &mut impl Read,
        buf: &mut [u8],
    ) -> Result<(), StreamError> {
        if buf.len() > self.unread {
            return Err(StreamError::Payload {
                kind: self.kind,
                reason: format!("{} bytes is shorter than its content", self.len),
            });
        }
        read_exact_or(input, buf, "a section", false)?;
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

/// Reads and checks the head of a `RamPages` section; its pages follow, to be read with
/// [`SectionBody::read_unhashed`] and checked against the head's page checksums.
pub fn read_pages_head(
    body: &mut SectionBody,
    input: &mut impl Read,
    page_size: usize,
) -> Result<RamPagesHead, StreamError> {
    let mut head = vec![0u8; RamPagesHead::len(RamPagesHead::pages_in(body.len, page_size)?)];
    body.read(input, &mut head)?;
    RamPagesHead::decode(&head, body.len, page_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(sections: &[(Kind, Vec<u8>)]) -> Vec<u8> {
        let mut out = stream_header().to_vec();
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
            (Kind::RamPages, vec![7u8; 16 + 4096]),
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
            (Kind::RamPages, vec![3u8; 16 + 4096]),
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
        let mut bytes = stream_header().to_vec();
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
        assert!(RamPagesHead::pages_in(16 + 100, 4096).is_err());
        assert!(RamPagesHead::pages_in(16, 4096).is_err());
    }

    /// A `RamPages` section as the source writes it.
    fn ram_pages_section(addr: u64, data: &[u8]) -> Vec<u8> {
        let mut writer = SectionWriter::new(Vec::new());
        writer.ram_pages(addr, data, 4096).unwrap();
        writer.flush().unwrap();
        writer.inner[STREAM_HEADER_LEN..].to_vec()
    }

    /// Reads a `RamPages` section as the destination does: head, pages, checksum.
    fn read_pages(mut section: &[u8]) -> Result<(RamPagesHead, Vec<u8>), StreamError> {
        let mut body = SectionBody::start(&mut section)?;
        let head = read_pages_head(&mut body, &mut section, 4096)?;
        let mut data = vec![0u8; head.page_crcs.len() * 4096];
        body.read_unhashed(&mut section, &mut data)?;
        body.finish(&mut section)?;
        Ok((head, data))
    }

    #[test]
    fn pages_have_their_own_checksums_and_the_head_its_check() {
        let mut data = vec![9u8; 2 * 4096];
        data[4096] = 1;
        let section = ram_pages_section(0x5000, &data);
        let (head, pages) = read_pages(&section).unwrap();
        assert_eq!(head.addr, 0x5000);
        assert_eq!(
            head.page_crcs,
            vec![page_crc(&data[..4096]), page_crc(&data[4096..])]
        );
        assert!(pages == data);
        // Any damage to the head is found, whatever the pages hold.
        let head_end = SECTION_HEADER_LEN + RamPagesHead::len(2);
        for at in SECTION_HEADER_LEN..head_end {
            let mut bad = section.clone();
            bad[at] ^= 0x10;
            let e = read_pages(&bad).unwrap_err().to_string();
            assert!(e.contains("address or length is corrupt"), "{at}: {e}");
        }
        // Damaged page data passes the section checksum (it stops at the pages) and fails
        // the page's own.
        let mut bad = section.clone();
        bad[head_end + 4096 + 7] ^= 0x10;
        let (head, pages) = read_pages(&bad).unwrap();
        assert_eq!(head.page_crcs[0], page_crc(&pages[..4096]));
        assert_ne!(head.page_crcs[1], page_crc(&pages[4096..]));
        // A damaged section checksum is found.
        let mut bad = section.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x10;
        assert!(matches!(
            read_pages(&bad),
            Err(StreamError::Checksum { .. })
        ));
        assert!(RamPagesHead::pages_in(12 + 4100 + 1, 4096).is_err());
    }

    #[test]
    fn section_writer_gathers_small_sections_and_writes_large_ones_whole() {
        /// Records each write call.
        #[derive(Default)]
        struct Calls(Vec<Vec<u8>>);
        impl Write for Calls {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.push(buf.to_vec());
                Ok(buf.len())
            }
            fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
                self.0
                    .push(bufs.iter().flat_map(|b| b.iter().copied()).collect());
                Ok(bufs.iter().map(|b| b.len()).sum())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let pages = vec![5u8; 64 * 4096];
        let mut writer = SectionWriter::new(Calls::default());
        writer.section(Kind::Config, &[b"{}"]).unwrap();
        writer.section(Kind::RamZero, &[&[0u8; 12]]).unwrap();
        assert!(writer.get_ref().0.is_empty(), "small sections are gathered");
        writer.ram_pages(0x10_0000, &pages, 4096).unwrap();
        assert_eq!(writer.get_ref().0.len(), 1, "one write for all of it");
        writer.section(Kind::End, &[]).unwrap();
        writer.flush().unwrap();
        let calls = writer.inner.0;
        assert_eq!(calls.len(), 2);
        let mut expected = stream(&[
            (Kind::Config, b"{}".to_vec()),
            (Kind::RamZero, vec![0u8; 12]),
        ]);
        expected.extend(ram_pages_section(0x10_0000, &pages));
        write_section(&mut expected, Kind::End, &[]).unwrap();
        assert!(calls.concat() == expected, "the same bytes, in two writes");
    }
}
