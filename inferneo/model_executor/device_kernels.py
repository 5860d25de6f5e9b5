"""The device transform: once the model is built and its weights loaded, put the device's kernels in place.

The model files are plain PyTorch (``RMSNorm``, ``SiluAndMul``, an ``Attention`` that rotates q and k with
``RotaryEmbedding``, an ``MLP`` of two linears). :func:`use_device_kernels` swaps modules for versions that run
the kernels chosen from the device and the engine's :class:`~inferneo.kernel_config.KernelConfig`, once, so that
no ``forward`` asks on every call which device its tensors are on:

============================  =========================================  =========================================
plain module                  CPU (``cpu_native_kernels``)               CUDA (``triton_ops``)
============================  =========================================  =========================================
``RMSNorm``                   :class:`NativeRMSNorm`                     :class:`TritonRMSNorm`
``GemmaRMSNorm``              :class:`NativeGemmaRMSNorm`                PyTorch
``SiluAndMul``                :class:`NativeSiluAndMul`                  :class:`TritonSiluAndMul`
``Attention`` (no q/k norm)   :class:`InplaceRotaryAttention`: rotary in place on the fused q/k/v output
                              (M-RoPE: :class:`MRopeInplaceRotaryAttention`, the same kernel over per-token rows)
``Attention`` (q/k norms)     :class:`QKNormRotaryAttention`: per-head   :class:`QKNormRotaryAttention`
                              norms + rotary, one native kernel, in      (``cuda_fused_qk_norm_rope``): per-head
                              place                                      norms + rotary, one kernel, in place;
                                                                         it also writes the new K/V to the
                                                                         Triton backend's cache
``nn.Linear``                 packed (``cpu_onednn_linear``: panel       ``DecodeLinear`` (``triton_gemv``):
                              kernel, oneDNN or F.linear, chosen per     one-row inputs through the Triton GEMV
                              CPU and shape: ``cpu_linear_tune``)
``MLP``                       :class:`RowPassMLP` when both linears      :class:`GemvSiluMLP` (``gemv_silu``):
                              are packed: long prompts in passes         gate/up + SiLU in one GEMV at one row;
                                                                         :class:`QuantizedSiluMLP` for FP8
                                                                         gate/up layers (the FP8 GEMV's fused
                                                                         gate/up + SiLU at a few rows)
``FusedMoE``                  batched PyTorch (``layers/moe.py``)        ``expert_kernel`` = ``triton_moe``:
                                                                         sorted pairs, two grouped GEMMs; the
                                                                         plain softmax top-k routers as one
                                                                         kernel (``cuda_fused_routing``,
                                                                         ``triton_routing``)
``FusedMoE`` with GGUF        ``fused_experts`` with the native block    ``fused_experts`` with the Triton GGUF
experts in ggml blocks        matmul per expert (``gguf_experts.py``)    GEMM per expert (kept: the layer's
                                                                         ``expert_kernel_fixed``)
``DecoderLayer`` with one of  :class:`NativeDecoderLayer`: the kernels   PyTorch
those two attentions          called directly (no module dispatch)
``DecoderLayer`` with such a  PyTorch                                    :class:`NormFusedMoeLayer`: at a few
``FusedMoE``                                                             tokens the post-attention norm, router
                                                                         linear and routing as one kernel; at
                                                                         one row the input norm inside the
                                                                         q/k/v GEMV
``DecoderLayer`` with W4A16   PyTorch                                    :class:`EpilogueNormLayer`
or FP8 linears (packed-half                                              (``w4a16_norm_epilogue``,
GEMVs)                                                                   ``fp8_norm_epilogue``): at one row
                                                                         the norms in the GEMVs' epilogues
``DecoderLayer`` with FP8     PyTorch                                    :class:`HalfCopyQuantLayer`
linears, no epilogue norms                                               (``fp8_half_copies``): at one row the
                                                                         GEMVs read float16 copies of their rows
============================  =========================================  =========================================

With tensor parallelism and peer memory, the norms after row-parallel layers then become
``PeerFusedRMSNorm`` (``tensor_parallel.fuse_peer_norms``). Replacements share the parameters of the modules
they replace (nothing is copied; parameter names do not change).
"""

from __future__ import annotations

import functools
import logging
from collections import Counter

import torch
from torch import nn

from inferneo import envs
from inferneo.attention.fp8_kv import is_fp8_kv_cache
from inferneo.distributed import TensorParallelGroup
from inferneo.kernel_config import KernelConfig
from inferneo.kernels.cpu import cpu_kernels
from inferneo.kernels.scaled_row import ScaledRow
from inferneo.kernels.triton_ops import triton_ops_for
from inferneo.model_executor.layers.basic import GemmaRMSNorm, RMSNorm, SiluAndMul, silu_and_mul
from inferneo.model_executor.layers.cpu_linear import PackedLinear, PanelLinear, mlp_row_chunk, pack_linears
from inferneo.model_executor.layers.cpu_linear_tune import DECODE_ROWS
from inferneo.model_executor.layers.gpu_linear import (
    DecodeGemv,
    DecodeLinear,
    decode_gemv,
    use_decode_linears,
)
from inferneo.model_executor.layers.moe import ExpertKernel, FusedMoE
from inferneo.model_executor.layers.rotary import MRotaryEmbedding
from inferneo.model_executor.models.llama import MLP, Attention, DecoderLayer
from inferneo.model_executor.tensor_parallel import fuse_peer_norms

logger = logging.getLogger(__name__)


# ---- norms and the activation ----------------------------------------------------------------------------------


