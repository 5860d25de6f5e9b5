"""Time the native GGUF kernel's paths against each other on the default model's layers (one step: every linear
once, the tied Q8_0 head included), at each row count, on CPU.

``gguf_linear`` has four float32 paths (``inferneo/csrc/gguf_kernels.cpp``): weights de-quantized in registers
(few rows), 16 weight rows de-quantized into a [K][16] panel and multiplied by a 6 x 16 register-blocked kernel
(``panel``), 512-wide K chunks of 16 rows multiplied by 4 x 3 dot-product panels (``chunks``), and de-quantized
tiles through ``at::mm`` (``tiles``); ``inreg`` (Q4_0 / Q4_1 / Q8_0 only, which the default model's are) is the
in-register path at every row count. Each path is forced through the call's row thresholds; the paths alternate
within each repeat and the best repeat is kept, so a busy machine's noise hits them alike. ``file`` / ``wide16``
(and their ``_bf16`` twins) time the defaults instead: the file's blocks through ``gguf_linear``, against the Q4
layers repacked at load into the wide16 layout (``gguf_packed_linear``); ``wide16_int8`` the same layers through the
int8 dot products (``gguf_packed_linear_int8``: activations quantized per 32-weight block, AVX512_VNNI; the Q8_0
head exact, as the engine runs it with ``INFERNEO_GGUF_INT8_DOT=1`` above 8 rows); ``wide16_int16`` the same layers
and the head with float32 activations held as 16-bit integers (``gguf_packed_linear_i16``, AVX512_VNNI: the engine's
float32 default from 16 rows, 9 where the CPU has AMX-INT8); ``wide16_int8_vnni`` / ``wide16_int8_amx`` and
``wide16_int16_vnni`` / ``wide16_int16_amx`` the same two with their integer products forced onto AVX512_VNNI or the
AMX-INT8 tiles (the same bits; the default takes the tiles where the CPU has them); ``wide16_dense`` /
``wide16_dense_bf16`` the same layers de-quantized at each call into ``[K, N]`` and multiplied by ``torch.mm``
(oneDNN: the dense path ``quantization/gguf_dense.py`` measures against the panels where the CPU has AMX-BF16).

    python3 benchmarks/cpu_gguf_paths.py [--rows 16,64,256,1024] [--threads 1] [--repeats 5] [--paths panel,inreg]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from inferneo.kernels.cpu_gguf import load_gguf_kernels
from inferneo.quantization.gguf_blocks import KEPT_FORMATS
from inferneo.quantization.gguf_wide import pack_wide16, wide16_supported
from inferneo.worker.cpu_tuning import keep_freed_memory_mapped

NEVER = 1 << 30
# (fused_max_rows, inreg_max_rows, panel_min_rows, panel isa, activation dtype) that force each path whatever the
# row count; "panel" is the [K][16] AVX2 panel, "wide" the [K][48] AVX-512 one (float32 activations), "wide_bf16"
# the AVX512_BF16 one (bfloat16 activations, weights rounded to bfloat16), "panel_bf16" the AVX2 panel on the same
# bfloat16 activations (widened to float32), for the bfloat16 comparison
PATHS = {
    "panel": (NEVER, 0, 0, "avx2", torch.float32),
    "chunks": (NEVER, 0, NEVER, "", torch.float32),
    "tiles": (0, 0, NEVER, "", torch.float32),
    "inreg": (NEVER, NEVER, NEVER, "", torch.float32),
    "wide": (NEVER, 0, 0, "avx512", torch.float32),
    "wide_bf16": (NEVER, 0, 0, "avx512_bf16", torch.bfloat16),
    "panel_bf16": (NEVER, 0, 0, "avx2", torch.bfloat16),
}
# the wide panels built through a row-major buffer (as the K-quants' are) instead of straight from the blocks
BUFFERED = {"wide_buffered": "wide", "wide_bf16_buffered": "wide_bf16"}
PATHS.update({name: PATHS[base] for name, base in BUFFERED.items()})
# whole-step defaults, each path choosing its own hand-over: "file" / "file_bf16" are gguf_linear on the file's
# blocks, "wide16" / "wide16_bf16" the Q4_0 / Q4_1 / Q8_0 layers (the Q8_0 head too) repacked at load
# (gguf_packed_linear; AVX-512), other types as in "file"
DEFAULTS = {"file": torch.float32, "file_bf16": torch.bfloat16, "wide16": torch.float32,
            "wide16_bf16": torch.bfloat16, "wide16_int8": torch.bfloat16, "wide16_int16": torch.float32,
            "wide16_dense": torch.float32,
            "wide16_dense_bf16": torch.bfloat16}
# the wide16 bfloat16 step with its panel products forced onto one instruction set: (isa, inreg_max_rows), -1 the
# default hand-over to the in-register path, 0 the panels at every row count
WIDE16_BF16_ISAS = {"wide16_bf16_vdpbf16": ("avx512_bf16", -1), "wide16_bf16_amx": ("amx_bf16", -1),
                    "wide16_bf16_amx_panels": ("amx_bf16", 0), "wide16_bf16_amx_whole_panels": ("amx_bf16_whole", 0),
                    "wide16_bf16_vdpbf16_panels": ("avx512_bf16", 0),
                    "wide16_bf16_inreg": ("", NEVER)}
DEFAULTS.update(dict.fromkeys(WIDE16_BF16_ISAS, torch.bfloat16))
# the integer paths with their products forced onto one unit: (kernel, isa), "" the best the CPU has
INTEGER_ISAS = {"wide16_int8": ("int8", ""), "wide16_int8_vnni": ("int8", "vnni"),
                "wide16_int8_amx": ("int8", "amx_int8"), "wide16_int16": ("int16", ""),
                "wide16_int16_vnni": ("int16", "vnni"), "wide16_int16_amx": ("int16", "amx_int8")}
DEFAULTS.update({name: torch.bfloat16 if kernel == "int8" else torch.float32
                 for name, (kernel, _) in INTEGER_ISAS.items()})


def main() -> None:
    from cpu_gguf_step import gguf_layers  # benchmarks/ is the script's own folder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="16,64,256,1024")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--paths", default="panel,chunks,tiles", help=f"among {', '.join([*PATHS, *DEFAULTS])}")
    args = parser.parse_args()
    unknown = sorted(set(args.paths.split(",")) - set(PATHS) - set(DEFAULTS))
    if unknown:
        parser.error(f"--paths: unknown {', '.join(unknown)} (choose among {', '.join([*PATHS, *DEFAULTS])})")
    paths = {name: PATHS.get(name) for name in args.paths.split(",")}
    torch.set_num_threads(args.threads)
    keep_freed_memory_mapped()  # glibc's thresholds as the engine sets them: no fresh pages for each call's buffers
    ops = load_gguf_kernels()
    if ops is None:
        raise SystemExit("the native GGUF kernels do not build here")
    layers = [(blocks, qtype, blocks.shape[1] // KEPT_FORMATS[qtype].type_size * KEPT_FORMATS[qtype].block_size)
              for blocks, qtype in gguf_layers()]
    wide = any(name.startswith("wide16") for name in paths)
    if wide and not ops.gguf_packed_available():
        raise SystemExit("the wide16 paths need AVX512F/BW/VL/DQ, which this CPU lacks")
    for name in INTEGER_ISAS:
        if name in paths and not ops.gguf_packed_int8_available():
            raise SystemExit(f"the {name} path needs AVX512_VNNI, which this CPU lacks")
        if name in paths and INTEGER_ISAS[name][1] == "amx_int8" and not ops.gguf_packed_amx_int8_available():
            raise SystemExit(f"the {name} path needs AMX-INT8, which this CPU lacks")
    if any(name.startswith("wide16_bf16_amx") for name in paths) and not ops.gguf_packed_amx_available():
        raise SystemExit("the wide16_bf16_amx paths need AMX-BF16, which this CPU lacks")
    if "wide16_dense_bf16" in paths and ops.gguf_isa() != "avx512_bf16":
        raise SystemExit("the wide16_dense_bf16 path needs AVX512_BF16, which this CPU lacks")
    tiles = [pack_wide16(blocks, qtype) if wide and wide16_supported(qtype) else None for blocks, qtype, _ in layers]
    for rows in map(int, args.rows.split(",")):
        inputs = {k: torch.randn(rows, k) for _, _, k in layers}
        inputs_bf16 = {k: x.bfloat16() for k, x in inputs.items()}
        best = dict.fromkeys(paths, float("inf"))
        for _ in range(args.repeats):
            for name, forced in paths.items():
                dtype = DEFAULTS[name] if forced is None else forced[4]
                xs = inputs_bf16 if dtype == torch.bfloat16 else inputs
                start = time.perf_counter()
                for (blocks, qtype, k), packed in zip(layers, tiles, strict=True):
                    if forced is not None:
                        fused, inreg, panel, isa, _ = forced
                        ops.gguf_linear(xs[k], blocks, qtype, k, fused, 0, inreg, panel, isa, name not in BUFFERED)
                    elif name.startswith("wide16_dense") and packed is not None:
                        torch.mm(xs[k], ops.gguf_packed_dequantize_kn(packed, qtype, blocks.shape[0], xs[k].dtype))
                    elif name in INTEGER_ISAS and packed is not None:
                        kernel, isa = INTEGER_ISAS[name]
                        if kernel == "int16":
                            ops.gguf_packed_linear_i16(xs[k], packed, qtype, blocks.shape[0], isa)
                        elif qtype != 8:  # int8: Q4 only (the Q8_0 head exact)
                            ops.gguf_packed_linear_int8(xs[k], packed, qtype, blocks.shape[0], isa)
                        else:
                            ops.gguf_packed_linear(xs[k], packed, qtype, blocks.shape[0])
                    elif name in WIDE16_BF16_ISAS and packed is not None:
                        isa, inreg = WIDE16_BF16_ISAS[name]
                        ops.gguf_packed_linear(xs[k], packed, qtype, blocks.shape[0], inreg, isa)
                    elif name.startswith("wide16") and packed is not None:
                        ops.gguf_packed_linear(xs[k], packed, qtype, blocks.shape[0])
                    else:
                        ops.gguf_linear(xs[k], blocks, qtype, k)
                best[name] = min(best[name], time.perf_counter() - start)
        row = {"rows": rows, "threads": args.threads, **{f"{n}_ms": round(t * 1e3, 2) for n, t in best.items()}}
        others = [t for n, t in best.items() if n != "panel"]
        if "panel" in best and others:
            row["panel_speedup_vs_best_other"] = round(min(others) / best["panel"], 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
