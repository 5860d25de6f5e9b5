"""GGUF mixture-of-experts experts kept in their ggml blocks (Mixtral, arch ``llama`` with experts; Qwen2-MoE;
Qwen3-MoE).

llama.cpp stores each sparse layer's experts as three stacked tensors: ``blk.N.ffn_gate_exps`` and
``blk.N.ffn_up_exps`` ``[E, I, H]`` and ``blk.N.ffn_down_exps`` ``[E, H, I]`` (almost all of a MoE file's bytes);
its first Mixtral files (December 2023) hold one tensor per expert instead (``blk.N.ffn_gate.E.weight``), taken
alike. When all three are of a kept type (``gguf_blocks.KEPT_FORMATS``) and gate and up share one type, the layer's
``FusedMoE.experts`` becomes a :class:`GGUFExperts`: ``gate_up_proj`` uint8 ``[E, 2*I, row_bytes(H)]`` (each
expert's gate rows, then its up rows, as the file's blocks) and ``down_proj`` uint8 ``[E, H, row_bytes(I)]`` (its
own type: Q4_K_M files hold some in Q6_K). The loader hands them over as one ``[rows, row_bytes]`` tensor per
expert and projection (``experts.{e}.gate_proj.qweight``, Mixtral's ``w1``/``w3``/``w2``: ``gguf_loader``), which
``MoeForCausalLM`` copies into its slice. The layer's expert kernel is ``layers.moe.fused_experts`` whose
per-expert projections are a block matmul on that expert's rows (``gguf.block_matmul_for``: the native CPU kernels,
the Triton GEMM on CUDA, else a PyTorch reference that de-quantizes the expert at each call).

Other layers keep the de-quantized path (experts in the model dtype, the batched kernels of ``layers/moe.py`` or
Triton's fused MoE on CUDA), and :func:`plan_gguf_experts` says why: an expert tensor of a type that is not kept
(F16, Q5_0, ...), gate and up of different types (or one projection's per-expert tensors of several), expert
biases, or shapes that do not match the model. Tensor and pipeline parallelism de-quantize the whole file
(``model_runner``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from inferneo.kernel_config import KernelConfig
from inferneo.model_executor.layers.moe import FusedMoE, fused_experts
from inferneo.model_loader.gguf_file import GGUFHeader, GGUFTensorInfo
from inferneo.quantization.base import QuantizedExperts
from inferneo.quantization.gguf_blocks import KEPT_FORMATS, BlockFormat, dequantize_blocks, random_blocks

# x [M, K], blocks uint8 [rows, row_bytes], format -> x @ W.T [M, rows] in x's dtype (``gguf.BlockMatmul``)
BlockMatmul = Callable[[torch.Tensor, torch.Tensor, BlockFormat], torch.Tensor]
MatmulFor = Callable[[torch.device, KernelConfig], "BlockMatmul | None"]

# the architectures whose experts llama.cpp stacks under these names (Mixtral is "llama" with experts)
_ARCHITECTURES = ("llama", "qwen2moe", "qwen3moe")
_STACKED = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight")
_PER_EXPERT = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight")


@dataclass(frozen=True, slots=True)
class ExpertTensors:
    """One layer's expert tensors in the file, per projection: one stacked tensor ``[E, rows, cols]``, or (llama.cpp's
    first Mixtral files) one ``[rows, cols]`` tensor per expert, in expert order."""

    gate: tuple[GGUFTensorInfo, ...]
    up: tuple[GGUFTensorInfo, ...]
    down: tuple[GGUFTensorInfo, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(info.name for part in (self.gate, self.up, self.down) for info in part)

    @property
    def nbytes(self) -> int:
        """The bytes of the tensors' blocks in the file."""
        return sum(info.nbytes for part in (self.gate, self.up, self.down) for info in part)

    @property
    def per_expert(self) -> bool:
        return len(self.gate[0].shape) == 2


@dataclass(frozen=True, slots=True)
class ExpertPlan:
    """How one layer's experts are held: ``tensors`` in blocks (``reason`` None), or de-quantized at load because
    of ``reason``."""

    tensors: ExpertTensors | None
    reason: str | None = None


