"""LoRA adapters offline: greedy tokens with PEFT adapters (written by PEFT itself, on the same tiny float32
weights) equal Hugging Face + PEFT's, for three adapters of different ranks, scales and target modules mixed in
one batch with base-model requests; with more adapters than slots (LRU paging); with prefix-cache hits and
chunked prefill; and adapters that cannot run are refused with errors that say why."""

from __future__ import annotations

import functools
import json
import shutil

import numpy as np
import pytest
import torch

from inferneo import LLM, LoRARequest, SamplingParams
from inferneo.engine.kv_cache_manager import KVCacheManager
from inferneo.engine.protocol import LoraRef
from inferneo.engine.request import Request
from inferneo.lora.adapter import LoRAAdapterError, load_adapter, lora_targets
from inferneo.model_executor.models.llama import DecoderConfig
from inferneo.testing.lora_adapters import make_peft_adapter, write_lora_adapter

pytest.importorskip("peft")

MAX_NEW = 8
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (rank, target modules, lora_alpha, use_rslora)
ADAPTERS = {
    "qv8": (8, ["q_proj", "v_proj"], 16, False),
    "all16": (16, ALL, 8, True),
    "mlp4": (4, ["up_proj", "down_proj", "o_proj"], 8, False),
}


@pytest.fixture(scope="module")
def base(tiny_llama_dir):
    return tiny_llama_dir


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory) -> dict[str, LoRARequest]:
    root = tmp_path_factory.mktemp("loras")
    out = {}
    for i, (name, (r, targets, alpha, rslora)) in enumerate(ADAPTERS.items(), start=1):
        path = make_peft_adapter(base, root / name, r=r, target_modules=targets, lora_alpha=alpha,
                                 use_rslora=rslora, seed=i)
        out[name] = LoRARequest(name, i, str(path))
    return out


@functools.cache
def _peft_model(base: str, adapter: str | None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return (PeftModel.from_pretrained(model, adapter) if adapter else model).eval()


def peft_greedy(base, lora: LoRARequest | None, prompt: list[int]) -> list[int]:
    model = _peft_model(str(base), lora.lora_path if lora else None)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prompts_and_loras(adapters, count: int, seed: int, shared_prefix: int = 0):
    rng = np.random.default_rng(seed)
    prefix = rng.integers(5, 380, shared_prefix).tolist()
    prompts = [prefix + rng.integers(5, 380, int(n)).tolist() for n in rng.integers(3, 40, count)]
    choices = [None, *adapters.values()]
    return prompts, [choices[i % len(choices)] for i in range(count)]


def check_against_peft(llm, base, prompts, loras):
    outputs = llm.generate(prompts, GREEDY, lora_request=loras, use_tqdm=False)
    for prompt, lora, out in zip(prompts, loras, outputs, strict=True):
        assert out.outputs[0].token_ids == peft_greedy(base, lora, prompt), (lora and lora.lora_name, prompt)
    kv = llm.engine.kv_cache
    kv.check_integrity([])
    assert kv.num_free_blocks == kv.num_blocks and not llm.engine.has_unfinished_requests()


@pytest.fixture(scope="module")
def llm(base):
    engine = LLM(str(base), enable_lora=True, max_loras=3, max_lora_rank=16, dtype="float32",
                 kv_cache_memory="16MiB", max_num_batched_tokens=64, num_threads=1)
    yield engine
    engine.shutdown()


def test_three_adapters_and_the_base_model_in_one_batch_equal_peft(llm, base, adapters):
    prompts, loras = prompts_and_loras(adapters, 8, seed=0)
    check_against_peft(llm, base, prompts, loras)
    # the eight requests ran together: all three adapters and the base model in the same steps
    assert llm.engine.core.stats.max_batch_size == 8


def test_chat_runs_each_conversation_with_its_adapter(llm, adapters):
    convs = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "the cat"}]]
    loras = [adapters[sorted(adapters)[0]], None]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    chats = llm.chat(convs, params, use_tqdm=False, lora_request=loras)
    direct = llm.generate([c.prompt_token_ids for c in chats], params, use_tqdm=False, lora_request=loras)
    assert [c.outputs[0].token_ids for c in chats] == [d.outputs[0].token_ids for d in direct]
    base_only = llm.chat(convs[0], params, use_tqdm=False)
    assert base_only[0].outputs[0].token_ids != chats[0].outputs[0].token_ids


