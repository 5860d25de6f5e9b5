"""Scoring over real HTTP: ``/v1/completions`` with ``echo`` and ``logprobs`` (the official ``openai`` client),
``max_tokens: 0``, vLLM's ``prompt_logprobs`` field, a stream with echo; and lm-evaluation-harness, unmodified,
with its ``local-completions`` model against ``inferneo serve``: a multiple-choice task (local YAML + JSONL) whose
per-sample log-likelihoods equal HF's on the same weights, and a ``generate_until`` task. The lm-eval command and
the task files are those of docs/evaluation.md, whose other examples run here too (one server for all)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from test_prompt_logprobs import hf_prompt_logprobs
from transformers import AutoTokenizer

from inferneo.testing.server import RemoteServer

MODEL = "tiny"
DOCS_MODEL = "meta-llama/Llama-2-7b-chat-hf"  # the name docs/evaluation.md uses
DOC = Path(__file__).resolve().parents[1] / "docs" / "evaluation.md"


def doc_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", DOC.read_text(), flags=re.DOTALL | re.MULTILINE)


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with RemoteServer(tiny_llama_dir, "--served-model-name", MODEL, DOCS_MODEL, "--kv-cache-memory", "32MiB",
                      "--num-threads", "1", "--max-num-batched-tokens", "32", "--disable-access-log") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_echo_logprobs_shape_and_values(client, tiny_llama_dir, tokenizer):
    prompt = "the quick brown fox jumps over the lazy dog and the cat sat on the mat"
    ids = tokenizer(prompt).input_ids
    ref = hf_prompt_logprobs(str(tiny_llama_dir), tuple(ids))
    echoed = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=2, max_tokens=3,
                                       temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(model=MODEL, prompt=prompt, logprobs=2, max_tokens=3, temperature=0,
                                      extra_body={"ignore_eos": True})
    choice, lp = echoed.choices[0], echoed.choices[0].logprobs
    assert choice.text == prompt + plain.choices[0].text  # the prompt as given, then the generated text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - ref[i - 1, ids[i]].item()) < 1e-4
        # keyed by token text (the legacy format), so tokens with the same text share an entry
        expected = ref[i - 1].topk(2).values.tolist() + [ref[i - 1, ids[i]].item()]
        assert lp.top_logprobs[i] and all(min(abs(v - e) for e in expected) < 1e-4
                                          for v in lp.top_logprobs[i].values())
    # the generated part is the ordinary logprobs answer; offsets run over the whole echoed text
    assert lp.tokens[len(ids):] == plain.choices[0].logprobs.tokens
    assert lp.token_logprobs[len(ids):] == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-5)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert "".join(lp.tokens) == tokenizer.decode(ids) + plain.choices[0].text  # the tokens show the BOS too


def test_echo_with_max_tokens_zero_scores_the_prompt_only(client, tiny_llama_dir):
    ids = [1, 45, 200, 17, 300, 22, 9, 140]
    ref = hf_prompt_logprobs(str(tiny_llama_dir), tuple(ids))
    out = client.completions.create(model=MODEL, prompt=[ids, ids[:5]], echo=True, logprobs=0, max_tokens=0)
    assert [c.finish_reason for c in out.choices] == ["length", "length"]
    assert out.usage.completion_tokens == 0
    first = out.choices[0].logprobs
    assert len(first.tokens) == len(ids) and first.token_logprobs[0] is None
    assert first.token_logprobs[1:] == pytest.approx([ref[i - 1, ids[i]].item() for i in range(1, len(ids))],
                                                     abs=1e-4)
    assert len(out.choices[1].logprobs.tokens) == 5


def test_vllm_prompt_logprobs_field(client, tiny_llama_dir):
    ids = [1, 33, 250, 71, 12, 99]
    ref = hf_prompt_logprobs(str(tiny_llama_dir), tuple(ids))
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0,
                                    extra_body={"prompt_logprobs": 2})
    rows = out.choices[0].model_extra["prompt_logprobs"]
    assert rows[0] is None and len(rows) == len(ids)
    for i in range(1, len(ids)):
        entry = rows[i][str(ids[i])]
        assert abs(entry["logprob"] - ref[i - 1, ids[i]].item()) < 1e-4
        assert entry["rank"] == int((ref[i - 1] > ref[i - 1, ids[i]]).sum()) + 1
        assert {int(t) for t, e in rows[i].items() if e["rank"] <= 2} >= set(ref[i - 1].topk(2).indices.tolist())
    assert out.choices[0].logprobs is None  # logprobs was not asked for


def test_vllm_prompt_logprobs_on_chat(client, server, tiny_llama_dir):
    """Chat's ``prompt_logprobs``: the rendered conversation's tokens scored as HF scores them, in the response
    (vLLM's place) and in each choice (one per conversation with a list of them); a 400 with stream."""
    messages = [{"role": "user", "content": "The cat sat"}]
    ids = httpx.post(server.url("/tokenize"), json={"messages": messages}, timeout=60).json()["tokens"]
    ref = hf_prompt_logprobs(str(tiny_llama_dir), tuple(ids))
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, temperature=0,
                                         extra_body={"prompt_logprobs": 1})
    rows = out.model_extra["prompt_logprobs"]
    assert rows == out.choices[0].model_extra["prompt_logprobs"]
    assert rows[0] is None and len(rows) == len(ids) == out.usage.prompt_tokens
    for i in range(1, len(ids)):
        assert abs(rows[i][str(ids[i])]["logprob"] - ref[i - 1, ids[i]].item()) < 1e-4
    two = httpx.post(server.url("/v1/chat/completions"), timeout=60, json={
        "messages": [messages, [{"role": "user", "content": "hi"}]], "max_tokens": 1, "prompt_logprobs": 0}).json()
    assert "prompt_logprobs" not in two and [len(c["prompt_logprobs"]) for c in two["choices"]][0] == len(ids)
    streamed = httpx.post(server.url("/v1/chat/completions"), timeout=60, json={
        "messages": messages, "max_tokens": 1, "prompt_logprobs": 1, "stream": True})
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "prompt_logprobs"


