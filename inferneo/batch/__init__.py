"""``inferneo batch``: run a file of OpenAI batch requests against a server or a model in this process.

From Python::

    from inferneo.batch import BatchJob, Sender, remote_client

    async def run_file() -> None:
        with BatchJob("requests.jsonl", "results.jsonl") as job:
            async with remote_client("http://localhost:8000") as http:
                summary = await job.run(Sender(http), concurrency=64)
        print(summary.succeeded, "ok,", summary.failed + summary.invalid, "failed")

Interrupted and rerun with the same files, a job resumes: every input line gets exactly one record in total.
Each line's body is sent unchanged (``response_format``, ``structured_outputs``, ``tools``, ``tool_choice``
included); :func:`request_line` and :func:`read_results` write such lines from a pydantic model and read the
answers back as instances of it.
"""

from inferneo.batch.job import BatchJob, BatchSummary, scan_input
from inferneo.batch.output import OutputFile, OutputFileError
from inferneo.batch.records import SUPPORTED_URLS, BatchRequest, InvalidLine, parse_line
from inferneo.batch.sender import (
    Reply,
    Sender,
    ServerAuthError,
    ServerBusyError,
    ServerUnreachableError,
    remote_client,
)
from inferneo.batch.structured import ParsedRecord, read_results, request_line

__all__ = [
    "SUPPORTED_URLS", "BatchJob", "BatchRequest", "BatchSummary", "InvalidLine", "OutputFile", "OutputFileError",
    "ParsedRecord", "Reply", "Sender", "ServerAuthError", "ServerBusyError", "ServerUnreachableError", "parse_line",
    "read_results", "remote_client", "request_line", "scan_input",
]
