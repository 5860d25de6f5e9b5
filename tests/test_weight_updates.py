"""What reinforcement-learning trainers need from the engine: new weights in a running model, a prefix-cache reset,
and sleep mode (``LLM.update_weights`` / ``reset_prefix_cache`` / ``sleep`` / ``wake_up``; the server's
``--enable-dev-endpoints``). Two tiny Llama checkpoints A and B of one shape (different seeds): an engine loaded
with A and given B's tensors must generate what Hugging Face generates with B."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_hf_parity import hf_greedy

from inferneo import LLM, SamplingParams
from inferneo.config import EngineConfig
from inferneo.engine.async_engine import AsyncEngine
from inferneo.engine.protocol import EngineBusyError, EngineSleepingError
from inferneo.testing.int4_checkpoints import write_int4_checkpoint
from inferneo.testing.server import RemoteServer
from inferneo.worker.weight_update import _weights_of, park_weights

MAX_NEW = 8
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
PROMPT = list(range(5, 61))  # 56 tokens: three full 16-token blocks the prefix cache keeps
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"  # loaded into the fused (and on CPU packed) qkv_proj


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint_factory) -> tuple[Path, Path]:
    return tiny_checkpoint_factory("llama", seed=0), tiny_checkpoint_factory("llama", seed=1)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def llm(checkpoints):
    engine = LLM(str(checkpoints[0]), dtype="float32", max_model_len=256, block_size=16)
    yield engine
    engine.shutdown()


@pytest.fixture
def as_a(llm, checkpoints):
    """The shared engine, put back to A's weights (and awake) after the test."""
    yield llm
    if llm.is_sleeping():
        llm.wake_up()
    llm.update_weights(tensors(checkpoints[0]).items())


def greedy(llm: LLM, prompt: list[int] = PROMPT) -> tuple[list[int], int]:
    """The greedy continuation and how many prompt tokens came from the prefix cache."""
    output = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    return list(output.outputs[0].token_ids), output.num_cached_tokens


def test_new_weights_give_the_other_checkpoints_output_and_reset_the_prefix_cache(as_a, checkpoints):
    llm, (a, b) = as_a, checkpoints
    assert greedy(llm)[0] == hf_greedy(a, PROMPT, MAX_NEW)
    assert greedy(llm)[1] == 48  # the prompt's full blocks now come from the prefix cache
    llm.update_weights(tensors(b).items())
    tokens, cached = greedy(llm)
    assert tokens == hf_greedy(b, PROMPT, MAX_NEW)
    assert cached == 0  # A's cached blocks were dropped: none served B's request
    assert greedy(llm) == (tokens, 48)  # and B's own blocks are cached as usual
    assert hf_greedy(a, PROMPT, MAX_NEW) != tokens  # (the two checkpoints differ: the test can fail)


def test_one_tensor_updates_alone(as_a, checkpoints, tmp_path):
    llm, (a, b) = as_a, checkpoints
    mixed = tmp_path / "mixed"
    shutil.copytree(a, mixed)
    weights = tensors(a) | {Q_PROJ: tensors(b)[Q_PROJ]}
    save_file(weights, str(mixed / "model.safetensors"))
    llm.update_weights([(Q_PROJ, tensors(b)[Q_PROJ])])
    assert greedy(llm)[0] == hf_greedy(mixed, PROMPT, MAX_NEW) != hf_greedy(a, PROMPT, MAX_NEW)


@pytest.mark.parametrize(("bad", "message"), [
    (("model.layers.0.self_attn.nope.weight", torch.zeros(4, 4)), "does not belong to this model"),
    (("model.layers.1.mlp.down_proj.weight", torch.zeros(3, 3)), "has shape (3, 3)"),
])
def test_an_unknown_name_or_a_wrong_shape_changes_nothing(as_a, checkpoints, bad, message):
    llm, (a, b) = as_a, checkpoints
    before = greedy(llm)[0]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        llm.update_weights([(Q_PROJ, tensors(b)[Q_PROJ]), bad])  # the good tensor first: all or none
    assert greedy(llm)[0] == before == hf_greedy(a, PROMPT, MAX_NEW)
    with pytest.raises(ValueError, match="pairs"):
        llm.update_weights([Q_PROJ])


