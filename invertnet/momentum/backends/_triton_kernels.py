"""Triton kernels of the exact momentum iteration, for CUDA tensors: the "triton" backend's loops.

One kernel per phase, as the C loops of ``_native.c`` (the backend,
:mod:`invertnet.momentum.backends.triton`, decides when they run): ``advance``, a
forward step with its bit store; ``retreat_position``, undoing the position;
``retreat_velocity``, undoing the velocity and the store; ``backpropagate``, the
gradient update. They give the states of the reference backend's tensor
operations (:mod:`invertnet.momentum.backends.tensor`) bit for bit:

* every value of the state is a whole number below :math:`2^{50}` held in
  float64, and every operation on them is exact (the split products and the
  division-free floor quotient of ``fixed_point.floor_divmod``);
* the roundings that are not exact (the update ``(1 - gamma) f`` to units, the
  state to the functions' dtype) are the same single operations as torch's,
  with fused multiply-adds forbidden (``enable_fp_fusion=False`` at launch), so
  that ``f * mix_units`` is rounded before the rounding to a whole number;
* the functions' inputs are float32 or float64 (conversions to 16-bit floats
  are left to the tensor operations: Triton's interpreter, where the tests
  prove the kernels, does not round them as CUDA does); their outputs may be
  of any floating dtype, as under autocast: widening them is exact.

Rounding to a whole number adds and subtracts :math:`1.5 \\cdot 2^{52}` (exact
half-to-even rounding below :math:`2^{51}`), as the C loops do: libdevice's
``rint`` has no equivalent in Triton's interpreter, which the tests run on the CPU.

The float64 constants are read from a small tensor: Triton passes Python floats
to a kernel as float32. Offsets are int64, so tensors of more than
:math:`2^{31}` elements are walked correctly. Each program walks a contiguous
range of blocks, and the forward step adds one atomic maximum per program and
per magnitude (update, position, velocity) into three float64 slots, as the bit
patterns of the magnitudes (which order as the values do, NaN above infinity).

No ``from __future__ import annotations`` here: Triton before 3.2 or so finds
``tl.constexpr`` parameters by their annotations, which that import makes strings.

Importing this module imports Triton; the backend does so only when a forward
pass on a CUDA tensor first asks for it.
"""

import functools

import torch
import triton
import triton.language as tl

__all__ = ["advance", "backpropagate", "retreat_position", "retreat_velocity"]

#: Elements per block, and blocks at most per program in a grid.
BLOCK = 1024
_WARPS = 4

# The functions' input dtypes served (see invertnet.momentum.backends.triton).
_TRITON_TYPES = {torch.float32: tl.float32, torch.float64: tl.float64}

# Indices into the constants tensor (see _constants).
_N, _D, _N_INVERSE, _N_OFFSET, _D_INVERSE, _D_OFFSET, _MIX_UNITS, _UNIT, _MIX, _KEEP = range(10)


@triton.jit
def _round(a):
    # Half to even for |a| < 2**51: a + 1.5 * 2**52 lies where doubles are 1 apart.
    return (a + 6755399441055744.0) - 6755399441055744.0


@triton.jit
def _floor_quotient(a, inverse, offset):
    # floor(a / b) for whole |a| < 2**50 (proof in fixed_point.floor_divmod).
    return _round(offset + a * inverse)


@triton.jit
def _magnitude_bits(a):
    # |a| as int64 bits: ordered as the magnitudes, NaN above infinity.
    return tl.abs(a).to(tl.int64, bitcast=True)


