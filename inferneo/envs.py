"""Environment variables Inferneo reads, in one typed place.

The kernel switches here (``cpu_onednn_linear`` ... ``gemv_silu``) are only the defaults of the fields of
``inferneo.kernel_config.KernelConfig``, read when one is built: an engine takes its kernels from its own
``KernelConfig`` (``LLM(kernels=KernelConfig(...))``), never from these functions directly.
"""

from __future__ import annotations

import os


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def cpu_onednn_linear() -> bool:
    """INFERNEO_CPU_ONEDNN (default on): pack CPU linear layers once at load (oneDNN, or the native panel kernel
    for float32, see ``cpu_native_linear``); off, they run as plain PyTorch matmuls (the reference path)."""
    return _flag("INFERNEO_CPU_ONEDNN", True)


def cpu_native_linear() -> bool:
    """INFERNEO_CPU_NATIVE_LINEAR (default on): run float32 CPU linear layers through the native panel kernel
    (AVX-512 machines with the native kernels built); off, they go through oneDNN."""
    return _flag("INFERNEO_CPU_NATIVE_LINEAR", True)


def cpu_linear_kernel() -> str:
    """INFERNEO_CPU_LINEAR_KERNEL (default ``auto``): the CPU linear kernel, chosen per CPU and layer shape at
    start-up; ``panel``, ``onednn``, ``torch`` or ``panel-matmul`` forces that kernel wherever it runs (elsewhere
    the choice stands, with a warning). See docs/performance-tuning.md."""
    return os.environ.get("INFERNEO_CPU_LINEAR_KERNEL", "").strip().lower() or "auto"


def cpu_linear_tune() -> bool:
    """INFERNEO_CPU_LINEAR_TUNE (default on): where more than one CPU linear kernel runs, time them on the model's
    own shapes at start-up (cached on disk); off, take the first candidate of the CPU's list (docs/performance-tuning.md)."""
    return _flag("INFERNEO_CPU_LINEAR_TUNE", True)


def cpu_tune_cache() -> str:
    """INFERNEO_CPU_TUNE_CACHE (default empty: ``$XDG_CACHE_HOME/inferneo/cpu_tune.json``, ``~/.cache`` when
    unset): the file the CPU linear kernel tune stores its measured choices in (``kernels/cpu_tune_cache.py``)."""
    return os.environ.get("INFERNEO_CPU_TUNE_CACHE", "").strip()


def cpu_native_kernels() -> bool:
    """INFERNEO_CPU_KERNELS (default on): build and use the C++ paged-attention kernel on CPU."""
    return _flag("INFERNEO_CPU_KERNELS", True)


def gguf_wide16() -> bool:
    """INFERNEO_GGUF_WIDE16 (default on): on AVX-512 CPUs, Q4_0 / Q4_1 GGUF layers are repacked once at load into the
    column-interleaved wide16 layout (``quantization/gguf_wide.py``; same bytes, same values, no per-call
    transposes); off, they stay in the file's block layout."""
    return _flag("INFERNEO_GGUF_WIDE16", True)


def gguf_int8_dot() -> bool:
    """INFERNEO_GGUF_INT8_DOT (default off): on AVX2 CPUs, Q4_0 / Q4_1 / Q8_0 GGUF layers quantize their activations
    to int8 per 32-weight block and multiply them by their blocks with integer dot products at the row counts where
    that measured faster (``quantization/gguf.py``; with AVX512_VNNI the Q4 layers do it in the wide16 layout;
    faster, not bit-exact: it flips the default model's first token at a near-tie in its "capital of France" chat
    test); off, every GGUF layer takes the exact float path."""
    return _flag("INFERNEO_GGUF_INT8_DOT", False)


def gguf_int16() -> bool:
    """INFERNEO_GGUF_INT16 (default on): on CPUs with AVX512_VNNI, GGUF layers held in the wide16 layout multiply
    float32 activations from 16 rows up as 16-bit integers per 32-weight block (each activation within 2^-16 of its
    block's largest magnitude; integer dot products, 1.1-1.4x the exact float32 path per step of the default model;
    ``quantization/gguf.py``); off, the exact float32 path at every row count. bfloat16 activations are unaffected."""
    return _flag("INFERNEO_GGUF_INT16", True)