@pytest.mark.parametrize(("arch", "targets"), [
    ("phi3", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),  # Phi-3's fused modules: one lora_A per module
    ("gemma3_multimodal", ["q_proj", "v_proj", "down_proj"]),  # layers under language_model, and a vision tower
    ("qwen3", "all-linear"),
])
def test_adapters_of_other_families_equal_peft(tiny_checkpoint_factory, tmp_path, arch, targets):
    """Adapters PEFT writes for Phi-3 (``qkv_proj`` / ``gate_up_proj``: ``lora_B``'s rows are the q, k, v or gate, up
    shards'), Gemma 3 served from its multimodal checkpoint (PEFT's q_proj / v_proj catch its vision tower's too,
    which Inferneo, serving the language model alone, skips) and Qwen3 with ``all-linear``: PEFT's greedy tokens."""
    from safetensors import safe_open

    base = tiny_checkpoint_factory(arch)
    path = make_peft_adapter(base, tmp_path / arch, r=8, target_modules=targets, seed=5)
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert (arch == "gemma3_multimodal") == any("vision_tower" in key for key in keys)
    lora = LoRARequest(arch, 1, str(path), base_model_name="tiny-base")  # vLLM's field, informational
    prompts = [[5, 17, 33, 61, 99], list(range(40, 63))]
    assert any(peft_greedy(base, lora, p) != peft_greedy(base, None, p) for p in prompts)
    llm = LLM(str(base), enable_lora=True, max_loras=1, max_lora_rank=8, dtype="float32", kv_cache_memory="16MiB",
              num_threads=1)
    try:
        check_against_peft(llm, base, prompts * 2, [lora, lora, None, None])
    finally:
        llm.shutdown()


def test_gemma3_adapters_of_older_transformers_name_language_model_first(tiny_checkpoint_factory, tmp_path):
    """Transformers before 4.52 saved Gemma 3's multimodal model as ``language_model.model.layers``: an adapter
    trained then reads as today's ``model.language_model.layers`` one (and its vision tower is skipped alike)."""
    from safetensors.torch import load_file, save_file

    base = tiny_checkpoint_factory("gemma3_multimodal")
    today = make_peft_adapter(base, tmp_path / "today", r=4, target_modules=["q_proj", "down_proj"])
    older = tmp_path / "older"
    shutil.copytree(today, older)
    tensors = load_file(str(today / "adapter_model.safetensors"))
    renamed = {key.replace("model.model.language_model.", "model.language_model.model."): t.clone()
               for key, t in tensors.items()}
    assert renamed.keys() != tensors.keys()
    save_file(renamed, str(older / "adapter_model.safetensors"))
    config = DecoderConfig.from_hf(json.loads((base / "config.json").read_text())["text_config"])
    targets = lora_targets(config)
    read = [load_adapter(p.name, 1, str(p), targets, config.num_layers, max_lora_rank=8) for p in (today, older)]
    assert read[0].weights.keys() == read[1].weights.keys() and read[0].weights
    for key, pairs in read[0].weights.items():
        for pair, other in zip(pairs, read[1].weights[key], strict=True):
            assert (pair is None and other is None) or all(map(torch.equal, pair, other))


