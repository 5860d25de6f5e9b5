"""``hf_overrides`` (vLLM's ``--hf-overrides``): config.json values set over the model's reach the model the engine
builds. Greedy tokens with the overrides equal Hugging Face's on a copy of the checkpoint whose config.json says
the same (and differ from the checkpoint's own), the context length follows an overridden
``max_position_embeddings``, transformers 5's ``rope_parameters`` can be overridden as well, and bad values are
refused at start-up."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_hf_parity import hf_greedy, mixed_prompts, run_engine

from inferneo import LLM
from inferneo.cli.main import build_parser
from inferneo.config import EngineConfig
from inferneo.model_loader import load_hf_config, resolve_model

OVERRIDES = {"rope_theta": 37.0, "rms_norm_eps": 0.05, "max_position_embeddings": 96}
ENGINE = dict(dtype="float32", kv_cache_memory="16MiB", num_threads=1)


def _edited_copy(src: Path, dst: Path, changes: dict) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    if "rope_theta" in changes and isinstance(config.get("rope_parameters"), dict):  # transformers 5 reads it there
        config["rope_parameters"]["rope_theta"] = changes["rope_theta"]
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_the_overridden_model_is_hugging_faces_model_of_that_config(tiny_llama_dir, tmp_path):
    edited = _edited_copy(tiny_llama_dir, tmp_path / "edited", OVERRIDES)
    edited_config = load_hf_config(resolve_model(str(edited)))
    assert edited_config["rope_theta"] == 37.0  # what the engine reads, whichever transformers wrote the file
    prompts = mixed_prompts(6, 200, seed=3)
    llm = LLM(str(tiny_llama_dir), hf_overrides=OVERRIDES, **ENGINE)
    assert llm.engine.max_model_len == 96
    overridden = run_engine(llm, prompts)
    assert overridden == [hf_greedy(edited, p) for p in prompts]
    assert overridden != run_engine(LLM(str(tiny_llama_dir), **ENGINE), prompts)


def test_rope_parameters_override_sets_what_the_engine_reads(tiny_llama_dir):
    source = resolve_model(str(tiny_llama_dir))
    params = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}
    config = load_hf_config(source, {"rope_parameters": params})
    assert config["rope_theta"] == 500.0
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    # the top-level keys, when given too, are the ones taken
    config = load_hf_config(source, {"rope_parameters": params, "rope_theta": 9.0})
    assert config["rope_theta"] == 9.0
    plain = load_hf_config(source, {"rope_parameters": {"rope_type": "default", "rope_theta": 7.0}})
    assert plain["rope_theta"] == 7.0 and plain["rope_scaling"] is None


def test_the_flag_takes_json_and_bad_values_are_refused(capsys):
    args = build_parser().parse_args(["generate", "x", "--hf-overrides", '{"rope_theta": 5.0}'])
    assert EngineConfig.from_cli_args(args).hf_overrides == {"rope_theta": 5.0}
    for bad in ("[1, 2]", "{not json"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["generate", "x", "--hf-overrides", bad])
        assert "hf_overrides must be a JSON object" in capsys.readouterr().err
    with pytest.raises(ValueError, match="hf_overrides must be a JSON object"):
        EngineConfig(hf_overrides=3)
