"""Tensors past 2**31 and 2**32 elements, allocated for real: a flat buffer of a large model (as
CPU offload steps it) has billions of elements. The thread split's arithmetic is tested at such
sizes without memory (test_hardening.py); here the kernels index, block and draw random bits at
them. Each case fills a whole tensor and takes steps, then checks windows around 2**31, 2**32,
the threads' boundaries and the end against fusedopt.reference run on copies of those windows,
with the random bits of the elements' own indices. They take about 17 GB and two minutes on 2
cores, so they run only with FUSEDOPT_HUGE_TESTS=1: CI sets it for a stage of their own, where
no other suite runs beside them. Skipped too where the machine has too little free memory."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest
from support import assert_same_bits

import fusedopt
from fusedopt import _core, reference
from fusedopt.quantize import BLOCK, QuantizedState, _num_blocks

BF16 = np.dtype(ml_dtypes.bfloat16)
WINDOW = 3 * _core.CHUNK + 300  # elements each side of a boundary: whole chunks and a part


def available_bytes() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0


def needs(n_bytes: float):
    """Skip unless asked for, and unless the machine has ``n_bytes`` free, with a tenth more to
    spare."""
    if os.environ.get("FUSEDOPT_HUGE_TESTS") != "1":
        return pytest.mark.skip(reason="tensors of 2**31 elements and more: FUSEDOPT_HUGE_TESTS=1")
    free = available_bytes()
    return pytest.mark.skipif(
        free < 1.1 * n_bytes,
        reason=f"needs {n_bytes / 2**30:.1f} GiB of free memory, has {free / 2**30:.1f}",
    )


def fill_random(a: np.ndarray, seed: int, piece: int = 1 << 24) -> None:
    """Uniform values in [-1, 1) in pieces (no temporary of the whole array), independent from
    piece to piece, so that no two windows hold the same values."""
    flat = a.reshape(-1)
    for i, start in enumerate(range(0, flat.size, piece)):
        rng = np.random.default_rng([seed, i])
        values = rng.random(min(piece, flat.size - start), dtype=np.float32)
        flat[start : start + values.size] = values * 2 - 1


def windows(n: int, *boundaries: int):
    """Windows [begin, end) of whole int8 blocks (the last may end the tensor) around each
    boundary below n and the threads' boundaries, and the tensor's first and last elements."""
    threads = _core._thread_ranges([n], fusedopt.get_num_threads())
    found = set()
    for b in (0, *boundaries, *(begin for begin, _ in threads), n):
        if 0 <= b <= n:
            begin = max(0, (b - WINDOW) // BLOCK * BLOCK)
            found.add((begin, min(n, _num_blocks(b + WINDOW) * BLOCK)))
    return sorted(found)


def blocks_of(begin: int, end: int) -> slice:
    return slice(begin // BLOCK, _num_blocks(end))


def reference_at(offset: int):
    """fusedopt.reference drawing the random bits of elements offset, offset + 1, ... (the
    window's place in its tensor) for its arrays' elements 0, 1, ..."""
    slot_bits = reference._slot_bits

    def shifted(key, size, slot, start=0):
        return slot_bits(key, size, slot, start=offset + start)

    return shifted


@needs(4 * (2**32 + 2**14))
def test_bfloat16_sgd_past_2_to_the_32(monkeypatch):
    """A bfloat16 param and gradient of 2**32 + 3 chunks + 5 elements, stochastic rounding,
    weight decay: each element's random bits are a hash of its index folded to 32 bits, and
    past 2**32 the fold must tell element i from element i - 2**32."""
    n = 2**32 + 3 * _core.CHUNK + 5
    param = np.empty(n, BF16)
    grad = np.empty(n, BF16)
    fill_random(param, 1)
    fill_random(grad, 2)
    # the same values at i and 2**32 + i: only their random bits can round them apart
    twins = slice(2**32, 2**32 + 2**12)
    param[twins], grad[twins] = param[: 2**12], grad[: 2**12]
    spans = windows(n, 2**31, 2**32)
    before = [(param[b:e].copy(), grad[b:e].copy()) for b, e in spans]
    hyper = dict(lr=0.5, weight_decay=0.01, stochastic_rounding=True, seed=11)
    fusedopt.sgd_(param, grad, **hyper)
    for (begin, end), (p, g) in zip(spans, before):
        monkeypatch.setattr(reference, "_slot_bits", reference_at(begin))
        reference.sgd_(p, g, **hyper)
        monkeypatch.undo()
        assert_same_bits(param[begin:end], p, f"elements {begin} to {end}")
    # the fold's constant makes i and 2**32 + i draw different bits, so they round apart
    assert np.mean(param[: 2**12] != param[twins]) > 0.2


@needs(6.1 * (2**31 + 2**14))
def test_adam_with_int8_state_past_2_to_the_31(monkeypatch):
    """Adam on a bfloat16 param and gradient of 2**31 + a chunk + 5 elements, with int8 state
    (its scales one per block, past 2**23 blocks) and stochastic rounding, two steps."""
    n = 2**31 + _core.CHUNK + 5
    param = np.empty(n, BF16)
    grad = np.empty(n, BF16)
    fill_random(param, 3)
    fill_random(grad, 4)
    exp_avg = QuantizedState.zeros(n, signed=True)
    exp_avg_sq = QuantizedState.zeros(n, signed=False)
    state = (exp_avg, exp_avg_sq)
    spans = windows(n, 2**31)

    def window(begin, end):
        blocks = blocks_of(begin, end)
        return [param[begin:end].copy(), grad[begin:end].copy()] + [
            QuantizedState(s.codes[begin:end].copy(), s.scales[blocks].copy()) for s in state
        ]

    hyper = dict(lr=1e-2, weight_decay=0.1, stochastic_rounding=True, seed=5)
    before = [window(b, e) for b, e in spans]
    for step in (1, 2):
        fusedopt.adamw_(param, grad, *state, step=step, **hyper)
    for (begin, end), (p, g, m, v) in zip(spans, before):
        monkeypatch.setattr(reference, "_slot_bits", reference_at(begin))
        for step in (1, 2):
            reference.adamw_(p, g, m, v, step=step, **hyper)
        monkeypatch.undo()
        label = f"elements {begin} to {end}"
        assert_same_bits(param[begin:end], p, label)
        for s, expected in zip(state, (m, v)):
            assert_same_bits(s.codes[begin:end], expected.codes, label)
            assert_same_bits(s.scales[blocks_of(begin, end)], expected.scales, label)