def test_a_fused_module_and_its_shard_both_changed_are_refused(tiny_checkpoint_factory, tmp_path):
    from safetensors.torch import load_file, save_file

    base = tiny_checkpoint_factory("phi3")
    path = make_peft_adapter(base, tmp_path / "phi3", r=4, target_modules=["qkv_proj"])
    tensors = load_file(str(path / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.1.self_attn."
    tensors[prefix + "k_proj.lora_A.weight"] = tensors[prefix + "qkv_proj.lora_A.weight"].clone()
    tensors[prefix + "k_proj.lora_B.weight"] = tensors[prefix + "qkv_proj.lora_B.weight"][:32].clone()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    targets, layers = _targets(base)
    with pytest.raises(LoRAAdapterError, match="changes k_proj of layer 1 twice"):
        load_adapter("phi3", 1, str(path), targets, layers, max_lora_rank=16)


def test_rank_and_alpha_patterns_equal_peft(llm, base, tmp_path):
    """PEFT's per-module ``rank_pattern`` / ``alpha_pattern`` (a pattern matches the end of the module's name at a
    dot): each module has its rank and its scale (``alpha / r`` of its own), and the tokens are PEFT's."""
    from safetensors.torch import load_file

    path = make_peft_adapter(base, tmp_path / "patterns", r=4, lora_alpha=8, target_modules="all-linear", seed=9,
                             rank_pattern={"v_proj": 12, "layers.1.mlp.down_proj": 2},
                             alpha_pattern={"o_proj": 32, r"model\.layers\.0\.self_attn\.q_proj": 1})
    targets, layers = _targets(base)
    adapter = load_adapter("patterns", 12, str(path), targets, layers, max_lora_rank=16)
    raw = load_file(str(path / "adapter_model.safetensors"))

    def check(layer, module, shard, name, rank, scale):
        a, b = adapter.weights[(layer, module)][shard]
        key = f"base_model.model.model.layers.{layer}.{module.split('.')[0]}.{name}.lora_"
        assert a.shape[0] == rank and torch.equal(a, raw[key + "A.weight"]), (layer, name)
        assert torch.allclose(b, raw[key + "B.weight"] * scale, rtol=1e-6, atol=0), (layer, name)

    check(0, "self_attn.qkv_proj", 0, "q_proj", 4, 1 / 4)
    check(1, "self_attn.qkv_proj", 0, "q_proj", 4, 8 / 4)
    check(0, "self_attn.qkv_proj", 2, "v_proj", 12, 8 / 12)
    check(0, "self_attn.o_proj", 0, "o_proj", 4, 32 / 4)
    check(1, "mlp.down_proj", 0, "down_proj", 2, 8 / 2)
    check(0, "mlp.down_proj", 0, "down_proj", 4, 8 / 4)
    prompts, lora = [[5, 17, 33, 61, 99], list(range(40, 63))], LoRARequest("patterns", 12, str(path))
    check_against_peft(llm, base, prompts, [lora, lora])
    cfg = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {"v_proj": 32}}))
    with pytest.raises(LoRAAdapterError, match="rank_pattern rank 32, above max_lora_rank 16"):
        load_adapter("patterns", 12, str(path), targets, layers, max_lora_rank=16)


def test_speculative_drafts_with_adapters_equal_peft(base, adapters):
    """Steps that verify draft tokens (drafts from an oracle, wrong at moving places) for requests of three
    adapters and the base model: each request's tokens are PEFT's."""
    from test_spec_decode import OracleProposer

    prompts, loras = prompts_and_loras(adapters, 8, seed=7)
    expected = [peft_greedy(base, lora, prompt) for prompt, lora in zip(prompts, loras, strict=True)]
    llm = LLM(str(base), enable_lora=True, max_loras=3, max_lora_rank=16, dtype="float32", kv_cache_memory="16MiB",
              max_num_batched_tokens=64, num_threads=1, speculative_config={"num_speculative_tokens": 3})
    try:
        llm.engine.core.proposer = OracleProposer({tuple(p): e for p, e in zip(prompts, expected, strict=True)}, 3)
        check_against_peft(llm, base, prompts, loras)
        stats = llm.engine.core.stats
        assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    finally:
        llm.shutdown()


def test_prefix_cache_hits_stay_within_an_adapter(llm, base, adapters):
    """The same prompts with every adapter and none, twice: the second pass hits the prefix cache, and each
    request still equals PEFT with its own adapter (a block computed with one adapter never serves another)."""
    rng = np.random.default_rng(1)
    shared = rng.integers(5, 380, 40).tolist()
    prompts = [shared + [7, 8, 9], shared + [11]] * 4
    loras = [lora for lora in (None, *adapters.values()) for _ in range(2)]
    kv = llm.engine.kv_cache
    for _ in range(2):
        hits = kv.prefix_cache_hits
        check_against_peft(llm, base, prompts, loras)
    assert kv.prefix_cache_hits > hits


