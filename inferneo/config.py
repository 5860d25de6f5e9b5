"""Engine configuration: the one declaration of the engine's options, and one validated record built from them.

Each ``EngineConfig`` field is declared once, with its default, help text and how the command line spells it
(``option(...)``), or as no flag at all (``not_a_flag(...)``). From that declaration come

- the command-line flags: ``add_engine_args(parser)`` adds ``--max-num-seqs``, ``--kv-cache-memory``, ... to
  ``inferneo generate``, ``chat``, ``serve``, ``batch`` and ``bench throughput``, and
  ``EngineConfig.from_cli_args(args)`` (or ``engine_config_kwargs(args)``) reads them back;
- the keyword arguments of ``LLM(...)``, which are the field names;
- the defaults, which are the fields' defaults (parsing no flags gives ``EngineConfig()``).

The flags are named as vLLM's ``EngineArgs`` names them: ``--`` and the field name with ``-`` for ``_``; a bool
field gets both ``--name`` and ``--no-name``.

This module imports no PyTorch at import time, so the command line (and a client-only install) can build its
parser cheaply.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from inferneo.multimodal.limits import check_mm_limits

if TYPE_CHECKING:
    import torch

    from inferneo.kernel_config import KernelConfig
    from inferneo.model_loader.source import ModelRef
    from inferneo.spec_decode.config import SpeculativeConfig

# Spellings ``dtype`` accepts, and the torch dtype each names.
_DTYPES = {
    "float32": "float32",
    "float": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "half": "float16",
    "fp16": "float16",
}
SCHEDULING_POLICIES = ("fcfs", "priority")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
QUANTIZATIONS = ("fp8", "awq", "gptq", "compressed-tensors", "gguf")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
DISTRIBUTED_EXECUTOR_BACKENDS = ("mp", "ray")
DATA_PARALLEL_BACKENDS = ("mp", "ray")
DATA_PARALLEL_ROUTINGS = ("prefix", "round_robin", "least_loaded")
TOKENIZER_MODES = ("auto", "hf")  # vLLM's modes that mean the checkpoint's Hugging Face tokenizer


def parse_memory_size(value: str | int | None) -> int | None:
    """Bytes from ``4GiB``, ``512MiB``, ``2G``, ``1e9`` or a plain integer."""
    if value is None or isinstance(value, int):
        return value
    text = value.strip().lower().replace(" ", "")
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9,
             "k": 2**10, "m": 2**20, "g": 2**30, "b": 1}
    suffix = next((u for u in units if text.endswith(u)), "")
    number, scale = (text[: -len(suffix)], units[suffix]) if suffix else (text, 1)
    try:
        size = int(float(number) * scale)
    except ValueError:
        raise ValueError(f"cannot read a memory size from {value!r}; use e.g. 4GiB or 512MiB") from None
    if size <= 0:
        raise ValueError(f"memory size must be positive, got {value!r}")
    return size


# ---- the declaration helpers ---------------------------------------------------------------------------------

_CLI = "cli"  # the metadata key: a CliOption, or None for a field that is deliberately no flag


@dataclass(frozen=True, slots=True)
class CliOption:
    """How one ``EngineConfig`` field appears on the command line."""

    help: str
    type: Callable[[str], Any] | None = None  # bool: --name/--no-name; None: the string as given
    choices: tuple[str, ...] | None = None
    aliases: tuple[str, ...] = ()  # more spellings, e.g. ("-tp",)
    metavar: str | None = None
    convert: Callable[[Any], Any] | None = None  # applied to the value however it arrives (flag or keyword)


def option(default: Any, type: Callable[[str], Any] | None, help: str, *,
           choices: tuple[str, ...] | None = None, aliases: tuple[str, ...] = (), metavar: str | None = None,
           convert: Callable[[Any], Any] | None = None) -> Any:
    """An ``EngineConfig`` field that is also the flag ``--field-name`` (and an ``LLM`` keyword)."""
    cli = CliOption(help, type, choices, aliases, metavar, convert)
    return dataclasses.field(default=default, metadata={_CLI: cli})


def not_a_flag(*, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING,
               help: str = "") -> Any:
    """An ``EngineConfig`` field with no command-line flag (still an ``LLM`` keyword), e.g. a nested config."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={_CLI: None, "help": help})