def gguf_dequantize() -> bool:
    """INFERNEO_GGUF_DEQUANTIZE (default off): de-quantize a GGUF file's weights to full width at load (the model
    dtype, as before GGUF weights were kept quantized); off, its Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K linear and embedding
    weights stay in their ggml blocks in memory (``inferneo/quantization/gguf.py``)."""
    return _flag("INFERNEO_GGUF_DEQUANTIZE", False)


def api_process_nice() -> int:
    """INFERNEO_API_NICE (default 10): how much the server's front-end process lowers its own CPU priority once
    the engine core runs in its own process on the CPU, so that HTTP work waits for the engine's compute threads
    rather than stalling them (0 keeps the priority)."""
    value = os.environ.get("INFERNEO_API_NICE", "").strip()
    return int(value) if value else 10


def gc_freeze() -> bool:
    """INFERNEO_GC_FREEZE (default on): once a process of Inferneo's own has loaded its model (the engine core's
    process, a tensor-parallel worker, ``inferneo serve``'s front end, ``inferneo batch``, a Ray engine replica; not
    ``LLM`` in the caller's process), move its start-up objects out of the garbage collector's reach
    (``inferneo/startup_heap.py``), so that no full collection walks them while requests run."""
    return _flag("INFERNEO_GC_FREEZE", True)


def engine_omp_spin_count() -> str:
    """INFERNEO_ENGINE_OMP_SPINCOUNT (default 2000): the ``GOMP_SPINCOUNT`` a CPU engine core process starts with
    when the user set neither ``GOMP_SPINCOUNT`` nor ``OMP_WAIT_POLICY`` (empty: OpenMP's own default, 300,000).

    An OpenMP thread that finishes its share of a parallel region spins this many times before it sleeps; with
    the server's front end and the engine on the same few cores, long spins take CPU the front end needs."""
    value = os.environ.get("INFERNEO_ENGINE_OMP_SPINCOUNT", "2000").strip()
    if value and not value.isdigit():
        raise ValueError(f"INFERNEO_ENGINE_OMP_SPINCOUNT must be a whole number of spins or empty; got {value!r}")
    return value


def engine_death_exit_s() -> float:
    """INFERNEO_ENGINE_DEATH_EXIT_S (default 2): once the server's engine has died (its process was killed, a
    tensor-parallel worker died, or too many steps failed in a row), how many seconds ``inferneo serve`` keeps
    answering ``/health`` and new requests with 503 before it stops and exits with status 1, so that a supervisor
    restarts it. 0 stops at once; a negative value keeps it up, answering 503, until it is told to stop."""
    value = os.environ.get("INFERNEO_ENGINE_DEATH_EXIT_S", "").strip()
    try:
        return float(value) if value else 2.0
    except ValueError:
        raise ValueError(f"INFERNEO_ENGINE_DEATH_EXIT_S must be a number of seconds; got {value!r}") from None


def log_stats_interval_s() -> float:
    """INFERNEO_LOG_STATS_INTERVAL_S (default 10): seconds between the server's engine-statistics log lines
    (``--disable-log-stats`` turns them off)."""
    value = os.environ.get("INFERNEO_LOG_STATS_INTERVAL_S", "").strip()
    try:
        seconds = float(value) if value else 10.0
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise ValueError(f"INFERNEO_LOG_STATS_INTERVAL_S must be a positive number of seconds; got {value!r}")
    return seconds


def test_fault() -> str:
    """INFERNEO_TEST_FAULT (tests only; unset in use): make the engine core's model steps raise, to test fault
    handling in the engine process. ``prompt:7,7,7,7`` fails every step that holds a request whose prompt starts
    with those token ids; ``always`` fails every step."""
    return os.environ.get("INFERNEO_TEST_FAULT", "").strip()


def triton_ops() -> bool:
    """INFERNEO_TRITON_OPS (default on): on CUDA, fused Triton kernels for RMSNorm, SiLU-and-mul and rotary."""
    return _flag("INFERNEO_TRITON_OPS", True)


def triton_gemv() -> bool:
    """INFERNEO_TRITON_GEMV (default on): on CUDA, one-row half-precision linear layers through the Triton GEMV."""
    return _flag("INFERNEO_TRITON_GEMV", True)


