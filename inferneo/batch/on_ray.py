"""``inferneo batch --ray``: a batch file answered by engine replicas on a Ray cluster, written by this driver.

The driver reads the input, writes invalid lines' error records itself, and feeds the lines still to answer
through the Ray Dataset processor (:mod:`inferneo.integrations.ray`); each answer comes back to the driver,
which appends its record to the output, so the output keeps the single-machine runner's guarantees: one writer,
whole-line appends, resumable. A replica that dies is restarted by Ray and its batches run again (a batch's
answers reach the driver once, from the attempt that finished); a driver that dies takes its replicas with it
and the next run resumes from the output. The lines to answer are held on the driver as compact JSON rows.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from inferneo.batch.job import BatchJob, BatchSummary, Recorder
from inferneo.batch.records import error_record, response_record

if TYPE_CHECKING:
    from inferneo.integrations.ray import EngineProcessorConfig


def run_on_ray(job: BatchJob, config: EngineProcessorConfig, progress: bool = True) -> BatchSummary:
    """Answer ``job``'s remaining lines with ``config``'s replicas on the Ray cluster this process is connected
    to (``ray.init`` first) and write their records."""
    import ray.data

    from inferneo.integrations.ray import build_processor

    recorder = Recorder(job, progress)
    try:
        rows = [{"line": item.line, "custom_id": item.custom_id, "url": item.url,
                 "body": json.dumps(item.body, ensure_ascii=False)} for item in job.pending(recorder)]
        if rows:
            answered = build_processor(config)(ray.data.from_items(rows))
            for row in answered.iter_rows():
                line = int(row["line"])
                if line in job.output.done:  # never expected: Ray hands back each row once
                    continue
                if row["response"] is None:  # a row the replica could not turn into a request
                    code, _, message = row["error"].partition(": ")
                    recorder.write(error_record(job.digest, line, row["custom_id"], code, message), "invalid")
                    continue
                record = response_record(job.digest, line, row["custom_id"], int(row["status_code"]),
                                         row["request_id"], json.loads(row["response"]))
                recorder.write(record, "failed" if record["error"] else "succeeded")
    finally:
        recorder.close()
    return recorder.summary