def test_more_adapters_than_slots_page_in_and_out(base, adapters):
    """One slot for three adapters: requests wait for the slot (LRU paging); chunked prefill splits prompts,
    a KV cache of a few blocks preempts requests, asynchronous scheduling and decode rows padded to buckets (as
    CUDA graphs pad them) are on; every output still equals PEFT's."""
    engine = LLM(str(base), enable_lora=True, max_loras=1, max_lora_rank=16, dtype="float32",
                 kv_cache_memory=9 * llm_block_bytes(base), max_num_batched_tokens=16, num_threads=1,
                 async_scheduling=True)
    engine.engine.runner.decode_buckets = [1, 2, 4, 8]
    try:
        prompts, loras = prompts_and_loras(adapters, 8, seed=2, shared_prefix=20)
        check_against_peft(engine, base, prompts, loras)
        slots = engine.engine.core.lora_slots
        assert slots.num_loads >= 3 and len(slots.slot_of) == 1
        assert engine.engine.core.stats.num_preemptions > 0
    finally:
        engine.shutdown()


def test_tensor_parallel_ranks_apply_their_parts_of_the_adapters(base, adapters):
    """Two ranks over gloo: each holds its heads' rows of B for q/k/v and gate/up, its input columns of A for o and
    down (whose deltas are all-reduced); three adapters over two slots (every rank pages them alike) and the base
    model in one batch, with chunked prefill: every output equals PEFT's on the whole model."""
    engine = LLM(str(base), enable_lora=True, max_loras=2, max_lora_rank=16, dtype="float32",
                 kv_cache_memory="16MiB", max_num_batched_tokens=32, num_threads=1, tensor_parallel_size=2)
    try:
        layer = engine.engine.runner.driver.model.layers[0]
        o_proj, qkv = layer.self_attn.o_proj, layer.self_attn.qkv_proj
        assert o_proj.in_features * 2 == qkv.in_features and o_proj.all_reduce is not None  # half the columns
        prompts, loras = prompts_and_loras(adapters, 8, seed=4)
        check_against_peft(engine, base, prompts, loras)
        assert engine.engine.core.lora_slots.num_loads >= 3
    finally:
        engine.shutdown()


def test_queued_requests_keep_their_adapter_read_when_they_arrived(base, adapters, tmp_path):
    """One slot and one host copy (max_cpu_loras = max_loras = 1): requests of two adapters arrive together, and the
    first adapter's folder is deleted before they run. Its requests still run with the weights read when they
    arrived (the host copy stays while requests need it; the step never reads the folder again), and so do the
    base-model request sharing their steps and the other adapter's: every output is PEFT's."""
    doomed = tmp_path / "doomed"
    shutil.copytree(adapters["qv8"].lora_path, doomed)
    gone = LoRARequest("doomed", 1, str(doomed))
    engine = LLM(str(base), enable_lora=True, max_loras=1, max_lora_rank=16, dtype="float32", kv_cache_memory="16MiB",
                 num_threads=1)
    try:
        core = engine.engine
        prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13], [14, 15, 16]]
        loras = [gone, None, gone, adapters["all16"]]
        for i, (prompt, lora) in enumerate(zip(prompts, loras, strict=True)):
            core.add_request(f"r{i}", prompt, GREEDY, lora=lora and lora.to_ref())
        shutil.rmtree(doomed)
        outputs = {}
        while core.has_unfinished_requests():
            outputs.update((out.request_id, out) for out in core.step() if out.finished)
        for i, (prompt, lora) in enumerate(zip(prompts, loras, strict=True)):
            reference = adapters["qv8"] if lora is gone else lora
            assert outputs[f"r{i}"].outputs[0].token_ids == peft_greedy(base, reference, prompt), i
        # the next adapter read brings the host copies back to max_cpu_loras
        check_against_peft(engine, base, [[5, 6, 7]], [adapters["mlp4"]])
        assert list(engine.engine.core.lora_slots.host) == [adapters["mlp4"].lora_int_id]
    finally:
        engine.shutdown()