def _kernels_from_env() -> KernelConfig:
    from inferneo.kernel_config import KernelConfig  # imports torch: only when an engine is configured

    return KernelConfig.from_env()


def _speculative_config(value: Any):
    from inferneo.spec_decode.config import parse_speculative_config  # numpy-free, but only when asked for

    return parse_speculative_config(value)


def _flag_type(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """``convert`` as an argparse ``type``: its ValueError becomes argparse's usage error."""

    def parse(text: str) -> Any:
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


_speculative_config_arg = _flag_type(_speculative_config)


def _generation_override(value: Any) -> dict[str, Any] | None:
    from inferneo.model_loader.loader import check_generation_override

    return check_generation_override(value)


_generation_override_arg = _flag_type(_generation_override)


def _hf_overrides(value: Any) -> dict[str, Any] | None:
    from inferneo.model_loader.loader import check_hf_overrides

    return check_hf_overrides(value)


_hf_overrides_arg = _flag_type(_hf_overrides)
_memory_size_arg = _flag_type(parse_memory_size)
_mm_limits_arg = _flag_type(check_mm_limits)


# ---- the configuration ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class EngineConfig:
    """Everything the engine core needs to know, checked once at start-up.

    ``kv_cache_memory`` is the number of bytes given to the paged KV cache (a string such as ``"4GiB"`` is read
    as a size); on CUDA, when it is None, the cache takes ``gpu_memory_utilization`` of the device memory minus
    what the model needs.
    """

    model: str | None = option(
        None, str, "HF folder, hub id (org/name: from the HF cache, else downloaded), or .gguf file "
        "(default: the bundled SmolLM2-135M-Instruct)")
    revision: str | None = option(
        None, str, "the hub model's branch, tag or commit (as model@REVISION; default main)")
    download_dir: str | None = option(
        None, str, "the Hugging Face cache to find hub models in and download them into (default: HF_HUB_CACHE, "
        "else HF_HOME/hub, else ~/.cache/huggingface/hub)", metavar="DIR")
    tokenizer: str | None = option(None, str, "tokenizer folder, if not the model's")
    tokenizer_revision: str | None = option(
        None, str, "the tokenizer's branch, tag or commit on the hub (vLLM's flag), when it comes from a hub id: "
        "--tokenizer's (also written org/name@REVISION), else the model's (default main)")
    trust_remote_code: bool = option(
        False, bool, "accepted so that vLLM command lines and LLM(...) calls run unchanged: Inferneo runs only its "
        "own model code, never Python files from a checkpoint")
    code_revision: str | None = option(
        None, str, "accepted so that vLLM command lines run unchanged: no checkpoint code ever runs (see "
        "--trust-remote-code)")
    tokenizer_mode: str = option(
        "auto", str, "vLLM's: auto (or hf) loads the checkpoint's fast tokenizer, the only mode Inferneo has",
        choices=TOKENIZER_MODES)
    chat_template: str | None = option(
        None, str, "the chat template instead of the model's: a Jinja file, or the template itself in one line",
        metavar="FILE_OR_TEMPLATE")
    generation_config: str = option(
        "auto", str, "sampling defaults (temperature, top_p, top_k, min_p, repetition_penalty) for requests that "
        "leave them out: auto takes the model's generation_config.json; vllm takes none (the OpenAI defaults); a "
        "folder takes its generation_config.json. EOS ids always come from the model's", metavar="auto|vllm|FOLDER")
    override_generation_config: dict[str, Any] | None = option(
        None, _generation_override_arg, "sampling defaults set over --generation-config's, as JSON (vLLM's flag), "
        'e.g. \'{"temperature": 0.6, "top_p": 0.95}\'; keys: temperature, top_p, top_k, min_p, '
        "repetition_penalty", metavar="JSON", convert=_generation_override)
    hf_overrides: dict[str, Any] | None = option(
        None, _hf_overrides_arg, "config.json values set over the model's, as JSON (vLLM's flag), e.g. "
        '\'{"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}\'; '
        "each value replaces the config's whole value", metavar="JSON", convert=_hf_overrides)
    max_logprobs: int = option(
        20, int, "the most log-probabilities a request may ask for per token (logprobs, top_logprobs, "
        "prompt_logprobs; vLLM's flag); -1: up to the vocabulary size", metavar="N")
    dtype: str = option("auto", str, "compute dtype; auto keeps the checkpoint's (on CPU: bf16 for a 16-bit "
                        "checkpoint where the CPU has AMX or AVX512_BF16, else fp32)",
                        choices=("auto", "float32", "bfloat16", "float16"))
    device: str = option("auto", str, "auto, cpu or cuda[:N]")
    load_format: str = option("auto", str, "how to read the weights; dummy: random weights from the config",
                              choices=LOAD_FORMATS)
    quantization: str | None = option(
        None, str, "weight quantization: a quantized checkpoint's own format is used without this flag (which, "
        "given, must match it); fp8 quantizes a full-precision model's linear layers at load",
        choices=QUANTIZATIONS)
    kv_cache_dtype: str = option(
        "auto", str, "KV cache element type: auto (the model dtype) or fp8 (e4m3 with scales: twice the tokens)",
        choices=KV_CACHE_DTYPES)
    max_model_len: int | None = option(None, int, "context length (default: the model's)")
    block_size: int = option(16, int, "tokens per KV cache block")
    kv_cache_memory: int | None = option(
        None, _memory_size_arg, "bytes for the KV cache, e.g. 4GiB (default: 4 GiB on CPU, at most a quarter of "
        "free RAM; on CUDA, what --gpu-memory-utilization leaves)", metavar="SIZE", convert=parse_memory_size)
    gpu_memory_utilization: float = option(
        0.9, float, "fraction of GPU memory for weights, activations and KV cache")
    max_num_seqs: int = option(256, int, "requests in the running batch at most")
    max_num_batched_tokens: int | None = option(
        None, int, "tokens computed per engine step (default: 2048; without chunked prefill, max_model_len)")
    enable_prefix_caching: bool = option(
        True, bool, "reuse the KV blocks of earlier requests that share a prompt prefix")
    enable_chunked_prefill: bool = option(True, bool, "split long prompts across engine steps")
    limit_mm_per_prompt: dict[str, int] | None = option(
        None, _mm_limits_arg, 'the most images a prompt may hold, as JSON: {"image": 4} (vLLM\'s option; "video" '
        'and "audio" are accepted, their inputs are not served; default: 16 images)', metavar="JSON",
        convert=check_mm_limits)
    allowed_local_media_path: str | None = option(
        None, str, "read images of file:// URLs in requests from under this folder (a security risk: only where "
        "every client may read it; default: file:// URLs are refused)", metavar="DIR")
    enable_prompt_embeds: bool = option(
        False, bool, "take prompts given as embeddings (vLLM's flag): prompt_embeds in /v1/completions, "
        "{'prompt_embeds': tensor} prompts in LLM.generate")
    scheduling_policy: str = option(
        "fcfs", str, "fcfs, or priority: lower priority values run first", choices=SCHEDULING_POLICIES)
    seed: int = option(0, int, "the engine's random seed")
    enforce_eager: bool = option(False, bool, "never use CUDA graphs (decode runs eagerly)")
    max_seq_len_to_capture: int | None = option(
        None, int, "accepted so that vLLM command lines and LLM(...) calls run unchanged: CUDA graphs here capture "
        "decode steps by batch size, whatever the sequences' length")
    swap_space: float | None = option(
        None, float, "accepted so that vLLM command lines and LLM(...) calls run unchanged: a preempted request's KV "
        "blocks are freed and computed again when it resumes (as vLLM's V1 engine does), never swapped to CPU "
        "memory", metavar="GiB")
    disable_custom_all_reduce: bool = option(
        False, bool, "accepted so that vLLM command lines and LLM(...) calls run unchanged: tensor parallelism "
        "all-reduces through torch.distributed (NCCL on GPUs) either way")
    num_threads: int | None = option(None, int, "CPU threads for torch (default: torch's)")
    tensor_parallel_size: int = option(
        1, int, "shard the model over this many ranks (one process each; GPUs, or CPU over gloo)",
        aliases=("-tp",))
    pipeline_parallel_size: int = option(
        1, int, "split the model's layers into this many contiguous stages (tensor parallelism inside each "
        "stage: tensor_parallel_size x pipeline_parallel_size ranks, one process each)", aliases=("-pp",))
    distributed_executor_backend: str = option(
        "mp", str, "how the worker ranks start: mp (local processes) or ray (Ray actors placed by a placement "
        "group, one bundle per worker rank, on the running Ray cluster)", choices=DISTRIBUTED_EXECUTOR_BACKENDS)
    data_parallel_size: int = option(
        1, int, "serve with this many engine replicas behind one endpoint (inferneo serve only), each a whole "
        "model (with its own tensor-parallel group) and KV cache", aliases=("-dp",))
    data_parallel_backend: str = option(
        "mp", str, "where data-parallel replicas run: mp (child processes of the server) or ray (Ray actors "
        "placed on the Ray cluster that RAY_ADDRESS or a local start gives)", choices=DATA_PARALLEL_BACKENDS)
    data_parallel_routing: str = option(
        "prefix", str, "how a request picks its replica: prefix (the replica that holds the longest cached "
        "prefix of its prompt, else the least loaded), round_robin, or least_loaded",
        choices=DATA_PARALLEL_ROUTINGS)
    async_scheduling: bool | None = option(
        None, bool, "schedule and queue the next step before the current one's tokens reach the host "
        "(hides the host's per-step work behind the GPU's; default: on for CUDA, off on CPU)")
    speculative_config: SpeculativeConfig | None = option(
        None, _speculative_config_arg, "speculative decoding, as JSON: "
        '{"method": "ngram", "num_speculative_tokens": 4} drafts tokens by prompt lookup (optional keys: '
        "prompt_lookup_max, default 4; prompt_lookup_min, default 1; disable_by_batch_size: no drafts while "
        "more requests run) and verifies them in one step",
        metavar="JSON", convert=_speculative_config)
    enable_lora: bool = option(False, bool, "serve LoRA adapters (PEFT folders) picked per request")
    max_loras: int = option(4, int, "LoRA adapters a batch may run at once (the device slots)")
    max_lora_rank: int = option(16, int, "the largest LoRA rank accepted (at most 64)")
    max_cpu_loras: int | None = option(
        None, int, "LoRA adapters kept read in host memory (default: max_loras)")
    kernels: KernelConfig = not_a_flag(
        default_factory=_kernels_from_env,
        help="which kernels the engine uses (KernelConfig); each switch defaults to its INFERNEO_* variable")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            cli = f.metadata.get(_CLI)
            if cli is not None and cli.convert is not None:
                setattr(self, f.name, cli.convert(getattr(self, f.name)))
        if self.dtype not in ("auto", *_DTYPES):
            raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16; got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]'; got {self.device!r}")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"device {self.device!r} was asked for but CUDA is not available on this machine")
        _one_of("load_format", self.load_format, LOAD_FORMATS)
        if self.quantization is not None:
            _one_of("quantization", self.quantization, QUANTIZATIONS)
        _one_of("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        _one_of("scheduling_policy", self.scheduling_policy, SCHEDULING_POLICIES)
        if self.tokenizer_mode not in TOKENIZER_MODES:
            raise ValueError(f"tokenizer_mode {self.tokenizer_mode!r} is not supported: Inferneo loads the "
                             "checkpoint's Hugging Face tokenizer (tokenizer_mode auto or hf); for a Mistral "
                             "tokenizer, use the checkpoint's tokenizer.json")
        _positive("block_size", self.block_size)
        _positive("tensor_parallel_size", self.tensor_parallel_size)
        _positive("pipeline_parallel_size", self.pipeline_parallel_size)
        _one_of("distributed_executor_backend", self.distributed_executor_backend, DISTRIBUTED_EXECUTOR_BACKENDS)
        _positive("data_parallel_size", self.data_parallel_size)
        _one_of("data_parallel_backend", self.data_parallel_backend, DATA_PARALLEL_BACKENDS)
        _one_of("data_parallel_routing", self.data_parallel_routing, DATA_PARALLEL_ROUTINGS)
        _positive("max_num_seqs", self.max_num_seqs)
        if type(self.max_logprobs) is not int or self.max_logprobs < -1:
            raise ValueError(
                f"max_logprobs must be an integer, 0 or more, or -1 (up to the vocabulary size); got "
                f"{self.max_logprobs!r}"
            )
        _positive("max_loras", self.max_loras)
        if not 1 <= self.max_lora_rank <= 64:
            raise ValueError(f"max_lora_rank must be between 1 and 64; got {self.max_lora_rank}")
        if self.speculative_config is not None and self.pipeline_parallel_size > 1:
            raise ValueError("speculative_config is not supported with pipeline_parallel_size > 1")
        if self.speculative_config is not None and self.async_scheduling:
            raise ValueError("speculative_config runs with synchronous scheduling (a step's drafts come from the "
                             "tokens of the step before): leave async_scheduling unset or off")
        if self.enable_lora and self.pipeline_parallel_size > 1:
            raise ValueError("enable_lora with pipeline_parallel_size > 1 is not supported yet")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras ({self.max_loras})")
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)
        if self.max_num_batched_tokens is not None:
            _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        if self.kv_cache_memory is not None:
            _positive("kv_cache_memory", self.kv_cache_memory)
        if self.num_threads is not None:
            _positive("num_threads", self.num_threads)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1]; got {self.gpu_memory_utilization}")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, **overrides: Any) -> EngineConfig:
        """The config the flags of ``add_engine_args`` gave, with ``overrides`` (field values) on top."""
        return cls(**{**engine_config_kwargs(args), **overrides})

    def model_ref(self) -> ModelRef:
        """The model as named here (``model``, ``revision``, ``download_dir``), for ``resolve()`` where it loads."""
        from inferneo.model_loader.source import ModelRef

        return ModelRef(self.model, self.revision, self.download_dir)

    def tokenizer_ref(self) -> ModelRef | None:
        """Where the tokenizer comes from when not from the model as loaded: ``tokenizer`` (at
        ``tokenizer_revision``), or with only ``tokenizer_revision`` set the model's hub id at that revision, as
        vLLM reads it; None for the model's own tokenizer."""
        from inferneo.model_loader.source import ModelRef

        if self.tokenizer is None and (self.tokenizer_revision is None or self.model is None):
            return None
        return ModelRef(self.tokenizer if self.tokenizer is not None else self.model, self.tokenizer_revision,
                        self.download_dir)

    @property
    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
        """The compute dtype: the one asked for, or for ``auto`` the checkpoint's; on CPU, ``auto`` follows the
        hardware (``cpu_select.cpu_default_dtype``: a 16-bit checkpoint runs in bfloat16 where the CPU multiplies
        bfloat16 natively, else in float32; a float32 one stays float32)."""
        import torch

        if self.dtype != "auto":
            return getattr(torch, _DTYPES[self.dtype])
        if self.torch_device.type == "cpu":
            from inferneo.kernels.cpu_features import cpu_features
            from inferneo.kernels.cpu_select import cpu_default_dtype

            return cpu_default_dtype(cpu_features(), checkpoint_dtype)
        return checkpoint_dtype or torch.float32