def cuda_pdl() -> bool:
    """INFERNEO_CUDA_PDL (default on): launch the decode-path Triton kernels with programmatic dependent launch on
    Hopper and later GPUs, so each may start while the one before it finishes (``inferneo.kernels._pdl``)."""
    return _flag("INFERNEO_CUDA_PDL", True)


def w4a16_tc_pdl() -> str:
    """INFERNEO_W4A16_TC_PDL (read at each launch, so a CUDA graph keeps the value it was captured with): how the
    W4A16 tensor-core kernel launches at 17 to 64 rows where the other decode kernels use programmatic dependent
    launch (``INFERNEO_CUDA_PDL``, Hopper and later; 16 rows and fewer take a plain launch,
    ``triton_int4.TC_PDL_MIN_ROWS``). ``wait`` (default): it prefetches its first step's weights to L2 and waits
    for the kernel before it; the next kernel launches when it ends. ``early``: the same, but it lets the next
    kernel launch before its wait (as fast in the batch-32 step on an H100, much slower at batch 16:
    docs/benchmarks.md); ``off``: a plain launch."""
    value = os.environ.get("INFERNEO_W4A16_TC_PDL", "").strip().lower() or "wait"
    if value not in ("early", "wait", "off"):
        raise ValueError(f"INFERNEO_W4A16_TC_PDL must be wait, early or off; got {value!r}")
    return value


def int4_float32_scales() -> bool:
    """INFERNEO_INT4_FLOAT32_SCALES (default off; read when a layer takes the row layout): the W4A16 row layout
    keeps float32 scales even where every scale is a float16 value (the A/B of ``int4_layouts.compact_scales``)."""
    return _flag("INFERNEO_INT4_FLOAT32_SCALES", False)


def cuda_pdl_early() -> bool:
    """INFERNEO_CUDA_PDL_EARLY (default on): the decode kernels whose dependents read nothing before their own wait
    that this kernel's predecessors write let the next kernel launch as soon as all their programs have started,
    before waiting for their predecessor (``inferneo.kernels._pdl``): a GEMV then streams its weights while the
    kernels before it still run. Off: every kernel lets the next one launch after its wait. Read once, at import."""
    return _flag("INFERNEO_CUDA_PDL_EARLY", True)


def decode_fused_reduce() -> bool | None:
    """INFERNEO_DECODE_FUSED_REDUCE: a split (flash-decoding) Triton decode attention merges its splits inside the
    decode kernel (the last split of each request and KV head, by an atomic ticket) instead of launching the
    reduction kernel (``triton_attention.paged_decode``). Unset (default): at one request with one query head per KV
    head (on an H200, 2026-12-04, Llama-2-7B's batch-1 step 0.08-0.13 ms shorter in bf16 and FP8; with Qwen3-30B-A3B's
    eight query heads per KV head, merged one after another, 0.41 ms longer); ``1``: always; ``0``: never. Read at
    each launch."""
    value = os.environ.get("INFERNEO_DECODE_FUSED_REDUCE", "").strip().lower()
    if not value:
        return None
    return value not in ("0", "false", "no", "off")


def fp8_kv_widen() -> int | None:
    """INFERNEO_FP8_KV_WIDEN: how the Triton attention kernels widen an FP8 (e4m3) KV cache read with bfloat16
    queries (``triton_attention.paged_decode`` / ``paged_prefill``'s ``fp8_widen``). ``0``: to bfloat16 by integer
    operations, bfloat16 dots; ``1``: the same with a shorter byte permute (same bits); ``2``: queries to float16
    (times 2^-8, folded back into the score scale) and the tiles to float16 by the hardware conversion, float16
    dots. Unset (None): 2 for decode (``triton_attention.default_fp8_widen``), 0 for prefill. Read at each
    launch."""
    value = os.environ.get("INFERNEO_FP8_KV_WIDEN", "").strip()
    if value in ("0", "1", "2"):
        return int(value)
    if value:
        raise ValueError(f"INFERNEO_FP8_KV_WIDEN must be 0, 1 or 2 (or unset: the launchers' rule); got {value!r}")
    return None


def decode_split_tiles() -> int:
    """INFERNEO_DECODE_SPLIT_TILES (default 0: the split rule of ``triton_attention.choose_num_splits``): at least
    this many KV tiles in each split of a split Triton decode attention. Read at each launch."""
    value = os.environ.get("INFERNEO_DECODE_SPLIT_TILES", "").strip()
    return int(value) if value else 0


