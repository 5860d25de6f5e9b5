"""A hub id that is not in the Hugging Face cache is downloaded, as ``vllm serve org/name`` does: only the files
the engine reads (configs, tokenizer, one set of weights), into the cache or ``download_dir``, and the model then
generates what the same folder loaded from disk generates; from a repository of GGUF files, ``org/name:QUANT``
fetches the one file of that type. With ``HF_HUB_OFFLINE=1`` the cached copies serve without a request to the
Hub; a missing repository, revision or quantization type, a GGUF repository named without a type and downloads
turned off fail with a message that says so. The Hub is :class:`fake_hub.FakeHub` on this machine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fake_hub import FakeHub
from test_hf_parity import mixed_prompts, run_engine

from inferneo import LLM
from inferneo.testing import make_tiny_gguf

ENGINE = dict(dtype="float32", kv_cache_memory="16MiB", num_threads=1)
PROMPTS = mixed_prompts(3, 200, seed=8)

SCRIPT = textwrap.dedent("""
    import json, os, sys
    from inferneo import LLM, SamplingParams
    from inferneo.model_loader import resolve_model

    def failure(**kwargs):
        try:
            resolve_model(**kwargs)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    report = {}
    if sys.argv[1] == "download":
        tokenizer = resolve_model("acme/tiny", tokenizer_only=True).path
        report["tokenizer_files"] = sorted(p.name for p in tokenizer.iterdir())
        report["missing"] = failure(model="acme/missing")
        report["gguf_only"] = failure(model="acme/tiny-GGUF")
        report["gguf_missing_type"] = failure(model="acme/tiny-GGUF:Q2_K")
        report["bad_revision"] = failure(model="acme/tiny", revision="v9")
        os.environ["HF_HUB_OFFLINE"] = "1"
        report["offline"] = failure(model="acme/tiny")
        del os.environ["HF_HUB_OFFLINE"]
        report["other_dir"] = str(resolve_model("acme/tiny", download_dir=sys.argv[2]).path)
    report["snapshot"] = str(resolve_model("acme/tiny").path)
    llm = LLM("acme/tiny", dtype="float32", kv_cache_memory="16MiB", num_threads=1)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = json.loads(sys.argv[3])
    report["tokens"] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    report["gguf_file"] = str(resolve_model("acme/tiny-GGUF:q8_0").path)
    llm = LLM("acme/tiny-GGUF:Q8_0", dtype="float32", kv_cache_memory="16MiB", num_threads=1)
    report["gguf_tokens"] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    print("REPORT " + json.dumps(report))
""")


V2_TEMPLATE = "{# v2 #}{% for m in messages %}{{ m['content'] }}{% endfor %}"

TOKENIZER_SCRIPT = textwrap.dedent("""
    import json, sys
    from inferneo import LLM
    from inferneo.cli.main import build_parser
    from inferneo.config import EngineConfig
    from inferneo.model_loader.tokenizer import load_tokenizer

    def template(**kwargs):
        config = EngineConfig(**kwargs)
        try:
            return load_tokenizer(config.model_ref().resolve(), config.tokenizer_ref()).chat_template
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    local, other = sys.argv[1], sys.argv[2]
    args = build_parser().parse_args(["serve", local, "--tokenizer", "acme/tiny", "--tokenizer-revision", "v2"])
    report = {"flag": template(**{"model": local, **{k: getattr(args, k) for k in ("tokenizer", "tokenizer_revision")}}),
              "main": template(model=local, tokenizer="acme/tiny"),
              "at_sign": template(model=local, tokenizer="acme/tiny@v2"),
              "bad": template(model=local, tokenizer="acme/tiny", tokenizer_revision="v9"),
              "elsewhere": template(model=local, tokenizer="acme/tiny", tokenizer_revision="v2", download_dir=other)}
    llm = LLM("acme/tiny", tokenizer_revision="v2", dtype="float32", kv_cache_memory="16MiB", num_threads=1)
    report["engine"] = llm.get_tokenizer().chat_template
    print("REPORT " + json.dumps(report))