class NativeRMSNorm(RMSNorm):
    """RMSNorm through the native CPU kernel (``residual += x`` in place, then the norm); inputs that are not
    contiguous take the PyTorch path."""

    weight_offset = False  # Gemma's norm (NativeGemmaRMSNorm): x / rms * (1 + weight)

    def __init__(self, norm: RMSNorm, ops) -> None:
        nn.Module.__init__(self)
        self.weight, self.eps, self.ops = norm.weight, norm.eps, ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if not x.is_contiguous():
            return super().forward(x, residual)
        if residual is None:
            return self.ops.rms_norm(x, None, self.weight, self.eps, self.weight_offset)
        residual = residual.contiguous()
        # residual += x in place
        return self.ops.rms_norm(x, residual, self.weight, self.eps, self.weight_offset), residual


class NativeGemmaRMSNorm(NativeRMSNorm, GemmaRMSNorm):
    """Gemma's RMSNorm (the stored weight an offset: ``x / rms * (1 + weight)`` in float32) through the native CPU
    kernel; inputs that are not contiguous take Gemma's PyTorch path."""

    weight_offset = True


class TritonRMSNorm(RMSNorm):
    """RMSNorm as one fused Triton kernel (``residual += x`` in place, then the norm)."""

    def __init__(self, norm: RMSNorm, ops, pdl: bool) -> None:
        nn.Module.__init__(self)
        self.weight, self.eps, self.ops, self.pdl = norm.weight, norm.eps, ops, pdl

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return self.ops.rms_norm(x, residual, self.weight, self.eps, pdl=self.pdl)


class NativeSiluAndMul(SiluAndMul):
    """SiLU-and-mul through the native CPU kernel (contiguous inputs; others take the PyTorch path)."""

    def __init__(self, ops) -> None:
        super().__init__()
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.silu_and_mul(x) if x.is_contiguous() else silu_and_mul(x)


class TritonSiluAndMul(SiluAndMul):
    """SiLU-and-mul as one Triton kernel."""

    def __init__(self, ops, pdl: bool) -> None:
        super().__init__()
        self.ops, self.pdl = ops, pdl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.silu_and_mul(x, pdl=self.pdl)


# ---- attention and the MLP ---------------------------------------------------------------------------------------


def _adopt(cls: type[nn.Module], module: nn.Module, **extra) -> nn.Module:
    """A ``cls`` (a subclass of ``module``'s class) holding ``module``'s state: the same parameters, children and
    settings, plus ``extra`` plain attributes."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    new.__dict__.update(extra)
    return new


class _InPlaceRotaryBase(Attention):
    """An attention whose query and key transform runs in place on the fused q/k/v projection output
    (``rotate_qk``, defined by each subclass), before the backend's attention."""

    def rotate_qk(self, positions, qkv, kv_cache, metadata) -> dict:
        raise NotImplementedError

    def attend_qkv(self, positions, qkv, kv_cache, metadata):
        options = self.rotate_qk(positions, qkv, kv_cache, metadata)
        q, k, v = self.split_heads(qkv)
        return self.attend_heads(q, k, v, kv_cache, metadata, **options).reshape(-1, self.q_size)


class InplaceRotaryAttention(_InPlaceRotaryBase):
    """Attention whose rotary embedding runs as one kernel, in place on the fused q/k/v projection output (the CPU
    kernel and the Triton kernel share this signature). Only for layers without q/k norms."""

    rotary_inplace = None  # set by ``use_device_kernels``: ``ops.rotary_inplace`` with its launch options
    stores_kv = False  # set by ``use_device_kernels``: the Triton kernel, and the backend is the Triton one

    def rotate_qk(self, positions, qkv, kv_cache, metadata) -> dict:
        """The rotary embedding in place on ``qkv``'s query and key heads; returns the backend options that follow
        from it (``kv_stored`` when the kernel also wrote the new keys and values: see :func:`_kernel_stores_kv`)."""
        if _kernel_stores_kv(self, qkv, kv_cache):
            self.rotary_inplace(qkv, positions, self.rotary.cos_cache, self.rotary.sin_cache,
                                self.num_heads + self.num_kv_heads, self.head_dim, num_q_heads=self.num_heads,
                                kv_cache=kv_cache, slot_mapping=metadata.slot_mapping, kv_scales=self.kv_scales)
            return {"kv_stored": True}
        self.rotary_inplace(qkv, positions, self.rotary.cos_cache, self.rotary.sin_cache,
                            self.num_heads + self.num_kv_heads, self.head_dim)
        return {}


class MRopeInplaceRotaryAttention(InplaceRotaryAttention):
    """:class:`InplaceRotaryAttention` of a model with M-RoPE (Qwen2-VL). One-row ``positions`` (text tokens and
    every decode row: the three positions equal) read the tables as any rotary layer does; a step with image
    tokens passes ``[3, num_tokens]`` positions, which run the same kernel over per-token cos/sin rows
    (``MRotaryEmbedding.rows``) at positions ``0..T-1``."""

    def rotate_qk(self, positions, qkv, kv_cache, metadata) -> dict:
        if positions.dim() == 1:
            return super().rotate_qk(positions, qkv, kv_cache, metadata)
        cos, sin = self.rotary.rows(positions)
        rows = torch.arange(positions.shape[1], device=positions.device, dtype=positions.dtype)
        self.rotary_inplace(qkv, rows, cos, sin, self.num_heads + self.num_kv_heads, self.head_dim)
        return {}


def _kernel_stores_kv(attention: Attention, qkv: torch.Tensor, kv_cache: torch.Tensor | None) -> bool:
    """Whether ``attention``'s rotary kernel writes this step's keys and values to the cache itself: its
    ``stores_kv`` (the Triton kernel with the Triton attention backend), a cache in the model dtype or an FP8 cache
    with the layer's scales, and ``INFERNEO_CUDA_ROTARY_STORES_KV`` on (read here, at each call)."""
    return (attention.stores_kv and kv_cache is not None and envs.cuda_rotary_stores_kv()
            and (kv_cache.dtype == qkv.dtype or (is_fp8_kv_cache(kv_cache) and attention.kv_scales is not None)))


