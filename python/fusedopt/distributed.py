"""Data-parallel training over MPI: gradient averaging and a ZeRO-1 sharded optimizer.

>>> from mpi4py import MPI
>>> from fusedopt import distributed, optim
>>> opt = distributed.ZeroRedundancyOptimizer(params, optim.AdamW, MPI.COMM_WORLD, lr=1e-3)
>>> for x, y in my_share_of_each_batch:
...     opt.step(backward(params, x, y))   # averaged over the ranks; params identical after

Run with ``mpiexec -n 4 python -m mpi4py train.py``: ``-m mpi4py`` aborts the whole job when
one rank raises outside of fusedopt's calls, where the others would wait for it forever.

Built on mpi4py (``pip install "fusedopt[distributed]"``, which brings the MPICH wheel), imported
on first use: this module imports without it. Arrays travel with mpi4py's buffer methods
(``Allreduce``, ``Reduce_scatter_block``, ``Allgather``, ``Gatherv``), never pickled.

- :func:`allreduce_mean_` averages a list of gradients in place, in buckets.
- :class:`ZeroRedundancyOptimizer` (ZeRO stage 1, Rajbhandari et al. 2020) keeps on each rank
  the optimizer state, float32 masters included, of an even 1/N slice of the flattened
  parameters: it reduce-scatters the gradients, steps its slice with one fused call of a
  :mod:`fusedopt.optim` class whose update is element-wise (all but LAMB, Muon and Adafactor)
  and all-gathers the parameters.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import sys
import tempfile
import time
import traceback
import zlib
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Type,
    Union,
)

import numpy as np

from . import _clip, _functional, _overlap, optim
from ._declarations import DECLARATIONS, Declaration
from ._dispatch import core as _core
from .optim import _GOLDEN, Grads, Optimizer, Params, _dtype_name
from .quantize import BLOCK, QuantizedState

__all__ = ["DEFAULT_BUCKET_BYTES", "ZeroRedundancyOptimizer", "allreduce_mean_", "shard_bounds"]

DEFAULT_BUCKET_BYTES = 25 * 2**20
"""Bucket size of :func:`allreduce_mean_`: torch DDP's 25 MiB."""

SHARDS_FORMAT = "fusedopt-zero-shards"
SHARDS_VERSION = 1


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError(
            "fusedopt.distributed needs mpi4py and an MPI library: "
            'pip install "fusedopt[distributed]"'
        ) from e
    return MPI


def _world(comm: Any) -> Any:
    return _mpi().COMM_WORLD if comm is None else comm


def _flat(a: np.ndarray) -> np.ndarray:
    """A contiguous array as a 1-D view in memory order (element i has int8 scale i // BLOCK)."""
    return a.reshape(-1, order="A")


def _order(a: np.ndarray) -> str:
    return "F" if a.flags.f_contiguous and not a.flags.c_contiguous else "C"


def _wire(a: np.ndarray) -> np.ndarray:
    """``a`` as MPI moves it: 2-byte floats (no MPI type) as their bits."""
    return a.view(np.uint16) if _dtype_name(a.dtype) in ("bfloat16", "float16") else a


def _digest(text: str) -> int:
    """A 62-bit hash of ``text``: compared across ranks as ``d`` and ``-d`` in one MAX Allreduce."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 2


def _reduce_dtype(dtype: np.dtype) -> np.dtype:
    """What gradients of a ``dtype`` are summed in: float64 for float64, else float32 (MPI has
    no bfloat16, and summing float16 overflows)."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


# --------------------------------------------------------------------- errors on some ranks