def decode_prefetch_tiles() -> int:
    """INFERNEO_DECODE_PREFETCH_TILES (default 1): KV tiles of its split that each Triton decode-attention program asks
    L2 for before its programmatic-dependent-launch wait (with ``decode`` in ``INFERNEO_PREWAIT_LOADS`` and the
    prefetch allowed for the cache, see ``triton_attention._l2_prefetch_ok``); 0: the whole split. A hint: every
    value reads the same bytes. Read at each launch, for A/Bs."""
    value = os.environ.get("INFERNEO_DECODE_PREFETCH_TILES", "").strip()
    if value and not value.isdigit():
        raise ValueError(f"INFERNEO_DECODE_PREFETCH_TILES must be a whole number of tiles (0: the whole split); "
                         f"got {value!r}")
    return int(value) if value else 1


def w4a16_config_overrides() -> str:
    """INFERNEO_W4A16_CONFIGS (default empty; for in-engine A/Bs of the W4A16 launches): a JSON object from tuned-table
    keys (``op,rows,n,k,group``, as in ``kernels/int4_configs.json``) to ``W4A16Config`` fields that replace those
    of the table's (or the default) launch for that key, e.g. ``{"linear,1,12288,4096,128": {"block_n": 8}}``.
    Read where a launch is chosen (``triton_int4.choose_config``; a CUDA graph keeps what it captured)."""
    return os.environ.get("INFERNEO_W4A16_CONFIGS", "").strip()


def store_kv_heads() -> int:
    """INFERNEO_STORE_KV_HEADS (default 0: ``triton_attention.store_kv_heads_per_program``'s rule): KV heads a
    Triton ``store_kv`` program writes (rounded up to a power of two, at most all of them). Read at each launch, for
    A/Bs; every value writes the same bytes."""
    value = os.environ.get("INFERNEO_STORE_KV_HEADS", "").strip()
    if value and not value.isdigit():
        raise ValueError(f"INFERNEO_STORE_KV_HEADS must be a whole number of KV heads (0: the rule) or empty; "
                         f"got {value!r}")
    return int(value) if value else 0


PREWAIT_KERNELS = frozenset({"rotary", "decode", "reduce"})
PREWAIT_DEFAULT = frozenset({"rotary", "decode"})


DECODE_LAUNCH_KEYS = ("block_n", "num_warps", "num_stages", "num_splits")


def decode_launch() -> dict[str, int]:
    """INFERNEO_DECODE_LAUNCH (default empty: the heuristics of ``triton_attention.paged_decode``): a tuning knob
    for the Triton decode attention's launch, e.g. ``block_n=32,num_warps=2`` (pairs separated by commas or ``+``); keys ``block_n`` (tokens a tile, a
    power of two from 16 to 256), ``num_warps`` (1, 2, 4 or 8), ``num_stages`` (1 to 4) and ``num_splits`` (>= 1), each
    replacing the heuristic's value at every launch that does not pass its own. Read at each launch (the benchmarks'
    same-process A/Bs set it before capturing CUDA graphs). A malformed value raises ``ValueError``."""
    value = os.environ.get("INFERNEO_DECODE_LAUNCH", "").strip()
    launch: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in value.replace("+", ",").split(","))):
        key, sep, number = item.partition("=")
        key = key.strip()
        if not sep or key not in DECODE_LAUNCH_KEYS or not number.strip().isdigit():
            raise ValueError(f"INFERNEO_DECODE_LAUNCH: {item!r} is not KEY=INTEGER with KEY one of "
                             f"{', '.join(DECODE_LAUNCH_KEYS)}")
        launch[key] = int(number)
    allowed = {"block_n": {16, 32, 64, 128, 256}, "num_warps": {1, 2, 4, 8}, "num_stages": {1, 2, 3, 4}}
    for key, options in allowed.items():
        if key in launch and launch[key] not in options:
            raise ValueError(f"INFERNEO_DECODE_LAUNCH: {key}={launch[key]} is not one of {sorted(options)}")
    if launch.get("num_splits", 1) < 1:
        raise ValueError("INFERNEO_DECODE_LAUNCH: num_splits must be at least 1")
    return launch


