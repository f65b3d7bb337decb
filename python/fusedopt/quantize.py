r"""8-bit block-quantized optimizer state: the exact NumPy codec.

A state array of :math:`n` elements, flattened in its memory order, is cut into blocks of
``BLOCK = 256`` consecutive elements (the last may be shorter). Each block stores one float32
scale :math:`2^E` and one byte per element: block floating point with a shared power-of-two
exponent per block, as in the OCP Microscaling formats. Each byte is a tiny float with
:math:`M = 3` mantissa bits and IEEE-style inf/NaN codes, relative to the block's scale:

- signed (``int8`` codes): bit 7 is the sign, bits 0..6 the magnitude field :math:`q`, with
  :math:`EB = 4` exponent bits (E4M3);
- unsigned (``uint8`` codes, for states that are never negative such as Adam's ``exp_avg_sq``):
  bits 0..7 are :math:`q`, with :math:`EB = 5` exponent bits (E5M3).

With :math:`F_{\max} = 2^{EB} - 1` and :math:`F = F_{\max} - 1` (14 or 30), the field
:math:`q = 8f + m` (:math:`0 \le m < 8`) has the value

.. math::

    v(q) = \begin{cases}
        m \cdot 2^{-F-2} & f = 0 \text{ (subnormal)} \\
        (1 + m/8) \cdot 2^{f-F} & 1 \le f \le F \\
        \infty \;(m = 0), \ \mathrm{NaN} \;(m \ne 0) & f = F_{\max}
    \end{cases}

and a code decodes to :math:`\pm v(q) \cdot 2^E`, one float32 multiply rounded to nearest even
(no flush to zero). The largest finite magnitude is :math:`v = 1.875`.

Encoding a block takes :math:`a`, the largest finite :math:`|x|` in it, rounds it up to 3
mantissa bits (so that every element's code, however rounded, fits without saturating: a
saturated maximum would bias stochastic rounding down) and sets :math:`E` to the exponent of
the result, clamped to
:math:`[-126, 127]`; each :math:`x \cdot 2^{-E}` is then rounded to a code (saturating at 1.875
only when :math:`E` is clamped at 127), to nearest even or stochastically (below). NaN stays NaN
and :math:`\pm\infty` stays :math:`\pm\infty`; the unsigned format stores every negative value
(``-inf`` included) as 0.

Rounded to nearest (``encode`` without ``random_bits``), every finite :math:`x` round-trips
within half a step of its grid:

.. math::

    |\hat x - x| \le \begin{cases}
        2^{-4} \, |x| & |x| \ge 2^{1-F+E} \\
        2^{-F-3+E} & |x| < 2^{1-F+E}
    \end{cases}

Rounded stochastically (``random_bits``: 16 random bits per element added below the 3 mantissa
bits kept, then truncated), a code is the grid point just below :math:`|x| \cdot 2^{-E}` or
the one just above, the nearer the likelier, so that the expected decoded value is :math:`x` up
to :math:`2^{-16}` of a step; the error is then below one step:

.. math::

    |\hat x - x| < \begin{cases}
        2^{-3} \, |x| & |x| \ge 2^{1-F+E} \\
        2^{-F-2+E} & |x| < 2^{1-F+E}
    \end{cases}

The kernels always round int8 state stochastically, whatever ``stochastic_rounding`` says, with
16 of each element's random bits from the call's ``seed`` and step (those stochastic rounding
draws): an exponential moving average whose changes are below half a step would never move
when rounded to nearest. :func:`encode` here rounds to nearest unless given ``random_bits``.

Decoded values are exactly representable, so encoding them again, with either rounding, decodes
to the same values. Mostly the codes and scales are the same too, but not where a block's
largest value was rounded down into a lower binade: 1.9 encodes with the scale 2 and decodes to
1.875, which encodes with the scale 1. This module is the specification of the C++ codec, which
agrees with it bit for bit; it depends on NumPy only.
"""

from __future__ import annotations

import numbers
from typing import Iterator, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["BLOCK", "QuantizedState", "decode", "encode"]

Shape = Union[int, Sequence[int]]

