"""server/wire.py's stream guard: a generation that fails after the headers went
out ends with the API's own error ending, and the job is let go either way."""

import asyncio
import json

from fermi.errors import FermiError
from fermi.server.wire import guarded, sse_error


class FakeJob:
    def __init__(self):
        self.finished, self.abandoned = False, 0

    def abandon(self):
        self.abandoned += 1


def run(body, job, log):
    async def collect():
        return [chunk async for chunk in guarded(job, log, body, sse_error)]
    return asyncio.run(collect())


def test_a_failure_mid_stream_ends_with_an_error_event_and_done():
    async def body():
        yield b"data: {}\n\n"
        raise FermiError("the engine step failed")

    job, log = FakeJob(), {}
    chunks = run(body(), job, log)
    assert chunks[0] == b"data: {}\n\n" and chunks[-1] == b"data: [DONE]\n\n"
    error = json.loads(chunks[1][len(b"data: "):])["error"]
    assert error["message"] == "the engine step failed" and error["code"] == "generation_failed"
    assert job.abandoned == 1 and log["note"] == "client disconnected"  # (it never saw its Done)


def test_a_finished_stream_lets_go_of_its_job_without_a_note():
    async def body():
        yield b"data: [DONE]\n\n"

    job, log = FakeJob(), {}
    job.finished = True
    assert run(body(), job, log) == [b"data: [DONE]\n\n"] and job.abandoned == 1 and "note" not in log
