"""The output file: append-only JSON lines that survive ``kill -9`` at any point.

Each record goes out as one ``os.write`` of the whole line (newline included) on an ``O_APPEND`` descriptor, so a
killed process leaves at worst one torn line at the end, never a torn line in the middle. Data in the page
cache outlives the process; ``fsync`` (at most every ``fsync_interval`` seconds, and on close) covers a crash of
the machine itself. On opening, a torn tail (bytes after the last complete record) is cut off, the records are
read to find the lines already done, and an exclusive ``flock`` keeps a second run off the same file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

from inferneo.batch.records import DIGEST_CHARS, parse_record_id
from inferneo.engine.fingerprint import FINGERPRINT_PREFIX


class OutputFileError(RuntimeError):
    """The output file cannot be resumed into (another input's results, damage, or another run holds it)."""


class OutputFile:
    """The results of one input file; ``done`` maps each input line already answered to its custom_id, and
    ``failed`` holds those of its lines whose record is an error (the rest were answered with a 2xx).

    ``retry_failed`` takes the records of requests the server answered with an error (a non-2xx status) out of the
    file, so that their lines are sent again (``retried`` counts them); records of lines that could not be sent stay.
    """

    def __init__(self, path: str | os.PathLike[str], digest: str, *, overwrite: bool = False,
                 fsync_interval: float = 1.0, retry_failed: bool = False) -> None:
        self.path = Path(path)
        self.digest = digest[:DIGEST_CHARS]
        self.fsync_interval = fsync_interval
        self.done: dict[int, str | None] = {}
        self.failed: set[int] = set()
        self.fingerprints: dict[str, str] = {}  # served model -> the system_fingerprint its answers here carry
        self.repaired_bytes = 0
        self.retried = 0
        self._answered_failures: dict[int, int] = {}  # file line -> input line, of records with a non-2xx answer
        self._torn = False  # a record was cut short and could not be cut off
        self._last_sync = time.monotonic()
        self._dirty = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:  # read-only, not a folder, no space, ...
            where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(self.path) else ""
            raise OutputFileError(f"cannot write the results to {self.path}: {exc.strerror or exc}{where}") from exc
        try:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputFileError(f"{self.path} is in use by another 'inferneo batch' run") from None
            if overwrite:
                os.ftruncate(self._fd, 0)
            else:
                self._load()
                if retry_failed and self._answered_failures:
                    self._drop_answered_failures()
        except BaseException:
            os.close(self._fd)
            raise

    def _load(self) -> None:
        """Read the existing records and cut off a torn last line (one this writer began but did not finish)."""
        size = os.fstat(self._fd).st_size
        keep = 0  # bytes up to the end of the last complete line
        with open(self._fd, "rb", closefd=False) as f:
            f.seek(0)
            for number, raw in enumerate(f, start=1):
                if not raw.endswith(b"\n"):
                    if not _is_torn_record(raw):
                        raise OutputFileError(
                            f"{self.path} does not look like 'inferneo batch' results (its last line is not a "
                            "batch record); use another output file, or --overwrite to replace it")
                    break
                keep += len(raw)
                if not raw.strip():
                    continue
                record = _parse_record(raw)
                if record is None:
                    raise OutputFileError(
                        f"{self.path} line {number} is not a batch record: the file is damaged or not "
                        "'inferneo batch' results; use another output file, or --overwrite to replace it")
                self._take(number, record)
        if keep < size:
            os.ftruncate(self._fd, keep)
            os.fsync(self._fd)
            self.repaired_bytes = size - keep

    def _take(self, number: int, record: dict[str, Any]) -> None:
        parsed = parse_record_id(record.get("id"))
        if parsed is None:
            raise OutputFileError(f"{self.path} line {number} was not written by 'inferneo batch' (id "
                                  f"{record.get('id')!r}); use another output file or --overwrite")
        digest, line = parsed
        if digest != self.digest:
            raise OutputFileError(
                f"{self.path} holds results of a different input file (digest {digest}, this input's is "
                f"{self.digest}); use another output file, or --overwrite to discard those results")
        if line in self.done:
            raise OutputFileError(f"{self.path} holds input line {line} twice (line {number}); it is damaged")
        custom_id = record.get("custom_id")
        self.done[line] = custom_id if isinstance(custom_id, str) else None
        if record.get("error") is not None:
            self.failed.add(line)
        if (answer := _fingerprint(record)) is not None:
            self.fingerprints.setdefault(*answer)
        if record.get("error") is not None and record.get("response") is not None:
            self._answered_failures[number] = line

    def _drop_answered_failures(self) -> None:
        """Rewrite the file without the records of answered failures: a new file, locked before anyone can know it,
        then renamed over this one (a crash leaves either file whole)."""
        tmp = self.path.with_name(f".{self.path.name}.retry-failed")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with open(self._fd, "rb", closefd=False) as f:
                f.seek(0)
                for number, raw in enumerate(f, start=1):
                    if number not in self._answered_failures:
                        view = memoryview(raw)
                        while view:
                            view = view[os.write(fd, view):]
            os.fsync(fd)
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(self._fd)
        self._fd = fd
        folder = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself
        finally:
            os.close(folder)
        for line in self._answered_failures.values():
            self.done.pop(line, None)
            self.failed.discard(line)
        self.retried = len(self._answered_failures)

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as one line, in one write. ``OutputFileError``, and nothing written, when its answer
        comes from another model than the file's answers of the same name (see :func:`_fingerprint`)."""
        if (answer := _fingerprint(record)) is not None:
            model, fingerprint = answer
            known = self.fingerprints.setdefault(model, fingerprint)
            if known != fingerprint:
                raise OutputFileError(
                    f"{self.path} holds answers of model {model!r} with system_fingerprint {known}, but the server "
                    f"now answers with {fingerprint}: another checkpoint, dtype, quantization, KV cache type, chat "
                    "template or adapter. Resume with the model and settings of the first run, or use another "
                    "output file, or --overwrite to discard those results")
        # ASCII only: no U+2028 or NEL inside a record that a line splitter could take for a line break.
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        if self._torn:
            raise OutputFileError(f"{self.path} ends with a record that could not be written whole; run again to "
                                  "resume (the next run cuts it off)")
        end = os.fstat(self._fd).st_size  # this run holds the lock: nobody else appends
        view = memoryview(data)
        try:
            while view:  # a regular file takes it whole; the loop only guards against a short write
                view = view[os.write(self._fd, view):]
        except OSError:
            # A full disk (or a file size limit) can take part of the record and refuse the rest. Cut the part off,
            # so that a record written after this one does not continue its line (a damaged file that no run
            # resumes); if even that fails, write nothing more: a torn last line is what the next run repairs.
            try:
                os.ftruncate(self._fd, end)
            except OSError:
                self._torn = True
            raise
        self._dirty = True
        parsed = parse_record_id(record["id"])
        if parsed is not None:
            self.done[parsed[1]] = record.get("custom_id")
            if record.get("error") is not None:
                self.failed.add(parsed[1])
        if time.monotonic() - self._last_sync >= self.fsync_interval:
            self.sync()

    def sync(self) -> None:
        """Flush written records to the disk."""
        if self._dirty:
            os.fsync(self._fd)
            self._dirty = False
        self._last_sync = time.monotonic()

    def close(self) -> None:
        """Sync and release the file (idempotent)."""
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            self.sync()
        os.close(self._fd)  # releases the lock
        self._fd = -1

    def __enter__(self) -> OutputFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_RECORD_START = b'{"id":"batch_req_'


def _fingerprint(record: dict[str, Any]) -> tuple[str, str] | None:
    """``(model, system_fingerprint)`` of a record's successful answer from an Inferneo server; None for any other
    record (an error, another server's answer: OpenAI's fingerprints change on their own, so they are not held
    to)."""
    response = record.get("response")
    body = response.get("body") if isinstance(response, dict) else None
    if not isinstance(body, dict) or record.get("error") is not None:
        return None
    model, fingerprint = body.get("model"), body.get("system_fingerprint")
    if isinstance(model, str) and isinstance(fingerprint, str) and fingerprint.startswith(FINGERPRINT_PREFIX):
        return model, fingerprint
    return None


def _is_torn_record(raw: bytes) -> bool:
    """Whether an unterminated last line is the start of a record (or zeros a crash left in the file)."""
    return raw.startswith(_RECORD_START) or _RECORD_START.startswith(raw) or not raw.strip(b"\0")


def _parse_record(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and "id" in record else None
