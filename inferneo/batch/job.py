"""One batch job: an input file of requests, an output file of records, and the loop that fills it.

The input is streamed twice and never held in memory: once at start-up for its digest and line count, once
to send. At most ``concurrency`` requests are in flight; each record is appended the moment its answer arrives
(so the output is in completion order; match records to requests by ``custom_id``). A rerun with the same
input and output skips the lines already answered, so every input line gets exactly one record in total.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from inferneo.batch.output import OutputFile, OutputFileError
from inferneo.batch.records import BatchRequest, InvalidLine, error_record, parse_line, response_record
from inferneo.batch.sender import Sender


@dataclass(slots=True)
class BatchSummary:
    """What a run did: records written this run by kind, and how many were there before it."""

    total: int
    already_done: int
    succeeded: int = 0
    failed: int = 0
    invalid: int = 0
    retries: int = 0

    @property
    def written(self) -> int:
        """Records written by this run."""
        return self.succeeded + self.failed + self.invalid

    @property
    def complete(self) -> bool:
        """Whether every input line now has its record."""
        return self.already_done + self.written == self.total


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based): the input lines whose number ``n`` (1-based, blank lines counted)
    has ``(n - 1) % count == index``. The same file and ``count`` always split the same way, so each shard of a
    Slurm array or Kubernetes indexed job runs its own lines into its own (resumable) output."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not (isinstance(self.count, int) and isinstance(self.index, int) and 0 <= self.index < self.count):
            raise ValueError(f"a shard is I/N with 0 <= I < N, got {self.index}/{self.count}")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` (e.g. ``"0/4"``)."""
        index, sep, count = text.partition("/")
        try:
            if not sep:
                raise ValueError
            return cls(int(index), int(count))
        except ValueError:
            raise ValueError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4), got {text!r}") from None

    def owns(self, line: int) -> bool:
        """Whether input line ``line`` (1-based) is this shard's."""
        return (line - 1) % self.count == self.index


def scan_input(path: str | os.PathLike[str], shard: Shard | None = None) -> tuple[str, int]:
    """The SHA-256 of the input file and its number of non-blank lines (those of ``shard`` only, if given)."""
    digest = hashlib.sha256()
    lines = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            digest.update(raw)
            if raw.strip() and (shard is None or shard.owns(number)):
                lines += 1
    return digest.hexdigest(), lines


class Recorder:
    """Writes records to a job's output and counts them into ``summary`` (with an optional progress bar)."""

    def __init__(self, job: BatchJob, progress: bool) -> None:
        self.output = job.output
        self.summary = BatchSummary(job.total, len(job.output.done))
        self.bar = tqdm(total=job.total, initial=len(job.output.done), desc="batch", unit="req",
                        dynamic_ncols=True, disable=not progress)

    def write(self, record: dict, kind: str) -> None:
        """Append ``record``; ``kind`` is ``succeeded``, ``failed`` or ``invalid``."""
        self.output.append(record)
        setattr(self.summary, kind, getattr(self.summary, kind) + 1)
        self.bar.update(1)
        if kind != "succeeded":
            self.bar.set_postfix(failed=self.summary.failed + self.summary.invalid, refresh=False)

    def close(self) -> None:
        self.bar.close()
        self.output.sync()


class BatchJob:
    """Opens (and locks) the output for an input file, ready to :meth:`run`; close it when done.

    Opening repairs a torn last line and reads the records already written. It raises OutputFileError if the
    output holds another input's results (``overwrite=True`` discards them) or another run is writing it.
    ``retry_failed=True`` sends again the lines the server answered with an error (their records are replaced).
    """

    def __init__(self, input_path: str | os.PathLike[str], output_path: str | os.PathLike[str], *,
                 overwrite: bool = False, fsync_interval: float = 1.0, shard: Shard | None = None,
                 retry_failed: bool = False) -> None:
        self.input_path = Path(input_path)
        self.output_path = Path(output_path)
        self.shard = shard
        if not self.input_path.is_file():
            raise FileNotFoundError(f"no input file {self.input_path}")
        if self.output_path.exists() and self.output_path.samefile(self.input_path):
            raise OutputFileError("the output file must not be the input file")
        self.digest, self.total = scan_input(self.input_path, shard)
        self.output = OutputFile(self.output_path, self.digest, overwrite=overwrite, fsync_interval=fsync_interval,
                                 retry_failed=retry_failed)
        if shard is not None:
            stray = next((line for line in self.output.done if not shard.owns(line)), None)
            if stray is not None:
                self.output.close()
                raise OutputFileError(f"{self.output_path} holds a record of input line {stray}, which is not in "
                                      f"shard {shard.index}/{shard.count}; give each shard its own output file")

    @property
    def num_done(self) -> int:
        """Input lines that have their record in the output so far."""
        return len(self.output.done)

    @property
    def num_failed(self) -> int:
        """Of those, the lines whose record is an error (invalid, refused, or not sent); the others were answered
        with a 2xx."""
        return len(self.output.failed)

    @property
    def repaired_bytes(self) -> int:
        """Bytes of a torn last line cut off the output at start-up (0 if there was none)."""
        return self.output.repaired_bytes

    def pending(self, recorder: Recorder) -> Iterator[BatchRequest]:
        """The requests still to send, in file order (this shard's only). Invalid lines are written as error
        records on the way; raises OutputFileError if a line's record holds another custom_id."""
        done = self.output.done
        with open(self.input_path, "rb") as f:
            seen: set[str] = set()  # every shard checks every line, so the first line with an id owns it
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                item = parse_line(number, raw, seen)
                if self.shard is not None and not self.shard.owns(number):
                    continue
                if number in done:
                    if done[number] != item.custom_id:
                        raise OutputFileError(
                            f"{self.output_path} has a record for line {number} with custom_id "
                            f"{done[number]!r}, but that line's custom_id is {item.custom_id!r}")
                    continue
                if isinstance(item, InvalidLine):
                    recorder.write(error_record(self.digest, number, item.custom_id, item.code, item.message),
                                   "invalid")
                    continue
                yield item

    async def run(self, sender: Sender, concurrency: int = 64, progress: bool = True) -> BatchSummary:
        """Send every line not yet answered and write its record. Raises (after cancelling what is in flight)
        if the server cannot be reached; the lines not written then are sent by the next run."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        recorder = Recorder(self, progress)
        retries_before = sender.num_retries
        gate = asyncio.Semaphore(concurrency)
        tasks: set[asyncio.Task] = set()
        fatal: list[BaseException] = []

        async def send(item: BatchRequest) -> None:
            try:
                reply = await sender.post(item.url, item.body)
                record = response_record(self.digest, item.line, item.custom_id, reply.status_code,
                                         reply.request_id, reply.body)
                recorder.write(record, "failed" if record["error"] else "succeeded")
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # the server is gone (or a bug): stop the run, keep what is written
                fatal.append(exc)
            finally:
                gate.release()

        try:
            for item in self.pending(recorder):
                if fatal:
                    break
                await gate.acquire()
                task = asyncio.create_task(send(item))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks and not fatal:
                await asyncio.wait(set(tasks), return_when=asyncio.FIRST_COMPLETED)
            if fatal:
                raise fatal[0]
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*tasks, return_exceptions=True)
            recorder.close()
            recorder.summary.retries = sender.num_retries - retries_before
        return recorder.summary

    def close(self) -> None:
        """Sync and unlock the output file."""
        self.output.close()

    def __enter__(self) -> BatchJob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
