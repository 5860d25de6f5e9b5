"""``inferneo batch --ray``: a batch file answered by engine replicas on a Ray cluster, written by this driver.

The driver reads the input, writes invalid lines' error records itself, and feeds the lines still to answer
through the Ray Dataset processor (:mod:`inferneo.integrations.ray`); each answer comes back to the driver,
which appends its record to the output, so the output keeps the single-machine runner's guarantees: one writer,
whole-line appends, resumable. The lines to answer are held on the driver as compact JSON rows.

Faults, from the inside out:

- a replica that dies (its actor killed, its node lost) is restarted by Ray, on another node if its own is gone,
  and the batches it held run again (``max_restarts``, ``max_task_retries`` of the processor config); a batch's
  answers reach the driver once, from the attempt that finished;
- past those bounds the dataset fails; the driver runs the lines still unanswered again with a fresh set of
  replicas, up to ``retry_rounds`` more times, each after ``retry_pause_s`` seconds (Ray declares a lost node
  dead only once its health checks have failed for a while, about 15 s with Ray's defaults; a replica placed
  before that may land on the lost node), and after the last round writes each of them with the error
  (code ``replica_failed``), so the job finishes with every line written once. A first round that writes no
  record at all raises instead (a cluster that answers nothing, such as a model no replica can load, is not the
  lines' fault): those lines stay unwritten for the next run;
- a driver that dies takes its replicas with it; the next run resumes from the output.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from inferneo.batch.job import BatchJob, BatchSummary, Recorder
from inferneo.batch.records import error_record, response_record

if TYPE_CHECKING:
    import ray.data

    from inferneo.integrations.ray import EngineProcessorConfig

logger = logging.getLogger(__name__)

REPLICA_FAILED = "replica_failed"  # the error code of a line whose replicas kept failing


def run_on_ray(job: BatchJob, config: EngineProcessorConfig, progress: bool = True, retry_rounds: int = 1,
               retry_pause_s: float = 30.0) -> BatchSummary:
    """Answer ``job``'s remaining lines with ``config``'s replicas on the Ray cluster this process is connected
    to (``ray.init`` first) and write their records (see the module docstring for the retry rounds)."""
    import ray.data
    import ray.exceptions

    from inferneo.integrations.ray import build_processor

    if not isinstance(retry_rounds, int) or retry_rounds < 0:
        raise ValueError(f"retry_rounds must be a non-negative integer, got {retry_rounds!r}")
    recorder = Recorder(job, progress)
    try:
        rows = [{"line": item.line, "custom_id": item.custom_id, "url": item.url,
                 "body": json.dumps(item.body, ensure_ascii=False)} for item in job.pending(recorder)]
        failure: BaseException | None = None
        for attempt in range(retry_rounds + 1):
            left = [row for row in rows if row["line"] not in job.output.done]
            if not left:
                break
            written_before = recorder.summary.written
            try:
                _write_answers(job, recorder, build_processor(config)(ray.data.from_items(left)))
                break
            except ray.exceptions.RayError as exc:
                if attempt == 0 and recorder.summary.written == written_before:
                    raise  # the cluster answers nothing (e.g. no replica can load the model): not the lines' fault
                failure = exc
                unanswered = len(left) - (recorder.summary.written - written_before)
                logger.warning("inferneo batch --ray: round %d failed past Ray's retries, %d of its %d lines "
                               "unanswered: %s", attempt + 1, unanswered, len(left), _first_line(exc))
                if attempt < retry_rounds:
                    time.sleep(retry_pause_s)
        else:
            message = (f"the replicas answering this line kept failing ({retry_rounds + 1} rounds, each past "
                       f"{config.max_restarts} restarts and {config.max_task_retries} task retries): "
                       f"{_first_line(failure)}")
            for row in rows:
                if row["line"] not in job.output.done:
                    recorder.write(error_record(job.digest, row["line"], row["custom_id"], REPLICA_FAILED,
                                                message), "failed")
    finally:
        recorder.close()
    return recorder.summary


def _write_answers(job: BatchJob, recorder: Recorder, answered: ray.data.Dataset) -> None:
    for row in answered.iter_rows():
        line = int(row["line"])
        if line in job.output.done:  # never expected: Ray hands back each row once
            continue
        recorder.write(*_record(job, line, row))


def _record(job: BatchJob, line: int, row: dict[str, Any]) -> tuple[dict, str]:
    if row["response"] is None:  # a row the replica could not turn into a request
        code, _, message = row["error"].partition(": ")
        return error_record(job.digest, line, row["custom_id"], code, message), "invalid"
    record = response_record(job.digest, line, row["custom_id"], int(row["status_code"]), row["request_id"],
                             json.loads(row["response"]))
    return record, "failed" if record["error"] else "succeeded"


def _first_line(exc: BaseException | None) -> str:
    text = f"{type(exc).__name__}: {exc}" if exc is not None else "unknown failure"
    return text.strip().splitlines()[0][:500]
