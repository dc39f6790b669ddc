//! Sends bytes with descriptors attached (SCM_RIGHTS), as a QMP client passes a descriptor
//! for `getfd`. Shared by the skiff and qmp test crates.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

/// Sends `data` on `stream` in one `sendmsg`, with `fds` attached; returns the bytes sent.
pub fn send_with_fds(stream: &UnixStream, data: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let payload = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    // u64 words keep the buffer aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain old data; all zeroes is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: the control buffer holds CMSG_SPACE(payload) bytes, so the first header and
        // its payload of `fds.len()` ints fit.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                payload,
            );
        }
    }
    // SAFETY: `msg` points at live buffers whose sizes it gives; the socket is open.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.unsigned_abs())
}

/// A pipe, (read end, write end), close-on-exec.
pub fn pipe() -> (std::fs::File, std::fs::File) {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a live array of the two ints pipe2 writes.
    let ret = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(ret, 0, "pipe2: {}", io::Error::last_os_error());
    // SAFETY: pipe2 just opened both descriptors, owned by nothing else.
    unsafe {
        use std::os::fd::FromRawFd;
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    }
}

/// A connected socket pair: the end to pass, and the end kept to tell when every copy of
/// the passed one is closed (see [`peer_closed`]).
pub fn probe_pair() -> (UnixStream, UnixStream) {
    UnixStream::pair().expect("socket pair")
}

/// Whether every copy of `kept`'s peer is closed (writing then fails with EPIPE).
pub fn peer_closed(kept: &UnixStream) -> bool {
    use std::io::Write;
    matches!((&*kept).write(b"x"), Err(e) if e.kind() == io::ErrorKind::BrokenPipe)
}