class QKNormRotaryAttention(_InPlaceRotaryBase):
    """Attention whose per-head q/k RMSNorms and rotary embedding run as one kernel, in place on the fused q/k/v
    projection output (``triton_ops.qk_norm_rotary_inplace``). The norms' weights and ``eps`` are read from the
    ``q_norm``/``k_norm`` children, which stay (their parameters keep their names)."""

    qk_norm_rotary = None  # set by ``use_device_kernels``: the kernel with its launch options and norm kind
    stores_kv = False  # set by ``use_device_kernels``: the backend is the Triton one, whose cache layout it writes

    def rotate_qk(self, positions, qkv, kv_cache, metadata) -> dict:
        """The q/k norms and rotary embedding in place on ``qkv``; returns the backend options that follow from it
        (``kv_stored`` when the kernel also wrote the new keys and values)."""
        store = _kernel_stores_kv(self, qkv, kv_cache)
        self.qk_norm_rotary(qkv, positions, self.rotary.cos_cache, self.rotary.sin_cache, self.num_heads,
                            self.num_kv_heads, self.head_dim, self.q_norm.weight, self.k_norm.weight,
                            self.q_norm.eps, kv_cache=kv_cache if store else None,
                            slot_mapping=metadata.slot_mapping if store else None,
                            kv_scales=self.kv_scales if store else None)
        return {"kv_stored": True} if store else {}


class NativeDecoderLayer(DecoderLayer):
    """A dense decoder layer on CPU that calls its native kernels itself: the same kernels in the same order as
    the plain modules' forwards (norm, q/k/v projection, rotary in place, the backend's attention, output
    projection, residual add and norm, gate/up, SiLU-and-mul, down), without the module dispatch and the Python
    frames between them, which on two cores cost 5-8% of a small model's decode step. A quantized projection that
    is one call (``QuantizedLinear.single_matmul``) is called directly. Submodules are read at each call, so a
    projection or MLP replaced later (LoRA wraps them after the kernels go in) is called as the module it is now;
    an attention or norm of another kind takes the plain layer's forward."""

    quantized_linear: type | None = None  # set by ``use_device_kernels``: QuantizedLinear (imported there)

    def _linear(self, layer: nn.Module):
        """What to call for ``layer``: its one-call matmul, or the module."""
        if type(layer) is self.quantized_linear and layer.bias is None and layer.single_matmul is not None:
            return layer.single_matmul
        return layer

    def forward(self, positions, hidden, residual, kv_cache, metadata):
        modules = self._modules
        attn, norm, post_norm = modules["self_attn"], modules["input_layernorm"], modules["post_attention_layernorm"]
        if (type(attn) not in _NATIVE_LAYER_ATTENTION or type(norm) is not NativeRMSNorm
                or type(post_norm) is not NativeRMSNorm):
            return super().forward(positions, hidden, residual, kv_cache, metadata)
        if residual is None:
            residual = hidden
            hidden = norm.forward(hidden)
        else:
            hidden, residual = norm.forward(hidden, residual)
        parts = attn._modules
        qkv = self._linear(parts["qkv_proj"])(hidden)
        hidden = self._linear(parts["o_proj"])(attn.attend_qkv(positions, qkv, kv_cache, metadata))
        hidden, residual = post_norm.forward(hidden, residual)
        mlp = modules["mlp"]
        if type(mlp) is MLP and type(mlp._modules["act_fn"]) is NativeSiluAndMul:
            layers = mlp._modules
            gate_up = layers["gate_up_proj"]
            # a GGUF gate/up projection with SiLU-and-mul in the same kernel pass, at the rows that pass takes
            fused = (gate_up.silu_matmul if type(gate_up) is self.quantized_linear and gate_up.bias is None
                     else None)
            act = fused(hidden) if fused is not None else None
            if act is None:
                act = layers["act_fn"].forward(self._linear(gate_up)(hidden))
            return self._linear(layers["down_proj"])(act), residual
        return mlp(hidden), residual


# The attentions whose layers NativeDecoderLayer runs itself.
_NATIVE_LAYER_ATTENTION = (InplaceRotaryAttention, MRopeInplaceRotaryAttention, QKNormRotaryAttention)


def _fused_qk_norm_attention(module: nn.Module, kernel, cuda: bool = True) -> QKNormRotaryAttention | None:
    """``module`` as a :class:`QKNormRotaryAttention` calling ``kernel`` when it is a plain ``Attention`` whose q/k
    norms are both plain ``RMSNorm`` or both Gemma's offset norm with one ``eps``; else None. On CUDA (``cuda``)
    the kernel also writes the new keys and values when the backend is the Triton one."""
    if type(module) is not Attention or module.q_norm is None:
        return None
    kind = type(module.q_norm)
    if kind not in (RMSNorm, GemmaRMSNorm) or type(module.k_norm) is not kind or module.q_norm.eps != module.k_norm.eps:
        return None
    return _adopt(QKNormRotaryAttention, module,
                  qk_norm_rotary=functools.partial(kernel, weight_offset=kind is GemmaRMSNorm),
                  stores_kv=cuda and _triton_backend(module))


def _triton_backend(attention: Attention) -> bool:
    """Whether ``attention`` runs the Triton attention backend, whose cache layout the rotary kernels write (a CUDA
    model's: importing it imports Triton)."""
    from inferneo.attention.triton_backend import TritonBackend

    return type(attention.backend) is TritonBackend


def _native_qk_norm_rotary(ops):
    """The CPU kernel with :class:`QKNormRotaryAttention`'s call signature (it never writes the cache itself)."""

    def qk_norm_rotary(qkv, positions, cos_cache, sin_cache, num_q_heads, num_kv_heads, head_dim, q_weight, k_weight,
                       eps, *, weight_offset=False, kv_cache=None, slot_mapping=None, kv_scales=None):
        ops.qk_norm_rotary_inplace(qkv, positions, cos_cache, sin_cache, num_q_heads, num_kv_heads, head_dim,
                                   q_weight, k_weight, eps, weight_offset)

    return qk_norm_rotary


