"""The core's contract and its clients: typed records over the pipe, and one core loop whichever client hosts it.

The property test sends the same random sequences of adds, aborts and pauses to a core loop in a thread and to
one in a child process, and checks that both answer every request with the same typed outputs: the same tokens
and the same finish reason for every request that was not aborted, and for an aborted one a prefix of the same
tokens (when an abort lands depends on timing, not on the client).
"""

from __future__ import annotations

import threading
import time

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inferneo.config import EngineConfig
from inferneo.engine.core_client import InlineCoreClient, ProcessCoreClient, ThreadCoreClient
from inferneo.engine.protocol import (
    COMMAND_DECODER,
    MESSAGE_DECODER,
    AbortRequests,
    AddRequests,
    CoreDead,
    CoreInfo,
    CoreOutput,
    CoreRequest,
    EngineSnapshot,
    FailureKind,
    RequestFailure,
    Shutdown,
    StepOutputs,
    decode_commands,
    encode,
)
from inferneo.sampling_params import SamplingParams

ENGINE = dict(dtype="float32", kv_cache_memory=8 * 2**20, num_threads=1, max_num_seqs=8)


def test_every_record_survives_the_pipe_encoding():
    params = SamplingParams(temperature=0.5, seed=3, stop=["x"], logit_bias={5: -1.0}, logprobs=2, max_tokens=4)
    request = CoreRequest("r1", [1, 2, 3], params, 4, frozenset({0, 2}), priority=-1, arrival_time=1.5)
    commands = [AddRequests([request]), AbortRequests(["r0"]), Shutdown()]
    assert COMMAND_DECODER.decode(encode(commands)) == commands
    step = StepOutputs(
        [CoreOutput("r1", [7], "length", None, [[7, 8]], [[-0.1, -2.0]], [1], 3), CoreOutput("r2", [9])],
        [RequestFailure(["r3"], FailureKind.INVALID, "bad")], 5,
        EngineSnapshot(num_running=1, batch_size_histogram={2: 4}))
    info = CoreInfo("m", "/m", ["LlamaForCausalLM"], 128, 384, 10, 16, 1024, "float32", "cpu", 1)
    for message in (step, info, CoreDead("gone")):
        decoded = MESSAGE_DECODER.decode(encode(message))
        assert type(decoded) is type(message) and decoded == message
    assert step.outputs[0].finished and not step.outputs[1].finished
    assert RequestFailure(["a"], FailureKind.INVALID, "m").to_exception().__class__.__name__ == "InvalidRequestError"


def test_a_misshapen_message_is_refused_not_misread():
    # A field added on one side only is a decoding error, never a shifted value.
    class LongerOutput(msgspec.Struct, array_like=True):
        request_id: str
        new_token_ids: list[int]
        extra: int

    with pytest.raises(msgspec.ValidationError):
        COMMAND_DECODER.decode(encode([{"not": "a command"}]))
    with pytest.raises(msgspec.ValidationError):
        decode_commands(encode([{"not": "a command"}]))
    with pytest.raises(msgspec.ValidationError):
        MESSAGE_DECODER.decode(encode(["step", [["r", [1], 5]], [], 0, None]))
    assert LongerOutput("r", [1], 5)  # the shape the decoder refused above


def _bad_request(request_id: str) -> CoreRequest:
    """A request whose values the engine's checks refuse (built past the front end's check, as a front-end fault
    would send it)."""
    params = SamplingParams(temperature=0.5, seed=1, max_tokens=4)
    params.seed = 2**63 + 5  # past int64: SamplingParams refuses it where the core decodes it
    return CoreRequest(request_id, [1, 2, 3], params, 4, frozenset())


def test_a_request_group_that_fails_the_checks_on_arrival_becomes_its_failure():
    good = CoreRequest("g", [1, 2], SamplingParams(max_tokens=2), 2, frozenset())
    commands = [AddRequests([_bad_request("b1"), _bad_request("b2")]), AddRequests([good]), AbortRequests(["x"])]
    decoded = decode_commands(encode(commands))
    assert decoded[1:] == commands[1:]
    failure = decoded[0]
    assert isinstance(failure, RequestFailure) and failure.kind is FailureKind.INVALID
    assert failure.request_ids == ["b1", "b2"] and "seed" in failure.message
    assert decode_commands(encode(commands[1:])) == commands[1:]