def plan_gguf_experts(header: GGUFHeader) -> dict[str, ExpertPlan]:
    """Per engine mixture-of-experts layer (``layers.N.mlp``) of the file: whether its experts can stay in blocks.
    Empty for architectures other than Mixtral / Qwen2-MoE / Qwen3-MoE."""
    if header.architecture not in _ARCHITECTURES:
        return {}
    found: dict[str, dict[str, dict[int, GGUFTensorInfo]]] = {}  # layer -> projection -> expert (-1: stacked)
    for info in header.tensors:
        if match := _STACKED.fullmatch(info.name):
            found.setdefault(f"layers.{match.group(1)}.mlp", {}).setdefault(match.group(2), {})[-1] = info
        elif match := _PER_EXPERT.fullmatch(info.name):
            layer, part, expert = match.groups()
            found.setdefault(f"layers.{layer}.mlp", {}).setdefault(part, {})[int(expert)] = info
    return {layer: _plan(parts) for layer, parts in found.items()}


def _plan(parts: dict[str, dict[int, GGUFTensorInfo]]) -> ExpertPlan:
    if set(parts) != {"gate", "up", "down"}:
        return ExpertPlan(None, f"the file has only {', '.join(sorted(parts))} experts")
    by_part = {}
    for part, tensors in parts.items():
        if len(tensors) > 1 and -1 in tensors:
            return ExpertPlan(None, f"{part} experts are both stacked and one tensor per expert")
        if -1 not in tensors and set(tensors) != set(range(len(tensors))):
            return ExpertPlan(None, f"{part} experts are missing some experts' tensors")
        by_part[part] = tuple(tensors[e] for e in sorted(tensors))
    tensors = ExpertTensors(by_part["gate"], by_part["up"], by_part["down"])
    unkept = sorted(
        {
            f"{t.name.split('.')[2]} in {t.type_name}"
            for p in ("gate", "up", "down")
            for t in by_part[p]
            if t.ggml_type not in KEPT_FORMATS
        }
    )
    if unkept:
        return ExpertPlan(None, " and ".join(unkept) + " (not a type kept in blocks)")
    types = {p: {t.ggml_type for t in by_part[p]} for p in by_part}
    names = {p: "/".join(sorted({t.type_name for t in by_part[p]})) for p in by_part}
    if len(types["down"]) > 1 or len(types["gate"] | types["up"]) > 1:
        return ExpertPlan(
            None,
            f"gate ({names['gate']}) and up ({names['up']}) experts differ in type"
            if len(types["gate"] | types["up"]) > 1
            else f"down experts differ in type ({names['down']})",
        )
    return ExpertPlan(tensors)


