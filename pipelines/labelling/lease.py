"""One attempt at a time per output: a lease object beside the labels, ``<output>/_lease.json``.

An attempt creates the lease before it plans or writes anything, renews it while it runs and deletes it at its
end. The create is atomic where the store allows it (``link`` of a complete file locally, a conditional PUT with
``If-None-Match: *`` on S3), so of two attempts started together exactly one gets it; the other is refused in one
line naming the holder. To tell a live holder from a dead one, a new attempt that finds a fresh lease watches it
for one renewal interval: renewed means alive (refused); not renewed means its attempt died recently (a killed
job re-submitted at once), and the new attempt waits until the lease is :data:`STALE_SECONDS` old, then takes it
over and says so: never longer than that. On the holder's own host a lease whose process is gone is taken over
at once.

Renewal runs in a daemon thread; it re-reads the lease first, so an attempt whose lease was taken over (it stalled
past the stale time) learns it at its next renewal and stops instead of writing beside the new holder.
"""

from __future__ import annotations

import _thread
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from fsspec.implementations.local import LocalFileSystem

from pipelines import storage
from pipelines.label_output import LEASE_FILE, OutputConflictError

logger = logging.getLogger(__name__)

# Without a renewal for this long a lease is stale: its attempt is gone. Renewals come every RENEW_FRACTION of it.
STALE_SECONDS = float(os.environ.get("CATSEG_LEASE_STALE_SECONDS", "120"))
RENEW_FRACTION = 0.2


class LeaseHeldError(OutputConflictError):
    """Another live attempt holds the output's lease (a refusal: exit code 2)."""


class LeaseLostError(RuntimeError):
    """This attempt's lease was taken over by another attempt while it ran."""


def lease_uri(output_uri: str) -> str:
    return storage.join(output_uri, LEASE_FILE)


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a live pid from a reused one), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Holder:
    """What a lease file says about the attempt that holds it."""

    token: str
    host: str
    pid: int
    process_start: str | None
    started: float
    renewed: float
    purpose: str
    stale_after: float = STALE_SECONDS  # as the holder stated it: it renews at a fraction of this

    @classmethod
    def from_json(cls, text: str) -> Holder:
        data = json.loads(text)
        return cls(
            token=str(data["token"]),
            host=str(data.get("host", "?")),
            pid=int(data.get("pid", -1)),
            process_start=data.get("process_start"),
            started=float(data["started_unix"]),
            renewed=float(data["renewed_unix"]),
            purpose=str(data.get("purpose", "")),
            stale_after=float(data.get("stale_after_seconds", STALE_SECONDS)),
        )

    def to_json(self) -> str:
        return json.dumps(
            {"token": self.token, "host": self.host, "pid": self.pid, "process_start": self.process_start,
             "purpose": self.purpose, "started": _iso(self.started), "renewed": _iso(self.renewed),
             "started_unix": self.started, "renewed_unix": self.renewed, "stale_after_seconds": self.stale_after},
            indent=2,
        )  # fmt: skip

    def describe(self, now: float) -> str:
        return (
            f"host {self.host}, pid {self.pid}, started {_iso(self.started)}, last renewed {_iso(self.renewed)} "
            f"({now - self.renewed:.0f} s ago)"
        )

    def gone_from_this_host(self) -> bool:
        """The holder ran on this host and its process no longer exists (or is another process by that pid)."""
        if self.host != socket.gethostname() or self.pid <= 0:
            return False
        start = _process_start(self.pid)
        return start is None or (self.process_start is not None and start != self.process_start)


