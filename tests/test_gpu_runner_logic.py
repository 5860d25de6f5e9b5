"""The GPU runner's device-independent logic, on CPU: graph buckets, padded decode batches, input packing, KV
sizing arithmetic and the architecture presets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inferneo import LLM, SamplingParams
from inferneo.engine.request import Request
from inferneo.model_executor import arch_presets
from inferneo.model_executor.arch_presets import PRESETS, preset_config, preset_name
from inferneo.model_executor.models.registry import get_model_class
from inferneo.worker.cuda_graphs import decode_buckets, graph_layout, pick_bucket
from inferneo.worker.memory import MemoryProfile, kv_cache_budget
from inferneo.worker.step_inputs import ScheduledSequence, pack_step, step_layout


def test_buckets_cover_every_batch_up_to_max_num_seqs():
    assert decode_buckets(256) == [1, 2, 4, *range(8, 257, 8)]
    assert decode_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert decode_buckets(1) == [1]
    assert decode_buckets(1000)[-1] == 256
    buckets = decode_buckets(100)
    for n in range(1, 101):
        b = pick_bucket(buckets, n)
        assert b >= n and (buckets.index(b) == 0 or buckets[buckets.index(b) - 1] < n)
    assert pick_bucket(buckets, 101) is None


def _request(tokens: list[int], computed: int, blocks: list[int]) -> Request:
    req = Request("r", tokens, SamplingParams(max_tokens=4), max_tokens=4)
    req.num_computed_tokens = computed
    req.block_ids = list(blocks)
    return req


def scheduled(req: Request, num_new_tokens: int) -> ScheduledSequence:
    """The runner's record of ``req`` running ``num_new_tokens`` tokens (nothing in flight)."""
    samples = req.num_computed_tokens + num_new_tokens == req.num_tokens
    return ScheduledSequence(req.all_token_ids, req.num_computed_tokens, num_new_tokens, req.block_ids, -1, samples,
                             req.sampling_row)


def test_pack_pads_decode_rows_into_the_spare_block():
    bs, spare = 4, 99
    a = _request(list(range(10, 19)), 8, [5, 6, 7])  # position 8 -> block 7, offset 0
    b = _request(list(range(20, 25)), 4, [1, 2])  # position 4 -> block 2, offset 0
    items = [scheduled(a, 1), scheduled(b, 1)]
    layout = graph_layout(decode_buckets(8), max_blocks_per_seq=6)
    buf = np.full(layout.size, -7, dtype=np.int64)  # stale garbage must not leak into the tables
    packed = pack_step(buf, layout, items, bs, pad_rows=4, spare_block=spare)
    lo = layout
    assert packed.num_decode == 4 and packed.num_real_decode == 2 and packed.samples_are_prefix
    assert list(buf[lo.ids : lo.ids + 4]) == [18, 24, 0, 0]
    assert list(buf[lo.positions : lo.positions + 4]) == [8, 4, 0, 0]
    assert list(buf[lo.slots : lo.slots + 4]) == [7 * bs, 2 * bs, spare * bs, spare * bs]
    assert list(buf[lo.seq_lens : lo.seq_lens + 4]) == [9, 5, 1, 1]
    tables = buf[lo.tables : lo.tables + 4 * lo.width].reshape(4, lo.width)
    assert tables.tolist() == [[5, 6, 7, 0, 0, 0], [1, 2, 0, 0, 0, 0], [spare, 0, 0, 0, 0, 0], [spare] + [0] * 5]
    assert layout.used(4) == lo.tables + 4 * lo.width


