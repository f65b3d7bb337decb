"""The NumPy codec of 8-bit block-quantized state (fusedopt.quantize) against its spec: the
value table of every code, hand-computed encodings, the round-trip error bound (and that it is
tight), special values, memory order and the QuantizedState container."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
from support import assert_same_bits, peak_traced_bytes

from fusedopt.quantize import BLOCK, QuantizedState, decode, encode

FLT_MAX = float(np.finfo(np.float32).max)
SIZES = [0, 1, 255, 256, 257, 1000, 2048 + 3]


def F_of(signed):
    return 14 if signed else 30


def spec_value(code, signed):
    """A code's value at scale 1, written out from the spec's formulas."""
    fmax = 15 if signed else 31
    F = fmax - 1
    q = code & 0x7F if signed else code
    f, m = q >> 3, q & 7
    if f == 0:
        v = math.ldexp(m, 1 - F - 3)
    elif f < fmax:
        v = math.ldexp(1 + m / 8, f - F)
    else:
        v = math.inf if m == 0 else math.nan
    return -v if signed and code & 0x80 else v


def f32(values):
    return np.array(values, dtype=np.float32)


def bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


def block_exponents(scales):
    """E of every scale 2**E, after checking that each is a (normal float32) power of two."""
    b = bits(scales)
    assert np.all(b & 0x807FFFFF == 0), "a scale is not a positive power of two"
    e = (b >> 23).astype(np.int64) - 127
    assert np.all((e >= -126) & (e <= 127))
    assert_same_bits(np.ldexp(1.0, e), scales.astype(np.float64))
    return e


def assert_roundtrip(x, signed):
    """Checks codes, scales and the decoded values of x against the spec; returns err / bound
    of every finite element it bounds, for the normal and the subnormal range."""
    codes, scales = encode(x, signed)
    assert codes.dtype == (np.int8 if signed else np.uint8)
    assert codes.shape == x.shape
    if x.ndim > 1 and not x.flags.c_contiguous:
        assert codes.flags.f_contiguous
    else:
        assert codes.flags.c_contiguous
    assert scales.dtype == np.float32 and scales.shape == (-(-x.size // BLOCK),)
    e = np.repeat(block_exponents(scales), BLOCK)[: x.size]

    y = decode(codes, scales)
    assert y.dtype == np.float32 and y.shape == x.shape
    xs = x.reshape(-1, order="A").astype(np.float64)
    ys = y.reshape(-1, order="A").astype(np.float64)

    assert np.all(np.isnan(ys[np.isnan(xs)]))
    negative = (xs < 0) & ~np.isnan(xs)
    if signed:
        inf = np.isinf(xs)
        assert_same_bits(ys[inf], xs[inf])
        bounded = np.isfinite(xs)
    else:
        assert np.all(bits(y.reshape(-1, order="A"))[negative] == 0)  # +0.0
        inf = xs == np.inf
        assert_same_bits(ys[inf], xs[inf])
        bounded = np.isfinite(xs) & ~negative

    F = F_of(signed)
    xb, yb, eb = xs[bounded], ys[bounded], e[bounded]
    normal = np.abs(xb) >= np.ldexp(1.0, 1 - F + eb)
    bound = np.where(normal, np.abs(xb) * 2.0**-4, np.ldexp(1.0, 1 - F - 4 + eb))
    error = np.abs(yb - xb)
    worst = np.argmax(error - bound) if error.size else None
    assert np.all(error <= bound), (xb[worst], yb[worst], eb[worst], bound[worst])
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(bound > 0, error / bound, 0.0)

    # decoded values are exactly representable: encoding them again gives them back (the scale
    # may drop a binade, where the maximum rounded down into the one below)
    again = decode(*encode(y, signed))
    np.testing.assert_array_equal(bits(again), bits(y))
    return ratio[normal], ratio[~normal]


def distributions(rng, n):
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    per_block = np.repeat(10.0 ** rng.integers(-30, 30, -(-n // BLOCK)), BLOCK)[:n]
    return {
        "normal": rng.standard_normal(n),
        "lognormal": sign * np.exp(rng.uniform(-80, 80, n)),
        "block_magnitudes": rng.standard_normal(n) * per_block,
        "positive": rng.random(n) ** 4 * 1e-6,
        "constant": np.full(n, 0.3),
        "zeros": np.zeros(n),
    }


# ---------------------------------------------------------------------------------------------
# the value table


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("exponent", [0, -20, 5, -126, 127])
def test_every_code_decodes_to_the_spec_value(signed, exponent):
    codes = np.arange(256).astype(np.uint8).view(np.int8 if signed else np.uint8)
    scales = f32([2.0**exponent])
    got = decode(codes, scales)
    # v * 2**E is exact in float64; one rounding to float32 (nearest even, no flush to zero)
    expected = f32([spec_value(c, signed) * 2.0**exponent for c in range(256)])
    nan = np.isnan(expected)
    assert nan.sum() == (14 if signed else 7)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(bits(got)[~nan], bits(expected)[~nan])


def test_value_table_landmarks():
    one, fmax, inf, nan = 14 << 3, (14 << 3) | 7, 15 << 3, (15 << 3) | 4
    signed = decode(np.array([one, fmax, inf, nan, 1, 8], np.uint8).view(np.int8), f32([1.0]))
    assert_same_bits(signed[:3], f32([1.0, 1.875, np.inf]))
    assert np.isnan(signed[3])
    assert_same_bits(signed[4:], f32([2.0**-16, 2.0**-13]))
    unsigned = decode(np.array([240, 247, 248, 252, 1, 8], np.uint8), f32([1.0]))
    assert_same_bits(unsigned[:3], f32([1.0, 1.875, np.inf]))
    assert np.isnan(unsigned[3])
    assert_same_bits(unsigned[4:], f32([2.0**-32, 2.0**-29]))


def test_signed_0x80_decodes_to_negative_zero():
    y = decode(np.array([-128, 0], np.int8), f32([4.0]))
    assert bits(y).tolist() == [0x80000000, 0]


# ---------------------------------------------------------------------------------------------
# encodings worked out by hand from the spec

S = 2.0**-16  # the signed subnormal step at scale 1
U = 2.0**-32  # the unsigned one
NAN = float("nan")
NEG_NAN = -NAN
GOLDEN = [
    # signed: x, codes (as uint8), E
    (True, [1.0], [112], 0),
    (True, [3.0], [116], 1),
    (True, [1.9375], [112], 1),  # max rounds (tie, to even) up to 2: E = 1, 0.96875 -> 1.0
    (True, [1.8125], [118], 0),  # tie, to even: m = 6
    # the max rounds up to 2 for the scale (E = 1), then 0.953125 to nearest: 0.9375
    (True, [1.90625], [111], 1),
    (
        True,
        [1.0, 0.5 * S, 1.5 * S, 2.5 * S, 3.5 * S, 7.5 * S, 2.0**-13],
        [112, 0, 2, 2, 4, 8, 8],
        0,
    ),
    (True, [-1.0, -2.5 * S], [0x80 | 112, 0x80 | 2], 0),
    (True, [NAN, NEG_NAN, np.inf, -np.inf, -0.0, 0.0], [0x7C, 0xFC, 0x78, 0xF8, 0x80, 0], -126),
    (True, [FLT_MAX, -FLT_MAX, 1.0], [119, 0x80 | 119, 0], 127),  # saturates
    (True, [2.0**-149], [0], -126),
    (True, [np.inf, 3.0, NAN], [0x78, 116, 0x7C], 1),  # the max is over finite elements
    # unsigned
    (False, [1.0], [240], 0),
    (False, [3.0], [244], 1),
    (False, [1.0, 0.5 * U, 2.5 * U, 3.5 * U, 7.5 * U, 2.0**-29], [240, 0, 2, 4, 8, 8], 0),
    # negatives saturate at 0 but count in the block's max (so decoding and encoding again
    # would change the scale)
    (False, [-1.0, 0.5], [0, 232], 0),
    (False, [NAN, NEG_NAN, np.inf, -np.inf, -0.0, 0.0], [252, 252, 248, 0, 0, 0], -126),
    (False, [FLT_MAX], [247], 127),
    (False, [2.0**-149], [56], -126),
]


@pytest.mark.parametrize("signed, x, expected, exponent", GOLDEN)
def test_hand_computed_encodings(signed, x, expected, exponent):
    x = f32(x)
    assert np.signbit(f32([NEG_NAN, -0.0])).all()  # the inputs keep their signs
    codes, scales = encode(x, signed)
    assert codes.view(np.uint8).tolist() == expected
    assert bits(scales).tolist() == [(exponent + 127) << 23]


# ---------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize(
    "name", ["normal", "lognormal", "block_magnitudes", "positive", "constant", "zeros"]
)
def test_roundtrip_within_bound(signed, name):
    rng = np.random.default_rng([7, signed, len(name)])
    for n in SIZES:
        assert_roundtrip(distributions(rng, n)[name].astype(np.float32), signed)


@pytest.mark.parametrize("signed", [True, False])
def test_bound_is_tight(signed):
    # magnitudes 2**-40 .. 2**2: both ranges well populated in every block
    rng = np.random.default_rng(11)
    n = 1 << 16
    x = (rng.choice([-1.0, 1.0], n) * 2.0 ** rng.uniform(-40, 2, n)).astype(np.float32)
    if not signed:
        x = np.abs(x)
    normal, subnormal = assert_roundtrip(x, signed)
    assert normal.size > 10_000 and subnormal.size > 10_000
    # 0.9 of the bound would be violated in both ranges
    assert normal.max() > 0.9 and subnormal.max() > 0.9


@pytest.mark.parametrize("signed", [True, False])
def test_zero_block_and_outlier_block(signed):
    rng = np.random.default_rng(3)
    small = np.abs(rng.standard_normal(3 * BLOCK)) * 1e-3
    small[BLOCK : 2 * BLOCK] = 0.0
    small[2 * BLOCK + 17] = 1e30
    x = small.astype(np.float32)
    assert_roundtrip(x, signed)
    codes, scales = encode(x, signed)
    e = block_exponents(scales)
    assert e[1] == -126 and not codes[BLOCK : 2 * BLOCK].any()
    assert e[2] == math.frexp(float(x[2 * BLOCK + 17]))[1] - 1  # 1e30 = 1.26 * 2**99
    y = decode(codes, scales)
    assert not np.delete(y[2 * BLOCK :], 17).any()  # everything else in the block is lost
    if signed:  # a block of -0.0 keeps its signs
        codes, scales = encode(-np.zeros(BLOCK, np.float32), True)
        assert (codes == -128).all() and np.signbit(decode(codes, scales)).all()


@pytest.mark.parametrize("signed", [True, False])
def test_nan_and_inf(signed):
    rng = np.random.default_rng(5)
    x = rng.standard_normal(3 * BLOCK).astype(np.float32)
    where = rng.choice(x.size, 60, replace=False)
    x[where[:20]] = np.nan
    x[where[20:40]] = np.inf
    x[where[40:]] = -np.inf
    x[2 * BLOCK :] = np.where(rng.random(BLOCK) < 0.5, np.inf, np.nan)  # nothing finite
    ratio_normal, _ = assert_roundtrip(x, signed)
    assert ratio_normal.size > (400 if signed else 200)
    _, scales = encode(x, signed)
    assert block_exponents(scales)[2] == -126


@pytest.mark.parametrize("signed", [True, False])
def test_float32_subnormal_inputs(signed):
    rng = np.random.default_rng(9)
    k = rng.integers(0, 1 << 23, 4 * BLOCK).astype(np.uint32)
    x = (k | (rng.integers(0, 2, k.size).astype(np.uint32) << 31)).view(np.float32)
    x[:BLOCK] = np.abs(x[:BLOCK]) * np.float32(2.0**-10)  # tinier still
    assert_roundtrip(x, signed)
    assert (block_exponents(encode(x, signed)[1]) == -126).all()


@pytest.mark.parametrize("signed", [True, False])
def test_near_flt_max(signed):
    top = np.nextafter(np.float32(FLT_MAX), np.float32(0))
    x = f32([FLT_MAX, top, 1.9375 * 2.0**127, 1.90625 * 2.0**127, 1.875 * 2.0**127, 2.0**127])
    x = np.concatenate([x, -x, f32([1.0, 1e-30, 0.0])])
    ratio, _ = assert_roundtrip(x, signed)
    codes, scales = encode(x, signed)
    assert block_exponents(scales).tolist() == [127]
    q_max = 119 if signed else 247
    assert codes.view(np.uint8)[:5].tolist() == [q_max] * 5  # saturated, not inf
    assert ratio.max() > 0.99  # FLT_MAX -> 1.875 * 2**127 is just inside the bound


@pytest.mark.parametrize("signed", [True, False])
def test_idempotent(signed):
    """Decoded values are fixed points: encoding them again gives the same values. Not always
    the same codes: a block whose largest value rounds down past a power of two (1.9, with
    scale 2, decodes to 1.875) encodes again with half the scale, its codes one binade up."""
    rng = np.random.default_rng(13)
    cases = list(distributions(rng, 3 * BLOCK + 5).values())
    below_a_power_of_two = np.zeros(BLOCK, np.float32)
    below_a_power_of_two[:2] = 1.9, 0.3
    for x, poisoned in [(x, True) for x in cases] + [(below_a_power_of_two, False)]:
        x = x.astype(np.float32)
        if poisoned:
            x[::97] = np.nan
            x[1::101] = -np.inf
        if not signed:  # see assert_roundtrip
            x = np.abs(x)
        values = decode(*encode(x, signed))
        assert_same_bits(decode(*encode(values, signed)), values)
    codes, scales = encode(below_a_power_of_two, signed)
    again = encode(decode(codes, scales), signed)
    assert bits(again[1])[0] != bits(scales)[0]  # the case above does change its scale


# ---------------------------------------------------------------------------------------------
# memory order and shapes


@pytest.mark.parametrize("signed", [True, False])
def test_fortran_order_follows_memory(signed):
    rng = np.random.default_rng(17)
    # rows of very different magnitudes, so that the blocks' contents depend on the order
    x = np.asfortranarray(rng.standard_normal((37, 50)) * 10.0 ** np.arange(-18, 19)[:, None])
    x = x.astype(np.float32, order="F")
    assert x.flags.f_contiguous and not x.flags.c_contiguous
    codes, scales = encode(x, signed)
    assert codes.flags.f_contiguous and codes.shape == x.shape
    codes_t, scales_t = encode(x.T, signed)  # the same memory, in C order
    assert codes_t.flags.c_contiguous
    np.testing.assert_array_equal(codes.T, codes_t)
    np.testing.assert_array_equal(bits(scales), bits(scales_t))
    assert not np.array_equal(scales, encode(np.ascontiguousarray(x), signed)[1])
    y = decode(codes, scales)
    assert y.flags.f_contiguous
    np.testing.assert_array_equal(bits(y.T), bits(decode(codes_t, scales_t)))
    assert_roundtrip(x, signed)


def test_shapes():
    for shape in [(), (0,), (3, 0), (2, 3, 100), (1, 300)]:
        x = np.ones(shape, np.float32)
        codes, scales = encode(x, True)
        assert codes.shape == shape and scales.size == -(-x.size // BLOCK)
        assert_same_bits(decode(codes, scales), x)
    # a non-contiguous array is read in C order
    x = np.arange(1000, dtype=np.float32).reshape(20, 50)[:, ::2]
    codes, scales = encode(x, False)
    np.testing.assert_array_equal(codes, encode(np.ascontiguousarray(x), False)[0])


# ---------------------------------------------------------------------------------------------
# errors and QuantizedState


def test_encode_decode_refuse_bad_arguments():
    with pytest.raises(TypeError, match="x must have dtype float32"):
        encode(np.zeros(3), True)
    with pytest.raises(TypeError, match="x must be a numpy.ndarray"):
        encode([1.0], True)
    with pytest.raises(TypeError, match="codes must have dtype int8 or uint8"):
        decode(np.zeros(3, np.int16), f32([1.0]))
    with pytest.raises(TypeError, match="scales must have dtype float32"):
        decode(np.zeros(3, np.int8), np.ones(1))
    with pytest.raises(ValueError, match="scales must be 1-D"):
        decode(np.zeros(3, np.int8), np.ones((1, 1), np.float32))
    with pytest.raises(ValueError, match=r"scales must have ceil\(codes.size / 256\) = 2"):
        decode(np.zeros(257, np.int8), f32([1.0]))
    with pytest.raises(ValueError, match="codes must be C- or F-contiguous"):
        decode(np.zeros((4, 4), np.int8)[:, ::2], f32([1.0]))


@pytest.mark.parametrize("signed", [True, False])
def test_quantized_state(signed):
    rng = np.random.default_rng(19)
    x = np.asfortranarray(rng.standard_normal((30, 20)).astype(np.float32))
    state = QuantizedState.from_array(x, signed)
    codes, scales = encode(x, signed)
    assert_same_bits(state.codes, codes)
    assert_same_bits(state.scales, scales)
    assert state.shape == (30, 20) and state.size == 600 and state.signed is signed
    assert state.nbytes == 600 + 3 * 4
    assert repr(state) == (
        f"QuantizedState(shape=(30, 20), signed={signed}, order='F', blocks=3, nbytes=612)"
    )
    y = state.dequantize()
    assert y.flags.f_contiguous
    assert_same_bits(y, decode(codes, scales))

    clone = state.copy()
    assert clone.codes.flags.f_contiguous
    clone.codes[0, 0] += 1
    clone.scales[0] = 2.0
    assert_same_bits(state.codes, codes)
    assert_same_bits(state.scales, scales)

    assert not hasattr(state, "__dict__")
    with pytest.raises(AttributeError):
        state.other = 1


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("order", ["C", "F"])
def test_zeros_is_encoded_zeros(signed, order):
    state = QuantizedState.zeros((300, 3), signed, order=order)
    encoded = QuantizedState.from_array(np.zeros((300, 3), np.float32, order=order), signed)
    assert state.codes.dtype == encoded.codes.dtype
    assert state.codes.flags.f_contiguous == (order == "F")
    np.testing.assert_array_equal(state.codes, encoded.codes)
    np.testing.assert_array_equal(bits(state.scales), bits(encoded.scales))
    assert QuantizedState.zeros(5, signed).shape == (5,)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize(
    "value", [0.0, -0.0, 1.0, -1.9, 0.1, 3e-40, -1e-45, FLT_MAX, 1e39, -math.inf, math.nan]
)
def test_full_is_the_encoded_full_array(signed, order, value):
    """Every value kind (zero, normal, float32-subnormal, the largest, past float32's range,
    inf, NaN, negative for the unsigned format), in whole and short blocks."""
    for shape in [(0,), (1,), (BLOCK,), (BLOCK + 1, 3), (7, 2 * BLOCK + 5)]:
        state = QuantizedState.full(shape, value, signed, order=order)
        with np.errstate(over="ignore"):
            x = np.full(shape, value, np.float32, order=order)
        encoded = QuantizedState.from_array(x, signed)
        assert state.codes.flags.f_contiguous == encoded.codes.flags.f_contiguous
        assert_same_bits(state.codes, encoded.codes)
        assert_same_bits(state.scales, encoded.scales)


def test_full_refuses_a_value_that_is_not_a_real_number():
    """By name (None became NaN, "2.5" 2.5, a complex its real part, an array NumPy's error)."""
    for value, got in [(None, "NoneType"), ("2.5", "str"), (1 + 2j, "complex"), (True, "bool"),
                       (np.ones(3), "an array of shape \\(3,\\)")]:  # fmt: skip
        with pytest.raises(TypeError, match=f"^value must be a real number, got {got}$"):
            QuantizedState.full(4, value, True)
    for value in (np.array(2.0), np.float32(1.5), 3, np.int8(-1)):
        assert_same_bits(
            QuantizedState.full(4, value, True).dequantize(), np.full(4, value, np.float32)
        )


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_a_quantized_state_pickles_with_every_protocol(protocol):
    """Protocols 0 and 1 too (a class with __slots__ needs __getstate__ for them), bit for bit
    and in the codes' memory order; deepcopy copies the arrays, copy shares them."""
    x = np.asfortranarray(np.random.default_rng(3).standard_normal((300, 3)).astype(np.float32))
    for state in (QuantizedState.from_array(x, signed=True), QuantizedState.zeros((2, 5), False)):
        loaded = pickle.loads(pickle.dumps(state, protocol))
        assert type(loaded) is QuantizedState
        assert loaded.codes.flags.f_contiguous == state.codes.flags.f_contiguous
        assert_same_bits(loaded.codes, state.codes)
        assert_same_bits(loaded.scales, state.scales)
    assert copy.deepcopy(state).codes is not state.codes and copy.copy(state).codes is state.codes


@pytest.mark.parametrize("signed", [True, False])
def test_the_codec_in_pieces_equals_it_in_one(monkeypatch, signed):
    """The codec runs in pieces of whole blocks so that its temporaries stay small: the pieces
    must not change a bit. Here a piece of 2 blocks against one of the whole array, at sizes
    around the pieces' ends, both roundings, values of every kind."""
    from fusedopt import quantize

    rng = np.random.default_rng(21)
    for n in [0, 1, 2 * BLOCK - 1, 2 * BLOCK, 2 * BLOCK + 1, 5 * BLOCK + 77]:
        x = (rng.standard_normal(n) * np.exp2(rng.integers(-140, 120, n))).astype(np.float32)
        x[rng.random(n) < 0.05] = np.nan
        x[rng.random(n) < 0.05] = -np.inf
        x[rng.random(n) < 0.1] = 0
        random_bits = rng.integers(0, 2**16, n, dtype=np.uint32)
        with np.errstate(over="ignore"):
            whole = [encode(x, signed), encode(x, signed, random_bits)]
        decoded = [decode(*codec) for codec in whole]
        monkeypatch.setattr(quantize, "_PIECE", 2 * BLOCK)
        with np.errstate(over="ignore"):
            pieces = [encode(x, signed), encode(x, signed, random_bits)]
        for (codes, scales), (codes_1, scales_1), values in zip(pieces, whole, decoded):
            assert_same_bits(codes, codes_1)
            assert_same_bits(scales, scales_1)
            assert_same_bits(decode(codes, scales), values)
        monkeypatch.undo()


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(37, 29), (7, 9, 11), (1, 600), (600, 1), (0, 5)])
def test_codes_in_the_other_order_are_the_decoded_array_encoded_in_it(monkeypatch, signed, shape):
    """int8 state loaded into a parameter of the other memory layout: its values encoded again
    in that layout's blocks, to nearest, a piece at a time (here of 2 blocks, monkeypatched),
    equal to the whole decoded array copied into that layout and encoded."""
    from fusedopt import quantize

    rng = np.random.default_rng(5)
    x = (rng.standard_normal(shape) * np.exp2(rng.integers(-30, 30, shape))).astype(np.float32)
    x[rng.random(shape) < 0.05] = 0
    x[rng.random(shape) < 0.02] = np.nan
    x[rng.random(shape) < 0.02] = -np.inf
    monkeypatch.setattr(quantize, "_PIECE", 2 * BLOCK)
    for order, other in (("C", "F"), ("F", "C")):
        codes, scales = encode(np.asarray(x, order=order), signed)
        with np.errstate(over="ignore"):
            want = encode(np.asarray(decode(codes, scales), order=other), signed)
        got = quantize._in_order(codes, scales, other)
        assert got[0].flags[f"{other}_CONTIGUOUS"]
        assert_same_bits(got[0], want[0], f"{order} to {other}")
        assert_same_bits(got[1], want[1], f"{order} to {other}")


