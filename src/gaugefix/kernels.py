"""The kernels behind ``SignedPerm.apply``: a gather along one axis and a sign flip.

``Kernel`` holds one signed permutation's ``perm``/``sign`` arrays and what its kernels
cache (the index per torch device, the signs per dtype and device, the IEEE sign-bit masks
per integer dtype). ``Kernel.apply`` has the modes of the primitive: ``out`` (write into a
given buffer), ``bits`` (a numpy integer array holding float bit patterns) and ``part`` (only
the result's slices ``lo:hi`` along the axis), on numpy arrays and on torch tensors. The
group algebra lives in ``gaugefix.group``; this module knows nothing of it.

torch is imported where a torch tensor is handled, never to move numpy arrays or raw bits:
``gaugefix apply`` on a safetensors checkpoint runs without it (its import is most of the
command's start-up).
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import GaugefixError

if TYPE_CHECKING:
    import torch


@cache
def _torch_bits() -> dict[Any, Any]:
    """Floating torch dtypes whose sign is one bit -> the integer dtype of their bits."""
    import torch

    return {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
            torch.bfloat16: torch.int16,
            **{getattr(torch, f8): torch.int8  # fp8 checkpoints: the sign is bit 7 too
               for f8 in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, f8)}}


# numpy floats -> the integer dtype of their bits
_NP_BITS = {np.dtype(np.float64): np.int64, np.dtype(np.float32): np.int32,
            np.dtype(np.float16): np.int16}


class Kernel:
    """The apply kernels of one signed permutation (``x_B[i] = sign[i] * x_A[perm[i]]``).

    ``perm`` and ``sign`` are taken as validated (``SignedPerm`` does that) and read-only.
    """

    __slots__ = ("_cache", "perm", "sign")

    def __init__(self, perm: np.ndarray, sign: np.ndarray) -> None:
        self.perm = perm
        self.sign = sign
        self._cache: dict[Any, Any] = {}

    @property
    def d(self) -> int:
        return int(self.perm.shape[0])

    # ------------------------------------------------------------------ cached operands
    def _index(self, device: torch.device) -> torch.Tensor:
        key = ("perm", device)
        if key not in self._cache:
            import torch

            self._cache[key] = torch.tensor(self.perm, device=device)
        return self._cache[key]

    def _signs(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = ("sign", dtype, device)
        if key not in self._cache:
            import torch

            self._cache[key] = torch.tensor(self.sign, device=device).to(dtype)
        return self._cache[key]

    def _sign_mask(self, dtype: np.dtype[Any]) -> np.ndarray:
        """The IEEE sign bit where the sign is -1, in the integer ``dtype`` of the bits."""
        key = ("mask", dtype)
        if key not in self._cache:
            self._cache[key] = np.where(self.sign < 0, np.iinfo(dtype).min, 0).astype(dtype)
        return self._cache[key]

    # ------------------------------------------------------------------ kernels
    def apply(self, tensor: Any, axis: int, signed: bool, *, out: Any | None, bits: bool,
              part: tuple[int, int] | None) -> Any:
        """``SignedPerm.apply`` (documented there): checks ``part``, then the numpy or the
        torch kernel."""
        lo, hi = (0, self.d) if part is None else part
        if not 0 <= lo <= hi <= self.d:
            raise GaugefixError(f"part {part} is not a range of 0..{self.d}")
        if isinstance(tensor, np.ndarray):
            return self.apply_numpy(tensor, axis, signed, out, bits, lo, hi)
        return self.apply_torch(tensor, axis, signed, out, lo, hi)

    def apply_torch(self, tensor: Any, axis: int, signed: bool, out: Any | None,
                    lo: int, hi: int) -> Any:
        """The primitive on torch tensors: CPU floats move as raw bits through the numpy
        kernel; anything else is an ``index_select`` and a multiply by the signs."""
        import torch

        if not isinstance(tensor, torch.Tensor):
            raise GaugefixError(f"apply expects a torch tensor or numpy array, got {type(tensor)}")
        ax = self.check_axis(tensor.shape, axis)
        shape = list(tensor.shape)
        shape[ax] = hi - lo
        if out is not None and (list(out.shape) != shape or out.dtype != tensor.dtype
                                or not out.is_contiguous()):
            raise GaugefixError(f"out must be a contiguous {tensor.dtype} tensor of shape "
                                f"{shape}")
        int_dtype = _torch_bits().get(tensor.dtype)
        if tensor.device.type == "cpu" and int_dtype is not None and not tensor.requires_grad:
            # CPU floats: gather the raw bits and flip the IEEE sign bit (no arithmetic):
            # a negation, for -0.0 and for NaN too (payload kept; a multiply by -1 would
            # leave a NaN's sign as it is), and several times faster than index_select.
            moved = out if out is not None else torch.empty(shape, dtype=tensor.dtype)
            self.apply_numpy(tensor.detach().view(int_dtype).numpy(), ax, signed,
                             moved.view(int_dtype).numpy(), True, lo, hi)
            return moved
        index = self._index(tensor.device)[lo:hi]
        moved = tensor.index_select(ax, index, out=out) if out is not None else \
            tensor.index_select(ax, index)
        if not signed or (self.sign[lo:hi] > 0).all():
            return moved
        if tensor.dtype == torch.bool:
            raise GaugefixError("cannot apply signs to a boolean tensor; use signed=False")
        view = [1] * tensor.ndim
        view[ax] = hi - lo
        return moved.mul_(self._signs(tensor.dtype, tensor.device)[lo:hi].view(view))

    def apply_numpy(self, arr: np.ndarray, axis: int, signed: bool, out: np.ndarray | None,
                    bits: bool, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """The primitive on numpy arrays: ``np.take`` (mode="clip": a permutation needs no
        bounds checks, and numpy's checked take is 1.5-4x slower), then the sign: the top
        bit flipped for floats (``bits``, or a float dtype viewed as its bits), a negation
        for integers."""
        ax = self.check_axis(arr.shape, axis)
        hi = self.d if hi is None else hi
        if bits and arr.dtype.kind != "i":
            raise GaugefixError(f"bits=True expects signed integers holding float bits, got "
                                f"{arr.dtype}")
        shape = list(arr.shape)
        shape[ax] = hi - lo
        if out is not None and (list(out.shape) != shape or out.dtype != arr.dtype
                                or not out.flags.c_contiguous):
            raise GaugefixError(f"out must be a contiguous {arr.dtype} array of shape {shape}")
        flips = signed and not (self.sign[lo:hi] > 0).all()
        if flips and arr.dtype == np.bool_:
            raise GaugefixError("cannot apply signs to a boolean tensor; use signed=False")
        if not bits and arr.dtype in _NP_BITS:  # floats: move their bits
            raw = arr.view(_NP_BITS[arr.dtype]) if arr.flags.c_contiguous else \
                np.ascontiguousarray(arr).view(_NP_BITS[arr.dtype])
            moved = np.empty(shape, arr.dtype) if out is None else out
            self.apply_numpy(raw, ax, signed, moved.view(raw.dtype), True, lo, hi)
            return moved
        moved = np.take(arr, self.perm[lo:hi], axis=ax, out=out, mode="clip")
        if flips:
            view = [1] * arr.ndim
            view[ax] = hi - lo
            if bits:
                np.bitwise_xor(moved, self._sign_mask(arr.dtype)[lo:hi].reshape(view),
                               out=moved)
            else:  # integers: -x (two's complement, wrapping as torch's multiply by -1 does)
                neg = (self.sign[lo:hi] < 0).reshape(view)
                np.negative(moved, out=moved, where=np.broadcast_to(neg, moved.shape))
        return moved

    def check_axis(self, shape: Any, axis: int) -> int:
        """``axis`` made non-negative, once it names an axis of size ``d``."""
        if len(shape) == 0:
            raise GaugefixError("cannot apply a gauge to a 0-d tensor (no residual axis)")
        ax = axis if axis >= 0 else axis + len(shape)
        if not 0 <= ax < len(shape):
            raise GaugefixError(f"axis {axis} out of range for a {len(shape)}-d tensor")
        if shape[ax] != self.d:
            raise GaugefixError(
                f"width mismatch: tensor has size {shape[ax]} on axis {axis}, "
                f"the gauge has d={self.d}"
            )
        return ax