# ---- from the declaration to the command line and back -------------------------------------------------------


def engine_flag_fields() -> list[dataclasses.Field]:
    """The ``EngineConfig`` fields that are command-line flags, in declaration order."""
    return [f for f in dataclasses.fields(EngineConfig) if f.metadata.get(_CLI) is not None]


def flag_name(field_name: str) -> str:
    """``max_num_seqs`` -> ``--max-num-seqs``."""
    return "--" + field_name.replace("_", "-")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Add a flag for every ``EngineConfig`` field declared with ``option(...)``, in an ``engine`` group."""
    group = parser.add_argument_group("engine", "engine options (the same as LLM(...) keyword arguments)")
    for f in engine_flag_fields():
        cli: CliOption = f.metadata[_CLI]
        if f.default is dataclasses.MISSING:
            raise TypeError(f"EngineConfig.{f.name}: a command-line option needs a plain default")
        names = [flag_name(f.name), *cli.aliases]
        if cli.type is bool:
            shown = "" if f.default is None else f" (default: {'on' if f.default else 'off'})"
            group.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                               help=cli.help + shown)
            continue
        shown = "" if f.default is None else " (default: %(default)s)"
        group.add_argument(*names, dest=f.name, type=cli.type, default=f.default, choices=cli.choices,
                           metavar=cli.metavar, help=cli.help + shown)


def engine_config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``EngineConfig`` (and ``LLM``) keyword arguments the flags of ``add_engine_args`` gave."""
    return {f.name: getattr(args, f.name) for f in engine_flag_fields()}


def _one_of(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