class RowPassMLP(MLP):
    """A CPU MLP over packed linears: long prompts run in passes of rows whose gate/up activation stays in cache
    (``cpu_linear.mlp_row_chunk``); shorter inputs run in one pass."""

    def forward(self, x):
        rows = mlp_row_chunk(x, self.gate_up_proj, self.down_proj)
        if rows is None:
            return super().forward(x)
        out = x.new_empty(x.shape[0], self.down_proj.out_features)
        for start in range(0, x.shape[0], rows):
            self.down_proj(self.act_fn(self.gate_up_proj(x[start : start + rows])), out=out[start : start + rows])
        return out


class GemvSiluMLP(MLP):
    """A GPU MLP whose gate/up projection and SiLU-and-mul run as one GEMV kernel for a one-row input in half
    precision (a batch-1 decode step); other inputs project, then activate."""

    gemv: DecodeGemv | None = None  # set by ``use_device_kernels``

    def forward(self, x):
        if self.gemv.applies(x, self.gate_up_proj.weight):
            return self.down_proj(self.gemv.silu_mul(x, self.gate_up_proj.weight))
        return super().forward(x)


class QuantizedSiluMLP(MLP):
    """A GPU MLP whose quantized gate/up layer runs its projection and SiLU-and-mul as one kernel where its method
    can for the input's rows (``method.silu_mul`` returns the activation: the FP8 GEMV at a few rows, the W4A16 GEMV at one row); other
    inputs project, then activate."""

    def forward(self, x):
        fused = self.gate_up_proj.method.silu_mul(self.gate_up_proj, x)
        return super().forward(x) if fused is None else self.down_proj(fused)



def _method_hook(layer: nn.Module, name: str):
    """``layer.method.<name>`` when ``layer`` is a plain quantized layer (not a LoRA wrapper: callers check at each
    call) whose method has that callable, else None."""
    from inferneo.quantization.base import QuantizedLinear

    hook = getattr(getattr(layer, "method", None), name, None) if type(layer) is QuantizedLinear else None
    return hook if callable(hook) else None


def _norm_linear(layer: nn.Module, x, residual, norm: RMSNorm, silu_mul: bool = False):
    """``layer.method.norm_apply`` (the norm inside the layer's kernel: FP8 at one row) when ``layer`` is a plain
    quantized layer whose method has it (not a LoRA wrapper: checked at each call), else None."""
    norm_apply = _method_hook(layer, "norm_apply")
    if norm_apply is None:
        return None
    return norm_apply(layer, x, residual, norm.weight, norm.eps, silu_mul=silu_mul)


class NormFusedQuantLayer(DecoderLayer):
    """A dense decoder layer whose RMSNorms run inside the quantized layers that read them where their method can
    (``norm_apply``: the FP8 GEMV at one row, ``triton_fp8_gemv.fp8_norm_gemv``): the input norm inside the q/k/v
    projection, the residual add and post-attention norm inside the gate/up projection with its SiLU-and-mul.
    Other inputs take the plain modules."""

    def forward(self, positions, hidden, residual, kv_cache, metadata):
        fused = _norm_linear(self.self_attn.qkv_proj, hidden, residual, self.input_layernorm)
        if fused is None:
            return super().forward(positions, hidden, residual, kv_cache, metadata)
        qkv, total = fused
        residual = hidden if residual is None else total
        return self.feed_forward(self.self_attn.forward_qkv(positions, qkv, kv_cache, metadata), residual)

    def feed_forward(self, hidden, residual):
        mlp = self.mlp
        fused = _norm_linear(mlp.gate_up_proj, hidden, residual, self.post_attention_layernorm, silu_mul=True)
        if fused is None:
            return super().feed_forward(hidden, residual)
        act, residual = fused
        return mlp.down_proj(act), residual


def _residual_norm_linear(layer: nn.Module, x, residual, norm: RMSNorm, x_half: torch.Tensor | None = None,
                          half: bool = False) -> ScaledRow | None:
    """``residual += layer(x)`` with the RMSNorm ``norm`` of the sum left to the next layer's kernel
    (``method.residual_norm_apply``: the W4A16 h2 GEMV at one row) when ``layer`` is a plain quantized layer whose
    method has it and takes ``x`` (checked at each call: a LoRA wrapper does not); else None, nothing written.
    ``x_half`` / ``half``: float16 copies of bfloat16 rows (``kernels/scaled_row.py``), ``x``'s / the result's."""
    apply = _method_hook(layer, "residual_norm_apply")
    if apply is None or residual is None:
        return None
    return apply(layer, x, residual, norm.weight, norm.eps, x_half=x_half, half=half)


