"""Shims for two gaps of Triton 3.6's CPU interpreter with numpy 2, for tests that run kernels under
``TRITON_INTERPRET=1``: loop bounds and other scalars held as 1-element arrays (``__index__``), and ``tl.dot`` on
bfloat16 (stored as raw uint16 bits, widened here to float32). Call :func:`patch_interpreter` once, after importing
triton with the interpreter switched on."""

from __future__ import annotations

import numpy as np


def patch_interpreter() -> None:
    """Install the shims (idempotent)."""
    from triton.runtime import interpreter

    if getattr(interpreter, "_inferneo_patched", False):
        return
    patch_tensor = interpreter._patch_lang_tensor

    def patched_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    create_dot = interpreter.InterpreterBuilder.create_dot

    def widen(handle):
        if handle.data.dtype != np.uint16:  # bfloat16 bits
            return handle
        bits = handle.data.astype(np.uint32) << 16
        return interpreter.TensorHandle(bits.view(np.float32), interpreter.tl.float32)

    def patched_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter._patch_lang_tensor = patched_tensor
    interpreter.InterpreterBuilder.create_dot = patched_dot
    interpreter._inferneo_patched = True


def round_e4m3_to_nearest() -> None:
    """Triton 3.6's interpreter converts float32 to e4m3 by truncating the mantissa without carrying into the
    exponent; GPUs round to nearest even (``cvt.rn.satfinite``), as PyTorch does: convert through PyTorch
    (idempotent)."""
    import torch
    import triton.language as tl
    from triton.runtime import interpreter

    if getattr(interpreter, "_inferneo_e4m3_rne", False):
        return
    convert = interpreter._convert_float

    def rne(data, src, dst, rounding):
        if dst == tl.float8e4nv and src == tl.float32:
            return torch.from_numpy(np.ascontiguousarray(data)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        return convert(data, src, dst, rounding)

    interpreter._convert_float = rne
    interpreter._inferneo_e4m3_rne = True