def test_stream_with_echo_sends_the_prompt_first(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time there was", echo=True, logprobs=1, max_tokens=4,
                  temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kwargs) if c.choices]
    assert chunks[0].text.startswith("Once upon a time there was")
    assert "".join(c.text for c in chunks) == whole.text
    tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
    offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
    token_logprobs = [x for c in chunks if c.logprobs for x in c.logprobs.token_logprobs]
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    assert token_logprobs[0] is None
    assert token_logprobs[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=1e-5)


# ---- lm-evaluation-harness -------------------------------------------------------------------------------------

MC_DOCS = [
    {"question": "The cat sat on the", "choices": ["mat", "dog", "fox"], "answer": 0},
    {"question": "Once upon a time there was a", "choices": ["king", "time", "quick brown fox"], "answer": 1},
    {"question": "hello", "choices": ["world", "there"], "answer": 0},
]
GEN_DOCS = [{"question": "The capital of France is", "answer": "Paris"}, {"question": "hello", "answer": "world"}]


def write_tasks(folder: Path) -> None:
    """The page's multiple-choice and generate_until tasks, over local JSONL files (no dataset download)."""
    for name, docs in (("mc", MC_DOCS), ("gen", GEN_DOCS)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    for block in doc_blocks("yaml"):
        task = re.search(r"^task: (\w+)$", block, flags=re.MULTILINE)[1]
        (folder / f"{task}.yaml").write_text(block.replace("./my_tasks/", f"{folder}/"))


def doc_lm_eval_command(url: str, tokenizer: str, include_path: str, output_path: str) -> list[str]:
    """The page's lm_eval command with this test's server, tokenizer and folders."""
    (command,) = [b for b in doc_blocks("bash") if b.startswith("lm_eval ")]
    command = (command.replace("\\\n", " ").replace("http://localhost:8000", url)
               .replace("/path/to/model", tokenizer).replace("./my_tasks", include_path)
               .replace("./eval_out", output_path))
    return [sys.executable, "-m", "lm_eval", *shlex.split(command)[1:]]


def hf_loglikelihood(path: str, tokenizer, context: str, continuation: str) -> float:
    """HF's log-likelihood of ``continuation`` after ``context``, tokenized as lm-eval's API models do (trailing
    spaces of the context move to the continuation; no special tokens; continuation = whole minus context)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    n_context = len(tokenizer(context, add_special_tokens=False).input_ids)
    ref = hf_prompt_logprobs(path, tuple(whole))
    return sum(ref[i - 1, whole[i]].item() for i in range(n_context, len(whole)))


def test_lm_eval_local_completions_matches_hf(server, tiny_llama_dir, tokenizer, tmp_path):
    write_tasks(tmp_path)
    out_dir = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = doc_lm_eval_command(server.base_url, str(tiny_llama_dir), str(tmp_path), str(out_dir))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    samples = {name: [json.loads(line) for f in out_dir.rglob(f"samples_{name}_*.jsonl")
                      for line in f.read_text().splitlines()] for name in ("my_mc", "my_gen")}
    assert len(samples["my_mc"]) == len(MC_DOCS) and len(samples["my_gen"]) == len(GEN_DOCS)
    for sample in samples["my_mc"]:
        doc = sample["doc"]
        assert len(sample["resps"]) == len(doc["choices"])
        arguments = [sample["arguments"][f"gen_args_{i}"] for i in range(len(doc["choices"]))]
        for args, resp in zip(arguments, sample["resps"], strict=True):
            context, continuation = args["arg_0"], args["arg_1"]
            assert context.rstrip() == doc["question"] and continuation.strip() in doc["choices"]
            want = hf_loglikelihood(str(tiny_llama_dir), tokenizer, context, continuation)
            assert abs(float(resp[0][0]) - want) < 1e-4, (context, continuation, resp, want)
    for sample in samples["my_gen"]:
        assert isinstance(sample["resps"][0][0], str)  # the generate_until path answered every document
    results = json.loads(next(out_dir.rglob("results_*.json")).read_text())["results"]
    assert "acc,none" in results["my_mc"] and "exact_match,none" in results["my_gen"]


# ---- the other examples of docs/evaluation.md ------------------------------------------------------------------


def test_doc_curl_example(server, tokenizer):
    (block,) = [b for b in doc_blocks("bash") if b.startswith("curl ")]
    body = json.loads(re.search(r"-d '(.*)'", block, flags=re.DOTALL)[1])
    reply = httpx.post(server.url("/v1/completions"), json=body, timeout=60).json()
    lp = reply["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(tokenizer(body["prompt"]).input_ids) and lp["token_logprobs"][0] is None
    assert reply["choices"][0]["text"] == body["prompt"] and reply["usage"]["completion_tokens"] == 0


def test_doc_python_examples(server, tiny_llama_dir):
    online = [b for b in doc_blocks("python") if "OpenAI(" in b or "client." in b]
    offline = [b for b in doc_blocks("python") if "LLM()" in b]
    assert len(online) == 2 and len(offline) == 1
    ns: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for block in online:
            exec(compile(block.replace("http://localhost:8000", server.base_url), str(DOC), "exec"), ns)
    lines = printed.getvalue().splitlines()
    assert lines[0].startswith("' Paris': ") and lines[1].startswith("' Berlin': ") and lines[2].endswith(" 1")
    # offline, on the tiny model instead of the bundled default
    llm = f"LLM({str(tiny_llama_dir)!r}, dtype='float32', kv_cache_memory='16MiB', num_threads=1)"
    ns = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(offline[0].replace("LLM()", llm), str(DOC), "exec"), ns)
    ids = ns["ids"]
    ref = hf_prompt_logprobs(str(tiny_llama_dir), tuple(ids))
    assert abs(ns["total"] - sum(ref[i - 1, ids[i]].item() for i in range(1, len(ids)))) < 1e-3
    assert printed.getvalue().startswith(f"{len(ids)} tokens, log-likelihood ")
    ns["llm"].shutdown()