def _reference_matmul(x: torch.Tensor, blocks: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    """``x @ W.T`` with the expert's ``W`` de-quantized in PyTorch (before :meth:`GGUFExperts.finalize`)."""
    return F.linear(x, dequantize_blocks(blocks, fmt.qtype).to(x.dtype))


class GGUFExperts(QuantizedExperts):
    """A ``FusedMoE``'s experts as ggml blocks (see the module doc): ``gate_up_proj`` uint8 ``[E, 2*I,
    row_bytes(H)]`` in ``gate_up_format``, ``down_proj`` uint8 ``[E, H, row_bytes(I)]`` in ``down_format``.

    :meth:`kernel` is the layer's ``expert_kernel``. ``matmul_for(device, kernels)`` picks the block matmul at
    :meth:`finalize` (``gguf.block_matmul_for``; None: keep the PyTorch reference)."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        gate_up_format: BlockFormat,
        down_format: BlockFormat,
        device: torch.device,
        matmul_for: MatmulFor,
    ) -> None:
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = (
            num_experts,
            hidden_size,
            intermediate_size,
        )
        self.gate_up_format, self.down_format = gate_up_format, down_format
        self.device = torch.device(device)
        self.matmul: BlockMatmul = _reference_matmul
        self._matmul_for = matmul_for
        shapes = {
            "gate_up_proj": (num_experts, 2 * intermediate_size, gate_up_format.row_bytes(hidden_size)),
            "down_proj": (num_experts, hidden_size, down_format.row_bytes(intermediate_size)),
        }
        for name, shape in shapes.items():
            param = nn.Parameter(
                torch.zeros(shape, dtype=torch.uint8, device=self.device), requires_grad=False
            )
            param.quantized = True  # dummy-weight init leaves it to init_dummy
            self.register_parameter(name, param)

    def finalize(self, kernels: KernelConfig) -> None:
        matmul = self._matmul_for(self.device, kernels)
        if matmul is not None:
            self.matmul = matmul

    def _project_gate_up(
        self, x: torch.Tensor, blocks: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor
    ) -> None:
        out.copy_(self.matmul(x, blocks, self.gate_up_format))

    def _project_down(
        self, x: torch.Tensor, blocks: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor
    ) -> None:
        out.copy_(self.matmul(x, blocks, self.down_format))

    def kernel(
        self,
        x: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        weights: torch.Tensor,
        ids: torch.Tensor,
        *,
        activation: str = "silu",
        w13_bias: torch.Tensor | None = None,
        w2_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The layer's expert kernel (``fused_experts``' signature; ``w13`` / ``w2`` are this module's blocks):
        each routed expert's projections as block matmuls on its rows. The layers held here have no biases."""
        if w13_bias is not None or w2_bias is not None:
            raise ValueError("GGUF experts in blocks take no biases")
        return fused_experts(
            x,
            w13,
            w2,
            weights,
            ids,
            activation=activation,
            project_w13=self._project_gate_up,
            project_w2=self._project_down,
        )

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            dequantize_blocks(self.gate_up_proj.data, self.gate_up_format.qtype),
            dequantize_blocks(self.down_proj.data, self.down_format.qtype),
        )

    def init_dummy(self, generator: torch.Generator) -> None:
        for param, fmt in ((self.gate_up_proj, self.gate_up_format), (self.down_proj, self.down_format)):
            random_blocks(param.data.view(-1, param.shape[-1]), fmt, generator)

    def extra_repr(self) -> str:
        return (
            f"{self.num_experts} experts, {self.hidden_size} -> {self.intermediate_size}, gguf gate/up "
            f"{self.gate_up_format.name}, down {self.down_format.name}"
        )


def hold_experts_in_blocks(
    moe: FusedMoE, tensors: ExpertTensors, device: torch.device, matmul_for: MatmulFor
) -> str | None:
    """Give ``moe`` a :class:`GGUFExperts` for ``tensors`` and its kernel; returns None, or why the layer keeps
    its de-quantized experts (the model's shapes do not match the file, biases, a tensor-parallel shard)."""
    experts = moe.experts
    num_experts, hidden, intermediate = moe.num_experts, experts.down_proj.shape[1], moe.intermediate_size
    if moe.all_reduce is not None or getattr(experts.gate_up_proj, "expert_loader", None) is not None:
        return "the experts are sharded over tensor-parallel ranks"
    if hasattr(experts, "gate_up_proj_bias"):
        return "the experts have biases"
    stacked = (num_experts,) if not tensors.per_expert else ()
    count = 1 if not tensors.per_expert else num_experts
    expected = {
        "gate": (*stacked, intermediate, hidden),
        "up": (*stacked, intermediate, hidden),
        "down": (*stacked, hidden, intermediate),
    }
    for part in ("gate", "up", "down"):
        infos = getattr(tensors, part)
        if len(infos) != count:
            return f"the file has {len(infos)} {part} expert tensors, the model {num_experts} experts"
        for info in infos:
            if tuple(info.shape) != expected[part]:
                return f"{info.name} is {tuple(info.shape)}, the model expects {expected[part]}"
    gate_up, down = KEPT_FORMATS[tensors.gate[0].ggml_type], KEPT_FORMATS[tensors.down[0].ggml_type]
    if hidden % gate_up.block_size or intermediate % down.block_size:
        return "rows do not fill whole blocks"
    blocks = GGUFExperts(num_experts, hidden, intermediate, gate_up, down, device, matmul_for)
    moe.experts = blocks
    moe.expert_kernel = blocks.kernel
    moe.expert_kernel_fixed = True
    return None