def prewait_loads() -> frozenset[str]:
    """INFERNEO_PREWAIT_LOADS (default ``rotary,decode``): which latency-bound decode kernels read, before their
    programmatic-dependent-launch wait, what no kernel of the step writes: ``rotary`` (the q/k norm + rotary
    kernel's positions, rotary rows, norm weights and slots; H200, Qwen3-30B-A3B's batch-1 chain, 2026-12-04: 1.4
    us a layer less), ``decode`` (decode attention's lengths and first block ids, and on CUDA an L2 prefetch of its
    first KV tile's cache blocks, not on an FP8 cache at more than one request; 0.7-0.9 us a layer less), both the
    same bits as without; ``reduce`` (opt-in: the split reduction reads its partials beside their log-sum-exps
    instead of after them; within noise there, and its sums take another order: one bf16 ulp apart at 32
    requests). Separated by commas or ``+``; ``all`` for the three, ``none`` for none. Read at each launch."""
    value = os.environ.get("INFERNEO_PREWAIT_LOADS", "").strip().lower()
    if value == "all":
        return PREWAIT_KERNELS
    return _kernel_names(value, PREWAIT_DEFAULT, PREWAIT_KERNELS)


EARLY_EXTRA_KERNELS = frozenset({"norm", "store"})


def pdl_early_extra() -> frozenset[str]:
    """INFERNEO_PDL_EARLY_EXTRA (default ``norm,store``; read at each launch, so where CUDA graphs are captured):
    more decode kernels that let their dependent launch before their own programmatic-dependent-launch wait (see
    ``kernels/_pdl.py``; with ``INFERNEO_CUDA_PDL_EARLY`` on): ``norm`` (the Triton RMSNorm: what follows it, a GEMV,
    reads only weights before its wait; other followers wait first or launch without PDL), ``store`` (the KV store:
    decode attention after it reads lengths and block tables before its wait and asks L2 for cache rows, a hint).
    The results are the same bits (each wait still waits for its predecessor's completion). H200, Llama-2-7B, FP8
    weights + FP8 KV cache, batch 1 (2026-12-04, two calls): 2.49-2.50 against 2.54-2.55 ms; bf16 unchanged
    (3.86-3.89 against 3.85-3.90). Separated by commas; ``none`` for none."""
    return _kernel_names(os.environ.get("INFERNEO_PDL_EARLY_EXTRA", ""), EARLY_EXTRA_KERNELS, EARLY_EXTRA_KERNELS)


def _kernel_names(value: str, default: frozenset[str], known: frozenset[str]) -> frozenset[str]:
    """The kernel names of a switch's value (separated by commas or ``+``) that are in ``known``; ``default`` when
    the value is empty (``none``, like any unknown name, selects nothing)."""
    value = value.strip().lower()
    if not value:
        return default
    return frozenset(part.strip() for part in value.replace("+", ",").split(",") if part.strip()) & known


def rotary_warps() -> int:
    """INFERNEO_ROTARY_WARPS (default 0: the launcher's choice, 8 warps for 4,096-element head tiles and more, else
    4): the warps of the Triton rotary and q/k norm + rotary kernel's program (one per token). Read at each launch
    (an A/B switch)."""
    value = os.environ.get("INFERNEO_ROTARY_WARPS", "").strip()
    return int(value) if value else 0


def rotary_head_groups() -> int:
    """INFERNEO_ROTARY_HEAD_GROUPS (default 0: ``_triton_elementwise.rotary_head_groups``'s rule): the programs a
    token's heads are spread over when the Triton rotary kernel (or the q/k norm + rotary kernel) also writes the
    cache (at most one a rotated head). Read at each launch, for A/Bs; the plain rotary kernel writes the same bytes
    with every value, the norm kernel's per-head sums may round one ulp apart."""
    value = os.environ.get("INFERNEO_ROTARY_HEAD_GROUPS", "").strip()
    if value and not value.isdigit():
        raise ValueError(f"INFERNEO_ROTARY_HEAD_GROUPS must be a whole number of programs (0: the rule) or empty; "
                         f"got {value!r}")
    return int(value) if value else 0


