"""The "triton" backend: the four phases as Triton kernels, on CUDA.

The kernels (``_triton_kernels.py``) do what the C loops do, for inputs of
``float32`` or ``float64`` whose functions return any floating dtype
(``bfloat16`` under autocast, for one), laid out as the C loops need. Triton is
optional: it is imported when a forward pass on a CUDA tensor first asks for
this backend, and where it is missing or does not load the other backends serve.
The forward step writes the largest magnitudes it reaches into slots on the
device, which the range check asserts on there: the host never waits.

The tests run the kernels on the CPU in Triton's interpreter
(``TRITON_INTERPRET=1``), by adding ``"cpu"`` to :attr:`TritonBackend.devices`.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

import torch

from invertnet.momentum.backends.base import Backend, Peaks, walks
from invertnet.momentum.fixed_point import Constants, MomentumState

__all__ = ["TritonBackend"]

# The dtypes the kernels handle: of the functions' inputs (the state's
# conversions, proven bit for bit in Triton's interpreter, whose conversions to
# 16-bit floats do not round as CUDA's do), and of their outputs (only read).
_DTYPES = (torch.float32, torch.float64)
_OUTPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class TritonBackend(Backend):
    """The Triton kernels of ``_triton_kernels.py``, where Triton loads."""

    name = "triton"

    def __init__(self) -> None:
        #: The device types served. Tests add ``"cpu"`` to run the kernels in
        #: Triton's interpreter, which walks CPU tensors.
        self.devices: tuple[str, ...] = ("cuda",)
        # The kernels module, once imported; False where Triton is missing or fails.
        self._module: ModuleType | bool | None = None

    @property
    def kernels(self) -> ModuleType | None:
        """The kernels module, imported (with Triton) on first use; None where it
        cannot be loaded."""
        if self._module is None:
            self._module = False
            if importlib.util.find_spec("triton") is not None:
                try:
                    import invertnet.momentum.backends._triton_kernels as module
                except Exception:  # a Triton that does not load here: another backend serves
                    module = None
                self._module = module if module is not None else False
        return self._module or None

    def serves(
        self,
        dtype: torch.dtype,
        doubles: tuple[torch.Tensor, ...],
        typed: tuple[torch.Tensor, ...] = (),
    ) -> bool:
        if doubles[0].device.type not in self.devices or dtype not in _DTYPES:
            return False
        return walks(doubles, typed, _OUTPUT_DTYPES) and self.kernels is not None

    def _loaded(self) -> ModuleType:
        module = self._module
        assert isinstance(module, ModuleType)
        return module

    def advance(
        self, c: Constants, state: MomentumState, y: torch.Tensor, residual: bool, split: bool
    ) -> tuple[torch.Tensor, Peaks]:
        # Always the split form (one program cannot know the others' velocities).
        out = torch.empty_like(state.position, dtype=c.fixed.dtype)
        peaks = state.peak_slots(3)
        self._loaded().advance(
            state.store.head, state.velocity, state.position, y.detach(), out, peaks,
            c.n, c.d, c.mix_units, c.fixed.unit, residual,
        )  # fmt: skip
        return out, Peaks((peaks[0],), (peaks[1],), (peaks[2],))

    def retreat_position(
        self, c: Constants, state: MomentumState, grad_velocity: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.empty_like(state.position, dtype=c.fixed.dtype)
        grad_y = torch.empty_like(out)
        self._loaded().retreat_position(
            state.velocity, state.position, grad_velocity, out, grad_y, c.fixed.unit, c.mix
        )
        return out, grad_y

    def retreat_velocity(
        self, c: Constants, state: MomentumState, y: torch.Tensor, residual: bool, split: bool
    ) -> None:
        self._loaded().retreat_velocity(
            state.store.head, state.velocity, state.position, y.detach(),
            c.n, c.d, c.mix_units, residual,
        )  # fmt: skip

    def backpropagate(
        self,
        c: Constants,
        grad_x: torch.Tensor,
        grad_velocity: torch.Tensor,
        grad_input: torch.Tensor | None,
        residual: bool,
    ) -> None:
        self._loaded().backpropagate(grad_x, grad_velocity, grad_input, c.keep, c.mix, residual)