BLOCK = 256
"""Elements per block: element ``i`` of a tensor (in memory order) has scale ``i // BLOCK``."""

_M = 3  # mantissa bits of every code
_ROUND_UP = (1 << (23 - _M)) - 1  # 0xFFFFF: rounds float32 bits up to 3 mantissa bits
_ROUND = (1 << (23 - _M - 1)) - 1  # 0x7FFFF: rounds float32 bits to 3 mantissa bits with the lsb
_TWO23 = np.float32(2.0**23)
_TWO23_BITS = 0x4B000000
_PIECE = 1 << 16  # elements the NumPy codec takes at a time (see _pieces)


class _Format:
    """The constants of one code format."""

    def __init__(self, signed: bool) -> None:
        self.signed = signed
        self.dtype = np.dtype(np.int8 if signed else np.uint8)
        eb = 4 if signed else 5
        self.fmax = (1 << eb) - 1
        self.f = self.fmax - 1
        self.q_inf = self.fmax << _M
        self.q_nan = self.q_inf | 4
        self.q_max = self.q_inf - 1
        self.min_normal = np.float32(2.0 ** (1 - self.f))
        self.to_subnormal_steps = np.float32(2.0 ** (self.f + 2))
        self.lut = self._value_table()

    def _value_table(self) -> np.ndarray:
        """Decoded value of each of the 256 codes at scale 1, from the bit layout."""
        q = np.arange(256, dtype=np.uint32)
        if self.signed:
            q = q & 0x7F
        f, m = q >> _M, q & 7
        subnormal = m.astype(np.float32) * np.float32(2.0 ** (1 - self.f - _M))
        normal_bits = ((f.astype(np.int64) - self.f + 127) << 23) | (m.astype(np.int64) << 20)
        normal = np.where(f >= 1, normal_bits, 0).astype(np.uint32).view(np.float32)
        special = np.where(m == 0, np.float32(np.inf), np.float32(np.nan)).astype(np.float32)
        value = np.where(f == 0, subnormal, np.where(f == self.fmax, special, normal))
        value = value.astype(np.float32)
        if self.signed:
            value = np.where(np.arange(256) >= 0x80, -value, value)  # 0x80 -> -0.0
        return value


_SIGNED = _Format(True)
_UNSIGNED = _Format(False)


def _format_of(codes: np.ndarray) -> _Format:
    return _SIGNED if codes.dtype == np.int8 else _UNSIGNED


def _memory_order(a: np.ndarray) -> str:
    """'F' for a Fortran-ordered array, else 'C' (what ``reshape(-1, order="A")`` reads)."""
    return "F" if a.flags.f_contiguous and not a.flags.c_contiguous else "C"


