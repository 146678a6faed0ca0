"""One writer per predictions folder (cxrray.score.store): an flock locally, a lease on object stores.

A local output (and NFS) holds an flock on `_lock`: the kernel drops it when the holder dies,
so a killed run never blocks the next one. Object stores have no locks, so there the writer
keeps a lease object `_lock.json` fresh, and a new run may take it over once it has expired or
its owner's process is gone (see _Lease).

Kept apart from store.py: the part/commit protocol does not depend on how exclusivity is
obtained, and store.py re-exports these names so `cxrray.score.store.OutputLock` still works.
"""
from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import time
import uuid

from cxrray import storage
from cxrray.score.errors import OutputConflict

log = logging.getLogger(__name__)

LOCK = "_lock"
LEASE = "_lock.json"
LEASE_TTL_S = 90.0  # an object-store lock not refreshed for this long is free to take


class OutputLock:
    """One writer per output folder: an flock locally, a refreshed lease on object stores."""

    def __init__(self, out: str):
        self.out = storage.normalize(out)
        self._lease: _Lease | None = None
        self.fd: int | None = None
        if storage.is_uri(self.out):
            self._lease = _Lease(self.out)
            return
        storage.makedirs(self.out)
        path = os.path.join(self.out, LOCK)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise OutputConflict(f"another scoring run is writing {self.out}; wait for it or kill it") from None

    def release(self) -> None:
        if self._lease is not None:
            self._lease.release()
        elif self.fd is not None:
            os.close(self.fd)


class _Lease:
    """`_lock.json` = {owner, host, pid, refreshed}; refreshed every TTL/4 by a daemon thread.
    Taken over when expired, or when its owner is a dead process on this host (a SIGKILLed
    driver that is re-run at once need not wait out the TTL). Object stores here offer no
    compare-and-swap, so after writing the lease it is read back once more: two drivers
    started within the same second are then caught unless both writes land before either
    read, which the single-driver design of a scoring job does not rely on."""

    def __init__(self, out: str):
        self.path = storage.join(out, LEASE)
        self.owner = uuid.uuid4().hex
        self.host, self.pid = socket.gethostname(), os.getpid()
        held = self._read()
        if held and held.get("owner") != self.owner and not self._free(held):
            age = time.time() - float(held.get("refreshed", 0))
            raise OutputConflict(f"another scoring run (host {held.get('host')}, pid {held.get('pid')}) holds "
                                 f"{self.path}, refreshed {age:.0f}s ago; wait for it, or for the lease to "
                                 f"expire {LEASE_TTL_S:.0f}s after its last refresh")
        self._write()
        time.sleep(0.2)
        if (self._read() or {}).get("owner") != self.owner:
            raise OutputConflict(f"another scoring run took {self.path} at the same moment; run one at a time")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, name="cxrray-lease", daemon=True)
        self._thread.start()

    def _read(self) -> dict | None:
        try:
            return storage.read_json(self.path)
        except (FileNotFoundError, ValueError):
            return None

    def _write(self) -> None:
        storage.write_json(self.path, {"owner": self.owner, "host": self.host, "pid": self.pid,
                                       "refreshed": time.time()})

    def _free(self, held: dict) -> bool:
        if time.time() - float(held.get("refreshed", 0)) > LEASE_TTL_S:
            return True
        if held.get("host") == self.host:
            try:
                os.kill(int(held.get("pid", -1)), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError):
                return False
        return False

    def _refresh(self) -> None:
        while not self._stop.wait(LEASE_TTL_S / 4):
            try:
                self._write()
            except OSError as e:  # a blip: the next refresh retries well before expiry
                log.warning("could not refresh %s: %s", self.path, e)

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if (self._read() or {}).get("owner") == self.owner:
            storage.delete(self.path)
