#!/usr/bin/env python3
"""Passes descriptors to a QMP monitor with the unmodified `qemu.qmp` client library (PyPI).

Usage: qemu_qmp_fds.py SOCKET MAGIC

Run by tests/qmp.rs (test `python_qemu_qmp_passes_descriptors`) against a skiff whose guest
is running; the same script runs against QEMU (`-M none`, MAGIC `QEVM`), which is how the
texts it checks were taken. Phase 1 uses the asyncio `QMPClient.send_fd_scm` (which sends
the descriptor on a lone space before the command): getfd names a socket, closefd closes it,
the errors for a missing descriptor or name, and an out-of-band migrate-recover with
`fd:NAME` outside postcopy leaves the descriptor alone. Phase 2 does the same naming with the
legacy synchronous wrapper (`QEMUMonitorProtocol.send_fd_scm`), then passes a file Python
opened (beside SOCKET) and migrates the VM into it with `fd:NAME`; the file must start with
MAGIC (the stream's header, docs/migration-stream.md for skiff). Then it quits the VM.

Prints `qemu.qmp descriptors: OK` at the end; any failure raises (non-zero exit status).
"""

import asyncio
import os
import socket
import sys
import time

from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

TIMEOUT = 20.0
NO_FD = "No file descriptor supplied via SCM_RIGHTS"
RECOVER_STATE = "Migrate recover can only be run when postcopy is paused."


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def peer_closed(kept):
    """Whether every copy of the passed end of `kept`'s pair is closed (reads end of file)."""
    kept.settimeout(0.2)
    try:
        return kept.recv(1) == b""
    except socket.timeout:
        return False


def error_desc(reply):
    check("error" in reply, f"expected an error, got {reply}")
    return reply["error"]["desc"]


def pass_socket(send_fd_scm):
    """Sends one end of a new socket pair with `send_fd_scm`; returns the end kept."""
    kept, passed = socket.socketpair()
    send_fd_scm(passed.fileno())
    passed.close()
    return kept


def legacy_phase(path, magic):
    qmp = QEMUMonitorProtocol(path)
    qmp.connect(negotiate=True)
    qmp.settimeout(TIMEOUT)
    check(error_desc(qmp.cmd_raw("getfd", {"fdname": "py"})) == NO_FD, "getfd without fd")

    kept = pass_socket(qmp.send_fd_scm)
    check(qmp.cmd("getfd", fdname="py") == {}, "getfd")
    check(not peer_closed(kept), "the monitor does not keep the descriptor")
    check(qmp.cmd("closefd", fdname="py") == {}, "closefd")
    check(peer_closed(kept), "closefd left the descriptor open")
    desc = error_desc(qmp.cmd_raw("closefd", {"fdname": "py"}))
    check(desc == "File descriptor named 'py' not found", f"closefd twice: {desc}")

    kept = pass_socket(qmp.send_fd_scm)
    desc = error_desc(qmp.cmd_raw("getfd", {"fdname": "9py"}))
    check(desc == "Parameter 'fdname' expects a name not starting with a digit", desc)
    check(peer_closed(kept), "a refused descriptor stays open")

    desc = error_desc(qmp.cmd_raw("migrate", {"uri": "fd:nope"}))
    check(desc == "File descriptor named 'nope' has not been found", f"migrate: {desc}")

    # A file opened here: the VM's migration stream goes into it.
    snapshot = os.path.join(os.path.dirname(path), "py-snapshot.bin")
    with open(snapshot, "wb") as out:
        qmp.send_fd_scm(out.fileno())
    check(qmp.cmd("getfd", fdname="snap") == {}, "getfd of the file")
    check(qmp.cmd("migrate", uri="fd:snap") == {}, "migrate fd:snap")
    deadline = time.monotonic() + TIMEOUT
    while True:
        status = qmp.cmd("query-migrate").get("status")
        if status == "completed":
            break
        check(status in ("setup", "active", "device"), f"migration status {status}")
        check(time.monotonic() < deadline, "the migration into the file does not complete")
        time.sleep(0.01)
    desc = error_desc(qmp.cmd_raw("closefd", {"fdname": "snap"}))
    check(desc == "File descriptor named 'snap' not found", f"migrate kept the fd: {desc}")
    with open(snapshot, "rb") as stream:
        head = stream.read(len(magic))
    check(head == magic, f"the file starts with {head!r}, not {magic!r}")
    check(qmp.cmd("quit") == {}, "quit")
    try:
        qmp.close()
    except EOFError:
        pass  # the VM hung up first, as it does after quit
    print("legacy QEMUMonitorProtocol.send_fd_scm: OK")


async def async_phase(path):
    client = QMPClient("skiff-fds")
    await asyncio.wait_for(client.connect(path), TIMEOUT)

    async def execute(name, args=None, oob=False):
        return await asyncio.wait_for(client.execute(name, args, oob=oob), TIMEOUT)

    async def refused(name, args, oob=False):
        try:
            await execute(name, args, oob)
        except ExecuteError as err:
            check(err.error_class == "GenericError", f"{name}: class {err.error_class}")
            return str(err)
        raise AssertionError(f"{name} {args} succeeded")

    check(await refused("getfd", {"fdname": "a"}) == NO_FD, "getfd without fd")
    kept = pass_socket(client.send_fd_scm)
    check(await execute("getfd", {"fdname": "a"}) == {}, "getfd")
    check(not peer_closed(kept), "the monitor does not keep the descriptor")
    # Out of band, outside postcopy: refused for the state, the descriptor left alone.
    desc = await refused("migrate-recover", {"uri": "fd:a"}, oob=True)
    check(desc == RECOVER_STATE, f"migrate-recover: {desc}")
    check(not peer_closed(kept), "a refused migrate-recover took the descriptor")
    check(await execute("closefd", {"fdname": "a"}) == {}, "closefd")
    check(peer_closed(kept), "closefd left the descriptor open")
    desc = await refused("closefd", {"fdname": "a"})
    check(desc == "File descriptor named 'a' not found", f"closefd twice: {desc}")

    await asyncio.wait_for(client.disconnect(), TIMEOUT)
    print("QMPClient.send_fd_scm: OK")


def main():
    path, magic = sys.argv[1], sys.argv[2].encode()
    asyncio.run(async_phase(path))
    legacy_phase(path, magic)
    print("qemu.qmp descriptors: OK")


if __name__ == "__main__":
    main()