class _Store:
    """Create-if-absent, read, overwrite and delete of one small object, on any fsspec filesystem."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.path = storage.filesystem(uri)
        self.local = isinstance(self.fs, LocalFileSystem)

    def create(self, text: str) -> bool:
        """Write ``text`` if no object exists; False if one does. Atomic locally and on S3."""
        data = text.encode()
        if self.local:
            # written whole under a temporary name, then linked to the lease's name: link() fails when the name
            # exists, and a reader never sees a created but still empty lease
            os.makedirs(posixpath.dirname(self.path), exist_ok=True)
            temporary = f"{self.path}.{uuid.uuid4().hex}.tmp"
            with open(temporary, "wb") as f:
                f.write(data)
            try:
                os.link(temporary, self.path)
            except FileExistsError:
                return False
            except OSError:  # no hard links on this mount: O_EXCL, whose empty file a reader may briefly see
                return self._create_exclusive(data)
            finally:
                os.unlink(temporary)
            return True
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        if "s3" in protocols or "s3a" in protocols:
            try:
                with storage.access_errors("create", self.uri):
                    try:
                        self.fs.pipe_file(self.path, data, mode="create")  # PUT with If-None-Match: *
                    except FileExistsError:  # s3fs's translation of 412 Precondition Failed
                        return False
            except storage.StorageAccessError as err:
                if "PreconditionFailed" in str(err) or "pre-conditions" in str(err):
                    return False
                raise
            return True
        # no conditional create in this store's fsspec driver: check, write, then read back (a narrow race)
        if self.fs.exists(self.path):
            return False
        self.overwrite(text)
        return True

    def _create_exclusive(self, data: bytes) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def read(self) -> str | None:
        try:
            with storage.access_errors("read", self.uri):
                return self.fs.cat_file(self.path).decode()
        except FileNotFoundError:
            return None

    def overwrite(self, text: str) -> None:
        if self.local:  # a reader never sees a half-written lease
            temporary = f"{self.path}.{uuid.uuid4().hex}.tmp"
            with open(temporary, "w") as f:
                f.write(text)
            os.replace(temporary, self.path)
            return
        with storage.access_errors("write", self.uri):
            self.fs.pipe_file(self.path, text.encode())

    def delete(self) -> None:
        try:
            with storage.access_errors("delete", self.uri):
                self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass


class OutputLease:
    """This attempt's lease on an output: :meth:`acquire` (or the ``with`` statement), renewed in the background,
    released at the end. ``interrupt`` (default True) interrupts the main thread when the lease is lost, so a
    blocking Ray Data execution stops; :meth:`check` then raises :class:`LeaseLostError`."""

    def __init__(self, output_uri: str, purpose: str = "labelling", *, interrupt: bool = True) -> None:
        self.output_uri = output_uri
        self.uri = lease_uri(output_uri)
        self.purpose = purpose
        self.interrupt = interrupt
        self._store = _Store(self.uri)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.holder: Holder | None = None
        self.took_over: Holder | None = None  # the stale lease this attempt replaced, if any
        self.lost: str | None = None

    # -- acquire ---------------------------------------------------------------------------------------------------
    def acquire(self) -> OutputLease:
        now = time.time()
        mine = Holder(
            token=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(),
            process_start=_process_start(os.getpid()), started=now, renewed=now, purpose=self.purpose,
            stale_after=STALE_SECONDS,
        )  # fmt: skip
        for _ in range(5):  # a lease deleted between our create and our read: try again
            if self._store.create(mine.to_json()):
                break
            text = self._store.read()
            if text is None:
                continue
            current = self._parse(text)
            if current is not None and not self._replaceable(current, time.time()):
                current = self._wait_while_unrenewed(current)
                if current is None:
                    continue
                if not self._replaceable(current, time.time()):
                    now = time.time()
                    raise LeaseHeldError(
                        f"{self.output_uri} is being {self.purpose.replace('labelling', 'labelled')} by another "
                        f"attempt ({current.describe(now)}); wait for it to finish, or stop it: a lease is taken "
                        f"over after {current.stale_after:g} s without renewal (CATSEG_LEASE_STALE_SECONDS)"
                    )
            if not self._take_over(current, time.time()):
                continue  # another attempt replaced the stale lease first: look again
        else:
            raise LeaseHeldError(f"could not take the lease {self.uri}: other attempts keep replacing it")
        self.holder = mine
        self._confirm()
        self._thread = threading.Thread(target=self._renew_loop, name="catseg-lease", daemon=True)
        self._thread.start()
        return self

    def _wait_while_unrenewed(self, current: Holder) -> Holder | None:
        """Watch a fresh lease: a live holder renews it within one renewal interval, and is returned at once (the
        caller refuses); one that misses that renewal died recently (a killed job re-submitted), so wait until
        its lease is stale and return it for the take-over. Never longer than the holder's stale time."""
        interval = current.stale_after * RENEW_FRACTION
        live_deadline = time.monotonic() + 1.5 * interval + 1.0  # a renewal, plus room for a slow store
        announced = False
        while True:
            time.sleep(min(1.0, interval / 4))
            latest = self._read_current()
            if latest is None or latest.token != current.token or latest.renewed > current.renewed:
                return latest  # gone (retry the create), replaced by a live attempt, or renewed: alive
            if self._replaceable(latest, time.time()):
                return latest
            if not announced and time.monotonic() > live_deadline:
                wait = latest.stale_after - (time.time() - latest.renewed)
                print(
                    f"the lease on {self.output_uri} ({latest.describe(time.time())}) is no longer renewed: "
                    f"waiting {max(wait, 0):.0f} s until it is stale to take it over",
                    flush=True,
                )
                announced = True

    def _parse(self, text: str) -> Holder | None:
        try:
            return Holder.from_json(text)
        except (ValueError, KeyError, TypeError):
            logger.warning("the lease %s is not readable; treating it as stale", self.uri)
            return None

    @staticmethod
    def _replaceable(current: Holder, now: float) -> bool:
        return now - current.renewed > current.stale_after or current.gone_from_this_host()

    def _take_over(self, current: Holder | None, now: float) -> bool:
        """Delete the stale lease ``current``; False (nothing deleted) if it was replaced since it was read."""
        latest = self._read_current()
        if latest is not None and (current is None or latest.token != current.token):
            return False
        why = "unreadable" if current is None else (
            "its process is gone" if current.gone_from_this_host()
            else f"not renewed for {now - current.renewed:.0f} s"
        )  # fmt: skip
        detail = "" if current is None else f" ({current.describe(now)})"
        message = f"taking over the lease on {self.output_uri} from an earlier attempt{detail}: {why}"
        logger.warning(message)
        print(message, flush=True)  # the job's own log says it, whatever the logging configuration
        self.took_over = current
        self._store.delete()
        return True

    def _confirm(self) -> None:
        """Read the lease back: on a store without a conditional create, a racing attempt may have overwritten it."""
        current = self._read_current()
        if current is None or current.token != self.holder.token:
            self.holder = None
            raise LeaseHeldError(
                f"another attempt took the lease {self.uri} at the same moment; it runs, this one stops"
            )

    def _read_current(self) -> Holder | None:
        text = self._store.read()
        return None if text is None else self._parse(text)

    # -- renew -----------------------------------------------------------------------------------------------------
    def renew(self) -> None:
        """Renew now (the background thread calls this); records :attr:`lost` if another attempt holds it."""
        if self.holder is None or self.lost:
            return
        current = self._read_current()
        if current is None or current.token != self.holder.token:
            by = f" by another attempt ({current.describe(time.time())})" if current else ""
            self.lost = f"this attempt's lease on {self.output_uri} was taken over{by}"
            return
        self.holder = Holder(**{**self.holder.__dict__, "renewed": time.time()})
        self._store.overwrite(self.holder.to_json())

    def _renew_loop(self) -> None:
        interval = max(0.05, STALE_SECONDS * RENEW_FRACTION)
        last_success = time.monotonic()
        while not self._stop.wait(interval):
            try:
                self.renew()
                if not self.lost:
                    last_success = time.monotonic()
            except Exception as err:  # a storage hiccup: retried at the next interval, stale only if it lasts
                logger.warning("could not renew the lease %s: %s", self.uri, err)
                if time.monotonic() - last_success > STALE_SECONDS:
                    self.lost = f"the lease on {self.output_uri} could not be renewed for {STALE_SECONDS:g} s: {err}"
            if self.lost:
                logger.error("%s: stopping this attempt", self.lost)
                if self.interrupt:
                    _thread.interrupt_main()
                return

    def check(self) -> None:
        """Raise :class:`LeaseLostError` if another attempt took the lease over."""
        if self.lost:
            raise LeaseLostError(f"{self.lost}; this attempt stopped so that only one writes the output")

    # -- release ---------------------------------------------------------------------------------------------------
    def release(self) -> None:
        """Stop renewing and delete the lease if it is still this attempt's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.holder is None or self.lost:
            return
        try:
            current = self._read_current()
            if current is not None and current.token == self.holder.token:
                self._store.delete()
        except Exception as err:  # the next attempt takes a stale lease over; say why it will have to wait
            logger.warning("could not release the lease %s (%s): it goes stale in %g s", self.uri, err, STALE_SECONDS)
        self.holder = None

    def __enter__(self) -> OutputLease:
        return self.acquire()

    def __exit__(self, exc_type: object, exc: BaseException | None, traceback: object) -> None:
        """Releases the lease; when its loss interrupted the run, the interruption leaves as LeaseLostError."""
        try:
            self.release()
        except KeyboardInterrupt as interrupt:  # the renewal thread's interruption, arriving while it is joined
            if not self.lost:
                raise
            exc = exc or interrupt
        if exc is not None and self.lost:
            self.check()