def _scaled_linear(layer: nn.Module, row: ScaledRow, residual: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
    """``layer(norm(residual))`` from ``row``, the :class:`ScaledRow` of ``residual``: in one kernel where the
    layer's method reads it (``scaled_apply``), else the norm (of the sum alone: the same row the fused add + norm
    gives), then the layer."""
    apply = _method_hook(layer, "scaled_apply")
    out = apply(layer, row) if apply is not None else None
    return layer(norm(residual)) if out is None else out


def _scaled_gated_activation(mlp: nn.Module, row: ScaledRow, residual: torch.Tensor, norm: RMSNorm,
                             half: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``act_fn(gate_up_proj(norm(residual)))`` of a gated MLP from ``row``: the fused gate/up + SiLU launch with
    the norm's ``1 / rms`` where the layer's method has one for the row (``scaled_apply(silu_mul=True)``), else
    the projection from ``row`` (:func:`_scaled_linear`), then the activation. Returns the activation and, with
    ``half`` (a bfloat16 row) where the fused launch ran, its float16 copy (``kernels/scaled_row.py``)."""
    gate_up = mlp.gate_up_proj
    apply = _method_hook(gate_up, "scaled_apply")
    if type(mlp) is QuantizedSiluMLP and apply is not None:
        width = gate_up.out_features // 2
        act_half = (row.scaled.new_empty((1, width), dtype=torch.float16)
                    if half and row.scaled.dtype == torch.bfloat16 and width % 8 == 0 else None)
        act = apply(gate_up, row, silu_mul=True, half_out=act_half)
        if act is not None:
            return act, act_half
    return mlp.act_fn(_scaled_linear(gate_up, row, residual, norm)), None


class EpilogueNormLayer(DecoderLayer):
    """A dense decoder layer whose RMSNorms, at one row, run in the epilogues of the quantized GEMVs around them
    (W4A16 or FP8 h2 kernels; see ``kernels/scaled_row.py``): the output projection adds to the residual and hands
    the post-attention norm to the gate/up projection; the down projection does the same with the next layer's
    input norm (``next_input_norm``, set by :func:`use_epilogue_norm_layers` when that layer is one of these too),
    which then receives a :class:`ScaledRow` as its hidden state. Where a kernel cannot take its part (more rows,
    another launch), that step runs as the plain layer does."""

    next_input_norm = None  # set by ``use_epilogue_norm_layers``: a tuple holding the next layer's input norm

    def forward(self, positions, hidden, residual, kv_cache, metadata):
        attn, mlp = self.self_attn, self.mlp
        if isinstance(hidden, ScaledRow):
            qkv = _scaled_linear(attn.qkv_proj, hidden, residual, self.input_layernorm)
        else:
            if residual is None:
                residual = hidden
                hidden = self.input_layernorm(hidden)
            else:
                hidden, residual = self.input_layernorm(hidden, residual)
            qkv = attn.qkv_proj(hidden)
        heads = attn.attend_qkv(positions, qkv, kv_cache, metadata)
        half_copies = _method_hook(attn.o_proj, "half_copies")  # float16 copies of the rows between the GEMVs
        half = half_copies is not None and half_copies()
        row = _residual_norm_linear(attn.o_proj, heads, residual, self.post_attention_layernorm, half=half)
        if row is None:
            return self.feed_forward(attn.o_proj(heads), residual)
        act, act_half = _scaled_gated_activation(mlp, row, residual, self.post_attention_layernorm, half)
        if self.next_input_norm is not None:
            row = _residual_norm_linear(mlp.down_proj, act, residual, self.next_input_norm[0], act_half, half)
            if row is not None:
                return row, residual
        return mlp.down_proj(act), residual


def _dense_silu_layer_whose_linears(m: nn.Module, takes) -> bool:
    """Whether ``m`` is a plain :class:`DecoderLayer` with Triton RMSNorms, one of this module's attentions and a
    plain gated MLP (SiLU), whose four linears (q/k/v, output, gate/up, down) all satisfy ``takes``."""
    return (type(m) is DecoderLayer and type(m.mlp) in (MLP, QuantizedSiluMLP)
            and type(m.self_attn) in (Attention, *_NATIVE_LAYER_ATTENTION)
            and type(m.input_layernorm) is TritonRMSNorm and type(m.post_attention_layernorm) is TritonRMSNorm
            and type(m.mlp.act_fn) in (SiluAndMul, TritonSiluAndMul)
            and all(takes(x) for x in (m.self_attn.qkv_proj, m.self_attn.o_proj, m.mlp.gate_up_proj,
                                       m.mlp.down_proj)))


def _epilogue_method(layer: EpilogueNormLayer) -> type:
    """The quantization method class of an :class:`EpilogueNormLayer`'s linears (one for all four)."""
    return type(layer.self_attn.qkv_proj.method)


def use_epilogue_norm_layers(model: nn.Module) -> int:
    """Make every plain :class:`DecoderLayer` of ``model.layers`` with Triton RMSNorms, one of this module's
    attentions and a plain gated MLP (SiLU) whose four linears are quantized with one method that fuses the norms
    into its epilogues (``residual_norm_apply`` and ``scaled_apply``) and has that switched on
    (``norm_epilogue()``) an :class:`EpilogueNormLayer`, and tell each the next one's input norm where the next is
    one too, of the same method (a row's float16 copy has its method's form); returns how many changed."""
    def fuses(layer) -> bool:
        switch = _method_hook(layer, "norm_epilogue")
        return (_method_hook(layer, "residual_norm_apply") is not None
                and _method_hook(layer, "scaled_apply") is not None and layer.bias is None
                and switch is not None and switch())

    def one_method(m: nn.Module) -> bool:
        linears = (m.self_attn.qkv_proj, m.self_attn.o_proj, m.mlp.gate_up_proj, m.mlp.down_proj)
        return len({type(x.method) for x in linears}) == 1

    layers = getattr(model, "layers", None)
    if layers is None:
        return 0
    changed = 0
    for i, m in enumerate(layers):
        if not _dense_silu_layer_whose_linears(m, fuses) or not one_method(m):
            continue
        layers[i] = _adopt(EpilogueNormLayer, m)
        changed += 1
    for layer, following in zip(list(layers)[:-1], list(layers)[1:], strict=True):
        if (type(layer) is EpilogueNormLayer and type(following) is EpilogueNormLayer
                and _epilogue_method(layer) is _epilogue_method(following)):
            layer.next_input_norm = (following.input_layernorm,)  # a tuple: not a child module
    return changed


def use_norm_fused_quant_layers(model: nn.Module) -> int:
    """Make every plain :class:`DecoderLayer` of ``model`` with Triton RMSNorms, one of this module's attentions
    and a plain gated MLP whose q/k/v and gate/up layers are quantized with a method that fuses the norm
    (``norm_apply``) a :class:`NormFusedQuantLayer`; returns how many changed."""
    def fuses(layer) -> bool:
        return _method_hook(layer, "norm_apply") is not None

    def replace(m: nn.Module) -> nn.Module | None:
        if (type(m) is not DecoderLayer or type(m.mlp) not in (MLP, QuantizedSiluMLP)
                or type(m.self_attn) not in (Attention, *_NATIVE_LAYER_ATTENTION)
                or type(m.input_layernorm) is not TritonRMSNorm
                or type(m.post_attention_layernorm) is not TritonRMSNorm
                or not fuses(m.self_attn.qkv_proj) or not fuses(m.mlp.gate_up_proj)
                or m.mlp.gate_up_proj.bias is not None):
            return None
        return _adopt(NormFusedQuantLayer, m)

    before = sum(isinstance(m, NormFusedQuantLayer) for m in model.modules())
    _swap_children(model, replace)
    return sum(isinstance(m, NormFusedQuantLayer) for m in model.modules()) - before


def _norm_with_copy(norm: TritonRMSNorm, x: torch.Tensor, residual: torch.Tensor | None):
    """``norm(x, residual)`` that also writes the normalized row's scaled float16 copy: ``(normalized, residual,
    copy)`` (the residual is ``x`` itself when none came in, as ``DecoderLayer.forward`` keeps it)."""
    half = x.new_empty(x.shape, dtype=torch.float16)
    if residual is None:
        return norm.ops.rms_norm(x, None, norm.weight, norm.eps, pdl=norm.pdl, half_out=half), x, half
    normed, residual = norm.ops.rms_norm(x, residual, norm.weight, norm.eps, pdl=norm.pdl, half_out=half)
    return normed, residual, half


def _copy_linear(layer: nn.Module, x: torch.Tensor, x_half: torch.Tensor, half_out: torch.Tensor | None = None,
                 silu_mul: bool = False) -> torch.Tensor | None:
    """``method.copy_apply`` of a plain quantized layer (checked at each call: not a LoRA wrapper), or None where
    it has none or it does not take ``x`` (nothing written)."""
    apply = _method_hook(layer, "copy_apply")
    return None if apply is None else apply(layer, x, x_half, half_out, silu_mul=silu_mul)


class HalfCopyQuantLayer(DecoderLayer):
    """A dense decoder layer of FP8 linears whose one-row GEMVs read scaled float16 copies of their bfloat16 inputs
    (``INFERNEO_FP8_HALF_COPIES``, read at each call): the RMSNorms write the copy beside the normalized row
    (``_triton_elementwise.rms_norm(half_out=...)``) for the q/k/v and gate/up GEMVs, and the gate/up + SiLU GEMV
    writes one beside the activation for the down projection (``triton_fp8_gemv.scaled_half``). Each GEMV then
    loads its activations as they are instead of converting each value; the same bits. Other inputs, and any step
    a layer's method does not take, run as the plain layer does."""

    def forward(self, positions, hidden, residual, kv_cache, metadata):
        if hidden.dim() != 2 or hidden.shape[0] != 1 or hidden.dtype != torch.bfloat16 or not envs.fp8_half_copies():
            return super().forward(positions, hidden, residual, kv_cache, metadata)
        attn, mlp = self.self_attn, self.mlp
        hidden, residual, half = _norm_with_copy(self.input_layernorm, hidden, residual)
        qkv = _copy_linear(attn.qkv_proj, hidden, half)
        heads = attn.attend_qkv(positions, attn.qkv_proj(hidden) if qkv is None else qkv, kv_cache, metadata)
        hidden, residual, half = _norm_with_copy(self.post_attention_layernorm, attn.o_proj(heads), residual)
        act_half = hidden.new_empty((1, mlp.gate_up_proj.out_features // 2), dtype=torch.float16)
        act = _copy_linear(mlp.gate_up_proj, hidden, half, act_half, silu_mul=True)
        if act is None:
            return mlp(hidden), residual
        out = _copy_linear(mlp.down_proj, act, act_half)
        return (mlp.down_proj(act) if out is None else out), residual


def use_half_copy_quant_layers(model: nn.Module) -> int:
    """Make every plain :class:`DecoderLayer` of ``model`` with Triton RMSNorms, one of this module's attentions and
    a plain gated MLP (SiLU) whose four linears have a method with ``copy_apply`` a :class:`HalfCopyQuantLayer`;
    returns how many changed."""
    def takes(layer) -> bool:
        return _method_hook(layer, "copy_apply") is not None and layer.bias is None

    def replace(m: nn.Module) -> nn.Module | None:
        return _adopt(HalfCopyQuantLayer, m) if _dense_silu_layer_whose_linears(m, takes) else None

    before = sum(isinstance(m, HalfCopyQuantLayer) for m in model.modules())
    _swap_children(model, replace)
    return sum(isinstance(m, HalfCopyQuantLayer) for m in model.modules()) - before


def use_expert_kernel(model: nn.Module, kernel: ExpertKernel) -> int:
    """Route every :class:`FusedMoE` of ``model`` through ``kernel`` (the layer and its parameters stay); returns how
    many layers changed. Layers whose experts a weight format holds in its own layout (``expert_kernel_fixed``: GGUF
    blocks) keep their kernel."""
    layers = [m for m in model.modules() if isinstance(m, FusedMoE) and not m.expert_kernel_fixed]
    for layer in layers:
        layer.expert_kernel = kernel
    return len(layers)


_PLAIN_LINEARS = (nn.Linear, DecodeLinear)  # a router whose weight (and bias) is all its forward reads


class NormFusedMoeLayer(DecoderLayer):
    """A decoder layer with a mixture-of-experts block whose two RMSNorms run inside the kernels that read them,
    for a few tokens (a decode step): at one row in half precision the input norm and the q/k/v projection as one
    GEMV (``triton_gemv.norm_gemv``; ``norm_gemv`` set), and up to ``NORM_ROUTE_MAX_TOKENS`` tokens the residual
    add, post-attention norm, router linear and routing as one launch (``triton_routing.norm_route_topk``; opt-in,
    ``norm_router`` set), else at one row the residual add and post-attention norm inside the router GEMV, which
    also stores the normed row for the experts (``router_gemv`` set). Other inputs take the plain modules."""

    norm_router = None  # set by ``use_norm_fused_layers`` (INFERNEO_CUDA_NORM_ROUTER): a ``triton_routing.NormRouter``
    norm_gemv: DecodeGemv | None = None  # set by ``use_norm_fused_layers`` where the q/k/v projection may fuse
    # set by ``use_norm_fused_layers`` (INFERNEO_CUDA_NORM_ROUTER_GEMV): at one row the residual add and
    # post-attention norm inside the router GEMV, which stores the normed row for the experts
    router_gemv: DecodeGemv | None = None

    def forward(self, positions, hidden, residual, kv_cache, metadata):
        qkv_proj, norm = self.self_attn.qkv_proj, self.input_layernorm
        gemv = self.norm_gemv
        # (checked at each call: LoRA may wrap the projection after this layer was made)
        if (gemv is None or type(qkv_proj) is not DecodeLinear or not gemv.norm_applies(hidden, qkv_proj.weight)
                or (residual is not None and not residual.is_contiguous())):
            return super().forward(positions, hidden, residual, kv_cache, metadata)
        qkv, total = gemv.norm_linear(hidden, residual, norm.weight, norm.eps, qkv_proj.weight, qkv_proj.bias)
        residual = hidden if residual is None else total
        hidden = self.self_attn.forward_qkv(positions, qkv, kv_cache, metadata)
        return self.feed_forward(hidden, residual)

    def feed_forward(self, hidden, residual):
        moe, norm = self.mlp, self.post_attention_layernorm
        if (self.norm_router is not None and type(moe.gate) in _PLAIN_LINEARS
                and self.norm_router.applies(hidden, residual)):
            normed, residual, routed = self.norm_router(hidden, residual, norm.weight, norm.eps, moe.gate.weight,
                                                        moe.gate.bias)
            return moe(normed, routed), residual
        gemv = self.router_gemv
        if (gemv is not None and type(moe.gate) in _PLAIN_LINEARS and residual is not None
                and residual.is_contiguous() and gemv.norm_applies(hidden, moe.gate.weight)):
            # residual add + norm + router logits in one GEMV (no RMSNorm launch); the routing kernel and the
            # experts then read its logits and normed row
            logits, residual, normed = gemv.norm_linear(hidden, residual, norm.weight, norm.eps, moe.gate.weight,
                                                        moe.gate.bias, store_normed=True)
            return moe(normed, moe.router(logits)), residual
        return super().feed_forward(hidden, residual)


def use_norm_fused_layers(model: nn.Module, gemv: DecodeGemv | None) -> int:
    """Make every plain :class:`DecoderLayer` of ``model`` whose feed-forward block is a :class:`FusedMoE` with the
    Triton router (``use_triton_routers`` first), a plain linear router and Triton RMSNorms a
    :class:`NormFusedMoeLayer` (its q/k/v GEMV fused with the input norm too when ``gemv`` is given, the projection a
    ``DecodeLinear`` and the attention one of this module's); returns how many changed."""
    from inferneo.kernels.triton_routing import NormRouter, TritonRouter

    norm_router = envs.cuda_norm_router()  # off by default: slower than its three launches on an H200
    norm_in_router = envs.cuda_norm_router_gemv()

    def replace(m: nn.Module) -> nn.Module | None:
        if type(m) is not DecoderLayer or not isinstance(m.mlp, FusedMoE):
            return None
        if not isinstance(m.mlp.router, TritonRouter) or type(m.post_attention_layernorm) is not TritonRMSNorm:
            return None
        if type(m.mlp.gate) not in _PLAIN_LINEARS:  # not a LoRA or quantized wrapper
            return None
        attention = type(m.self_attn) in (Attention, InplaceRotaryAttention, QKNormRotaryAttention)
        fuse_qkv = (gemv is not None and attention and type(m.self_attn.qkv_proj) is DecodeLinear
                    and type(m.input_layernorm) is TritonRMSNorm)
        if not fuse_qkv and not norm_router and not (norm_in_router and gemv is not None):
            return None
        return _adopt(NormFusedMoeLayer, m, norm_gemv=gemv if fuse_qkv else None,
                      norm_router=NormRouter(m.mlp.router, m.mlp.gate.weight.device) if norm_router else None,
                      router_gemv=gemv if norm_in_router else None)

    before = sum(isinstance(m, NormFusedMoeLayer) for m in model.modules())
    _swap_children(model, replace)
    return sum(isinstance(m, NormFusedMoeLayer) for m in model.modules()) - before


def use_triton_routers(model: nn.Module, pdl: bool) -> int:
    """Give every :class:`FusedMoE` of ``model`` whose router is a plain softmax top-k one the Triton routing kernel
    (``kernels/triton_routing.py``; imports Triton); returns how many layers changed."""
    from inferneo.kernels.triton_routing import triton_router_for

    changed = 0
    for layer in (m for m in model.modules() if isinstance(m, FusedMoE)):
        router = triton_router_for(layer.router, pdl)
        if router is not None:
            layer.router, changed = router, changed + 1
    return changed


# ---- the transform -----------------------------------------------------------------------------------------------


def _swap_children(model: nn.Module, replace) -> None:
    """``setattr(parent, name, replace(child))`` for every child where ``replace`` returns a module."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = replace(child)
            if new is not None:
                setattr(parent, name, new)


def use_device_kernels(model: nn.Module, device: torch.device, kernels: KernelConfig,
                       tp: TensorParallelGroup | None = None, *, max_num_seqs: int | None = None) -> Counter:
    """Swap the plain modules of a built model with loaded weights for the kernels of ``device`` that ``kernels``
    allows (see the module doc), then fuse the tensor-parallel all-reduces into the norms where ``tp`` has peer
    memory. Call once. Returns how many modules of each class the model holds afterwards. ``max_num_seqs`` bounds
    the decode rows the CPU linear kernels are timed at (``cpu_linear_tune``)."""
    ops = norm = gemma_norm = act = rotary = None
    if device.type == "cpu":
        ops = cpu_kernels(kernels)
        if ops is not None:
            norm, gemma_norm = functools.partial(NativeRMSNorm, ops=ops), functools.partial(NativeGemmaRMSNorm, ops=ops)
            act, rotary = functools.partial(NativeSiluAndMul, ops), ops.rotary_inplace
    elif device.type == "cuda":
        pdl = kernels.pdl_on(device)
        ops = triton_ops_for(device, kernels)
        if ops is not None:
            norm = functools.partial(TritonRMSNorm, ops=ops, pdl=pdl)
            act = functools.partial(TritonSiluAndMul, ops, pdl)
            rotary = functools.partial(ops.rotary_inplace, pdl=pdl)
    if device.type == "cuda" and ops is not None and kernels.cuda_fused_qk_norm_rope:
        # before the norm swap below, which turns the q/k norms (unused by the fused layer) into Triton ones
        _swap_children(model, functools.partial(_fused_qk_norm_attention,
                                                kernel=functools.partial(ops.qk_norm_rotary_inplace, pdl=pdl)))
    elif device.type == "cpu" and ops is not None:  # the same, with the native kernel (before the norm swap)
        _swap_children(model, functools.partial(_fused_qk_norm_attention, kernel=_native_qk_norm_rotary(ops),
                                                cuda=False))
    if ops is not None:
        _swap_children(model, lambda m: norm(m) if type(m) is RMSNorm else act() if type(m) is SiluAndMul else None)
        _swap_children(model, lambda m: _adopt(MRopeInplaceRotaryAttention if isinstance(m.rotary, MRotaryEmbedding)
                                               else InplaceRotaryAttention, m, rotary_inplace=rotary,
                                               stores_kv=device.type == "cuda" and _triton_backend(m))
                       if type(m) is Attention and m.q_norm is None else None)
    if gemma_norm is not None:
        _swap_children(model, lambda m: gemma_norm(m) if type(m) is GemmaRMSNorm else None)
    if device.type == "cpu" and ops is not None:
        from inferneo.quantization.base import QuantizedLinear

        _swap_children(model, lambda m: _adopt(NativeDecoderLayer, m, quantized_linear=QuantizedLinear)
                       if type(m) is DecoderLayer and type(m.self_attn) in _NATIVE_LAYER_ATTENTION else None)
    if device.type == "cuda" and ops is not None:
        from inferneo.kernels.triton_moe import triton_fused_experts  # imports triton: CUDA only

        if use_expert_kernel(model, triton_fused_experts):
            logger.info("mixture-of-experts layers use the Triton fused-experts kernels")
        if kernels.cuda_fused_routing and use_triton_routers(model, pdl):
            logger.info("mixture-of-experts routers use the Triton routing kernel")

    # Linear layers, then the MLPs whose path depends on them.
    if device.type == "cpu" and kernels.cpu_onednn_linear:
        pack_linears(model, kernels, decode_rows=min(DECODE_ROWS, max_num_seqs or DECODE_ROWS))
        packed = (PanelLinear, PackedLinear)
        _swap_children(model, lambda m: _adopt(RowPassMLP, m) if type(m) is MLP and isinstance(m.gate_up_proj, packed)
                       and isinstance(m.down_proj, packed) else None)
    elif device.type == "cuda":
        gemv = decode_gemv(device, kernels)
        use_decode_linears(model, gemv)
        if gemv is not None and gemv.silu:
            _swap_children(model, lambda m: _adopt(GemvSiluMLP, m, gemv=gemv)
                           if type(m) is MLP and isinstance(m.gate_up_proj, nn.Linear)  # not a quantized layer
                           and m.gate_up_proj.bias is None else None)

    if device.type == "cuda" and kernels.gemv_silu:
        _swap_children(model, lambda m: _adopt(QuantizedSiluMLP, m) if type(m) is MLP
                       and callable(getattr(getattr(m.gate_up_proj, "method", None), "silu_mul", None)) else None)

    if tp is not None:
        fuse_peer_norms(model, tp)
    if (device.type == "cuda" and ops is not None and kernels.gemv_silu and envs.fp8_norm_gemv()
            and use_norm_fused_quant_layers(model)):
        logger.info("decoder layers run their RMSNorms inside the quantized q/k/v and gate/up GEMVs at one row")
    # (one rank only: a sharded output or down projection holds a partial sum, not yet the residual's addend)
    if (device.type == "cuda" and ops is not None and (tp is None or tp.world_size == 1)
            and use_epilogue_norm_layers(model)):
        logger.info("decoder layers run their RMSNorms in the epilogues of the quantized GEMVs at one row")
    if device.type == "cuda" and ops is not None and use_half_copy_quant_layers(model):
        logger.info("FP8 decoder layers hand their one-row GEMVs float16 copies of the rows (when switched on)")
    if (device.type == "cuda" and ops is not None and kernels.cuda_fused_routing
            and use_norm_fused_layers(model, decode_gemv(device, kernels))):
        logger.info("mixture-of-experts layers run their norms inside the q/k/v GEMV and the routing kernel")
    counts = Counter(type(module).__name__ for module in model.modules())
    logger.info("kernels on %s: %s", device, ", ".join(f"{counts[name]} {name}" for name in sorted(counts)
                                                      if name in _REPORTED) or "PyTorch modules only")
    return counts


_REPORTED = {"NativeDecoderLayer", "NativeRMSNorm", "NativeGemmaRMSNorm", "TritonRMSNorm", "NativeSiluAndMul",
             "TritonSiluAndMul", "InplaceRotaryAttention", "QKNormRotaryAttention", "NormFusedMoeLayer",
             "NormFusedQuantLayer", "EpilogueNormLayer", "HalfCopyQuantLayer", "RowPassMLP", "GemvSiluMLP",
             "QuantizedSiluMLP", "PanelLinear", "PackedLinear", "DecodeLinear", "PeerFusedRMSNorm"}