def test_a_busy_adapter_does_not_keep_another_waiting_for_ever(base, adapters):
    """One slot; a request of adapter B waits behind adapter A's, and A's requests keep arriving (one every other
    step). B's request waited for ever (every step a later A request started: A kept the slot); after
    ``lora_max_wait_steps`` steps it holds back the adapter requests behind it, A's running ones finish, and it
    runs: with PEFT's tokens, as do A's."""
    engine = LLM(str(base), enable_lora=True, max_loras=1, max_lora_rank=16, dtype="float32", kv_cache_memory="16MiB",
                 num_threads=1)
    try:
        core = engine.engine
        scheduler = core.core.scheduler
        assert scheduler.lora_max_wait_steps == 64
        scheduler.lora_max_wait_steps = 8  # the same rule, in fewer steps
        a, b, prompt = adapters["qv8"], adapters["mlp4"], [5, 6, 7]
        core.add_request("a-0", prompt, GREEDY, lora=a.to_ref())
        core.add_request("b", prompt, GREEDY, lora=b.to_ref())
        outputs, step = {}, 0
        while "b" not in outputs and step < 100:
            if step % 2 == 0:
                core.add_request(f"a-{step + 1}", prompt, GREEDY, lora=a.to_ref())
            outputs.update((out.request_id, out) for out in core.step() if out.finished)
            step += 1
        assert "b" in outputs, f"b still waits after {step} steps"
        while core.has_unfinished_requests():
            outputs.update((out.request_id, out) for out in core.step() if out.finished)
        assert outputs["b"].outputs[0].token_ids == peft_greedy(base, b, prompt)
        want = peft_greedy(base, a, prompt)
        assert all(out.outputs[0].token_ids == want for rid, out in outputs.items() if rid.startswith("a-"))
    finally:
        engine.shutdown()


def llm_block_bytes(base) -> int:
    """Bytes of one KV block of the tiny model (float32, 16 tokens): layers x K and V x kv heads x head_dim."""
    config = DecoderConfig.from_hf(json.loads((base / "config.json").read_text()))
    return config.num_layers * 2 * config.num_kv_heads * config.head_dim * 16 * 4


def test_block_hashes_are_keyed_by_adapter():
    kv = KVCacheManager(8, 4)
    params = SamplingParams(max_tokens=1)
    tokens = list(range(12))
    hashes = []
    for lora in (None, LoraRef("a", 1, "/x"), LoraRef("b", 2, "/y"), LoraRef("a", 1, "/x")):
        request = Request("r", tokens, params, 1, lora=lora)
        kv._update_block_hashes(request)
        hashes.append(request.block_hashes)
    assert len({tuple(h) for h in hashes[:3]}) == 3 and hashes[1] == hashes[3]


# ---- adapters that cannot run ------------------------------------------------------------------------------------


def _targets(base):
    config = DecoderConfig.from_hf(json.loads((base / "config.json").read_text()))
    return lora_targets(config), config.num_layers


def test_rank_above_the_max_is_refused(base, tmp_path):
    path = make_peft_adapter(base, tmp_path / "r32", r=32, target_modules=["q_proj"])
    targets, layers = _targets(base)
    with pytest.raises(LoRAAdapterError, match="r=32, above max_lora_rank 16") as err:
        load_adapter("r32", 1, str(path), targets, layers, max_lora_rank=16)
    assert err.value.param == "lora_path"


def test_an_adapter_of_another_base_model_is_refused(base, tmp_path):
    config = json.loads((base / "config.json").read_text())
    other = write_lora_adapter({**config, "hidden_size": 96, "intermediate_size": 160}, tmp_path / "other", r=4,
                               target_modules=["q_proj", "down_proj"], dtype=torch.float32)
    targets, layers = _targets(base)
    with pytest.raises(LoRAAdapterError, match="does not fit this model"):
        load_adapter("other", 1, str(other), targets, layers, max_lora_rank=16)
    deeper = write_lora_adapter({**config, "num_hidden_layers": layers + 2}, tmp_path / "deeper", r=4,
                                target_modules=["q_proj"], dtype=torch.float32)
    with pytest.raises(LoRAAdapterError, match=f"the model has {layers} layers"):
        load_adapter("deeper", 1, str(deeper), targets, layers, max_lora_rank=16)


