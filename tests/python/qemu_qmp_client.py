#!/usr/bin/env python3
"""Drives a Skiff QMP monitor with the unmodified `qemu.qmp` client library (PyPI).

Usage: qemu_qmp_client.py SOCKET

Run by tests/qmp.rs (test `python_qemu_qmp_client`) against a running skiff whose guest is
running. Phase 1 uses the legacy synchronous wrapper (`QEMUMonitorProtocol`, the one
iotests and qmp-shell use: it sends requests without an id). Phase 2 uses the asyncio
`QMPClient`: it negotiates (enabling OOB because the greeting offers it), executes in-band and
`exec-oob` commands, listens for STOP/RESUME events and quits; skiff then exits.

Prints `qemu.qmp: OK` at the end; any failure raises (non-zero exit status).
"""

import asyncio
import sys

from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

TIMEOUT = 20.0
VERSION = {"qemu": {"micro": 0, "minor": 2, "major": 9}, "package": "skiff-0.1.0"}
MIGRATE_PAUSE_ERROR = (
    "migrate-pause is currently only supported during postcopy-active or postcopy-recover state"
)


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def legacy_phase(path):
    """The synchronous wrapper: id-less cmd_obj, and cmd() (which uses ids)."""
    qmp = QEMUMonitorProtocol(path)
    greeting = qmp.connect(negotiate=True)
    check(greeting["QMP"]["version"] == VERSION, f"greeting {greeting}")
    reply = qmp.cmd_obj({"execute": "query-status"})
    check(reply == {"return": {"status": "running", "running": True}}, f"cmd_obj: {reply}")
    check("id" not in reply, f"the server invented an id: {reply}")
    name = qmp.cmd("query-name")
    check(name == {}, f"cmd('query-name'): {name}")
    qmp.close()
    print("legacy QEMUMonitorProtocol: OK")


async def next_event(client, name):
    event = await asyncio.wait_for(client.events.get(), TIMEOUT)
    check(event["event"] == name, f"expected {name}, got {event}")
    check("data" not in event, f"{name} must have no data: {event}")
    check(set(event["timestamp"]) == {"seconds", "microseconds"}, f"timestamp {event}")
    return event


async def async_phase(path):
    client = QMPClient("skiff-test")
    await asyncio.wait_for(client.connect(path), TIMEOUT)
    greeting = client.greeting
    check(greeting is not None, "no greeting")
    check(list(greeting.QMP.capabilities) == ["oob"], f"capabilities {greeting}")

    status = await asyncio.wait_for(client.execute("query-status"), TIMEOUT)
    check(status == {"status": "running", "running": True}, f"query-status {status}")
    version = await asyncio.wait_for(client.execute("query-version"), TIMEOUT)
    check(version == VERSION, f"query-version {version}")

    # exec-oob (OOB was negotiated by QMPClient since the greeting offered it).
    try:
        await asyncio.wait_for(client.execute("migrate-pause", oob=True), TIMEOUT)
    except ExecuteError as err:
        check(err.error_class == "GenericError", f"class {err.error_class}")
        check(str(err) == MIGRATE_PAUSE_ERROR, f"desc {err}")
    else:
        raise AssertionError("migrate-pause succeeded")
    try:
        await asyncio.wait_for(client.execute("query-status", oob=True), TIMEOUT)
    except ExecuteError as err:
        check(str(err) == "The command query-status does not support OOB", f"desc {err}")
    else:
        raise AssertionError("exec-oob query-status succeeded")

    # Events through the default listener.
    check(client.events.empty(), f"unexpected events {client.events.clear()}")
    await asyncio.wait_for(client.execute("stop"), TIMEOUT)
    await next_event(client, "STOP")
    status = await asyncio.wait_for(client.execute("query-status"), TIMEOUT)
    check(status == {"status": "paused", "running": False}, f"after stop {status}")
    await asyncio.wait_for(client.execute("cont"), TIMEOUT)
    await next_event(client, "RESUME")

    # quit: reply, SHUTDOWN, then the server hangs up.
    await asyncio.wait_for(client.execute("quit"), TIMEOUT)
    event = await asyncio.wait_for(client.events.get(), TIMEOUT)
    check(event["event"] == "SHUTDOWN", f"expected SHUTDOWN, got {event}")
    check(event["data"] == {"guest": False, "reason": "host-qmp-quit"}, f"data {event}")
    try:
        await asyncio.wait_for(client.disconnect(), TIMEOUT)
    except EOFError:
        pass  # the server closed first, as it should after quit
    print("QMPClient: OK")


def main():
    path = sys.argv[1]
    legacy_phase(path)
    asyncio.run(async_phase(path))
    print("qemu.qmp: OK")


if __name__ == "__main__":
    main()