@triton.jit
def _advance_kernel(
    z_ptr, v_ptr, x_ptr, y_ptr, out_ptr, constants_ptr, peaks_ptr, size, per_program,
    RESIDUAL: tl.constexpr, OUT_TYPE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    n = tl.load(constants_ptr + 0)
    d = tl.load(constants_ptr + 1)
    n_inverse = tl.load(constants_ptr + 2)
    n_offset = tl.load(constants_ptr + 3)
    d_inverse = tl.load(constants_ptr + 4)
    d_offset = tl.load(constants_ptr + 5)
    mix_units = tl.load(constants_ptr + 6)
    unit = tl.load(constants_ptr + 7)
    first = tl.program_id(0).to(tl.int64) * per_program
    peak_update = tl.zeros([BLOCK], dtype=tl.int64)
    peak_x = tl.zeros([BLOCK], dtype=tl.int64)
    peak_v = tl.zeros([BLOCK], dtype=tl.int64)
    for start in range(0, per_program, BLOCK):
        offsets = first + start + tl.arange(0, BLOCK)
        mask = offsets < size
        z = tl.load(z_ptr + offsets, mask=mask, other=0.0)
        v = tl.load(v_ptr + offsets, mask=mask, other=0.0)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        f = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
        if not RESIDUAL:
            f = f - x
        update = _round(f * mix_units)
        a = _floor_quotient(v, d_inverse, d_offset)
        b = v - a * d
        head = _floor_quotient(z, n_inverse, n_offset)
        p = (z - head * n) + n * b
        high = _floor_quotient(p, d_inverse, d_offset)
        z = (p - high * d) + d * head
        v = (high + n * a) + update
        x = x + v * unit
        tl.store(z_ptr + offsets, z, mask=mask)
        tl.store(v_ptr + offsets, v, mask=mask)
        tl.store(x_ptr + offsets, x, mask=mask)
        tl.store(out_ptr + offsets, x.to(OUT_TYPE), mask=mask)
        peak_update = tl.maximum(peak_update, tl.where(mask, _magnitude_bits(update), 0))
        peak_x = tl.maximum(peak_x, tl.where(mask, _magnitude_bits(x), 0))
        peak_v = tl.maximum(peak_v, tl.where(mask, _magnitude_bits(v), 0))
    tl.atomic_max(peaks_ptr + 0, tl.max(peak_update, 0))
    tl.atomic_max(peaks_ptr + 1, tl.max(peak_x, 0))
    tl.atomic_max(peaks_ptr + 2, tl.max(peak_v, 0))


@triton.jit
def _retreat_position_kernel(
    v_ptr, x_ptr, grad_v_ptr, out_ptr, grad_y_ptr, constants_ptr, size, per_program,
    OUT_TYPE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    unit = tl.load(constants_ptr + 7)
    mix = tl.load(constants_ptr + 8)
    first = tl.program_id(0).to(tl.int64) * per_program
    for start in range(0, per_program, BLOCK):
        offsets = first + start + tl.arange(0, BLOCK)
        mask = offsets < size
        v = tl.load(v_ptr + offsets, mask=mask, other=0.0)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        grad_v = tl.load(grad_v_ptr + offsets, mask=mask, other=0.0)
        x = x - v * unit
        tl.store(x_ptr + offsets, x, mask=mask)
        tl.store(out_ptr + offsets, x.to(OUT_TYPE), mask=mask)
        tl.store(grad_y_ptr + offsets, (grad_v * mix).to(OUT_TYPE), mask=mask)


@triton.jit
def _retreat_velocity_kernel(
    z_ptr, v_ptr, x_ptr, y_ptr, constants_ptr, size, per_program,
    RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    n = tl.load(constants_ptr + 0)
    d = tl.load(constants_ptr + 1)
    n_inverse = tl.load(constants_ptr + 2)
    n_offset = tl.load(constants_ptr + 3)
    d_inverse = tl.load(constants_ptr + 4)
    d_offset = tl.load(constants_ptr + 5)
    mix_units = tl.load(constants_ptr + 6)
    first = tl.program_id(0).to(tl.int64) * per_program
    for start in range(0, per_program, BLOCK):
        offsets = first + start + tl.arange(0, BLOCK)
        mask = offsets < size
        z = tl.load(z_ptr + offsets, mask=mask, other=0.0)
        v = tl.load(v_ptr + offsets, mask=mask, other=0.0)
        f = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
        if not RESIDUAL:
            f = f - tl.load(x_ptr + offsets, mask=mask, other=0.0)
        velocity = v - _round(f * mix_units)
        e = _floor_quotient(velocity, n_inverse, n_offset)
        rest = velocity - e * n
        head = _floor_quotient(z, d_inverse, d_offset)
        p = (z - head * d) + d * rest
        high = _floor_quotient(p, n_inverse, n_offset)
        tl.store(z_ptr + offsets, (p - high * n) + n * head, mask=mask)
        tl.store(v_ptr + offsets, high + d * e, mask=mask)


@triton.jit
def _backpropagate_kernel(
    grad_x_ptr, grad_v_ptr, found_ptr, constants_ptr, size, per_program,
    HAS_FOUND: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    mix = tl.load(constants_ptr + 8)
    keep = tl.load(constants_ptr + 9)
    first = tl.program_id(0).to(tl.int64) * per_program
    for start in range(0, per_program, BLOCK):
        offsets = first + start + tl.arange(0, BLOCK)
        mask = offsets < size
        g = tl.load(grad_x_ptr + offsets, mask=mask, other=0.0)
        grad_v = tl.load(grad_v_ptr + offsets, mask=mask, other=0.0)
        if HAS_FOUND:
            g = g + tl.load(found_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
        if not RESIDUAL:
            g = g - mix * grad_v
        tl.store(grad_x_ptr + offsets, g, mask=mask)
        tl.store(grad_v_ptr + offsets, g + keep * grad_v, mask=mask)


@functools.lru_cache(maxsize=64)
def _constants(
    device: torch.device, n: int, d: int, mix_units: float, unit: float, mix: float, keep: float
) -> torch.Tensor:
    """The kernels' float64 constants, on ``device`` (copied there once per set)."""
    values = [0.0] * 10
    values[_N], values[_D] = float(n), float(d)
    values[_N_INVERSE], values[_N_OFFSET] = 1.0 / n, (1.0 - n) / (2.0 * n)
    values[_D_INVERSE], values[_D_OFFSET] = 1.0 / d, (1.0 - d) / (2.0 * d)
    values[_MIX_UNITS], values[_UNIT], values[_MIX], values[_KEEP] = mix_units, unit, mix, keep
    return torch.tensor(values, dtype=torch.float64, device=device)


@functools.lru_cache(maxsize=8)
def _most_programs(device: torch.device) -> int:
    """Programs in a grid at most: a few per multiprocessor, enough to fill the device."""
    if device.type == "cuda":
        return 8 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # Triton's interpreter, on the CPU


def _grid(t: torch.Tensor) -> tuple[int, int]:
    """Programs and elements per program (a multiple of :data:`BLOCK`) for ``t``."""
    size = t.numel()
    blocks = triton.cdiv(size, BLOCK)
    programs = max(1, min(blocks, _most_programs(t.device)))
    return programs, triton.cdiv(blocks, programs) * BLOCK


class _NoDevice:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _on(t: torch.Tensor) -> torch.cuda.device | _NoDevice:
    """Launch on ``t``'s device (Triton launches on the current one)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else _NoDevice()


def advance(
    head: torch.Tensor,
    velocity: torch.Tensor,
    position: torch.Tensor,
    y: torch.Tensor,
    out: torch.Tensor,
    peaks: torch.Tensor,
    n: int,
    d: int,
    mix_units: float,
    unit: float,
    residual: bool,
) -> None:
    """A forward step in place; ``peaks`` (3 float64 zeros) gets the largest magnitudes.

    Those of the update (units), the new position (its value) and the new
    velocity (units), NaN if one is NaN.
    """
    if head.numel() == 0:
        return
    constants = _constants(head.device, n, d, mix_units, unit, 0.0, 0.0)
    programs, per_program = _grid(head)
    with _on(head):
        _advance_kernel[(programs,)](
            head, velocity, position, y, out, constants, peaks.view(torch.int64),
            head.numel(), per_program,
            RESIDUAL=residual, OUT_TYPE=_TRITON_TYPES[out.dtype], BLOCK=BLOCK,
            num_warps=_WARPS, enable_fp_fusion=False,
        )  # fmt: skip


def retreat_position(
    velocity: torch.Tensor,
    position: torch.Tensor,
    grad_velocity: torch.Tensor,
    out: torch.Tensor,
    grad_y: torch.Tensor,
    unit: float,
    mix: float,
) -> None:
    """``x <- x - v`` in place, ``out = x`` and ``grad_y = mix * grad_velocity`` in their dtype."""
    if velocity.numel() == 0:
        return
    constants = _constants(velocity.device, 1, 2, 0.0, unit, mix, 0.0)
    programs, per_program = _grid(velocity)
    with _on(velocity):
        _retreat_position_kernel[(programs,)](
            velocity, position, grad_velocity, out, grad_y, constants,
            velocity.numel(), per_program,
            OUT_TYPE=_TRITON_TYPES[out.dtype], BLOCK=BLOCK,
            num_warps=_WARPS, enable_fp_fusion=False,
        )  # fmt: skip


def retreat_velocity(
    head: torch.Tensor,
    velocity: torch.Tensor,
    position: torch.Tensor,
    y: torch.Tensor,
    n: int,
    d: int,
    mix_units: float,
    residual: bool,
) -> None:
    """Undo a step's velocity and store digits in place."""
    if head.numel() == 0:
        return
    constants = _constants(head.device, n, d, mix_units, 0.0, 0.0, 0.0)
    programs, per_program = _grid(head)
    with _on(head):
        _retreat_velocity_kernel[(programs,)](
            head, velocity, position, y, constants, head.numel(), per_program,
            RESIDUAL=residual, BLOCK=BLOCK, num_warps=_WARPS, enable_fp_fusion=False,
        )  # fmt: skip


def backpropagate(
    grad_x: torch.Tensor,
    grad_v: torch.Tensor,
    found: torch.Tensor | None,
    keep: float,
    mix: float,
    residual: bool,
) -> None:
    """The gradient update in place: ``g_x += found`` (if any), ``g_x -= mix g_v`` (if not
    residual), ``g_v <- g_x + keep g_v``."""
    if grad_x.numel() == 0:
        return
    constants = _constants(grad_x.device, 1, 2, 0.0, 0.0, mix, keep)
    programs, per_program = _grid(grad_x)
    with _on(grad_x):
        _backpropagate_kernel[(programs,)](
            grad_x, grad_v, grad_x if found is None else found, constants,
            grad_x.numel(), per_program,
            HAS_FOUND=found is not None, RESIDUAL=residual, BLOCK=BLOCK,
            num_warps=_WARPS, enable_fp_fusion=False,
        )  # fmt: skip