def test_unknown_modules_and_bad_folders_are_refused(base, tmp_path):
    targets, layers = _targets(base)
    head = make_peft_adapter(base, tmp_path / "head", r=4, target_modules=["q_proj", "lm_head"])
    with pytest.raises(LoRAAdapterError, match="lm_head.*not a projection"):
        load_adapter("head", 1, str(head), targets, layers, max_lora_rank=16)
    with pytest.raises(LoRAAdapterError, match="does not exist"):
        load_adapter("gone", 1, str(tmp_path / "missing"), targets, layers, max_lora_rank=16)
    with pytest.raises(LoRAAdapterError, match="is a file: a LoRA adapter is named by its folder"):
        load_adapter("file", 1, str(head / "adapter_model.safetensors"), targets, layers, max_lora_rank=16)
    dora = make_peft_adapter(base, tmp_path / "dora", r=4, target_modules=["q_proj"])
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    # PEFT options whose adapters compute something else: refused by name (lora_bias, layer_replication and
    # alora_invocation_tokens were read as plain LoRA, their weights fitting the model)
    for option, value in [("use_dora", True), ("lora_bias", True), ("layer_replication", [[0, 2]]),
                          ("alora_invocation_tokens", [5, 6]), ("trainable_token_indices", [3]),
                          ("target_parameters", ["mlp.experts.gate_up_proj"]), ("use_qalora", True)]:
        (dora / "adapter_config.json").write_text(json.dumps({**cfg, option: value}))
        with pytest.raises(LoRAAdapterError, match=f"does not support: {option}="):
            load_adapter("dora", 1, str(dora), targets, layers, max_lora_rank=16)


def test_the_engine_refuses_bad_requests(llm, base, adapters, tmp_path):
    big = make_peft_adapter(base, tmp_path / "big", r=32, target_modules=["v_proj"])
    with pytest.raises(ValueError, match="above max_lora_rank"):
        llm.generate([[5, 6, 7]], GREEDY, lora_request=LoRARequest("big", 9, str(big)), use_tqdm=False)
    check_against_peft(llm, base, [[5, 6, 7]], [adapters["qv8"]])  # id 1 is qv8's from now on
    clash = LoRARequest("clash", adapters["qv8"].lora_int_id, adapters["mlp4"].lora_path)
    with pytest.raises(ValueError, match="needs an id of its own"):
        llm.generate([[5, 6, 7]], GREEDY, lora_request=clash, use_tqdm=False)
    with pytest.raises(ValueError, match="got 1 lora_request entries for 2 prompts"):
        llm.generate([[5, 6], [7]], GREEDY, lora_request=[adapters["qv8"]], use_tqdm=False)
    with pytest.raises(ValueError, match="lora_int_id must be a positive integer"):
        LoRARequest("x", 0, "/tmp")
    # the engine goes on: a good request afterwards
    check_against_peft(llm, base, [[5, 6, 7]], [adapters["all16"]])


def test_lora_requests_need_enable_lora(base, adapters):
    engine = LLM(str(base), dtype="float32", kv_cache_memory="8MiB", num_threads=1)
    try:
        with pytest.raises(ValueError, match="without LoRA adapters"):
            engine.generate([[5, 6, 7]], GREEDY, lora_request=adapters["qv8"], use_tqdm=False)
    finally:
        engine.shutdown()
    with pytest.raises(ValueError, match="max_lora_rank must be between 1 and 64"):
        LLM(str(base), enable_lora=True, max_lora_rank=128)
    # refused before any worker starts, naming what is not supported
    from inferneo.config import EngineConfig

    with pytest.raises(ValueError, match="enable_lora with pipeline_parallel_size > 1 is not supported"):
        EngineConfig(model=str(base), enable_lora=True, pipeline_parallel_size=2)


def test_a_model_without_the_projections_is_refused_by_name(tiny_checkpoint_factory):
    """DeepSeek's multi-head latent attention has no q/k/v projections: enable_lora says so at start-up."""
    with pytest.raises(ValueError, match="enable_lora does not support DeepseekV2ForCausalLM: .* no self_attn.qkv_proj"):
        LLM(str(tiny_checkpoint_factory("deepseek_v2")), enable_lora=True, dtype="float32", kv_cache_memory="8MiB",
            num_threads=1)


def test_the_adapters_page_offline_example_runs(base, tmp_path, monkeypatch):
    import contextlib
    import io
    import re
    from pathlib import Path

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "base").symlink_to(base)
    make_peft_adapter(base, tmp_path / "adapters" / "sql-lora", r=8, target_modules=["q_proj", "v_proj"])
    monkeypatch.chdir(tmp_path)
    page = (Path(__file__).parents[1] / "docs" / "adapters.md").read_text()
    block = re.findall(r"^```python\n(.*?)^```", page, flags=re.DOTALL | re.MULTILINE)[0]
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "<docs/adapters.md>", "exec"), namespace)
    assert out.getvalue().strip() == "True"
    namespace["llm"].shutdown()