def moe_pair_tiles() -> dict[str, int]:
    """INFERNEO_MOE_PAIR_TILES (default empty): fields of the few-token Triton MoE kernels' tiles overridden, as
    ``name=value`` pairs separated by commas or ``+`` (e.g. ``up_block_n=4+up_block_k=2048``; the names of
    ``moe_tile_configs.PairTiles``). Read where the tiles are looked up (an A/B switch)."""
    value = os.environ.get("INFERNEO_MOE_PAIR_TILES", "").strip()
    fields = {}
    for part in filter(None, (p.strip() for p in value.replace("+", ",").split(","))):
        name, _, number = part.partition("=")
        if not number.strip().lstrip("-").isdigit():
            raise ValueError(f"INFERNEO_MOE_PAIR_TILES wants name=integer pairs; got {part!r}")
        fields[name.strip()] = int(number)
    return fields


def moe_evict() -> int | None:
    """INFERNEO_MOE_EVICT (default empty: the shape's tuned ``"pair"`` entry): the L2 eviction hint of the expert
    weights in the few-token Triton MoE kernels, 0 normal, 1 ``evict_first``, 2 ``evict_last``
    (``moe_tile_configs.pair_tiles``). Read where the tiles are looked up."""
    value = os.environ.get("INFERNEO_MOE_EVICT", "").strip()
    return int(value) if value else None


def tp_timing() -> bool:
    """INFERNEO_TP_TIMING (default off; for profiling): tensor-parallel workers print their host time per step
    when they stop."""
    return _flag("INFERNEO_TP_TIMING", False)


def peer_all_reduce() -> bool:
    """INFERNEO_PEER_ALL_REDUCE (default on): at tensor-parallel size > 1 on GPUs that reach each other's memory,
    sum small partial results through peer memory: the all-reduce after each row-parallel layer is fused with the
    residual add and RMSNorm that follow it (one kernel), other small all-reduces take one peer-memory kernel
    (``inferneo.distributed.peer_all_reduce``). ``0`` sends every all-reduce through NCCL.
    """
    return _flag("INFERNEO_PEER_ALL_REDUCE", True)


def peer_push() -> bool:
    """INFERNEO_PEER_PUSH (default on; takes effect with the peer all-reduce): in 16-bit precision, the fused
    all-reduce + RMSNorm kernel writes this rank's partial rows into every peer's receive buffer and waits for
    theirs in its own (no flags, no reads across GPUs). ``0`` keeps the flag barrier and the reads from the peers."""
    return _flag("INFERNEO_PEER_PUSH", True)


def gemv_silu() -> bool:
    """INFERNEO_GEMV_SILU (default on; with the Triton GEMV): at one-row decode steps in half precision, a gated
    MLP's gate/up projection and its SiLU-and-multiply run as one kernel (``triton_gemv.gemv_silu_mul``)."""
    return _flag("INFERNEO_GEMV_SILU", True)


def fp8_gemv() -> bool:
    """INFERNEO_FP8_GEMV (default on): on CUDA, FP8 linear layers run decode steps of a few rows (up to
    ``triton_fp8_gemv.max_rows()``) through the weight-only FP8 GEMV (``kernels/triton_fp8_gemv.py``: e4m3 weights
    de-quantized in registers, activations not quantized; the gated MLP's gate/up + SiLU fused with
    ``gemv_silu``); off, every row count takes the W8A8 GEMM (per-token activation quantization +
    ``torch._scaled_mm``)."""
    return _flag("INFERNEO_FP8_GEMV", True)



def fp8_norm_gemv() -> bool:
    """INFERNEO_FP8_NORM_GEMV (default off: slower on an H200, 2026-12-03): at one-row decode steps, a dense decoder
    layer's FP8 q/k/v and gate/up layers take the RMSNorm before them (and its residual add) inside their GEMV
    (``triton_fp8_gemv.fp8_norm_gemv``): no RMSNorm launch and no normed row in memory, but every program of the
    GEMV reads and scales the whole input row (Llama-2-7B batch-1 step 2.87 -> 3.17 ms)."""
    return _flag("INFERNEO_FP8_NORM_GEMV", False)


def w4a16_norm_epilogue() -> bool:
    """INFERNEO_W4A16_NORM_EPILOGUE (default on): at one-row decode steps, a dense decoder layer whose
    four linears are W4A16 on the Triton h2 kernel runs its RMSNorms in the GEMVs' epilogues
    (``device_kernels.EpilogueNormLayer``): the output and down projections add to the residual and write it scaled
    by the next norm's weight with partial sums of squares; the q/k/v and gate/up projections multiply their
    products by ``1 / rms``. No RMSNorm launch between them (64 a step for a 32-layer model). On an H100 the
    Llama-2-7B W4A16 + FP8 KV batch-1 step took 2.11 ms against 2.15 off (docs/benchmarks.md)."""
    return _flag("INFERNEO_W4A16_NORM_EPILOGUE", True)