class Recorder:
    """Collects a running client's messages; the property test's view of it."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.finish: dict[str, str] = {}
        self.types: set[type] = set()
        self.failed: dict[str, FailureKind] = {}
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)

    def __call__(self, message) -> None:
        with self.lock:
            self.types.add(type(message))
            if isinstance(message, StepOutputs):
                for out in message.outputs:
                    self.types.add(type(out))
                    self.tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                    if out.finish_reason is not None:
                        self.finish[out.request_id] = out.finish_reason
                for failure in message.failures:
                    self.failed.update(dict.fromkeys(failure.request_ids, failure.kind))
            self.changed.notify_all()

    def wait_finished(self, request_ids: set[str], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with self.lock:
            while not request_ids <= self.finish.keys():
                left = deadline - time.monotonic()
                assert left > 0, f"requests never finished: {sorted(request_ids - self.finish.keys())}"
                self.changed.wait(left)


@pytest.fixture(scope="module")
def clients(tiny_checkpoint_factory):
    config = EngineConfig(model=str(tiny_checkpoint_factory("llama")), **ENGINE)
    thread = ThreadCoreClient.from_config(config)
    process = ProcessCoreClient(config)
    process.wait_ready()
    recorders = {"thread": Recorder(), "process": Recorder()}
    thread.start(recorders["thread"])
    process.start(recorders["process"])
    yield {"thread": (thread, recorders["thread"]), "process": (process, recorders["process"])}
    thread.close()
    process.close()
    assert not thread.is_alive() and not process.is_alive()


_counter = iter(range(10**9))

operation = st.one_of(
    st.tuples(st.just("add"), st.lists(
        st.tuples(st.lists(st.integers(1, 383), min_size=1, max_size=12),  # prompt
                  st.integers(1, 10),  # max_tokens
                  st.sampled_from([None, 1, 2])),  # None: greedy; else the seed of a sampled request
        min_size=1, max_size=3)),
    st.tuples(st.just("abort"), st.integers(0, 20)),
    st.tuples(st.just("pause"), st.floats(0, 0.02)),
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(operation, min_size=1, max_size=8))
def test_thread_and_process_clients_answer_alike(clients, operations):
    run = next(_counter)
    added: list[str] = []
    aborted: set[str] = set()
    script = []  # the same commands, in the same order, for both clients
    for op in operations:
        if op[0] == "add":
            specs = []
            for prompt, max_tokens, seed in op[1]:
                request_id = f"p{run}-{len(added)}"
                params = SamplingParams(temperature=0 if seed is None else 0.8, seed=seed, max_tokens=max_tokens)
                specs.append(CoreRequest(request_id, prompt, params, max_tokens, frozenset()))
                added.append(request_id)
            script.append(AddRequests(specs))
        elif op[0] == "abort" and added:
            request_id = added[op[1] % len(added)]
            aborted.add(request_id)
            script.append(AbortRequests([request_id]))
        elif op[0] == "pause":
            script.append(op[1])
    for _, (client, _) in clients.items():
        for item in script:
            if isinstance(item, float):
                time.sleep(item)
            else:
                client.send(item)
    expected_done = set(added) - aborted
    results = {}
    for name, (_, recorder) in clients.items():
        recorder.wait_finished(expected_done)
        with recorder.lock:
            results[name] = ({r: list(recorder.tokens.get(r, [])) for r in added},
                             {r: recorder.finish.get(r) for r in added})
            assert recorder.types <= {StepOutputs, CoreOutput}
    (thread_tokens, thread_finish), (process_tokens, process_finish) = results["thread"], results["process"]
    for request_id in added:
        if request_id in aborted:
            short, long = sorted((thread_tokens[request_id], process_tokens[request_id]), key=len)
            assert long[: len(short)] == short, request_id
        else:
            assert thread_tokens[request_id] == process_tokens[request_id], request_id
            assert thread_finish[request_id] == process_finish[request_id] == "length", request_id


def test_a_request_the_core_cannot_decode_fails_alone_and_the_engine_goes_on(clients):
    """A front-end fault (a request whose values fail the checks where the core decodes them) used to stop the
    engine; it fails that request group (400 for a client) and the others run."""
    process, recorder = clients["process"]
    good = CoreRequest("after-bad", [5, 6, 7], SamplingParams(temperature=0, max_tokens=3), 3, frozenset())
    process.send(AddRequests([_bad_request("bad-1")]))
    process.send(AddRequests([good]))
    recorder.wait_finished({"after-bad"})
    with recorder.lock:
        assert recorder.failed.get("bad-1") is FailureKind.INVALID
        assert len(recorder.tokens["after-bad"]) == 3
    assert process.is_alive()


def test_inline_client_matches_the_running_ones(clients, tiny_checkpoint_factory):
    config = EngineConfig(model=str(tiny_checkpoint_factory("llama")), **ENGINE)
    inline = InlineCoreClient.from_config(config)
    params = SamplingParams(temperature=0, max_tokens=6)
    specs = [CoreRequest(f"inline-{i}", [5 + i, 9, 13], params, 6, frozenset()) for i in range(3)]
    inline.send(AddRequests(specs))
    tokens: dict[str, list[int]] = {}
    while inline.has_work():
        for out in inline.turn().outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    for _, (client, recorder) in clients.items():
        client.send(AddRequests(specs))
        recorder.wait_finished({s.request_id for s in specs})
        with recorder.lock:
            assert {s.request_id: recorder.tokens[s.request_id][-6:] for s in specs} == tokens