def test_the_codec_and_int8_state_take_little_memory_beyond_their_arrays():
    """Making int8 state takes its codes and scales, not a float32 array of the state and the
    encoder's temporaries (about 60 bytes an element): the state of a large model would not
    fit while it is made. tracemalloc counts NumPy's arrays."""
    from fusedopt import optim

    n = 1 << 21
    x = np.random.default_rng(3).standard_normal(n).astype(np.float32)
    param, grad = np.zeros(n, np.float32), np.ones(n, np.float32)
    little = 8 << 20  # bytes: the codec's pieces of whole blocks
    codes, scales = encode(x.reshape(1024, -1), True)
    for what, make, kept in [
        ("encode", lambda: encode(x, True), n + n // 64),
        ("decode", lambda: decode(*encode(x, True)), 4 * n),
        (
            "loaded into the other order",
            lambda: optim._quantized_in_order(QuantizedState(codes, scales), "F", adopt=True),
            n + n // 64,
        ),
        ("Adam's int8 state", lambda: optim.Adam([param], state_dtype="int8").step([grad]), 0),
    ]:
        peak = peak_traced_bytes(make)
        # the state is 2 bytes an element (two moments of codes) and a scale a block
        assert peak < kept + 2 * n + little, f"{what}: {peak / n:.1f} bytes an element at peak"


def test_quantized_state_validates():
    with pytest.raises(TypeError, match="codes must be a numpy.ndarray"):
        QuantizedState([0], f32([1.0]))
    with pytest.raises(TypeError, match="codes must have dtype"):
        QuantizedState(np.zeros(3, np.float32), f32([1.0]))
    with pytest.raises(TypeError, match="scales must be a numpy.ndarray"):
        QuantizedState(np.zeros(3, np.int8), [1.0])
    with pytest.raises(ValueError, match="scales must have"):
        QuantizedState(np.zeros(3, np.int8), f32([1.0, 1.0]))
    with pytest.raises(ValueError, match="order must be 'C' or 'F'"):
        QuantizedState.zeros(3, True, order="K")
    with pytest.raises(ValueError, match="scales must be contiguous, got a strided view"):
        QuantizedState(np.zeros(300, np.int8), f32([1.0, 1.0, 1.0, 1.0])[::2])
    x = np.ones(300, np.float32)
    for call in (
        lambda: QuantizedState.zeros(3, "no"),
        lambda: QuantizedState.from_array(x, None),
        lambda: encode(x, 1),
    ):
        with pytest.raises(TypeError, match="signed must be a bool, got"):
            call()
    with pytest.raises(TypeError, match="random_bits must have dtype uint32, got float64"):
        encode(x, True, np.full(300, 0.7))
    for size in (10, 301):
        with pytest.raises(
            ValueError,
            match=f"random_bits must have one element per element "
            rf"of x \(300\), got {size}",
        ):
            encode(x, True, np.zeros(size, np.uint32))
    encode(x, True, np.zeros((3, 100), np.uint32))  # in memory order, any shape


def _blocks_for_both_codec_paths(rng, signed):
    """Blocks of a state that the C++ codec takes its fast loops for (every value normal at its
    block's scale) and blocks it must not: a zero, a value just below the smallest normal code
    and one exactly at it, subnormal codes, inf, NaN, a scale of 2^127, all negative."""
    F = F_of(signed)
    blocks = [np.abs(rng.standard_normal(BLOCK)) + 0.5 for _ in range(9)]
    blocks[1][7] = 0.0
    blocks[2][:] = 1.0
    blocks[2][3] = math.ldexp(1.0, 1 - F)  # exactly the smallest normal: the fast loop
    blocks[3][:] = 1.0
    blocks[3][3] = np.nextafter(np.float32(math.ldexp(1.0, 1 - F)), np.float32(0))  # below
    blocks[4][::5] = math.ldexp(1.0, -F - 1)  # subnormal codes
    blocks[5][9] = np.inf
    blocks[6][200] = np.nan
    blocks[7] *= FLT_MAX / 4  # scale 2^127
    blocks[8] = -blocks[8]  # unsigned codes store negatives as 0
    x = np.concatenate(blocks).astype(np.float32)
    if signed:
        x[: 4 * BLOCK] *= np.where(rng.random(4 * BLOCK) < 0.5, -1, 1)
    return x[: x.size - 3]  # a short last block


def _adam_matches_reference(grad, m, v, **hyper):
    """Adam on a param of ones with int8 states m and v (copies of them), through the kernels
    and through fusedopt.reference: the same param bits, codes and scales. Returns the kernels'
    m and v."""
    import fusedopt
    from fusedopt import reference

    runs = []
    for update in (fusedopt.adam_, reference.adam_):
        param = np.ones(grad.size, np.float32)
        states = [QuantizedState(s.codes.copy(), s.scales.copy()) for s in (m, v)]
        with np.errstate(all="ignore"):
            update(param, grad, *states, lr=1e-3, **hyper)
        runs.append((param, *states))
    (param, *states), (param_ref, *states_ref) = runs
    np.testing.assert_array_equal(param.view(np.uint8), param_ref.view(np.uint8), strict=True)
    for state, state_ref in zip(states, states_ref):
        np.testing.assert_array_equal(state.codes, state_ref.codes, strict=True)
        np.testing.assert_array_equal(
            state.scales.view(np.uint8), state_ref.scales.view(np.uint8), strict=True
        )
    return states


@pytest.mark.parametrize("signed", [True, False])
def test_the_compiled_codec_matches_the_spec_on_its_fast_and_general_blocks(signed):
    """The kernels decode blocks of only normal codes by a shorter loop: through Adam with
    beta1 = beta2 = 0.5 (m and v half the old state, half the new), state blocks of both kinds
    give the reference's bits, codes and scales (the encoder's boundaries: the next test)."""
    rng = np.random.default_rng(11 if signed else 12)
    old = _blocks_for_both_codec_paths(rng, signed)
    grad = _blocks_for_both_codec_paths(rng, signed)[::-1].copy()
    # the blocks in the state of their kind (m signed, v unsigned), the other one plain
    crafted = QuantizedState(*encode(old, signed))
    other = QuantizedState(*encode(np.abs(old), not signed))
    m, v = (crafted, other) if signed else (other, crafted)
    _adam_matches_reference(grad, m, v, beta1=0.5, beta2=0.5, step=3, seed=5)


@pytest.mark.parametrize("signed", [True, False])
def test_the_compiled_decoder_takes_its_general_loop_for_every_code_that_needs_it(signed):
    """Block c holds code c (0 ... 255) among random normal codes below the largest, so that
    code c alone decides which loop decodes the block; a short last block has code 7, the
    largest subnormal, in its tail. Through Adam (beta1 = beta2 = 0.5) the kernels give the
    reference's bits: a decoder that took the loop without selects for any subnormal, inf or
    NaN code would not."""
    rng = np.random.default_rng(14 if signed else 15)
    top = (15 if signed else 31) << 3  # the inf code; normal codes are 8 ... top - 1
    codes = rng.integers(8, top - 1, (257, BLOCK), dtype=np.uint8)
    if signed:
        codes |= rng.choice(np.array([0, 0x80], np.uint8), codes.shape)
    codes[:256, 100] = np.arange(256, dtype=np.uint8)
    codes[256, 200] = 7
    codes = codes.reshape(-1)[: 256 * BLOCK + 201].view(np.int8 if signed else np.uint8)
    scales = np.ldexp(1.0, rng.integers(-20, 4, 257)).astype(np.float32)
    n = codes.size
    grad = np.zeros(n, np.float32)  # m and v halved exactly: a wrong decode shows in every bit
    other = encode(np.abs(rng.standard_normal(n)).astype(np.float32) * 1e-3, not signed)
    crafted, plain = QuantizedState(codes, scales), QuantizedState(*other)
    m, v = (crafted, plain) if signed else (plain, crafted)
    _adam_matches_reference(grad, m, v, beta1=0.5, beta2=0.5, step=3, seed=6)


def _gradients_at_the_encoders_boundaries(rng):
    """With zero state and beta1 = beta2 = 0 Adam encodes m = g and v = g * g: blocks of g
    that put m or v exactly at the smallest normal code of its block's scale (the encoder's
    shorter loop) or one float below it (the general loop); blocks whose largest m or v is
    at the largest code, 1.875 times the scale, or a float below it (stochastic rounding may
    reach that code, never pass it: the shorter loop does not clamp), or a float above it
    (the next scale); and others that are only normal or hold a zero, inf or NaN."""
    below = lambda x: np.nextafter(np.float32(x), np.float32(0))  # noqa: E731
    above = lambda x: np.nextafter(np.float32(x), np.float32(np.inf))  # noqa: E731
    blocks = [rng.standard_normal(BLOCK) + 3.0 for _ in range(13)]
    # m: scale 2^0, smallest normal code 2^(1-14); v = g * g is then normal
    blocks[1][:] = 1.0
    blocks[1][5] = math.ldexp(1.0, -13)
    blocks[2][:] = 1.0
    blocks[2][5] = below(math.ldexp(1.0, -13))
    # v: largest 1.5^2 = 2.25, scale 2^1, smallest normal code 2^(2-30) = (2^-14)^2
    blocks[3][:] = 1.5
    blocks[3][5] = math.ldexp(1.0, -14)
    blocks[4][:] = 1.5
    blocks[4][5] = below(math.ldexp(1.0, -14))
    # the largest code: m at, below and above 1.875 (every element, so that many random bits
    # round it); v = g * g at 1.875 - 2^-22 (0x6FFFFE: the nearest float32 square below
    # 1.875, none is exact) and 1.875 + 2^-23 (0x700001); the last at a scale of 2^-8
    blocks[5][:] = 1.875
    blocks[6][:] = below(1.875)
    blocks[7][:] = 1.875
    blocks[7][9] = above(1.875)
    blocks[8][:] = 1.3693063259124756
    blocks[9][:] = 1.3693063259124756
    blocks[9][9] = 1.3693064451217651
    blocks[9] *= 2.0**-4
    blocks[10][6] = 0.0
    blocks[11][7] = np.inf
    blocks[12][8] = np.nan
    g = np.concatenate(blocks).astype(np.float32)
    g[::3] *= -1
    return g[: g.size - 5]


def test_the_compiled_encoder_matches_the_spec_at_its_boundaries():
    """Every block of m = g and v = g * g, at and just below the smallest normal code, from
    the kernels' encoder: the reference's codes and scales, bit for bit."""
    g = _gradients_at_the_encoders_boundaries(np.random.default_rng(13))
    m = QuantizedState.zeros(g.shape, signed=True)
    v = QuantizedState.zeros(g.shape, signed=False)
    _adam_matches_reference(g, m, v, beta1=0.0, beta2=0.0, step=1, seed=9)
    # the blocks are what they are meant to be: exactly at and below the boundary
    _, m_scales = encode(g, True)
    assert m_scales[1] == m_scales[2] == 1.0
    assert m_scales[5] == m_scales[6] == 1.0 and m_scales[7] == 2.0
    v = g.astype(np.float32) * g.astype(np.float32)
    assert np.abs(v[8 * BLOCK : 9 * BLOCK]).max().view(np.uint32) == 0x3FEFFFFE
    assert np.abs(v[9 * BLOCK : 10 * BLOCK]).max().view(np.uint32) == 0x3FF00001 - (8 << 23)


@pytest.mark.parametrize("signed", [True, False])
def test_the_compiled_codec_folds_the_scale_in_only_where_that_is_exact(signed):
    """The kernels' shorter loops fold a block's scale 2^E into integer arithmetic where every
    result stays a normal float32: the decoder for E >= F - 127, the encoder for E <= 109
    (signed) or 125 (unsigned). Blocks on both sides of each boundary, of normal values only,
    with zeros, and with subnormal codes or values below the smallest normal code, decoded
    (Adam with zero grads and beta1 = beta2 = 0.5) and encoded (zero state, beta1 = beta2 = 0:
    m = g and v = g * g), give the reference's bits, codes and scales."""
    rng = np.random.default_rng(16 if signed else 17)
    F = F_of(signed)
    top = (15 if signed else 31) << 3
    exponents = [F - 129, F - 128, F - 127, F - 126, -126, 0, 100, 126, 127]
    # normal codes; with zeros; with every subnormal code
    codes = rng.integers(8, top - 1, (3, len(exponents), BLOCK), dtype=np.uint8)
    codes[1, :, ::5] = 0
    codes[2, :, ::7] = np.arange(8, dtype=np.uint8)[np.arange(BLOCK)[::7] % 8]
    if signed:
        codes |= rng.choice(np.array([0, 0x80], np.uint8), codes.shape)
    codes = codes.reshape(-1).view(np.int8 if signed else np.uint8)
    crafted = QuantizedState(codes, np.ldexp(1.0, exponents * 3).astype(np.float32))
    plain = QuantizedState(*encode(np.full(codes.size, 0.25, np.float32), not signed))
    m, v = (crafted, plain) if signed else (plain, crafted)
    grad = np.zeros(codes.size, np.float32)
    _adam_matches_reference(grad, m, v, beta1=0.5, beta2=0.5, step=3, seed=6)

    # the encoder: blocks whose largest m (or v) is 1.5 2^E, the others within 2^-8 of it;
    # then the same with zeros (which the shorter loops take, folded or not), and with zeros
    # and values below the smallest normal code (which they take unfolded); E = -126 at the
    # end: a block of float32 subnormals
    limit = 109 if signed else 125
    exponents = [limit - 1, limit, limit + 1, limit + 2, 0, -100, -126]
    blocks = []
    for kind in ("normal", "zeros", "small"):
        for e in exponents:
            x = 1.5 * 2.0 ** rng.uniform(-8, 0, BLOCK)
            x[3] = 1.5
            if kind == "small":
                x[5::9] = 2.0 ** rng.uniform(-2 * F, -F + 1, x[5::9].size)
            if kind != "normal":
                x[7::11] = 0.0
            if e == -126:  # m or v = g * g float32 subnormals, largest about 1.5 2^-140
                e = -140
            blocks.append(np.ldexp(x, e) if signed else np.sqrt(np.ldexp(x, e)))
    g = np.concatenate(blocks).astype(np.float32)
    g[::3] *= -1
    m = QuantizedState.zeros(g.shape, signed=True)
    v = QuantizedState.zeros(g.shape, signed=False)
    m, v = _adam_matches_reference(g, m, v, beta1=0.0, beta2=0.0, step=1, seed=9)
    encoded = m.scales if signed else v.scales
    assert block_exponents(encoded).tolist() == exponents * 3
