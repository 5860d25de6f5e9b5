"""``inferneo batch``: run a file of OpenAI batch requests against a server or a model in this process.

From Python::

    from inferneo.batch import BatchJob, Sender, remote_client

    async def run_file() -> None:
        with BatchJob("requests.jsonl", "results.jsonl") as job:
            async with remote_client("http://localhost:8000") as http:
                summary = await job.run(Sender(http), concurrency=64)
        print(summary.succeeded, "ok,", summary.failed + summary.invalid, "failed")

Interrupted and rerun with the same files, a job resumes: every input line gets exactly one record in total.
"""

from inferneo.batch.job import BatchJob, BatchSummary, scan_input
from inferneo.batch.output import OutputFile, OutputFileError
from inferneo.batch.records import SUPPORTED_URLS, BatchRequest, InvalidLine, parse_line
from inferneo.batch.sender import Reply, Sender, ServerUnreachableError, remote_client

__all__ = [
    "SUPPORTED_URLS", "BatchJob", "BatchRequest", "BatchSummary", "InvalidLine", "OutputFile", "OutputFileError",
    "Reply", "Sender", "ServerUnreachableError", "parse_line", "remote_client", "scan_input",
]