def test_weights_change_only_between_requests(as_a, checkpoints):
    llm, (a, b) = as_a, checkpoints
    engine = llm.llm_engine
    engine.add_request("running", PROMPT, GREEDY)
    engine.step()  # the prompt is computed with A's weights; the request goes on
    with pytest.raises(EngineBusyError, match="1 request"):
        llm.update_weights(tensors(b).items())
    with pytest.raises(EngineBusyError):
        llm.sleep()
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs[0].outputs[0].token_ids == hf_greedy(a, PROMPT, MAX_NEW)  # all of it with A's weights


def test_reset_prefix_cache_keeps_blocks_running_requests_hold(as_a):
    llm = as_a
    greedy(llm)
    assert llm.reset_prefix_cache() is True
    assert greedy(llm)[1] == 0
    engine = llm.llm_engine
    engine.add_request("holder", PROMPT, GREEDY)
    engine.step()  # it holds its cached blocks
    assert llm.reset_prefix_cache() is False
    while engine.has_unfinished_requests():
        engine.step()
    assert llm.reset_prefix_cache() is True


def test_sleep_refuses_requests_and_wake_up_serves_the_same_output(as_a):
    llm = as_a
    before = greedy(llm)[0]
    llm.sleep(level=1)
    assert llm.is_sleeping()
    assert llm.llm_engine.runner.kv_caches == []  # the KV memory is freed
    with pytest.raises(EngineSleepingError, match="sleeping"):
        llm.generate([PROMPT], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="already sleeping"):
        llm.sleep()
    llm.wake_up()
    assert not llm.is_sleeping()
    assert greedy(llm) == (before, 0)  # the same weights; the cache was emptied
    with pytest.raises(ValueError, match="level must be 1 or 2"):
        llm.sleep(level=3)
    assert not llm.is_sleeping()


def test_sleep_level_2_drops_the_weights_until_they_are_loaded_again(as_a, checkpoints):
    llm, b = as_a, checkpoints[1]
    llm.sleep(level=2)
    with pytest.raises(EngineBusyError, match="wake it up"):
        llm.update_weights(tensors(b).items())
    llm.wake_up()
    with pytest.raises(EngineSleepingError, match="update_weights"):
        llm.generate([PROMPT], GREEDY, use_tqdm=False)
    llm.update_weights([(Q_PROJ, tensors(b)[Q_PROJ])])
    with pytest.raises(EngineSleepingError, match="update_weights"):  # one of many: still refused
        llm.generate([PROMPT], GREEDY, use_tqdm=False)
    llm.update_weights(tensors(b).items())
    assert greedy(llm)[0] == hf_greedy(b, PROMPT, MAX_NEW)