def fp8_norm_epilogue() -> bool:
    """INFERNEO_FP8_NORM_EPILOGUE (default off: with the epilogue launches' own tilings, ``"epilogue_shapes"``,
    Llama-2-7B's batch-1 step is 2.5% faster on an H100; on an H200 it was 3.8% slower before those tilings, not yet
    measured with them; docs/benchmarks.md): at one-row decode
    steps, a dense decoder layer whose four linears are FP8 on the Triton h2 GEMV runs its RMSNorms in the GEMVs' epilogues
    (``device_kernels.EpilogueNormLayer``), as ``INFERNEO_W4A16_NORM_EPILOGUE`` does for W4A16: the output and down
    projections add to the residual and write it scaled by the next norm's weight with partial sums of squares;
    the q/k/v and gate/up GEMVs multiply their sums by ``1 / rms``. Read when the model's kernels are chosen."""
    return _flag("INFERNEO_FP8_NORM_EPILOGUE", False)


def w4a16_half_copies() -> bool:
    """INFERNEO_W4A16_HALF_COPIES (default on): in a bfloat16 model's one-row decode steps through
    ``device_kernels.EpilogueNormLayer``, the W4A16 h2 launches that write the rows the next ones read (the output,
    gate/up + SiLU and down projections) also write each row's float16 copy in the kernel's pair order, and the
    readers (gate/up, down, q/k/v) load their activation pairs from it instead of converting and pairing every
    bfloat16 value (``kernels/scaled_row.py``, ``triton_int4.paired_half``). The same bits. On an H200 the
    Llama-2-7B W4A16 + FP8 KV batch-1 step took 1.90-1.91 ms against 1.97-1.98 off (docs/benchmarks.md). Read at
    each layer call (a CUDA graph keeps what it captured)."""
    return _flag("INFERNEO_W4A16_HALF_COPIES", True)


def fp8_half_copies() -> bool:
    """INFERNEO_FP8_HALF_COPIES (default off): in a bfloat16 model's one-row decode steps, dense decoder layers of
    FP8 linears (``device_kernels.HalfCopyQuantLayer``) have their RMSNorms and gate/up + SiLU GEMV also write each
    row's scaled float16 copy, from which the q/k/v, gate/up and down GEMVs read their activations instead of
    converting every bfloat16 value (``triton_fp8_gemv.scaled_half``). The same bits. Read at each layer call (a
    CUDA graph keeps what it captured)."""
    return _flag("INFERNEO_FP8_HALF_COPIES", False)


def w4a16_silu_pairs() -> bool:
    """INFERNEO_W4A16_SILU_PAIRS (default on): at one row, the W4A16 gate/up projection and its SiLU-and-mul run as
    one h2 launch with the projection's own tuned tile, each program's rows gate/up pairs
    (``triton_int4.W4A16Config.silu_pairs``), in place of the table's fused-SiLU entry (Llama-2-7B's: none, the
    projection then the SiLU-and-mul kernel). The same sums and roundings as the two launches. On an H100 the
    Llama-2-7B W4A16 + FP8 KV batch-1 step took 2.05 ms against 2.11 and 2.12 off (docs/benchmarks.md). Read where
    the launch is chosen (at each call; a CUDA graph keeps what it captured)."""
    return _flag("INFERNEO_W4A16_SILU_PAIRS", True)


def cuda_fused_qk_norm_rope() -> bool:
    """INFERNEO_CUDA_FUSED_QK_NORM_ROPE (default on; with the Triton ops): on CUDA, attention layers with per-head
    q/k RMSNorms (Qwen3, Qwen3-MoE, Gemma 3) normalize and rotate their queries and keys in one Triton kernel, in
    place on the fused q/k/v projection output (``triton_ops.qk_norm_rotary_inplace``), and with the Triton
    attention backend that kernel also writes the new keys and values to the cache (``cuda_rotary_stores_kv``);
    off, the PyTorch modules."""
    return _flag("INFERNEO_CUDA_FUSED_QK_NORM_ROPE", True)


