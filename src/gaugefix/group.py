"""The gauge group: signed permutations of the residual basis.

Convention (used everywhere in gaugefix): a gauge ``Q`` maps chart A to chart B,
``x_B = Q x_A``, stored as ``perm, sign`` with

    x_B[i] = sign[i] * x_A[perm[i]].

``SignedPerm.apply`` is the single primitive through which every tensor in the
library is transformed: weights, norm gains, SAE matrices, steering vectors,
optimizer moments. It is a gather and a sign flip, hence bit-exact in any dtype.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .errors import GaugefixError
from .kernels import Kernel

if TYPE_CHECKING:
    import torch

RandomKind = Literal["signed", "perm", "global"]


def _as_int_array(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise GaugefixError(f"{name} must be a 1-D list of integers, got shape {arr.shape}")
    integral = np.issubdtype(arr.dtype, np.integer) or (
        np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr))
    )
    if arr.size and not integral:
        raise GaugefixError(f"{name} must contain integers only")
    return arr.astype(np.int64)


@dataclass(frozen=True, eq=False)
class SignedPerm:
    """An element of the hyperoctahedral group B_d acting on residual coordinates."""

    perm: np.ndarray
    sign: np.ndarray
    _kernel: Kernel = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        perm = _as_int_array(self.perm, "perm")
        sign = _as_int_array(self.sign, "sign")
        if perm.shape != sign.shape:
            raise GaugefixError(
                f"perm and sign lengths differ: {perm.shape[0]} vs {sign.shape[0]}"
            )
        d = perm.shape[0]
        if d == 0:
            raise GaugefixError("a gauge needs at least one coordinate (d = 0)")
        seen = np.zeros(d, dtype=bool)
        if perm.min() < 0 or perm.max() >= d:
            raise GaugefixError(f"perm must be a permutation of 0..{d - 1}; found {perm.min()}"
                                f"..{perm.max()}")
        seen[perm] = True
        if not seen.all():
            missing = int(np.flatnonzero(~seen)[0])
            raise GaugefixError(
                f"perm must be a permutation of 0..{d - 1}; index {missing} is missing "
                "(another is repeated)"
            )
        bad = np.flatnonzero(np.abs(sign) != 1)
        if bad.size:
            raise GaugefixError(
                f"sign must be +1 or -1; sign[{int(bad[0])}] = {int(sign[bad[0]])}"
            )
        perm.setflags(write=False)
        sign = sign.astype(np.int8)
        sign.setflags(write=False)
        object.__setattr__(self, "perm", perm)
        object.__setattr__(self, "sign", sign)
        object.__setattr__(self, "_kernel", Kernel(perm, sign))

    # ------------------------------------------------------------------ constructors
    @property
    def d(self) -> int:
        return int(self.perm.shape[0])

    @classmethod
    def identity(cls, d: int) -> SignedPerm:
        return cls(np.arange(d), np.ones(d, dtype=np.int64))

    @classmethod
    def random(
        cls,
        d: int,
        seed: int | None = None,
        *,
        kind: RandomKind = "signed",
        positive_fraction: float | None = None,
    ) -> SignedPerm:
        """A uniformly random gauge.

        ``kind="signed"``: any signed permutation (B_d, RMSNorm models).
        ``kind="perm"``: a plain permutation (signs all +1).
        ``kind="global"``: a permutation times one random global sign (S_d x {+-1},
        the gauge group of LayerNorm models).
        ``positive_fraction`` (signed only) fixes the number of +1 signs to
        ``round(p * d)``, placed at random.
        """
        rng = np.random.default_rng(seed)
        perm = rng.permutation(d)
        if kind == "perm":
            sign = np.ones(d, dtype=np.int64)
        elif kind == "global":
            sign = np.full(d, rng.choice([-1, 1]), dtype=np.int64)
        elif kind == "signed":
            if positive_fraction is None:
                sign = rng.choice(np.array([-1, 1]), size=d)
            else:
                if not 0.0 <= positive_fraction <= 1.0:
                    raise GaugefixError(
                        f"positive_fraction must lie in [0, 1], got {positive_fraction}"
                    )
                sign = -np.ones(d, dtype=np.int64)
                sign[rng.permutation(d)[: round(positive_fraction * d)]] = 1
        else:
            raise GaugefixError(f"unknown random gauge kind {kind!r}; use signed, perm or global")
        if positive_fraction is not None and kind != "signed":
            raise GaugefixError("positive_fraction only applies to kind='signed'")
        return cls(perm, sign)

    @classmethod
    def from_matrix(cls, q: np.ndarray | torch.Tensor) -> SignedPerm:
        """Read a dense signed-permutation matrix (``Q[i, perm[i]] = sign[i]``)."""
        q = np.asarray(q if isinstance(q, np.ndarray) else q.detach().cpu())
        if q.ndim != 2 or q.shape[0] != q.shape[1]:
            raise GaugefixError(f"expected a square matrix, got shape {q.shape}")
        nz = q != 0
        if not (nz.sum(axis=1) == 1).all() or not (nz.sum(axis=0) == 1).all():
            raise GaugefixError("matrix is not a signed permutation (one nonzero per row/column)")
        perm = nz.argmax(axis=1)
        return cls(perm, q[np.arange(q.shape[0]), perm])

    # ------------------------------------------------------------------ group laws
    def then(self, other: SignedPerm) -> SignedPerm:
        """The gauge A -> C obtained by applying ``self`` (A -> B), then ``other`` (B -> C)."""
        self._check_same_d(other)
        return SignedPerm(self.perm[other.perm], other.sign * self.sign[other.perm])

    def __matmul__(self, other: SignedPerm) -> SignedPerm:
        """Matrix product ``self @ other``: apply ``other`` first, then ``self``."""
        return other.then(self)

    def tiled(self, k: int) -> SignedPerm:
        """This gauge on an axis of ``k`` residual streams side by side (a concatenation
        ``[h, e]`` read as one vector): block-diagonal, every block this gauge."""
        if k == 1:
            return self
        if k < 1:
            raise GaugefixError(f"cannot tile a gauge {k} times")
        return SignedPerm(np.concatenate([self.perm + i * self.d for i in range(k)]),
                          np.tile(self.sign, k))

    def inverse(self) -> SignedPerm:
        inv = np.empty_like(self.perm)
        inv[self.perm] = np.arange(self.d)
        return SignedPerm(inv, self.sign[inv])

    def unsigned(self) -> SignedPerm:
        """The same permutation with every sign +1 (the S_d part of the gauge)."""
        return SignedPerm(self.perm, np.ones(self.d, dtype=np.int64))

    @property
    def global_sign(self) -> int | None:
        """+1 or -1 when all signs agree (an element of S_d x {+-1}), otherwise None."""
        if np.all(self.sign == self.sign[0]):
            return int(self.sign[0])
        return None

    @property
    def positive_fraction(self) -> float:
        return float(np.mean(self.sign > 0))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SignedPerm):
            return NotImplemented
        return bool(
            self.d == other.d
            and np.array_equal(self.perm, other.perm)
            and np.array_equal(self.sign, other.sign)
        )

    def __hash__(self) -> int:
        return hash((self.perm.tobytes(), self.sign.tobytes()))

    def __repr__(self) -> str:
        head = ", ".join(f"{s:+d}·{p}" for p, s in zip(self.perm[:6], self.sign[:6], strict=True))
        more = ", ..." if self.d > 6 else ""
        return f"SignedPerm(d={self.d}, [{head}{more}])"

    def _check_same_d(self, other: SignedPerm) -> None:
        if self.d != other.d:
            raise GaugefixError(f"gauge widths differ: d={self.d} vs d={other.d}")

    # ------------------------------------------------------------------ the primitive
    def apply(self, tensor: Any, axis: int = 0, signed: bool = True, *,
              out: Any | None = None, bits: bool = False,
              part: tuple[int, int] | None = None) -> Any:
        """Move ``tensor`` from chart A to chart B along its residual ``axis``.

        ``out.select(axis, i) = sign[i] * tensor.select(axis, perm[i])``; with
        ``signed=False`` only the gather (the rule for norm gains and second
        moments). Works for torch tensors of any dtype and for numpy arrays; the
        result has the input's type, dtype and device. Bit-exact. ``out``: a
        contiguous tensor (or array) of the result's shape and dtype to write into
        (streaming reuses its buffers: fresh memory costs a page fault per 4 KiB).
        ``bits=True``: ``tensor`` is a numpy integer array holding the IEEE bit patterns
        of floats (bfloat16 and fp8 have no numpy dtype); the sign is the top bit.
        ``part=(lo, hi)``: only the result's slices ``lo:hi`` along ``axis`` (its size there
        is ``hi - lo``), gathered from the whole ``tensor``: streaming writes a tensor whose
        residual axis is its first block by block.
        """
        return self._kernel.apply(tensor, axis, signed, out=out, bits=bits, part=part)

    # ------------------------------------------------------------------ coordinates
    def index_map(self, indices: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        """Where A's coordinates land in B: ``(i, s)`` with ``x_B[i] = s * x_A[j]``."""
        j = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices)
        j = j.astype(np.int64)
        if j.size and (j.min() < -self.d or j.max() >= self.d):
            raise GaugefixError(f"coordinate index out of range for d={self.d}")
        i = self.inverse().perm[j]
        return i, self.sign[i].astype(np.int64)

    def to_matrix(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense Q with ``Q[i, perm[i]] = sign[i]`` (for tests and small d; float64 by
        default)."""
        import torch

        dtype = torch.float64 if dtype is None else dtype
        q = torch.zeros(self.d, self.d, dtype=dtype)
        q[torch.arange(self.d), torch.tensor(self.perm)] = torch.tensor(self.sign, dtype=dtype)
        return q

    def compare(self, reference: SignedPerm) -> dict[str, float]:
        """Accuracy of this (estimated) gauge against a reference gauge.

        ``perm_accuracy``: fraction of coordinates mapped to the right source.
        ``sign_accuracy``: among those, the fraction with the right sign.
        ``full_accuracy``: fraction right in both.
        """
        self._check_same_d(reference)
        perm_ok = self.perm == reference.perm
        both = perm_ok & (self.sign == reference.sign)
        n_ok = int(perm_ok.sum())
        return {
            "d": self.d,
            "perm_accuracy": float(perm_ok.mean()),
            "sign_accuracy": float(both.sum() / n_ok) if n_ok else 0.0,
            "full_accuracy": float(both.mean()),
        }

    # ------------------------------------------------------------------ the gauge file
    # (gaugefix.gaugefile holds the format, and is handed this class: it never imports it)
    def to_json(self, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
        from .gaugefile import to_json

        return to_json(self, metadata)

    @classmethod
    def from_json(cls, doc: Any, source: str = "gauge") -> SignedPerm:
        from .gaugefile import from_json

        return from_json(cls, doc, source)

    def save(self, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None,
             *, overwrite: bool = False) -> Path:
        from .gaugefile import save

        return save(self, path, metadata, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SignedPerm:
        from .gaugefile import read

        return read(cls, path)[1]


def read_gauge_document(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw JSON of a gauge file (gauge plus metadata), checked to hold a gauge."""
    from .gaugefile import read

    return read(SignedPerm, path)[0]