def _num_blocks(n: int, block: int = BLOCK) -> int:
    return -(-n // block)


def _check_array(name: str, a: object, dtypes: tuple[type, ...]) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype not in [np.dtype(d) for d in dtypes]:
        allowed = " or ".join(np.dtype(d).name for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}, got {a.dtype}")
    return a


def _check_signed(signed: object) -> None:
    if not isinstance(signed, (bool, np.bool_)):  # a truthy "no" must not mean signed
        raise TypeError(f"signed must be a bool, got {type(signed).__name__}")


def _check_codes_scales(codes: object, scales: object) -> tuple[np.ndarray, np.ndarray]:
    codes = _check_array("codes", codes, (np.int8, np.uint8))
    scales = _check_array("scales", scales, (np.float32,))
    if not (codes.flags.c_contiguous or codes.flags.f_contiguous):
        raise ValueError("codes must be C- or F-contiguous")
    if scales.ndim != 1:
        raise ValueError(f"scales must be 1-D, got shape {scales.shape}")
    if not scales.flags.c_contiguous:  # held and updated in place by the kernels
        raise ValueError("scales must be contiguous, got a strided view")
    if scales.size != _num_blocks(codes.size):
        raise ValueError(
            f"scales must have ceil(codes.size / {BLOCK}) = {_num_blocks(codes.size)} "
            f"elements, got {scales.size}"
        )
    return codes, scales


def encode(
    x: np.ndarray, signed: bool, random_bits: Optional[np.ndarray] = None
) -> tuple[np.ndarray, np.ndarray]:
    """Encodes a float32 array; returns ``(codes, scales)``.

    ``codes`` has the shape and memory layout (C or F) of ``x``, dtype int8 if ``signed`` else
    uint8; ``scales`` is float32 of length ``ceil(x.size / BLOCK)``, each a power of two. Blocks
    follow the memory order of ``x`` (a non-contiguous ``x`` is read in C order).

    Rounds to nearest even, or with ``random_bits`` (16 random bits per element, uint32, in
    the memory order of ``x``; an array of more than one dimension is read in C order)
    stochastically: the bits are added below the 3 mantissa bits kept (the top 16
    of the 20 dropped), then truncated, so that the expected code is x up to 2**-16 of a step.
    The kernels round quantized state this way: with 3 mantissa bits, an exponential moving
    average whose steps (1 - beta of it) are below half a step never moves when rounded to
    nearest.
    """
    x = _check_array("x", x, (np.float32,))
    _check_signed(signed)
    if random_bits is not None:
        _check_array("random_bits", random_bits, (np.uint32,))
        if random_bits.size != x.size:
            raise ValueError(
                f"random_bits must have one element per element of x ({x.size}), got "
                f"{random_bits.size}"
            )
    return _encode(x, signed, random_bits, BLOCK)


def _pieces(n: int, block: int) -> Iterator[Tuple[slice, slice]]:
    """The elements and the scales of each piece of whole blocks (the last may end in a
    shorter block) that the codec takes at a time, at least one piece: its NumPy temporaries
    take tens of bytes an element, too many for a whole state of 1e9 elements."""
    size = max(block, _PIECE // block * block)
    for start in range(0, max(n, 1), size):
        stop = min(start + size, n)
        yield slice(start, stop), slice(start // block, _num_blocks(stop, block))


def _encode(
    x: np.ndarray, signed: bool, random_bits: Optional[np.ndarray], block: int
) -> tuple[np.ndarray, np.ndarray]:
    """encode() with blocks of ``block`` elements: the kernels' format for BLOCK, other sizes
    for experiments (bench/block_size.py)."""
    fmt = _SIGNED if signed else _UNSIGNED
    order = _memory_order(x)
    flat = x.reshape(-1, order=order)
    n = flat.size
    bits = None if random_bits is None else np.asarray(random_bits).reshape(-1)
    codes = np.empty(n, fmt.dtype)
    scales = np.empty(_num_blocks(n, block), np.float32)
    for piece, its_scales in _pieces(n, block):
        codes[piece], scales[its_scales] = _encode_blocks(
            flat[piece], fmt, None if bits is None else bits[piece], block
        )
    return codes.reshape(x.shape, order=order), scales


def _encode_blocks(
    flat: np.ndarray, fmt: _Format, random_bits: Optional[np.ndarray], block: int
) -> tuple[np.ndarray, np.ndarray]:
    """The codes and scales of the blocks of 1-D ``flat`` (all whole but the last)."""
    n = flat.size
    blocks = np.zeros((_num_blocks(n, block), block), np.float32)  # zeros leave the max alone
    blocks.reshape(-1)[:n] = flat

    # The scale: 2**E, E the exponent of the block's largest finite |x| rounded up to 3 bits.
    amax = np.where(np.isfinite(blocks), np.abs(blocks), np.float32(0)).max(axis=1)
    u = amax.view(np.uint32).astype(np.int64)
    exponent = np.clip(((u + _ROUND_UP) >> 23) - 127, -126, 127)
    scales = ((exponent + 127) << 23).astype(np.uint32).view(np.float32)
    # 2**-127 is a float32 subnormal, so the float64 power converts exactly.
    inverse = np.ldexp(1.0, -exponent).astype(np.float32)

    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        a = np.abs(blocks * inverse[:, None])
        u = a.view(np.uint32).astype(np.int64)
        if random_bits is None:
            t = a * fmt.to_subnormal_steps
            q_normal = ((u + _ROUND + ((u >> 20) & 1)) >> 20) - ((127 - fmt.f) << _M)
            # Adding 2**23 rounds t to an integer (nearest even); its low mantissa bits are q.
            q_subnormal = (t + _TWO23).view(np.uint32).astype(np.int64) - _TWO23_BITS
        else:
            r = np.zeros(blocks.size, np.int64)
            r[:n] = random_bits.astype(np.int64) & 0xFFFF
            r = r.reshape(blocks.shape)
            q_normal = ((u + (r << 4)) >> 20) - ((127 - fmt.f) << _M)
            # The smallest normal added in float32 (rounding 20 bits below a step) puts the
            # subnormal steps in the top mantissa bits; then as for normal codes.
            shifted = (a + fmt.min_normal).view(np.uint32).astype(np.int64)
            q_subnormal = ((shifted + (r << 4)) >> 20) - ((128 - fmt.f) << _M)
        q = np.where(a >= fmt.min_normal, q_normal, q_subnormal)
    q = np.minimum(q, fmt.q_max)
    q = np.where(np.isinf(blocks), fmt.q_inf, q)
    q = np.where(np.isnan(blocks), fmt.q_nan, q)
    if fmt.signed:
        q = q | (np.signbit(blocks).astype(np.int64) << 7)
    else:
        q = np.where(blocks < 0, 0, q)
    return q.reshape(-1)[:n].astype(np.uint8).view(fmt.dtype), scales


def _in_order(codes: np.ndarray, scales: np.ndarray, order: str) -> tuple[np.ndarray, np.ndarray]:
    """The codes and scales of the same decoded values with the blocks in memory order
    ``order`` (for codes laid out in the other one): encoded again, to nearest, as ``encode``
    would encode the decoded array laid out in ``order``. Each piece of the new order gathers
    its elements' codes and scales where the old order holds them, so the temporaries are a
    piece's, not the decoded array and its copy in the other order."""
    shape, fmt = codes.shape, _format_of(codes)
    source = _memory_order(codes)
    flat = codes.reshape(-1, order=source).view(np.uint8)
    n = flat.size
    out = np.empty(n, fmt.dtype)
    out_scales = np.empty(_num_blocks(n), np.float32)
    for piece, its_scales in _pieces(n, BLOCK):
        index = np.unravel_index(np.arange(piece.start, piece.stop), shape, order=order)
        at = np.ravel_multi_index(index, shape, order=source)
        with np.errstate(under="ignore", invalid="ignore"):
            values = fmt.lut[flat[at]] * scales[at // BLOCK]  # as _decode multiplies
        out[piece], out_scales[its_scales] = _encode_blocks(values, fmt, None, BLOCK)
    return out.reshape(shape, order=order), out_scales


def decode(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Decodes ``codes`` (int8: signed format, uint8: unsigned) with their blocks' ``scales``.

    Returns float32 in the shape and memory layout of ``codes``: each element is the code's
    value times its block's scale, one float32 multiply rounded to nearest even.
    """
    return _decode(*_check_codes_scales(codes, scales), BLOCK)


def _decode(codes: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    """decode() of blocks of ``block`` elements (see _encode)."""
    order = _memory_order(codes)
    flat = codes.reshape(-1, order=order).view(np.uint8)
    lut = _format_of(codes).lut
    out = np.empty(flat.size, np.float32)
    for piece, its_scales in _pieces(flat.size, block):
        values = lut[flat[piece]]
        with np.errstate(under="ignore", invalid="ignore"):
            out[piece] = values * np.repeat(scales[its_scales], block)[: values.size]
    return out.reshape(codes.shape, order=order)


class QuantizedState:
    """An array of 8-bit codes and their per-block scales (see :mod:`fusedopt.quantize`).

    ``codes`` is int8 (signed format) or uint8 (unsigned format), any shape, C- or
    F-contiguous; ``scales`` is 1-D float32 with one power of two per ``BLOCK`` elements of
    ``codes`` in memory order. The arrays are held, not copied.
    """

    __slots__ = ("codes", "scales")

    codes: np.ndarray
    scales: np.ndarray

    def __init__(self, codes: np.ndarray, scales: np.ndarray) -> None:
        self.codes, self.scales = _check_codes_scales(codes, scales)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codes.shape

    @property
    def size(self) -> int:
        return self.codes.size

    @property
    def signed(self) -> bool:
        return self.codes.dtype == np.int8

    @property
    def nbytes(self) -> int:
        """Bytes of codes and scales together."""
        return self.codes.nbytes + self.scales.nbytes

    def __repr__(self) -> str:
        order = _memory_order(self.codes)
        return (
            f"QuantizedState(shape={self.shape}, signed={self.signed}, order={order!r}, "
            f"blocks={self.scales.size}, nbytes={self.nbytes})"
        )

    def dequantize(self) -> np.ndarray:
        """The decoded float32 array, in the shape and memory layout of ``codes``."""
        return decode(self.codes, self.scales)

    def __getstate__(self):
        # protocols 0 and 1 save slots only through this; the others' form, arrays as held
        slots = {}
        for cls in type(self).__mro__:
            names = getattr(cls, "__slots__", ())
            for name in [names] if isinstance(names, str) else names:
                if hasattr(self, name):
                    slots[name] = getattr(self, name)
        return None, slots

    def copy(self) -> QuantizedState:
        """An independent copy: new arrays of the same codes (in their memory layout, C or F)
        and scales, bit for bit."""
        return type(self)(self.codes.copy(order="K"), self.scales.copy())

    @classmethod
    def zeros(cls, shape: Shape, signed: bool, order: str = "C") -> QuantizedState:
        """All zeros, with the scales that encoding zeros gives (``2**-126``).

        ``signed``: True for int8 codes (the signed E4M3 format, for a state of any sign, such
        as Adam's ``exp_avg`` or a momentum buffer), False for uint8 codes (the unsigned E5M3
        format, for a state that is never negative, such as Adam's ``exp_avg_sq``; a kernel
        takes it only for such a state). ``order``: the codes' memory layout, "C" or "F"
        (blocks follow it).
        """
        return cls.full(shape, 0.0, signed, order)

    @classmethod
    def full(cls, shape: Shape, value: float, signed: bool, order: str = "C") -> QuantizedState:
        """Every element ``value`` (rounded to float32; past its range, inf), encoded: the
        codes and scales of ``from_array(np.full(shape, value, np.float32, order=order),
        signed)``, made without that array or the encoder's work on it (one block is encoded
        and its code and scale repeated). ``signed`` and ``order`` as for :meth:`zeros`."""
        _check_signed(signed)
        if order not in ("C", "F"):
            raise ValueError(f"order must be 'C' or 'F', got {order!r}")
        real = isinstance(value, numbers.Real) or (
            isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "fiu"
        )
        if not real or isinstance(value, (bool, np.bool_)):
            what = f"an array of shape {value.shape}" if np.ndim(value) else type(value).__name__
            raise TypeError(f"value must be a real number, got {what}")
        with np.errstate(over="ignore"):  # past float32's range is inf, as stored
            block = np.full(BLOCK, value, np.float32)
        code, scale = _encode(block, signed, None, BLOCK)
        if code[0] == 0:  # zeros: pages the OS maps on first use, not written now
            codes = np.zeros(shape, code.dtype, order=order)
        else:
            codes = np.full(shape, code[0], code.dtype, order=order)
        return cls(codes, np.full(_num_blocks(codes.size), scale[0], np.float32))

    @classmethod
    def from_array(cls, x: np.ndarray, signed: bool) -> QuantizedState:
        """Encodes the float32 array ``x`` (see :func:`encode`)."""
        return cls(*encode(x, signed))


def _check_scales(where: str, scales: np.ndarray) -> None:
    """That int8 state's scales are what the encoder writes: powers of two from 2**-126 to
    2**127 (positive, normal, no mantissa bits). Any other (NaN, inf, 0, negative) would decode
    to NaN or to values the format cannot hold. The kernels' binding checks the same."""
    bits = scales.view(np.uint32)
    exponent = bits >> 23
    if np.any((bits & 0x7FFFFF) != 0) or np.any((exponent < 1) | (exponent > 254)):
        raise ValueError(
            f"{where}: scales must be powers of two in [2**-126, 2**127], as the encoder "
            "writes them"
        )