def cuda_rotary_stores_kv() -> bool:
    """INFERNEO_CUDA_ROTARY_STORES_KV (default on; read at each layer call, so a CUDA graph keeps the value it was
    captured with): on CUDA with the Triton attention backend, the rotary kernel (and the q/k norm + rotary kernel)
    also writes the step's new keys and values to the cache, FP8 caches included (``_triton_elementwise._rotary_kernel``
    with ``STORE_KV``), so the backend launches no ``store_kv``; off, the separate store launch (the A/B's base)."""
    return _flag("INFERNEO_CUDA_ROTARY_STORES_KV", True)


def cuda_fused_routing() -> bool:
    """INFERNEO_CUDA_FUSED_ROUTING (default on; with the Triton ops): on CUDA, the softmax top-k mixture-of-experts
    routers (renormalised or not, and gpt-oss's top-k-then-softmax) run as one Triton kernel
    (``kernels/triton_routing.py``), and at a few tokens their layer's residual add, post-attention RMSNorm and
    router linear join that kernel (at one row, the input RMSNorm joins the q/k/v GEMV:
    ``device_kernels.NormFusedMoeLayer``); off, the PyTorch routers. DeepSeek's grouped routers are always
    PyTorch."""
    return _flag("INFERNEO_CUDA_FUSED_ROUTING", True)


def fp8_cpu_emulation() -> bool:
    """INFERNEO_FP8_CPU_EMULATION (default off; for tests and reference runs): on CPU, FP8 layers run the FP8 math
    in PyTorch (activations quantized as on the GPU, the e4m3 products taken in float32) instead of a FP8
    checkpoint being de-quantized at load, and ``--quantization fp8`` is allowed. It is much slower than the
    de-quantized model: no CPU here has FP8 arithmetic (see docs/quantization.md)."""
    return _flag("INFERNEO_FP8_CPU_EMULATION", False)


def pp_layer_partition() -> str:
    """INFERNEO_PP_LAYER_PARTITION (default unset: an even split): the decoder layers each pipeline stage holds,
    as comma-separated counts summing to the model's layer count, e.g. ``14,18`` for two stages of a 32-layer
    model (``inferneo.model_executor.pipeline.stage_layer_ranges``)."""
    return os.environ.get("INFERNEO_PP_LAYER_PARTITION", "").strip()


def ray_worker_cpus() -> float:
    """INFERNEO_RAY_WORKER_CPUS (default 1): the CPUs each worker rank's placement-group bundle asks Ray for with
    ``--distributed-executor-backend ray`` (fractions allowed; Ray only books them, the rank uses its threads)."""
    return float(os.environ.get("INFERNEO_RAY_WORKER_CPUS", "1"))


def lora_fused_rows() -> bool:
    """INFERNEO_LORA_FUSED_ROWS (default on): on CUDA, one-row LoRA steps (batch-1 decode) run the row shrink and
    add the delta in the base projection's GEMV epilogue, keeping the fused gate/up + SiLU GEMV (``lora/rows.py``);
    off, they take the batched shrink/expand kernels after each projection, with the plain MLP."""
    return _flag("INFERNEO_LORA_FUSED_ROWS", True)


def cuda_norm_router_gemv() -> bool:
    """INFERNEO_CUDA_NORM_ROUTER_GEMV (default on): at one token in half precision, a mixture-of-experts layer with
    the Triton router runs its residual add and post-attention RMSNorm inside the router GEMV
    (``triton_gemv.norm_gemv``, which also stores the normed row for the experts): one launch where the RMSNorm
    and the router GEMV took two. Off: the two."""
    return _flag("INFERNEO_CUDA_NORM_ROUTER_GEMV", True)


def cuda_norm_router() -> bool:
    """INFERNEO_CUDA_NORM_ROUTER (default off): at a few tokens, run a mixture-of-experts layer's residual add,
    post-attention norm, router linear and top-k as one kernel (``triton_routing.norm_route_topk``). Off because on
    an H200 it measured slower than the three launches it replaces (5.8 against 4.2 us a layer, Qwen3-30B-A3B
    shapes, docs/benchmarks.md)."""
    return _flag("INFERNEO_CUDA_NORM_ROUTER", False)
