"""GGUF mixture-of-experts experts kept in their ggml blocks (Mixtral, arch ``llama`` with experts; Qwen2-MoE;
Qwen3-MoE).

llama.cpp stores each sparse layer's experts as three stacked tensors: ``blk.N.ffn_gate_exps`` and
``blk.N.ffn_up_exps`` ``[E, I, H]`` and ``blk.N.ffn_down_exps`` ``[E, H, I]`` (almost all of a MoE file's bytes).
When all three are of a kept type (``gguf_blocks.KEPT_FORMATS``) and gate and up share one type, the layer's
``FusedMoE.experts`` becomes a :class:`GGUFExperts`: ``gate_up_proj`` uint8 ``[E, 2*I, row_bytes(H)]`` (each
expert's gate rows, then its up rows, as the file's blocks) and ``down_proj`` uint8 ``[E, H, row_bytes(I)]`` (its
own type: Q4_K_M files hold some in Q6_K). The loader hands them over as one ``[rows, row_bytes]`` tensor per
expert and projection (``experts.{e}.gate_proj.qweight``, Mixtral's ``w1``/``w3``/``w2``: ``gguf_loader``), which
``MoeForCausalLM`` copies into its slice. The layer's expert kernel is ``layers.moe.fused_experts`` whose
per-expert projections are a block matmul on that expert's rows (``gguf.block_matmul_for``: the native CPU kernels,
the Triton GEMM on CUDA, else a PyTorch reference that de-quantizes the expert at each call).

Other layers keep the de-quantized path (experts in the model dtype, the batched kernels of ``layers/moe.py`` or
Triton's fused MoE on CUDA), and :func:`plan_gguf_experts` says why: an expert tensor of a type that is not kept
(F16, Q5_0, ...), gate and up of different types, llama.cpp's first Mixtral files (one tensor per expert), expert
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
_PER_EXPERT = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)\.\d+\.weight")


@dataclass(frozen=True, slots=True)
class ExpertTensors:
    """The three stacked expert tensors of one layer in the file."""

    gate: GGUFTensorInfo
    up: GGUFTensorInfo
    down: GGUFTensorInfo

    @property
    def names(self) -> tuple[str, str, str]:
        return self.gate.name, self.up.name, self.down.name

    @property
    def nbytes(self) -> int:
        """The bytes of the three tensors' blocks in the file."""
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes


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
    stacked: dict[str, dict[str, GGUFTensorInfo]] = {}
    plans: dict[str, ExpertPlan] = {}
    for info in header.tensors:
        if match := _STACKED.fullmatch(info.name):
            stacked.setdefault(f"layers.{match.group(1)}.mlp", {})[match.group(2)] = info
        elif match := _PER_EXPERT.fullmatch(info.name):
            plans[f"layers.{match.group(1)}.mlp"] = ExpertPlan(
                None, "one tensor per expert (llama.cpp's first Mixtral files): de-quantized at load"
            )
    for layer, parts in stacked.items():
        if set(parts) != {"gate", "up", "down"}:
            plans[layer] = ExpertPlan(None, f"the file has only {', '.join(sorted(parts))} experts")
            continue
        tensors = ExpertTensors(parts["gate"], parts["up"], parts["down"])
        unkept = [t for t in (tensors.gate, tensors.up, tensors.down) if t.ggml_type not in KEPT_FORMATS]
        if unkept:
            plans[layer] = ExpertPlan(
                None,
                " and ".join(f"{t.name.split('.')[2]} in {t.type_name}" for t in unkept)
                + " (not a type kept in blocks)",
            )
        elif tensors.gate.ggml_type != tensors.up.ggml_type:
            plans[layer] = ExpertPlan(
                None,
                f"gate ({tensors.gate.type_name}) and up ({tensors.up.type_name}) experts differ in type",
            )
        else:
            plans[layer] = ExpertPlan(tensors)
    return plans


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
    expected = {
        tensors.gate.name: (num_experts, intermediate, hidden),
        tensors.up.name: (num_experts, intermediate, hidden),
        tensors.down.name: (num_experts, hidden, intermediate),
    }
    for info in (tensors.gate, tensors.up, tensors.down):
        if tuple(info.shape) != expected[info.name]:
            return f"{info.name} is {tuple(info.shape)}, the model expects {expected[info.name]}"
    gate_up, down = KEPT_FORMATS[tensors.gate.ggml_type], KEPT_FORMATS[tensors.down.ggml_type]
    if hidden % gate_up.block_size or intermediate % down.block_size:
        return "rows do not fill whole blocks"
    blocks = GGUFExperts(num_experts, hidden, intermediate, gate_up, down, device, matmul_for)
    moe.experts = blocks
    moe.expert_kernel = blocks.kernel
    moe.expert_kernel_fixed = True
    return None