""")


@pytest.fixture(scope="module")
def hub(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    tiny = root / "tiny"
    shutil.copytree(tiny_llama_dir, tiny)
    for extra in ("pytorch_model.bin", "original/consolidated.00.pth", "onnx/model.onnx", "model-q8.gguf"):
        (tiny / extra).parent.mkdir(parents=True, exist_ok=True)
        (tiny / extra).write_bytes(b"not for the engine")
    ggufs = root / "tiny-GGUF"
    ggufs.mkdir()
    for kind in ("Q8_0", "F32"):
        make_tiny_gguf(tiny_llama_dir, ggufs / f"tiny-{kind}.gguf", kind)
    (ggufs / "README.md").write_text("two files")
    v2 = root / "tiny-v2"  # branch v2 of acme/tiny: another chat template
    shutil.copytree(tiny_llama_dir, v2)
    (v2 / "chat_template.jinja").write_text(V2_TEMPLATE)
    server = FakeHub({"acme/tiny": tiny, "acme/tiny-GGUF": ggufs}, branches={"acme/tiny": {"v2": v2}})
    yield server
    server.close()


def _run(hub: FakeHub, cache: Path, mode: str, other_dir: Path, offline: bool, script: str = SCRIPT) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(cache), HF_HUB_DISABLE_TELEMETRY="1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([sys.executable, "-c", script, mode, str(other_dir), json.dumps(PROMPTS)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line.removeprefix("REPORT "))


def test_a_hub_id_is_downloaded_then_served_from_the_cache(hub, tiny_llama_dir, tmp_path):
    expected = run_engine(LLM(str(tiny_llama_dir), **ENGINE), PROMPTS)
    cache, other = tmp_path / "cache", tmp_path / "elsewhere"
    report = _run(hub, cache, "download", other, offline=False)
    assert report["tokens"] == expected
    snapshot = Path(report["snapshot"])
    assert snapshot.is_relative_to(cache) and snapshot.parent.name == "snapshots"
    fetched = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    assert fetched == sorted(f for f in hub.files("acme/tiny")
                             if f.endswith((".json", ".safetensors", ".jinja")) or f.startswith("tokenizer"))
    assert "model.safetensors" in fetched and "pytorch_model.bin" not in fetched
    assert Path(report["other_dir"]).is_relative_to(other)
    # a tokenizer's download (--tokenizer org/name) leaves the weights; the model's download then adds them
    assert "config.json" in report["tokenizer_files"] and "tokenizer.json" in report["tokenizer_files"]
    assert not any(name.endswith(".safetensors") for name in report["tokenizer_files"])
    assert "no repository acme/missing" in report["missing"]
    assert "holds GGUF files (tiny-F32.gguf, tiny-Q8_0.gguf)" in report["gguf_only"]
    assert "name one by its quantization type (acme/tiny-GGUF:Q4_K_M)" in report["gguf_only"]
    assert "no Q2_K file; its GGUF files are of the types F32, Q8_0" in report["gguf_missing_type"]
    gguf = Path(report["gguf_file"])
    assert gguf.name == "tiny-Q8_0.gguf" and gguf.is_relative_to(cache)
    assert sorted(p.name for p in gguf.parent.iterdir()) == ["tiny-Q8_0.gguf"]  # that file alone
    local_gguf = run_engine(LLM(str(hub.repos["acme/tiny-GGUF"] / "tiny-Q8_0.gguf"), **ENGINE), PROMPTS)
    assert report["gguf_tokens"] == local_gguf
    assert "has no revision 'v9'" in report["bad_revision"]
    assert "the Hugging Face Hub: downloads are off (HF_HUB_OFFLINE)" in report["offline"]  # not cached yet
    # offline, the cache alone serves it: no request reaches the Hub
    before = len(hub.requests)
    cached = _run(hub, cache, "cached", other, offline=True)
    assert cached["tokens"] == expected and cached["gguf_tokens"] == local_gguf
    assert len(hub.requests) == before



def test_tokenizer_revision_picks_the_tokenizers_revision_on_the_hub(hub, tiny_llama_dir, tmp_path):
    """``--tokenizer-revision`` (``tokenizer_revision``) is the revision of a tokenizer named by hub id (also
    written ``org/name@REVISION``), fetched into ``--download-dir`` when given; with no ``--tokenizer`` it is the
    model's tokenizer at that revision, as vLLM reads it. A revision the Hub lacks fails, naming it."""
    cache, other = tmp_path / "cache", tmp_path / "elsewhere"
    report = _run(hub, cache, str(tiny_llama_dir), other, offline=False, script=TOKENIZER_SCRIPT)
    assert report["flag"] == report["at_sign"] == report["elsewhere"] == report["engine"] == V2_TEMPLATE
    assert report["main"] == (tiny_llama_dir / "chat_template.jinja").read_text() != V2_TEMPLATE
    assert "has no revision 'v9'" in report["bad"] and "tokenizer 'acme/tiny'" in report["bad"]
    v2_commit = hub.revisions["acme/tiny", "v2"][1]
    for where in (cache, other):  # the tokenizer's snapshot of v2 in each cache, under its branch name
        assert (where / "models--acme--tiny" / "refs" / "v2").read_text() == v2_commit
    assert not (other / "models--acme--tiny" / "refs" / "main").exists()  # only the tokenizer went there
