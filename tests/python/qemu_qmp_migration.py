#!/usr/bin/env python3
"""Drives a postcopy migration between two Skiff processes with the unmodified `qemu.qmp`
asyncio client (PyPI), as a management tool would: capabilities and parameters on both
monitors, `migrate`, `migrate-start-postcopy`, an out-of-band `migrate-pause` on the source,
recovery with an out-of-band `migrate-recover` on the destination and `migrate` with
`resume: true`, then completion, following MIGRATION events throughout.

Usage: qemu_qmp_migration.py SOURCE_QMP DEST_QMP MIGRATION_URI RECOVERY_URI

Run by tests/migration.rs (test `python_qemu_qmp_drives_postcopy_recovery`); the destination
is started with -S and --incoming MIGRATION_URI. Prints `qemu.qmp migration: OK` at the end;
any failure raises (non-zero exit status).
"""

import asyncio
import sys

from qemu.qmp import QMPClient

TIMEOUT = 60.0


def check(cond, what):
    if not cond:
        raise AssertionError(what)


async def migration_status(client, status):
    """Waits for the MIGRATION event announcing `status` (earlier ones are skipped)."""
    while True:
        event = await asyncio.wait_for(client.events.get(), TIMEOUT)
        if event["event"] == "MIGRATION" and event["data"]["status"] == status:
            return


async def connect(name, path):
    client = QMPClient(name)
    await asyncio.wait_for(client.connect(path), TIMEOUT)
    check("oob" in client.greeting.QMP.capabilities, f"{name}: no oob in the greeting")
    return client


async def main(src_path, dst_path, uri, recovery_uri):
    src = await connect("source", src_path)
    dst = await connect("destination", dst_path)
    caps = [{"capability": c, "state": True} for c in ("events", "postcopy-ram")]
    for client in (src, dst):
        await client.execute("migrate-set-capabilities", {"capabilities": caps})
        listed = await client.execute("query-migrate-capabilities")
        on = {c["capability"] for c in listed if c["state"]}
        check({"events", "postcopy-ram"} <= on, f"capabilities {listed}")
    await src.execute(
        "migrate-set-parameters",
        {"max-bandwidth": 8 << 20, "downtime-limit": 1, "max-postcopy-bandwidth": 4096},
    )
    params = await src.execute("query-migrate-parameters")
    check(params["max-postcopy-bandwidth"] == 4096, f"parameters {params}")

    await src.execute("migrate", {"uri": uri})
    await migration_status(src, "active")
    await src.execute("migrate-start-postcopy")
    await migration_status(src, "postcopy-active")
    await migration_status(dst, "postcopy-active")

    # Break the connection on purpose; both sides pause.
    await src.execute("migrate-pause", oob=True)
    await migration_status(src, "postcopy-paused")
    await migration_status(dst, "postcopy-paused")
    info = await src.execute("query-migrate")
    check(info["status"] == "postcopy-paused", f"source {info}")

    # Recover: the destination listens anew (out of band), the source reconnects.
    await dst.execute("migrate-recover", {"uri": recovery_uri}, oob=True)
    await src.execute("migrate", {"uri": recovery_uri, "resume": True})
    await migration_status(src, "postcopy-active")
    await src.execute("migrate-set-parameters", {"max-postcopy-bandwidth": 0})
    await migration_status(src, "completed")
    await migration_status(dst, "completed")
    info = await src.execute("query-migrate")
    check(info["status"] == "completed", f"source {info}")
    check(info["ram"]["total"] > 0 and info["total-time"] > 0, f"source {info}")
    status = await dst.execute("query-status")
    check(status == {"status": "paused", "running": False}, f"destination {status}")
    for client in (src, dst):
        await client.disconnect()
    print("qemu.qmp migration: OK")


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