def _agree(comm: Any, error: Optional[BaseException], what: str) -> None:
    """Collective: raise on every rank if ``error`` is set on any. The failing rank re-raises its
    own exception; the others raise RuntimeError naming it, so no rank waits for another."""
    messages = comm.allgather(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        rank, message = failed[0]
        raise RuntimeError(f"{what} failed on rank {rank} of {comm.Get_size()}: {message}")


def _abort(comm: Any, what: str) -> None:
    """After communication began, one rank's exception would leave the others waiting forever
    in the next collective: print it and abort the job."""
    sys.stderr.write(
        f"fusedopt.distributed: rank {comm.Get_rank()} of {comm.Get_size()} raised in {what}; "
        "aborting the MPI job so that no rank waits for it forever:\n" + traceback.format_exc()
    )
    sys.stderr.flush()
    time.sleep(1.0)  # MPI_Abort kills the launcher's forwarding too: let it pass the message on
    comm.Abort(1)


# --------------------------------------------------------------------- gradient averaging


def allreduce_mean_(
    grads: Union[Sequence[Optional[np.ndarray]], Mapping[str, Optional[np.ndarray]]],
    comm: Any = None,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> None:
    """Average gradient arrays in place over the ranks of ``comm`` (MPI.COMM_WORLD by default).

    The arrays (a list, or a dict's values; None entries are skipped) are packed in order into
    buckets of at most ``bucket_bytes``, one ``Allreduce`` each (a tensor larger than a bucket
    spans several), and unpacked divided by the number of ranks. float64 gradients are summed in
    float64, the others in float32, and bfloat16/float16 results rounded to nearest once. As
    torch's DDP by default, the sum comes before the division: float32 gradients whose sum over
    the ranks passes float32's largest value (about 3.4e38) average to infinity. Every
    rank must pass arrays of the same shapes, dtypes and memory layouts (C or F order) in the
    same order, and the same ``bucket_bytes``; the results are the same bits on every rank. A
    bad argument on one rank, or a different number of elements, layout or ``bucket_bytes``,
    raises on every rank (one small ``Allreduce`` checks) and changes nothing. An exception once
    the buckets travel aborts the job.
    """
    comm = _world(comm)
    MPI = _mpi()
    error, by_dtype, layout = None, {}, 0
    try:
        by_dtype, layout = _bucket_dtypes(grads, bucket_bytes)
    except Exception as e:
        error = e
    # one tiny Allreduce: did any rank fail, do all pass as many elements of each dtype, the
    # same shapes, dtypes and orders (a digest, equal where its max is minus max of -d), and
    # the same bucket_bytes (else the ranks' bucket Allreduces would not match)?
    counts = [sum(f.size for f in by_dtype.get(np.dtype(d), [])) for d in (np.float32, np.float64)]
    # past any buffer's size every bucket size is one bucket: an int64 holds the agreed one
    bucket = min(bucket_bytes, 2**62) if error is None else 0
    flags = np.array(
        [error is not None, *counts, *(-c for c in counts), layout, -layout, bucket, -bucket],
        np.int64,
    )
    comm.Allreduce(MPI.IN_PLACE, flags, op=MPI.MAX)
    if flags[0]:
        _agree(comm, error, "allreduce_mean_()")
    if any(flags[1:3] != -flags[3:5]):
        raise ValueError(
            "allreduce_mean_: the ranks pass different numbers of gradient elements (float32 "
            "and lower, float64): every rank must pass the same shapes and dtypes"
        )
    if flags[5] != -flags[6]:
        raise ValueError(
            "allreduce_mean_: the ranks pass gradients of different shapes, dtypes or memory "
            "orders: every rank must pass the same ones in the same order"
        )
    if flags[7] != -flags[8]:
        raise ValueError(
            "allreduce_mean_: the ranks pass different bucket_bytes: every rank must pass the same"
        )
    if comm.Get_size() == 1:
        return  # the mean of one
    try:
        for dtype, flats in sorted(by_dtype.items(), key=lambda kv: str(kv[0])):
            _allreduce_mean_buckets(comm, flats, dtype, max(1, bucket_bytes // dtype.itemsize))
    except BaseException:
        _abort(comm, "allreduce_mean_()")
        raise


def _bucket_dtypes(grads: Any, bucket_bytes: Any) -> Tuple[Dict[np.dtype, List[np.ndarray]], int]:
    """The gradients checked, as 1-D views grouped by the dtype they are summed in, and a digest
    of their shapes, dtypes and orders."""
    if isinstance(grads, Mapping):
        grads = list(grads.values())
    if isinstance(grads, np.ndarray):
        grads = [grads]
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 8:
        raise ValueError(f"bucket_bytes must be an integer >= 8, got {bucket_bytes!r}")
    by_dtype: Dict[np.dtype, List[np.ndarray]] = {}
    layout = []
    for i, g in enumerate(grads):
        if g is None:
            layout.append(None)
            continue
        if not isinstance(g, np.ndarray):
            raise TypeError(f"grads[{i}]: expected a numpy.ndarray or None, got {type(g).__name__}")
        if _dtype_name(g.dtype) is None:
            raise TypeError(
                f"grads[{i}]: expected dtype float32, float64, bfloat16 or float16, got {g.dtype}"
            )
        if not (g.flags.c_contiguous or g.flags.f_contiguous) or not g.flags.writeable:
            raise ValueError(f"grads[{i}]: expected a writeable C- or F-contiguous array")
        by_dtype.setdefault(_reduce_dtype(g.dtype), []).append(_flat(g))
        layout.append((g.shape, str(g.dtype), _order(g) if g.ndim > 1 else "C"))
    return by_dtype, _digest(repr(layout))


def _allreduce_mean_buckets(
    comm: Any, flats: List[np.ndarray], dtype: np.dtype, capacity: int
) -> None:
    """Average 1-D arrays in place through buckets of ``capacity`` elements of ``dtype``."""
    MPI, size = _mpi(), comm.Get_size()
    bucket = np.empty(min(capacity, sum(f.size for f in flats)), dtype)
    pending: List[Tuple[np.ndarray, int, int, int]] = []  # (array, from, to, bucket offset)
    used = 0

    def flush() -> None:
        comm.Allreduce(MPI.IN_PLACE, bucket[:used], op=MPI.SUM)
        np.divide(bucket[:used], size, out=bucket[:used])
        for flat, lo, hi, at in pending:
            flat[lo:hi] = bucket[at : at + hi - lo]
        pending.clear()

    for flat in flats:
        lo = 0
        while lo < flat.size:
            n = min(flat.size - lo, capacity - used)
            bucket[used : used + n] = flat[lo : lo + n]
            pending.append((flat, lo, lo + n, used))
            used, lo = used + n, lo + n
            if used == capacity:
                flush()
                used = 0
    if used:
        flush()


# --------------------------------------------------------------------- the sharded layout


def shard_bounds(sizes: Sequence[int], world: int) -> List[int]:
    """Where ``world`` ranks split a flat space of tensors of ``sizes`` elements: rank r holds
    ``[bounds[r], bounds[r + 1])``. Each cut is the even one, r/N of the total, moved down to the
    start of a block of ``BLOCK`` elements of the tensor it falls in (an int8 scale never spans
    two ranks), so no rank holds more than 1/N of the elements plus one block."""
    starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()
    total = starts[-1]
    bounds = [0]
    for r in range(1, world):
        target = r * total // world
        t = int(np.searchsorted(starts, target, side="right")) - 1
        t = min(t, len(sizes) - 1) if sizes else 0
        cut = starts[t] + (target - starts[t]) // BLOCK * BLOCK if sizes else 0
        bounds.append(max(cut, bounds[-1]))
    bounds.append(total)
    return bounds


class _Space:
    """The parameters of one dtype as one flat space, cut into ranks' slices, and one buffer
    for the gradients' reduce-scatter and the parameters' all-gather. In the buffer each rank's
    slice is padded to the longest one (at most a block longer), so that the collectives are
    ``Reduce_scatter_block`` and ``Allgather``: MPICH's ``Allgatherv`` was 60x slower than
    ``Allgather`` here at N = 4."""

    def __init__(self, dtype: np.dtype, names: List[str], sizes: List[int], world: int, rank: int):
        self.dtype = dtype
        self.names = names
        self.sizes = sizes
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()[:-1]
        self.total = int(sum(sizes))
        self.bounds = shard_bounds(sizes, world)
        self.counts = [b - a for a, b in zip(self.bounds, self.bounds[1:])]
        self.lo, self.hi = self.bounds[rank], self.bounds[rank + 1]
        self.width = max(self.counts)  # of each rank's part of the buffer
        self.offset = rank * self.width  # of this rank's part
        self.reduce_dtype = _reduce_dtype(dtype)
        padded = world * self.width
        raw = np.empty(padded * self.reduce_dtype.itemsize, np.uint8)
        self.grads = raw.view(self.reduce_dtype)  # the whole model's gradients, then ...
        self.params = raw[: padded * dtype.itemsize].view(dtype)  # ... its parameters
        self.padding = [
            (r * self.width + c, (r + 1) * self.width) for r, c in enumerate(self.counts)
        ]
        self.shard_grads = np.empty(self.width, self.reduce_dtype)
        # name -> [(lo, hi, at)]: elements [lo, hi) of the tensor are at [at, at + hi - lo)
        self.segments: Dict[str, List[Tuple[int, int, int]]] = {n: [] for n in names}
        for r in range(world):
            for (name, (lo, hi)), start in zip(self.pieces(self.bounds, r).items(), self.starts):
                if hi > lo:
                    self.segments[name].append(
                        (lo, hi, r * self.width + start + lo - self.bounds[r])
                    )

    def pieces(self, bounds: Optional[Sequence[int]] = None, rank: int = 0) -> Dict[str, Tuple]:
        """name -> (lo, hi): the part of each tensor (in its memory order) that ``rank`` holds
        under ``bounds`` (this rank under this layout by default); (0, 0) for none."""
        a, b = (self.lo, self.hi) if bounds is None else (bounds[rank], bounds[rank + 1])
        out = {}
        for name, start, size in zip(self.names, self.starts, self.sizes):
            lo, hi = max(a - start, 0), min(b - start, size)
            out[name] = (lo, hi) if lo < hi else (0, 0)
        return out


def _local_seed(seed: int, rank: int) -> int:
    """Each rank's stream of random bits (stochastic rounding, int8 codes): rank 0 keeps the
    seed, so one rank computes what one process does."""
    return (seed + rank * _GOLDEN) % 2**64


def _state_bytes(state: Mapping[str, Mapping[str, Any]]) -> int:
    total = 0
    for entry in state.values():
        for value in entry.values():
            if isinstance(value, QuantizedState):
                total += value.codes.nbytes + value.scales.nbytes
            elif isinstance(value, np.ndarray):
                total += value.nbytes
    return total


def _slice_entry(
    parts: List[Tuple[int, int, Mapping[str, Any]]], lo: int, hi: int, order: str
) -> Dict[str, Any]:
    """The state entry of elements [lo, hi) of a tensor from entries of parts [s_lo, s_hi) of it
    (flattened in memory order ``order``); bounds are block-aligned, so int8 scales split too."""
    out: Dict[str, Any] = {}
    for key, first in parts[0][2].items():
        if _whole(first):  # the step, NAdam's mu_product: every part's is the tensor's
            out[key] = first
            continue
        chunks, scales = [], []
        for s_lo, s_hi, entry in parts:
            a, b = max(lo, s_lo), min(hi, s_hi)
            if a >= b:
                continue
            value = entry[key]
            if isinstance(value, QuantizedState):
                # its scales follow its codes' memory order: into the parameter's first, as
                # Optimizer.load_state_dict does (bit for bit where the orders agree); only
                # read here, so not copied where they do
                value = optim._quantized_in_order(value, order, adopt=True)
                chunks.append(np.ravel(value.codes, order=order)[a - s_lo : b - s_lo])
                scales.append(value.scales[(a - s_lo) // BLOCK : -(-(b - s_lo) // BLOCK)])
            else:
                chunks.append(np.ravel(np.asarray(value), order=order)[a - s_lo : b - s_lo])
        if isinstance(first, QuantizedState):
            codes = np.concatenate(chunks) if chunks else first.codes.reshape(-1)[:0]
            out[key] = QuantizedState(
                codes, np.concatenate(scales) if scales else np.empty(0, np.float32)
            )
        else:
            out[key] = np.concatenate(chunks) if chunks else np.asarray(first).reshape(-1)[:0]
    return out


def _write_json(path: str, data: Any) -> None:
    """Atomically: a temporary file in the same folder, flushed to disk, renamed over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fusedopt-", suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, default=optim._json_scalar)  # NumPy scalars, as Optimizer.save
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class _Signature(NamedTuple):
    optimizer: str
    params: List[Tuple[str, Tuple[int, ...], str, str, int]]  # name, shape, dtype, order, group
    groups: List[str]  # each group's hyperparameters, repr'd
    options: str  # max_grad_norm, skip_if_nonfinite and the local optimizer's options, repr'd
    values: List[int]  # a CRC-32 of each parameter's bytes


def _value_digest(p: np.ndarray) -> int:
    return zlib.crc32(_flat(p).view(np.uint8))


# --------------------------------------------------------------------- ZeRO-1


class ZeroRedundancyOptimizer:
    """ZeRO stage 1 over MPI: the optimizer state of 1/N of the parameters on each rank.

    ``ZeroRedundancyOptimizer(params, optim.AdamW, comm, lr=1e-3, ...)`` takes what
    ``optimizer_class(params, ...)`` takes (hyperparameters, parameter groups, ``state_dtype``,
    ``master_weights``, ``max_grad_norm`` ...). ``optimizer_class`` must update each element
    from that element alone, as it steps flat slices: one whose kernel reduces over whole
    tensors (LAMB's norms: its declaration's ``passes`` is 2) or that has no kernel of its own
    (Muon's and Adafactor's matrix updates) is a ValueError.

    Every rank passes the same parameters (names, shapes, dtypes, order, groups) with the same
    values (e.g. broadcast from rank 0 first), and the same hyperparameters and options:
    construction checks all of these (the values by a CRC-32 of their bytes) and raises
    ValueError on every rank on a mismatch.

    The parameters of each dtype form one flat space (each tensor in memory order) cut into N
    even slices, tensors split wherever a cut falls, at a multiple of ``BLOCK`` = 256 elements
    into the tensor, so no rank holds more than 1/N of the state plus one block per dtype.
    :attr:`optim` is the local ``optimizer_class`` over this rank's slices, 1-D views named as
    the full parameters (empty where it holds none of one).

    ``step(grads)``, collective, with this rank's gradients:

    1. packs them into the dtype's flat buffer (float32, float64 for float64 parameters) and
       reduce-scatters it: each rank gets the sum of its slice, divided by N (summed, then
       divided, as torch's DDP does by default: float32 gradients whose sum over the ranks
       passes float32's largest value, about 3.4e38, become infinite);
    2. applies ``skip_if_nonfinite`` and ``max_grad_norm`` to the global gradient (one
       ``Allreduce`` of a flag or of a sum of squares: each rank's ``sum_squares`` over its
       slices of the tensors, one call per gradient dtype, as ``clip_grad_norm_`` sums);
    3. steps its slice with :attr:`optim` on gradients of the dtypes given (bfloat16 and
       float16 ones rounded to nearest once, after clipping, as one process holds them), so
       that it makes one process's fused calls: one per (group, dtypes);
    4. all-gathers the slices into the same buffer and copies them into the parameters,
       which are then the same bits on every rank.

    Apart from the order in which MPI sums the gradients and the ranks' sums of squares, the
    result is what ``optimizer_class`` computes in one process on the averaged gradients, bit
    for bit for every element (the kernels are element-wise) except where random bits enter:
    stochastic rounding and int8 codes draw a different stream per rank (see
    :func:`_local_seed`), equally unbiased; and where bfloat16 or float16 gradients are
    clipped: the average is clipped in float32 and rounded once, where one process would clip
    gradients already rounded to the averaged ones' dtype. On one rank it is one process's
    result bit for bit, random bits included.

    Schedule-Free classes: the step advances the groups' ``k``, ``lr_max`` and ``weight_sum``
    as one process's (they are in :attr:`param_groups` and the checkpoints), and the
    collective :meth:`train` and :meth:`eval` switch every rank's slices.

    Checkpoints: ``consolidate_state_dict(to)`` then ``state_dict()`` on rank ``to`` give the
    state dict of one ``optimizer_class`` over the full parameters: it loads into a plain
    optimizer, and ``load_state_dict`` takes it at any world size. ``save``/``load`` write and
    read it as one file; ``save_shards``/``load_shards`` write one file per rank in parallel and
    reshard on load.

    An error on some ranks only (a bad gradient, a bad hyperparameter) raises on every rank
    before anything changed. An exception after communication began aborts the job with its
    traceback, since the other ranks would otherwise wait for this one forever.
    """

    def __init__(
        self,
        params: Params,
        optimizer_class: Type[Optimizer] = optim.AdamW,
        comm: Any = None,
        **kwargs: Any,
    ) -> None:
        self.comm = comm = _world(comm)
        self.rank, self.world_size = comm.Get_rank(), comm.Get_size()
        self.optimizer_class = optimizer_class
        error: Optional[BaseException] = None
        signature = None
        try:
            if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, Optimizer)):
                raise TypeError(
                    "optimizer_class: expected a fusedopt.optim.Optimizer subclass, got "
                    f"{optimizer_class!r}"
                )
            _check_elementwise(optimizer_class, DECLARATIONS.get(optimizer_class.kernel))
            # The full optimizer allocates no state (it is lazy): it holds the groups, options
            # and checks, and gives consolidated checkpoints their format.
            self._full = optimizer_class(params, **kwargs)
            for group in self._full.param_groups:  # a class may pick its kernel per group
                _check_elementwise(optimizer_class, self._full._plan(group).declaration)
            self._check_no_shared_memory()
            signature = self._signature()
        except Exception as e:
            error = e
        message = None if error is None else f"{type(error).__name__}: {error}"
        signatures = comm.allgather((signature, message))
        if error is not None:
            raise error
        for rank, (_, message) in enumerate(signatures):
            if message is not None:
                raise RuntimeError(f"ZeroRedundancyOptimizer() failed on rank {rank}: {message}")
        self._check_signatures([sig for sig, _ in signatures])

        full = self._full
        by_dtype: Dict[np.dtype, List[str]] = {}
        for name, p in full._params.items():
            by_dtype.setdefault(p.dtype, []).append(name)
        self._spaces = [
            _Space(d, names, [full._params[n].size for n in names], self.world_size, self.rank)
            for d, names in by_dtype.items()
        ]
        self._space_of: Dict[str, _Space] = {}
        self._piece: Dict[str, Tuple[int, int]] = {}  # name -> this rank's (lo, hi) of it
        self._shard_param: Dict[str, np.ndarray] = {}
        self._shard_grad: Dict[str, np.ndarray] = {}
        for space in self._spaces:
            for (name, (lo, hi)), start in zip(space.pieces().items(), space.starts):
                at = start + lo - space.lo if hi > lo else 0  # in this rank's slice
                self._space_of[name], self._piece[name] = space, (lo, hi)
                at_params = space.offset + at
                self._shard_param[name] = space.params[at_params : at_params + hi - lo]
                self._shard_grad[name] = space.shard_grads[at : at + hi - lo]
        groups = [
            {**self._hyper(g), "params": {n: self._shard_param[n] for n in g["names"]}}
            for g in full.param_groups
        ]
        self.optim: Optimizer = optimizer_class(groups, **self._local_options(full.seed))
        self._consolidated: Optional[Dict[str, Any]] = None

    # ----------------------------------------------------------------- construction helpers

    def _check_no_shared_memory(self) -> None:
        """As one process's step checks it: a step copies each parameter's slices in and out,
        so parameters sharing memory would be updated once where one process updates twice."""
        names, params = list(self._full._params), list(self._full._params.values())
        pair = _overlap.first_overlap(_overlap.byte_extents(params), [True] * len(params))
        if pair is not None:
            first, second = (names[i] for i in sorted(pair))
            raise ValueError(
                f"parameter {first!r} and parameter {second!r} share memory; an array that a "
                "step writes must not overlap any other"
            )

    @staticmethod
    def _hyper(group: Mapping[str, Any]) -> Dict[str, Any]:
        return {k: v for k, v in group.items() if k not in ("params", "names")}

    def _options(self) -> Dict[str, Any]:
        """The options that must agree across ranks: a rank alone clipping or skipping would
        make an extra Allreduce (a hang), the others change the local optimizer."""
        full = self._full
        return dict(
            max_grad_norm=full.max_grad_norm,
            skip_if_nonfinite=full.skip_if_nonfinite,
            impl=full.impl,
            state_dtype=full.state_dtype,
            master_weights=full.master_weights,
            stochastic_rounding=full.stochastic_rounding,
            seed=full.seed,
        )

    def _local_options(self, seed: int) -> Dict[str, Any]:
        full = self._full
        return dict(
            impl=full.impl,
            state_dtype=full.state_dtype,
            master_weights=full.master_weights,
            stochastic_rounding=full.stochastic_rounding,
            seed=_local_seed(seed, self.rank),
        )

    def _signature(self) -> _Signature:
        full = self._full
        params, values = [], []
        for i, group in enumerate(full.param_groups):
            for name, p in zip(group["names"], group["params"]):
                params.append((name, tuple(p.shape), str(p.dtype), _order(p), i))
                values.append(_value_digest(p))
        groups = [repr(sorted(self._hyper(g).items())) for g in full.param_groups]
        options = repr(sorted(self._options().items()))
        return _Signature(type(full).__name__, params, groups, options, values)

    def _check_signatures(self, signatures: List[_Signature]) -> None:
        first = signatures[0]
        for rank, sig in enumerate(signatures[1:], 1):
            if sig == first:
                continue
            if sig.optimizer != first.optimizer:
                detail = f"optimizer {first.optimizer} on rank 0, {sig.optimizer} on rank {rank}"
            elif len(sig.params) != len(first.params):
                detail = (
                    f"{len(first.params)} parameters on rank 0, {len(sig.params)} on rank {rank}"
                )
            elif sig.params != first.params:
                i = next(i for i, (a, b) in enumerate(zip(first.params, sig.params)) if a != b)

                def show(p):
                    return f"{p[0]!r} {p[2]} {p[1]} ({p[3]} order, group {p[4]})"

                detail = (
                    f"parameter {i} is {show(first.params[i])} on rank 0, "
                    f"{show(sig.params[i])} on rank {rank}"
                )
            elif sig.groups != first.groups:
                i = next(i for i, (a, b) in enumerate(zip(first.groups, sig.groups)) if a != b)
                detail = f"group {i}'s hyperparameters: {first.groups[i]} on rank 0, "
                detail += f"{sig.groups[i]} on rank {rank}"
            elif sig.options != first.options:
                detail = f"options {first.options} on rank 0, {sig.options} on rank {rank}"
            else:
                i = next(i for i, (a, b) in enumerate(zip(first.values, sig.values)) if a != b)
                detail = (
                    f"the values of parameter {first.params[i][0]!r} differ between rank 0 and "
                    f"rank {rank} (broadcast them from one rank first)"
                )
            raise ValueError(
                "ZeroRedundancyOptimizer: every rank must pass the same parameters (names, "
                f"shapes, dtypes, order, groups, values), hyperparameters and options: {detail}"
            )

    # ----------------------------------------------------------------- what the full one has

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        """The full parameter groups; change hyperparameters here (schedules do), the same on
        every rank: each step passes them to :attr:`optim`."""
        return self._full.param_groups

    @property
    def defaults(self) -> Dict[str, Any]:
        """The default hyperparameters of the full optimizer's groups."""
        return self._full.defaults

    @property
    def names(self) -> List[str]:
        """The full parameters' names, in order."""
        return self._full.names

    @property
    def skipped_steps(self) -> int:
        """How many steps ``skip_if_nonfinite`` skipped (the same count on every rank)."""
        return self._full.skipped_steps

    def freeze(self, names: Union[str, Iterable[str]]) -> None:
        """Stop updating these parameters (on every rank alike: the next step checks); their
        state is kept."""
        self._full.freeze(names)
        self._consolidated = None

    def unfreeze(self, names: Union[str, Iterable[str]]) -> None:
        """Resume updating these parameters (on every rank alike) from their kept state."""
        self._full.unfreeze(names)
        self._consolidated = None

    def reset_state(self, names: Optional[Union[str, Iterable[str]]] = None) -> None:
        """Forget the state of these parameters, or of all (on every rank alike)."""
        self._consolidated = None
        self.optim.reset_state(
            self._full._known(
                self._full._params
                if names is None
                else [names]
                if isinstance(names, str)
                else names
            )
        )

    def state_bytes(self) -> int:
        """Bytes of optimizer state on this rank: moments, masters, int8 codes and scales."""
        return _state_bytes(self.optim.state)

    def _sync(self) -> None:
        """The full groups' hyperparameters and frozen set, validated, into the local one."""
        for full_group, local_group in zip(self._full.param_groups, self.optim.param_groups):
            self._full._plan(full_group)
            local_group.update(self._hyper(full_group))
        self.optim._frozen = set(self._full._frozen)

    # ----------------------------------------------------------------- the step

    def step(self, grads: Grads) -> bool:
        """Collective: average the gradients over the ranks and update every parameter that has
        one and is not frozen (``grads`` as for ``optimizer_class.step``; None for a parameter
        must be None on every rank). Returns False where ``skip_if_nonfinite`` skipped the step
        on every rank, True otherwise."""
        comm, full = self.comm, self._full
        n, n_groups = len(full._params), len(full.param_groups)
        error, aligned = None, {}
        # per parameter: has a gradient, is frozen; per group (and the options): a digest of
        # its hyperparameters. Each as x and -x, in one MAX Allreduce: equal on every rank where
        # max(x) == -max(-x). A rank alone frozen or on another learning rate would corrupt
        # the parameters silently; one alone clipping or skipping would hang.
        local = np.zeros(2 * n + n_groups + 1, np.int64)
        try:
            aligned = full._align(grads)
            self._sync()
            if isinstance(full, optim._ScheduleFree):
                full._check_train_mode()
            local[:n] = [g is not None for g in aligned.values()]
            local[n : 2 * n] = [name in full._frozen for name in full._params]
            local[2 * n : -1] = [
                _digest(repr(sorted(self._hyper(g).items()))) for g in full.param_groups
            ]
            dtypes = [None if g is None else str(g.dtype) for g in aligned.values()]
            local[-1] = _digest(repr((full.max_grad_norm, full.skip_if_nonfinite, dtypes)))
        except Exception as e:
            error = e
        flags = np.concatenate([[error is not None], local, -local])
        comm.Allreduce(_mpi().IN_PLACE, flags, op=_mpi().MAX)
        if flags[0]:
            _agree(comm, error, "ZeroRedundancyOptimizer.step()")
        mixed = flags[1 : 1 + local.size] != -flags[1 + local.size :]
        if mixed.any():
            names = list(full._params)
            nones = [name for name, m in zip(names, mixed[:n]) if m]
            frozen = [name for name, m in zip(names, mixed[n : 2 * n]) if m]
            groups = [i for i, m in enumerate(mixed[2 * n : -1]) if m]
            problems = [
                f"gradients of {nones} are None on some ranks only" if nones else "",
                f"{frozen} are frozen on some ranks only" if frozen else "",
                f"the hyperparameters of groups {groups} differ across ranks" if groups else "",
                "max_grad_norm, skip_if_nonfinite or the gradients' dtypes differ across ranks"
                if mixed[-1]
                else "",
            ]
            raise ValueError(
                f"ZeroRedundancyOptimizer.step(): {'; '.join(filter(None, problems))}. Every "
                "rank must pass the same None gradients, and freeze and set hyperparameters "
                "(schedules) and options alike; nothing changed"
            )
        self._consolidated = None
        try:
            return self._step(aligned)
        except BaseException:
            if self.world_size == 1:
                raise
            _abort(comm, "ZeroRedundancyOptimizer.step()")
            raise

    def _step(self, aligned: Dict[str, Optional[np.ndarray]]) -> bool:
        MPI, comm, full = _mpi(), self.comm, self._full
        # a frozen parameter's gradient counts as None: in neither the norm nor the check
        frozen = full._frozen_names()
        for space in self._spaces:
            for name in space.names:
                g = None if aligned[name] is None or name in frozen else _flat(aligned[name])
                for lo, hi, at in space.segments[name]:
                    space.grads[at : at + hi - lo] = 0 if g is None else g[lo:hi]
            for lo, hi in space.padding:
                space.grads[lo:hi] = 0
            comm.Reduce_scatter_block(space.grads, space.shard_grads, MPI.SUM)
            if self.world_size > 1:
                np.divide(space.shard_grads, self.world_size, out=space.shard_grads)
        shard_grads = [s.shard_grads[: s.hi - s.lo] for s in self._spaces]
        if full.skip_if_nonfinite:
            finite = np.array(all(_functional.all_finite([g]) for g in shard_grads))
            comm.Allreduce(MPI.IN_PLACE, finite, op=MPI.LAND)
            if not finite:
                full.skipped_steps += 1
                return False
        updated = [
            name for name in full._params if aligned[name] is not None and name not in frozen
        ]
        if full.max_grad_norm is not None:
            # as clip_grad_norm_ sums in one process: one sum_squares per gradient dtype over
            # the list of tensors (here this rank's slices of them), in its order of dtypes
            squares = np.zeros(1, np.float64)
            for _, places in _clip._by_dtype([aligned[name] for name in updated]):
                squares[0] += _core.sum_squares([self._shard_grad[updated[i]] for i in places])
            comm.Allreduce(MPI.IN_PLACE, squares, op=MPI.SUM)
            coef = full.max_grad_norm / (math.sqrt(squares[0]) + 1e-6)  # as clip_grad_norm_
            for g in shard_grads:
                _clip.scale_by_coefficient([g], coef)
        for name in updated:
            lo, hi = self._piece[name]
            self._shard_param[name][...] = _flat(full._params[name])[lo:hi]
        self.optim.step({n: self._local_grad(n, g) for n, g in aligned.items()})
        # what the step wrote into its groups (Schedule-Free's k, lr_max, weight_sum), the same
        # on every rank, into the full ones: _sync copies them back, checkpoints carry them
        for full_group, local_group in zip(full.param_groups, self.optim.param_groups):
            full_group.update(self._hyper(local_group))
        self._allgather(updated)
        return True

    def _local_grad(self, name: str, g: Optional[np.ndarray]) -> Optional[np.ndarray]:
        """This rank's slice of the averaged gradient of ``name``, for :attr:`optim`: in the
        dtype of the gradient given (bfloat16, float16: rounded to nearest once, as
        allreduce_mean_ gives them), since one process groups its fused calls by gradient dtype
        and keys random bits by place in the call, and stores a clipped gradient in its
        dtype."""
        if g is None:
            return None
        shard = self._shard_grad[name]
        return shard if g.dtype == shard.dtype else shard.astype(g.dtype)

    def _allgather(self, names: List[str]) -> None:
        """Every rank's slices of the parameter buffers to every rank, into these parameters."""
        MPI, full = _mpi(), self._full
        for space in self._spaces:
            wire = _wire(space.params)
            self.comm.Allgather(MPI.IN_PLACE, [wire, _mpi_type(wire.dtype)])
        for name in names:
            space, p = self._space_of[name], _flat(full._params[name])
            for lo, hi, at in space.segments[name]:
                p[lo:hi] = space.params[at : at + hi - lo]

    # ----------------------------------------------------------------- Schedule-Free modes

    def train(self) -> None:
        """Collective: Schedule-Free's switch of the parameters to :math:`y`, where gradients
        are taken (``optimizer_class.train``): each rank switches its slices, then all-gathers."""
        self._switch(True)

    def eval(self) -> None:
        """Collective: Schedule-Free's switch of the parameters to the average :math:`x`
        (``optimizer_class.eval``): each rank switches its slices, then all-gathers."""
        self._switch(False)

    def _switch(self, to_train: bool) -> None:
        full = self._full
        if not isinstance(full, optim._ScheduleFree):  # the same class on every rank
            raise TypeError(
                f"{type(full).__name__} has no train and eval modes (the Schedule-Free classes "
                "have)"
            )
        error = None
        try:  # all that one process checks before it writes, and the parameters gathered into
            self._sync()
            full._switch_plan(to_train)
            self.optim._switch_plan(to_train)  # this rank's slices of z and the masters
            for name, p in full._params.items():
                optim._check_param(name, p)
        except Exception as e:
            error = e
        _agree(self.comm, error, f"ZeroRedundancyOptimizer.{'train' if to_train else 'eval'}()")
        self._consolidated = None
        try:
            for name, p in full._params.items():
                lo, hi = self._piece[name]
                self._shard_param[name][...] = _flat(p)[lo:hi]
            self.optim._switch(to_train)  # element-wise: each rank's slices of p, z, masters
            self._allgather(list(full._params))
            for full_group in full.param_groups:
                full_group["train_mode"] = to_train
        except BaseException:
            if self.world_size == 1:
                raise
            _abort(self.comm, "ZeroRedundancyOptimizer.train()/eval()")
            raise

    # ----------------------------------------------------------------- checkpoints

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Collective: gather the state of every rank's slices on rank ``to``, where
        :meth:`state_dict` then returns the full checkpoint (one ``Gatherv`` per dtype and
        state buffer). Every rank passes the same ``to``; else every rank raises."""
        comm, local = self.comm, self.optim.state
        error = None
        if isinstance(to, bool) or not isinstance(to, int) or not 0 <= to < self.world_size:
            error = ValueError(f"to: expected a rank in [0, {self.world_size}), got {to!r}")
        layout = [
            (name, entry.get("step"), sorted((k, _kind(v)) for k, v in entry.items()))
            for name, entry in local.items()
        ]
        message = None if error is None else f"{type(error).__name__}: {error}"
        agreed = comm.allgather((message, repr(to), sorted(layout, key=lambda x: x[0])))
        if error is not None:
            raise error
        failed = [(r, m) for r, (m, _, _) in enumerate(agreed) if m is not None]
        if failed:
            raise RuntimeError(
                f"consolidate_state_dict() failed on rank {failed[0][0]}: {failed[0][1]}"
            )
        if any(t != agreed[0][1] for _, t, _ in agreed):
            raise ValueError(
                "consolidate_state_dict: the ranks pass different ranks `to`: "
                + ", ".join(f"{t} on rank {r}" for r, (_, t, _) in enumerate(agreed))
            )
        if any(x != agreed[0][2] for _, _, x in agreed):
            raise RuntimeError(
                "consolidate_state_dict: the ranks' states differ in which parameters have "
                "state, their step counts or buffers: were steps taken on some ranks only?"
            )
        self._consolidated = None
        try:
            state = self._consolidate(to)
        except BaseException:
            if self.world_size == 1:
                raise
            _abort(comm, "ZeroRedundancyOptimizer.consolidate_state_dict()")
            raise
        if self.rank == to:
            order = {n: i for i, n in enumerate(self._full._params)}
            self._consolidated = dict(sorted(state.items(), key=lambda kv: order[kv[0]]))

    def _consolidate(self, to: int) -> Dict[str, Dict[str, Any]]:
        local = self.optim.state
        state: Dict[str, Dict[str, Any]] = {
            n: {k: v for k, v in entry.items() if _whole(v)} for n, entry in local.items()
        }
        for space in self._spaces:
            keys = sorted(
                {k for n in space.names if n in local for k, v in local[n].items() if not _whole(v)}
            )
            for key in keys:
                names = [n for n in space.names if n in local and key in local[n]]
                quantized = isinstance(local[names[0]][key], QuantizedState)
                parts = [local[n][key] for n in names]
                codes = [p.codes if quantized else p for p in parts]
                full = self._gather(space, names, codes, lambda lo, hi: hi - lo, to)
                if quantized:
                    scales = self._gather(
                        space,
                        names,
                        [p.scales for p in parts],
                        lambda lo, hi: -(-(hi - lo) // BLOCK),
                        to,
                    )
                if self.rank != to:
                    continue
                at = scale_at = 0
                for name in names:
                    p = self._full._params[name]
                    value = full[at : at + p.size].reshape(p.shape, order=_order(p))
                    at += p.size
                    if quantized:
                        blocks = -(-p.size // BLOCK)
                        value = QuantizedState(value, scales[scale_at : scale_at + blocks])
                        scale_at += blocks
                    state[name][key] = value
        return state

    def _gather(
        self,
        space: _Space,
        names: List[str],
        arrays: List[np.ndarray],
        count: Callable[[int, int], int],
        to: int,
    ) -> Optional[np.ndarray]:
        """Gatherv of the concatenated local ``arrays`` of ``names`` on rank ``to``: what every
        rank sends, in rank order, which is the full tensors concatenated in order."""
        send = np.concatenate([a.reshape(-1) for a in arrays])
        counts = []
        for rank in range(self.world_size):
            pieces = space.pieces(space.bounds, rank)
            counts.append(sum(count(*pieces[n]) for n in names))
        recv = np.empty(sum(counts), send.dtype) if self.rank == to else None
        wire = _wire(send)
        mpi_type = _mpi_type(wire.dtype)
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
        target = [_wire(recv), (counts, displs), mpi_type] if recv is not None else None
        self.comm.Gatherv([wire, mpi_type], target, root=to)
        return recv

    def state_dict(self) -> Dict[str, Any]:
        """The checkpoint gathered by the last :meth:`consolidate_state_dict` to this rank: what
        ``optimizer_class.state_dict()`` gives in one process, for the full parameters (copies
        of the arrays, as it gives)."""
        if self._consolidated is None:
            raise RuntimeError(
                "state_dict(): the state was not consolidated on this rank since the last change "
                f"(step, load, reset_state, freeze); call consolidate_state_dict(to={self.rank}) "
                "on every rank first"
            )
        full = self._full
        full.state = {}
        sd = full.state_dict()
        sd["state"] = {
            name: {
                k: (v.copy() if isinstance(v, (np.ndarray, QuantizedState)) else v)
                for k, v in entry.items()
            }
            for name, entry in self._consolidated.items()
        }
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Collective: load a full checkpoint (``state_dict()`` of this class or of
        ``optimizer_class``, saved at any world size), each rank taking its slices. Every rank
        passes the same one; a mismatch raises on every rank and changes nothing."""
        error, parts = None, {}
        try:
            state = state_dict.get("state", {})
            for name, entry in state.items():
                p = self._full._params.get(name)
                if p is None:
                    raise ValueError(f"checkpoint has state for unknown parameter {name!r}")
                for key, value in entry.items():
                    if not _whole(value) and getattr(value, "shape", None) != p.shape:
                        raise ValueError(
                            f"state {key!r} of {name!r}: expected shape {p.shape} like the "
                            f"parameter, got {getattr(value, 'shape', type(value).__name__)}"
                        )
                parts[name] = [(0, p.size, entry)]
        except Exception as e:
            error = e
        self._load(state_dict, parts, error, "load_state_dict()")

    def _load(
        self,
        sd: Mapping[str, Any],
        parts: Mapping[str, List[Tuple[int, int, Mapping[str, Any]]]],
        error: Optional[BaseException],
        what: str,
    ) -> None:
        """Collective: load this rank's slices of a checkpoint whose tensors' states come in
        ``parts``: name -> [(lo, hi, entry of elements [lo, hi))]. Every rank slices and checks
        first (the local state on a scratch optimizer), all agree, then all commit: a failure
        on any rank changes nothing on every rank."""
        full, local_sd = self._full, None
        before = full.state_dict()  # it keeps no state: cheap
        if error is None:
            try:
                local_sd = self._local_state_dict(sd, parts)
                full.load_state_dict({**sd, "state": {}})
                try:
                    groups = [
                        {**self._hyper(g), "params": dict(zip(g["names"], g["params"]))}
                        for g in self.optim.param_groups
                    ]
                    scratch = self.optimizer_class(groups, **self._local_options(full.seed))
                    scratch.load_state_dict(local_sd)
                    del scratch
                except BaseException:
                    full.load_state_dict(before)
                    raise
            except Exception as e:
                error = e
        try:
            _agree(self.comm, error, what)
        except BaseException:
            if error is None:  # another rank failed: undo what this one checked
                full.load_state_dict(before)
            raise
        try:
            self.optim.load_state_dict(local_sd)
        except BaseException:
            if self.world_size == 1:
                full.load_state_dict(before)
                raise
            _abort(self.comm, f"ZeroRedundancyOptimizer.{what}")
            raise
        self._consolidated = None

    def _local_state_dict(
        self, sd: Mapping[str, Any], parts: Mapping[str, List[Tuple[int, int, Mapping[str, Any]]]]
    ) -> Dict[str, Any]:
        if sd.get("optimizer") != type(self._full).__name__:
            raise ValueError(
                f"checkpoint of a {sd.get('optimizer')} optimizer, this is a "
                f"{type(self._full).__name__}"
            )
        state = {}
        for name, tensor_parts in parts.items():
            lo, hi = self._piece[name]
            order = _order(self._full._params[name])
            state[name] = _slice_entry(list(tensor_parts), lo, hi, order)
        return {
            **sd,
            "state": state,
            "skipped_steps": 0,
            "max_grad_norm": None,
            "skip_if_nonfinite": False,
            "seed": _local_seed(int(sd.get("seed", 0)), self.rank),
        }

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Collective: consolidate on rank 0, which writes the full checkpoint atomically
        (``optimizer_class``'s format: ``Optimizer.load`` reads it too)."""
        self.consolidate_state_dict(to=0)
        error = None
        if self.rank == 0:
            try:
                optim._write_checkpoint(self.state_dict(), path)
            except Exception as e:
                error = e
        self._consolidated = None
        _agree(self.comm, error, "save()")

    def load_checkpoint(self, path: Union[str, os.PathLike]) -> None:
        """Collective: every rank reads the full checkpoint at ``path`` and takes its slices."""
        error, sd = None, {}
        try:
            sd = Optimizer.read_checkpoint(path)
        except Exception as e:
            error = e
        _agree(self.comm, error, "load_checkpoint()")
        self.load_state_dict(sd)

    @classmethod
    def load(
        cls, path: Union[str, os.PathLike], params: Params, comm: Any = None
    ) -> "ZeroRedundancyOptimizer":
        """Collective: a new optimizer of the saved class, options and hyperparameters over
        ``params``, from a full checkpoint saved at any world size."""
        comm = _world(comm)
        error, sd = None, {}
        try:
            sd = Optimizer.read_checkpoint(path)
            kind = optim._REGISTRY.get(sd.get("optimizer"))
            if kind is None:
                raise ValueError(f"{os.fspath(path)} holds an unknown optimizer")
        except Exception as e:
            error = e
        _agree(comm, error, "ZeroRedundancyOptimizer.load()")
        options = {k: sd.get(k, v) for k, v in Optimizer._DEFAULT_OPTIONS.items()}
        opt = cls(params, kind, comm, **options)
        opt.load_state_dict(sd)
        return opt

    def save_shards(self, path: Union[str, os.PathLike]) -> None:
        """Collective: each rank writes its own state to ``<path>.<id>.rank<r>.npz`` at the same
        time (atomically, as ``Optimizer.save``), then rank 0 writes the manifest ``path``
        (JSON, atomically) that names them and removes the files of the manifest it replaced.
        A crash at any point leaves the previous checkpoint whole. :meth:`load_shards` reads it
        at any world size."""
        comm, error = self.comm, None
        try:
            path = os.fspath(path)
        except Exception as e:  # on one rank only, it would leave the others in bcast
            error = e
        _agree(comm, error, "save_shards()")
        token = comm.bcast(secrets.token_hex(6) if self.rank == 0 else None, root=0)
        files = [f"{os.path.basename(path)}.{token}.rank{r}.npz" for r in range(self.world_size)]
        folder = os.path.dirname(os.path.abspath(path))
        own = os.path.join(folder, files[self.rank])
        try:
            self.optim.save(own)
        except Exception as e:
            error = e
        self._agree_or_remove(error, own)
        if self.rank == 0:
            try:
                old = []
                if os.path.exists(path):
                    with open(path) as f:
                        old = json.load(f).get("files", [])
                # remove only this checkpoint's own shard files, whatever the manifest says
                mine = re.compile(
                    re.escape(os.path.basename(path)) + r"\.[0-9a-f]+\.rank[0-9]+\.npz"
                )
                old = [
                    n
                    for n in old
                    if isinstance(n, str) and mine.fullmatch(n) and "/" not in n and os.sep not in n
                ]
                self._full.state = {}
                _write_json(
                    path,
                    {
                        "format": SHARDS_FORMAT,
                        "version": SHARDS_VERSION,
                        "world_size": self.world_size,
                        "files": files,
                        "spaces": [
                            {
                                "dtype": str(s.dtype),
                                "names": s.names,
                                "sizes": s.sizes,
                                "shapes": [list(self._full._params[n].shape) for n in s.names],
                                "orders": [_order(self._full._params[n]) for n in s.names],
                                "bounds": s.bounds,
                            }
                            for s in self._spaces
                        ],
                        "optimizer_state": self._full.state_dict(),
                    },
                )
                # best effort: after the manifest is written nothing may fail, or every rank
                # would remove the shard files it names
                for name in set(old) - set(files):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(folder, name))
            except Exception as e:
                error = e
        self._agree_or_remove(error, own)

    def _agree_or_remove(self, error: Optional[BaseException], own: str) -> None:
        """save_shards's agreement: where any rank failed, every rank removes the shard file it
        wrote for the manifest that will not name it."""
        try:
            _agree(self.comm, error, "save_shards()")
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(own)
            raise

    def load_shards(self, path: Union[str, os.PathLike]) -> None:
        """Collective: load a checkpoint written by :meth:`save_shards` at any world size; each
        rank reads only the shard files that overlap its slices."""
        error, manifest = None, {}
        parts: Dict[str, List[Tuple[int, int, Mapping[str, Any]]]] = {}
        try:
            path = os.fspath(path)
            with open(path) as f:
                manifest = json.load(f)
            if (
                not isinstance(manifest, dict)
                or manifest.get("format") != SHARDS_FORMAT
                or manifest.get("version") != SHARDS_VERSION
            ):
                raise ValueError(f"{path}: not a {SHARDS_FORMAT} manifest version {SHARDS_VERSION}")
            folder = os.path.dirname(os.path.abspath(path))
            saved = {s["dtype"]: s for s in manifest["spaces"]}
            if sorted(saved) != sorted(str(s.dtype) for s in self._spaces):
                raise ValueError(
                    f"{path}: saved for parameters of dtypes {sorted(saved)}, these are of "
                    f"{sorted(str(s.dtype) for s in self._spaces)}"
                )
            shards: Dict[int, Dict[str, Any]] = {}
            for space in self._spaces:
                s = saved[str(space.dtype)]
                self._check_saved_space(path, s, space)
                bounds = s["bounds"]
                mine = [
                    r
                    for r in range(len(bounds) - 1)
                    if bounds[r] < space.hi and space.lo < bounds[r + 1]
                ]
                # every shard has an entry, maybe empty, for each parameter with state: its step
                for rank in mine or [0]:
                    if rank not in shards:
                        shard_path = os.path.join(folder, manifest["files"][rank])
                        shards[rank] = Optimizer.read_checkpoint(shard_path)["state"]
                    pieces = space.pieces(bounds, rank)
                    for name in space.names:
                        if name in shards[rank]:
                            lo, hi = pieces[name]
                            parts.setdefault(name, []).append((lo, hi, shards[rank][name]))
        except Exception as e:
            error, manifest = e, {}
        self._load(manifest.get("optimizer_state", {}), parts, error, "load_shards()")

    def _check_saved_space(self, path: str, saved: Mapping[str, Any], space: _Space) -> None:
        """The first parameter of ``space`` whose name, size, shape or order differs from the
        manifest's (shapes and orders where it has them)."""
        names, n = saved["names"], len(space.names)
        shapes = saved.get("shapes") or [None] * len(names)
        orders = saved.get("orders") or [None] * len(names)
        rows = list(zip(names, saved["sizes"], shapes, orders))
        for i, name in enumerate(space.names):
            p = self._full._params[name]
            here = (name, p.size, list(p.shape), _order(p))
            if i >= len(rows):
                raise ValueError(f"{path}: {name!r} ({space.dtype}) was not saved")
            there = rows[i]
            for what, a, b in zip(("name", "size", "shape", "order"), there, here):
                if a is not None and a != b:
                    raise ValueError(
                        f"{path}: {space.dtype} parameter {i} {name!r}: saved with {what} "
                        f"{a!r}, here {b!r}"
                    )
        if len(rows) > n:
            raise ValueError(f"{path}: saved {space.dtype} parameter {rows[n][0]!r} is not here")

    def __repr__(self) -> str:
        return (
            f"ZeroRedundancyOptimizer(rank {self.rank} of {self.world_size}, "
            f"{self.state_bytes()} B of state here, optim={self.optim!r})"
        )


def _elementwise(declaration: Optional[Declaration]) -> bool:
    """Whether a kernel's update of an element reads that element alone: one pass (a second
    reduces over whole tensors, as LAMB's norms), and a kernel's at all (Muon and Adafactor
    run matrix and factored updates of whole tensors)."""
    return declaration is not None and declaration.passes == 1


def _check_elementwise(cls: Type[Optimizer], declaration: Optional[Declaration]) -> None:
    if _elementwise(declaration):
        return
    why = "norms" if declaration is not None else "updates"
    takes = sorted(
        name for name, c in optim._REGISTRY.items() if _elementwise(DECLARATIONS.get(c.kernel))
    )
    raise ValueError(
        "optimizer_class: ZeroRedundancyOptimizer steps flat slices of the parameters, so it "
        f"takes element-wise updates only; {cls.__name__} computes {why} over whole tensors. "
        f"It takes {', '.join(takes)}"
    )


def _whole(value: Any) -> bool:
    """Whether a state entry's value is the whole tensor's (a number: the step, NAdam's
    mu_product), not an array that each rank holds a slice of."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    if isinstance(value, QuantizedState):
        return f"int8:{value.codes.dtype}"
    if isinstance(value, np.ndarray):
        return str(value.dtype)
    return type(value).__name__


def _mpi_type(dtype: np.dtype) -> Any:
    from mpi4py.util.dtlib import from_numpy_dtype

    return from_numpy_dtype(dtype)