def test_pack_mixed_step_lays_out_spans_after_decodes():
    bs = 4
    dec = _request([1, 2, 3, 4, 5], 4, [3, 8])
    pre = _request(list(range(100, 110)), 4, [0, 9, 4])  # chunk of tokens 4..9 (not the last: 10 tokens total)
    pre.all_token_ids.append(7)  # pretend one more token exists, so this chunk samples nothing
    items = [scheduled(dec, 1), scheduled(pre, 6)]
    layout = step_layout(items, bs)
    buf = np.zeros(layout.size, dtype=np.int64)
    packed = pack_step(buf, layout, items, bs, pad_rows=None, spare_block=0)
    lo = layout
    assert packed.num_tokens == 7 and packed.num_decode == 1
    assert list(buf[lo.ids : lo.ids + 7]) == [5, 104, 105, 106, 107, 108, 109]
    assert list(buf[lo.positions : lo.positions + 7]) == [4, 4, 5, 6, 7, 8, 9]
    assert list(buf[lo.slots : lo.slots + 7]) == [8 * bs, 9 * bs, 9 * bs + 1, 9 * bs + 2, 9 * bs + 3, 4 * bs, 4 * bs + 1]
    (span,) = packed.spans
    assert (span.start, span.num_tokens, span.context_len, span.num_blocks) == (1, 6, 4, 3)
    assert list(buf[span.table_offset : span.table_offset + 3]) == [0, 9, 4]
    assert packed.num_samples == 1 and buf[lo.sample_rows] == 0  # only the decode row (dec) samples


def _generate(llm: LLM, prompts, max_tokens=12):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint_factory):
    return LLM(str(tiny_checkpoint_factory("llama")), dtype="float32", device="cpu")


def test_padded_decode_batches_give_the_same_tokens(llm):
    runner = llm.engine.runner
    assert runner.kv_caches[0].numel() > 0 and runner.spare_block == llm.engine.kv_cache.num_blocks
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [40, 41], [3] * 9, [17, 18, 19, 20], [70, 71, 72]]
    plain = _generate(llm, prompts)
    seen: list[int] = []
    pick = runner._decode_bucket

    def spy(items):
        bucket = pick(items)
        if bucket is not None:
            seen.append(bucket - len(items))
        return bucket

    runner.decode_buckets = [1, 2, 4, 8]
    runner._decode_bucket = spy
    try:
        padded = _generate(llm, prompts)
    finally:
        runner.decode_buckets = []
        del runner._decode_bucket
    assert padded == plain
    assert any(pad > 0 for pad in seen), "no step was padded"
    spare = runner.spare_block
    kv = llm.engine.kv_cache
    kv.check_integrity([])
    assert spare not in {b.block_id for b in kv.blocks}


def test_kv_budget_arithmetic():
    gib = 2**30
    profile = MemoryProfile(total=80 * gib, in_use=15 * gib, peak_activation=3 * gib)
    assert kv_cache_budget(profile, 0.9) == int(72 * gib) - 18 * gib
    assert kv_cache_budget(profile, 0.9, reserve=gib) == int(72 * gib) - 19 * gib
    assert kv_cache_budget(profile, 0.2) == 0


@pytest.mark.parametrize(("name", "params"), [
    ("llama-2-7b", 6.738e9), ("llama-2-70b", 68.977e9), ("llama-3-8b", 8.030e9), ("qwen2.5-7b", 7.616e9),
    ("qwen3-0.6b", 0.596e9), ("gpt-oss-20b", 20.915e9),
])
def test_presets_have_the_published_sizes(name, params):
    config = preset_config(name)
    cls = get_model_class(config)
    with torch.device("meta"):
        model = cls(cls.config_from_hf(config), backend=None, max_position=16)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - params) / params < 0.002, count


def test_preset_names():
    assert preset_name("preset:Llama-2-7B") == "llama-2-7b"
    assert preset_name("some/model") is None
    with pytest.raises(ValueError, match="available"):
        preset_name("preset:gpt-5")


@pytest.mark.parametrize("name", list(PRESETS))
def test_tiny_preset_runs_on_token_ids_and_refuses_text(name, monkeypatch, tmp_path):
    tiny = preset_config(name, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    if "head_dim" in tiny:
        tiny["head_dim"] = 16
    monkeypatch.setitem(PRESETS, "tiny-test", tiny)
    monkeypatch.setattr(arch_presets.tempfile, "gettempdir", lambda: str(tmp_path))
    llm = LLM("preset:tiny-test", load_format="dummy", dtype="float32", device="cpu", kv_cache_memory="4MiB")
    (tokens,) = _generate(llm, [[1, 2, 3, 4]], max_tokens=5)
    assert len(tokens) == 5 and all(0 <= t < 256 for t in tokens)
    with pytest.raises(ValueError, match="token ids"):
        llm.generate("some text", use_tqdm=False)