def weight_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The model's weight tensors (parameters and the CPU kernels' packed tensors), one per storage view."""
    return [getattr(module, name).data if is_parameter else getattr(module, name)
            for module, name, is_parameter in (w.slots[0] for w in _weights_of(model))]


def test_weights_parked_in_host_memory_come_back_whole(as_a):
    """Sleep level 1 on CUDA (weights to pinned host memory and back), run on the host: every weight tensor moves
    to the copy, and the copies are what the model computes with afterwards."""
    llm = as_a
    runner = llm.llm_engine.runner
    model = runner.model
    before, old = greedy(llm)[0], weight_tensors(model)  # held: their memory is not reused meanwhile
    graphs = runner.use_cuda_graphs
    runner.release_cuda_graphs()  # (CUDA) captured graphs read the weights where they were, as sleep knows
    parked = park_weights(model, keep=True)
    moved = {t.untyped_storage().data_ptr() for t in weight_tensors(model)}
    assert moved.isdisjoint(t.untyped_storage().data_ptr() for t in old)  # no module reads the old tensors
    weights = sum(p.numel() * p.element_size() for p in llm.llm_engine.runner._load_twin().parameters())
    assert weights <= parked.nbytes < 1.5 * weights  # all of them, once each (panels add their padding)
    parked.restore(runner.device)  # (on CUDA: from pinned host memory back to the GPU)
    if graphs:
        runner.capture_cuda_graphs()
    assert greedy(llm)[0] == before


def test_a_tied_embedding_and_head_update_together(tiny_checkpoint_factory):
    a = tiny_checkpoint_factory("llama", tie_word_embeddings=True, seed=0)
    b = tiny_checkpoint_factory("llama", tie_word_embeddings=True, seed=1)
    llm = LLM(str(a), dtype="float32", max_model_len=256)
    try:
        llm.update_weights(tensors(b).items())
        assert greedy(llm)[0] == hf_greedy(b, PROMPT, MAX_NEW)
        llm.sleep(level=2)
        llm.wake_up()
        llm.update_weights(tensors(a).items())
        assert greedy(llm)[0] == hf_greedy(a, PROMPT, MAX_NEW)
    finally:
        llm.shutdown()


def test_every_tensor_parallel_rank_takes_its_slices(checkpoints):
    a, b = checkpoints
    llm = LLM(str(a), dtype="float32", max_model_len=256, tensor_parallel_size=2, device="cpu")  # gloo
    try:
        assert greedy(llm)[0] == hf_greedy(a, PROMPT, MAX_NEW)
        with pytest.raises(ValueError, match="has shape"):  # refused on the driver: no worker moves
            llm.update_weights([(Q_PROJ, torch.zeros(3, 3))])
        llm.update_weights(tensors(b).items())
        assert greedy(llm) == (hf_greedy(b, PROMPT, MAX_NEW), 0)
        llm.sleep(level=2)  # every rank drops its shards
        llm.wake_up()
        with pytest.raises(EngineSleepingError):
            llm.generate([PROMPT], GREEDY, use_tqdm=False)
        llm.update_weights(tensors(a).items())
        assert greedy(llm)[0] == hf_greedy(a, PROMPT, MAX_NEW)
    finally:
        llm.shutdown()


def test_quantized_weights_are_refused_clearly(checkpoints, tmp_path):
    quantized, _ = write_int4_checkpoint(checkpoints[0], tmp_path / "awq", tmp_path / "deq", "awq")
    llm = LLM(str(quantized), max_model_len=256)
    try:
        before = greedy(llm)[0]
        with pytest.raises(ValueError, match="quantized .*awq"):
            llm.update_weights([("model.norm.weight", torch.ones(64))])
        with pytest.raises(ValueError, match="sleep level 2 drops the weights"):
            llm.sleep(level=2)
        llm.sleep(level=1)  # the KV cache alone: fine
        llm.wake_up()
        assert greedy(llm)[0] == before
    finally:
        llm.shutdown()


@pytest.mark.parametrize("host", ["in_child_process", "in_thread"])
def test_the_commands_reach_a_core_in_a_child_process_or_a_thread(checkpoints, host):
    a, b = checkpoints

    async def scenario(engine: AsyncEngine) -> None:
        async def run() -> list[int]:
            tokens: list[int] = []
            async for output in engine.generate(PROMPT, GREEDY, "r"):
                tokens += output.outputs[0].token_ids
            return tokens

        assert await run() == hf_greedy(a, PROMPT, MAX_NEW)
        await engine.update_weights(tensors(b).items())
        assert await run() == hf_greedy(b, PROMPT, MAX_NEW)
        with pytest.raises(ValueError, match="does not belong"):
            await engine.update_weights([("lm_head.nope", torch.zeros(2))])
        assert await engine.reset_prefix_cache() is True
        await engine.sleep(1)
        assert engine.is_sleeping
        with pytest.raises(EngineSleepingError):
            await run()
        await engine.wake_up()
        assert await run() == hf_greedy(b, PROMPT, MAX_NEW)

    engine = getattr(AsyncEngine, host)(EngineConfig(model=str(a), dtype="float32", max_model_len=256))
    engine.start()
    try:
        asyncio.run(scenario(engine))
    finally:
        engine.shutdown()


def test_data_parallel_replicas_all_take_the_commands(checkpoints):
    """Two replicas (child processes): new weights reach both (prompts routed to each answer with B's tokens), a
    request running on either refuses new weights and sleep before any replica changes, and sleep, wake-up and
    the prefix-cache reset answer once for both."""
    a, b = checkpoints
    prompts = [PROMPT, list(range(100, 140)), list(range(200, 230)), list(range(300, 350))]

    async def scenario(engine: AsyncEngine) -> None:
        async def run(prompt: list[int], request_id: str, params: SamplingParams = GREEDY) -> list[int]:
            tokens: list[int] = []
            async for output in engine.generate(prompt, params, request_id):
                tokens += output.outputs[0].token_ids
            return tokens

        async def run_all(tag: str) -> list[list[int]]:
            return await asyncio.gather(*(run(p, f"{tag}{i}") for i, p in enumerate(prompts)))

        assert await run_all("a") == [hf_greedy(a, p, MAX_NEW) for p in prompts]
        served = [sum(r.routed.values()) for r in engine.client.replica_status()]
        assert all(count > 0 for count in served), served  # both replicas ran some
        long = engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=150, ignore_eos=True), "long")
        first = await anext(long)  # running on one replica now
        with pytest.raises(EngineBusyError, match="unfinished"):
            await engine.update_weights(tensors(b).items())
        with pytest.raises(EngineBusyError):
            await engine.sleep(1)
        assert len(first.outputs[0].token_ids) + sum([len(o.outputs[0].token_ids) async for o in long]) == 150
        await engine.update_weights(tensors(b).items())
        assert await run_all("b") == [hf_greedy(b, p, MAX_NEW) for p in prompts]
        assert await engine.reset_prefix_cache() is True
        await engine.sleep(1)
        assert engine.is_sleeping
        with pytest.raises(EngineSleepingError):
            await run(PROMPT, "asleep")
        await engine.wake_up()
        assert not engine.is_sleeping
        assert await run(PROMPT, "awake") == hf_greedy(b, PROMPT, MAX_NEW)

    engine = AsyncEngine.data_parallel(EngineConfig(model=str(a), dtype="float32", max_model_len=256,
                                                    data_parallel_size=2, num_threads=1, kv_cache_memory="8MiB"))
    engine.start()
    try:
        asyncio.run(scenario(engine))
    finally:
        engine.shutdown()


@pytest.mark.slow
def test_the_dev_endpoints_over_http(checkpoints):
    a, _ = checkpoints
    with RemoteServer(a, "--dtype", "float32", "--max-model-len", "256", "--enable-dev-endpoints") as server:
        client = openai.OpenAI(base_url=server.url("/v1"), api_key="none", max_retries=0)
        model = client.models.list().data[0].id

        def complete() -> list[int]:
            answer = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_NEW, temperature=0,
                                               extra_body={"ignore_eos": True, "return_token_ids": True})
            return answer.choices[0].token_ids

        before = complete()
        with httpx.Client(base_url=server.base_url) as http:
            assert http.post("/reset_prefix_cache").json() == {"reset": True}
            assert http.get("/is_sleeping").json() == {"is_sleeping": False}
            assert http.post("/sleep", params={"level": 1}).status_code == 200
            assert http.get("/is_sleeping").json() == {"is_sleeping": True}
            refused = http.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 2})
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
            assert refused.json()["error"]["code"] == "engine_sleeping"
            bad = http.post("/sleep", params={"level": 1})
            assert bad.status_code == 400 and "already sleeping" in bad.json()["error"]["message"]
            assert http.post("/wake_up").status_code == 200
            assert http.get("/is_sleeping").json() == {"is_sleeping": False}
            assert http.post("/sleep", params={"level": 7}).status_code == 400
        assert complete() == before
    with RemoteServer(a, "--dtype", "float32", "--max-model-len", "256", "--engine-in-process") as server, \
            httpx.Client(base_url=server.base_url) as http:
        for method, path in [("POST", "/sleep"), ("POST", "/wake_up"), ("GET", "/is_sleeping"),
                             ("POST", "/reset_prefix_cache")]:
            assert http.request(method, path).status_code == 404, path
