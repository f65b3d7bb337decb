r"""The executable specification: every update rule in plain NumPy, as written in the literature.

Arrays stored in bfloat16 or float16 (in any combination the fused functions take) are
converted to float32 (float64 for a float64 param), the formula runs there, and what it writes
is rounded once, to nearest even: the semantics of the kernels. A state given as a
:class:`fusedopt.quantize.QuantizedState` is decoded to float32 and encoded back after the
formula; with ``master=`` float32 master weights the formula runs on the master and the param
becomes the master rounded.

Each function has the signature of its fused twin in :mod:`fusedopt` (a test checks that they
agree with the kernel's declaration; only the fused twin still takes a renamed buffer's old,
deprecated keyword) and updates its arrays in place, one tensor or a list of tensors. It does
no validation. The fused kernels compute the same operations in the same order (see the comment
atop each ``csrc/kernels/optimizers/*.hpp``), so they agree bit for bit. Bias
corrections and learning-rate factors are Python floats (double); NumPy applies them to float32
arrays as float32.

The docstring of each function is the update rule; the fused function's docstring is the same
text with its arguments, derived from the declaration.
"""

from __future__ import annotations

import functools
import inspect
import math

import ml_dtypes
import numpy as np

from .quantize import QuantizedState, _check_scales, encode

__all__ = [
    "adafactor_",
    "adagrad_",
    "adam_",
    "adamax_",
    "adamw_",
    "lamb_",
    "lion_",
    "momentum_",
    "muon_",
    "nadam_",
    "radam_",
    "rmsprop_",
    "schedulefree_adamw_",
    "schedulefree_averaging",
    "schedulefree_sgd_",
    "sgd_",
]


SEED_NEEDED = (
    "seed is required: with no step argument, the random bits of stochastic rounding and of int8 "
    "state are a function of the seed alone, so pass a new one each call (e.g. the step count; "
    "the fusedopt.optim classes do)"
)


def _tensors(arrays):
    """Each tensor's array of ``arrays``: each an array, a QuantizedState, a list of them or
    None."""
    return [
        t for a in arrays if a is not None for t in (a if isinstance(a, (list, tuple)) else [a])
    ]


def _draws_random_bits(stochastic_rounding, arrays):
    """Whether a call stores int8 state or, stochastically, a bfloat16 or float16 array:
    ``arrays`` are the param and the state buffers (see _tensors)."""
    return any(
        isinstance(t, QuantizedState)
        or (stochastic_rounding and getattr(t, "dtype", None) in _STOCHASTIC)
        for t in _tensors(arrays)
    )


# The buffers a formula reads only while a hyperparameter is on (true or nonzero), as the
# kernels declare them (a test checks that they agree): one given with its switch off is neither
# read nor written, so it draws no random bits and its scales are not checked.
_SWITCHED_BUFFERS = {
    "max_exp_avg_sq": "amsgrad",
    "momentum_buffer": "momentum",
    "grad_avg": "centered",
}


def _seed(function, seed, takes_step, stochastic_rounding, arrays):
    """The call's seed: 0 for None, which a call without a step that draws random bits refuses,
    as the kernels do."""
    if seed is not None:
        return seed
    if not takes_step and _draws_random_bits(stochastic_rounding, arrays):
        raise TypeError(f"{function}(): {SEED_NEEDED}")
    return 0


def _python_number(value):
    """A NumPy bool, integer or float scalar as the Python number it equals (a longdouble
    rounded to double, as the kernels read it); anything else as it is."""
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def _for_each_tensor(update):
    """Lets a one-tensor update take lists of arrays too (then every array argument is a list),
    skip the whole step when asked to and a gradient is not finite, and store low-precision
    arrays as the kernels do (see :func:`_in_compute_type`). Returns whether the step was
    applied."""
    signature = inspect.signature(update)
    takes_step = "step" in signature.parameters
    # the buffers in the order of the kernel's arrays (slot 1, 2, ...; the param is slot 0)
    buffers_in_order = [
        p.name
        for p in signature.parameters.values()
        if (p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in ("param", "grad"))
        or (p.kind is p.KEYWORD_ONLY and p.default is None)
    ]
    switch_defaults = {
        p.name: p.default
        for p in signature.parameters.values()
        if p.name in _SWITCHED_BUFFERS.values()
    }

    @functools.wraps(update)
    def wrapper(
        param,
        grad,
        *arrays,
        skip_if_nonfinite=False,
        stochastic_rounding=False,
        seed=None,
        master=None,
        **hyper,
    ):
        # NumPy scalars as the Python numbers they equal, as the kernels read them: under
        # NumPy's promotion rules an np.float64 lr would make the formula run in float64
        hyper = {k: _python_number(v) for k, v in hyper.items()}
        seed = _python_number(seed)
        switches = {**switch_defaults, **hyper}
        optional = [
            v
            for k, v in hyper.items()
            if isinstance(v, (np.ndarray, QuantizedState, list))
            and (k not in _SWITCHED_BUFFERS or switches[_SWITCHED_BUFFERS[k]])
        ]
        arrays_stored = [param, *arrays, *optional]
        seed = _seed(update.__name__, seed, takes_step, stochastic_rounding, arrays_stored)
        for t in _tensors(arrays_stored):  # refused before any write, as the kernels refuse them
            if isinstance(t, QuantizedState):
                _check_scales(f"{update.__name__}()", t.scales)
        grads = [grad] if isinstance(grad, np.ndarray) else grad
        if skip_if_nonfinite and not all(np.isfinite(g).all() for g in grads):
            return False
        rounding = (stochastic_rounding, seed, hyper.get("step", 0))
        if isinstance(param, np.ndarray):
            _in_compute_type(
                update, param, grad, arrays, hyper, buffers_in_order, rounding, 0, master
            )
            return True
        arrays = (grad,) + arrays
        count = len(param)
        per_tensor = [[None] * count if a is None else a for a in arrays]
        buffers = {k: v for k, v in hyper.items() if isinstance(v, (list, tuple))}
        scalars = {k: v for k, v in hyper.items() if k not in buffers}
        for i in range(count):
            _in_compute_type(
                update,
                param[i],
                per_tensor[0][i],
                [a[i] for a in per_tensor[1:]],
                {**{k: v[i] for k, v in buffers.items()}, **scalars},
                buffers_in_order,
                rounding,
                i,
                None if master is None else master[i],
            )
        return True

    P = inspect.Parameter
    extra = [
        P("skip_if_nonfinite", P.KEYWORD_ONLY, default=False),
        P("stochastic_rounding", P.KEYWORD_ONLY, default=False),
        P("seed", P.KEYWORD_ONLY, default=0 if takes_step else None),
        P("master", P.KEYWORD_ONLY, default=None),
    ]
    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])
    return wrapper


def _in_compute_type(
    update, param, grad, arrays, hyper, buffers_in_order, rounding, tensor, master=None
):
    """Runs a one-tensor update as the kernels do with low-precision storage: every array is
    converted to the compute type (float64 for a float64 param, float32 otherwise), the formula
    runs there, and every array it writes is rounded once on the way back: to nearest even, or
    with ``stochastic_rounding`` at random for bfloat16 and float16 (:func:`_stochastic_bfloat16`,
    :func:`_stochastic_float16`). A
    quantized state is decoded and encoded again; with a ``master`` the formula runs on it and
    the param is the master rounded, as the param would be."""
    compute = np.float64 if param.dtype == np.float64 else np.float32
    buffers = {k: v for k, v in hyper.items() if isinstance(v, (np.ndarray, QuantizedState))}
    named = {
        "param": param if master is None else master,
        **dict(zip(buffers_in_order, arrays)),
        **buffers,
    }
    stored = {name: a for name, a in named.items() if a is not None}
    if (
        master is None
        and grad.dtype == compute
        and all(isinstance(a, np.ndarray) and a.dtype == compute for a in stored.values())
    ):
        update(param, grad, *arrays, **hyper)
        return
    up = {
        name: a.dequantize() if isinstance(a, QuantizedState) else a.astype(compute)
        for name, a in stored.items()
    }
    update(
        up["param"],
        grad.astype(compute),
        *(up.get(name) for name in buffers_in_order[: len(arrays)]),
        **{
            k: up[k] if isinstance(v, (np.ndarray, QuantizedState)) else v for k, v in hyper.items()
        },
    )
    stochastic, seed, step = rounding
    key = _tensor_key(seed, step, tensor)
    if master is not None:
        stored["master"], stored["param"] = stored["param"], param
        up["master"] = up["param"]
    for name, a in stored.items():
        if isinstance(a, QuantizedState):  # always stochastically: see quantize.encode
            slot = 1 + buffers_in_order.index(name)
            bits = _slot_bits(key, a.size, slot)
            a.codes[...], a.scales[...] = encode(up[name], signed=a.signed, random_bits=bits)
        elif stochastic and a.dtype in _STOCHASTIC:
            slot = 0 if name == "param" else 1 + buffers_in_order.index(name)
            a.ravel(order="K")[...] = _STOCHASTIC[a.dtype](up[name].ravel(order="K"), key, slot)
        else:
            # Past float16's (or float32's) range is inf, as the kernels store it: no warning.
            with np.errstate(over="ignore"):
                a[...] = up[name].astype(a.dtype)


_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(z):
    """SplitMix64's output function on a Python int in [0, 2**64)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _tensor_key(seed, step, tensor):
    def splitmix(x):
        return _mix64((x + _GOLDEN) & _MASK)

    return splitmix(splitmix(splitmix(seed) ^ step) ^ tensor)


def _fmix32(h):
    """MurmurHash3's finalizer on uint32 arrays (which wrap)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _slot_bits(key, size, slot, start=0):
    """The kernels' 16 random bits (uint32) of elements start .. start+size-1 of a tensor for
    array ``slot`` (the param 0, the states 1, 2, 3): the low or high half of 32 bits, half 0
    for slots 0-1, half 1 for slots 2-3."""
    index = np.arange(start, start + size, dtype=np.uint64)
    c = (index & np.uint64(0xFFFFFFFF)).astype(np.uint32) + (index >> np.uint64(32)).astype(
        np.uint32
    ) * np.uint32(0x27D4EB2F)
    h = _fmix32(np.uint32(key & 0xFFFFFFFF) + c * np.uint32(0x9E3779B1))  # a Weyl sequence's terms
    if slot >= 2:  # half 1: half 0's halves folded, one multiply
        h = (h ^ (h >> np.uint32(16))) * np.uint32(0x7FEB352D)
    return (h >> np.uint32(16 if slot in (1, 2) else 0)) & np.uint32(0xFFFF)


def _stochastic_bfloat16(x, key, slot, start=0):
    """``x`` (float32, in memory order) rounded to bfloat16 at random, without bias: 16 random
    bits, the element's for this array (``slot``), are added below the 16 bits kept, then
    truncated. The bits are those of the kernels (``x`` is the tensor's elements ``start``
    on). NaN rounds to nearest."""
    bits = _slot_bits(key, x.size, slot, start)
    rounded = ((x.view(np.uint32) + bits) >> np.uint32(16)).astype(np.uint16).view(_BFLOAT16)
    nan = np.isnan(x)
    rounded[nan] = x[nan].astype(_BFLOAT16)
    return rounded


def _stochastic_float16(x, key, slot, start=0):
    """``x`` (float32, in memory order) rounded to float16 at random, without bias: the top 13
    of the element's 16 random bits are added below the 10 mantissa bits kept, then truncated.
    Below 2**-14, float16's smallest normal (its subnormals' step is 2**-24), 2**-14 is added
    first in float32, which puts that step at the same bit, and taken away after (exact). Past
    the largest float16 the step up is to inf; inf and NaN convert as to nearest. The bits are
    those of the kernels (``x`` is the tensor's elements ``start`` on)."""
    bits = _slot_bits(key, x.size, slot, start)
    u = x.view(np.uint32)
    a = u & np.uint32(0x7FFFFFFF)
    small = a < np.uint32(113 << 23)
    offset = np.float32(2.0**-14)
    with np.errstate(over="ignore", invalid="ignore"):  # NaN and inf lanes are replaced below
        shifted = np.where(small, (a.view(np.float32) + offset).view(np.uint32), a)
        kept = (shifted + (bits >> np.uint32(3))) & np.uint32(0xFFFFE000)
        value = np.where(small, (kept.view(np.float32) - offset).view(np.uint32), kept)
        rounded = np.where(a >= np.uint32(0x7F800000), a, value) | (u & np.uint32(0x80000000))
        return rounded.view(np.float32).astype(np.float16)  # past float16's range: inf


_STOCHASTIC = {_BFLOAT16: _stochastic_bfloat16, np.dtype(np.float16): _stochastic_float16}


def _gradient(grad, param, weight_decay, maximize):
    g = -grad if maximize else grad
    if weight_decay:
        g = g + weight_decay * param
    return g


@_for_each_tensor
def sgd_(param, grad, *, lr, weight_decay=0.0, maximize=False):
    r"""Stochastic gradient descent (Robbins & Monro 1951), in place.

    .. math::
        g_t &= \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\,\theta_{t-1} \\
        \theta_t &= \theta_{t-1} - \gamma\, g_t

    with :math:`\gamma` = ``lr``, :math:`\lambda` = ``weight_decay`` (L2 penalty) and the
    gradient negated when ``maximize``.
    """
    g = _gradient(grad, param, weight_decay, maximize)
    param -= lr * g


@_for_each_tensor
def momentum_(
    param,
    grad,
    momentum_buffer,
    *,
    lr,
    momentum,
    dampening=0.0,
    nesterov=False,
    weight_decay=0.0,
    maximize=False,
):
    r"""SGD with momentum (Polyak 1964), or Nesterov momentum (Sutskever et al. 2013), in place.

    .. math::
        g_t &= \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\,\theta_{t-1} \\
        b_t &= \mu\, b_{t-1} + (1 - \tau)\, g_t \\
        \theta_t &= \theta_{t-1} - \gamma \begin{cases}
            g_t + \mu\, b_t & \text{nesterov} \\ b_t & \text{otherwise} \end{cases}

    with :math:`\gamma` = ``lr``, :math:`b` = ``momentum_buffer``, :math:`\mu` = ``momentum``,
    :math:`\tau` = ``dampening``, :math:`\lambda` = ``weight_decay``. With :math:`\tau = \mu`
    this is the exponential moving average of the textbooks
    (:math:`v \leftarrow \beta v + (1-\beta) g`, :math:`\theta \leftarrow \theta - \alpha v`);
    :math:`\tau = 0` is PyTorch's heavy ball.

    Warning:
        ``torch.optim.SGD`` initialises the buffer with the first gradient, undamped; this
        function always applies the rule above (start the buffer at zero for the textbook
        form). ``buf`` is the buffer's former keyword (deprecated).
    """
    g = _gradient(grad, param, weight_decay, maximize)
    momentum_buffer[...] = momentum * momentum_buffer + (1 - dampening) * g
    update = g + momentum * momentum_buffer if nesterov else momentum_buffer
    param -= lr * update


@_for_each_tensor
def adam_(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    *,
    step,
    lr=1e-3,
    beta1=0.9,
    beta2=0.999,
    eps=1e-8,
    weight_decay=0.0,
    decoupled_weight_decay=False,
    amsgrad=False,
    max_exp_avg_sq=None,
    maximize=False,
):
    r"""Adam (Kingma & Ba 2015, Algorithm 1), in place; AMSGrad and AdamW as options.

    .. math::
        g_t &= \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\,\theta_{t-1} \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t \\
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2 \\
        \theta_t &= \theta_{t-1} - \frac{\gamma}{1 - \beta_1^t}\,
            \frac{m_t}{\sqrt{v_t} \cdot \left(1 / \sqrt{1 - \beta_2^t}\right) + \epsilon}

    with :math:`\gamma` = ``lr``, :math:`m` = ``exp_avg``, :math:`v` = ``exp_avg_sq``,
    :math:`t` = ``step``, :math:`\lambda` = ``weight_decay``. With ``decoupled_weight_decay``
    (AdamW, Loshchilov & Hutter 2019) the L2 term is dropped from :math:`g_t` and
    :math:`\theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda)` comes first. With
    ``amsgrad`` (Reddi et al. 2018) :math:`\hat v_t = \max(\hat v_{t-1}, v_t)` is kept in
    ``max_exp_avg_sq`` and replaces :math:`v_t` in the denominator.

    Note:
        :math:`\epsilon` is added after the bias correction of :math:`\sqrt{v_t}`, as in the
        paper and ``torch.optim.Adam``; TensorFlow's Adam adds it before (its
        :math:`\hat\epsilon`). The correction multiplies by :math:`1 / \sqrt{1 - \beta_2^t}`,
        computed in double and rounded once to the arrays' precision, as DeepSpeed's CPU Adam
        does, where ``torch.optim.Adam`` divides by :math:`\sqrt{1 - \beta_2^t}`: one division
        per element instead of two, and results that differ from torch's by the rounding of
        that product.
    """
    g = -grad if maximize else grad
    if decoupled_weight_decay:
        param *= 1 - lr * weight_decay
    elif weight_decay:
        g = g + weight_decay * param
    exp_avg[...] = beta1 * exp_avg + (1 - beta1) * g
    exp_avg_sq[...] = beta2 * exp_avg_sq + (1 - beta2) * g * g
    if amsgrad:
        max_exp_avg_sq[...] = np.maximum(max_exp_avg_sq, exp_avg_sq)
        v = max_exp_avg_sq
    else:
        v = exp_avg_sq
    denom = np.sqrt(v) * (1 / math.sqrt(1 - beta2**step)) + eps
    param -= lr / (1 - beta1**step) * exp_avg / denom


def adamw_(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    *,
    step,
    lr=1e-3,
    beta1=0.9,
    beta2=0.999,
    eps=1e-8,
    weight_decay=1e-2,
    amsgrad=False,
    max_exp_avg_sq=None,
    maximize=False,
    skip_if_nonfinite=False,
    stochastic_rounding=False,
    seed=0,
    master=None,
):
    r"""AdamW (Loshchilov & Hutter 2019): :func:`adam_` with decoupled weight decay, in place.

    .. math::
        \theta_{t-1} &\leftarrow \theta_{t-1}(1 - \gamma\lambda) \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t \\
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2 \\
        \theta_t &= \theta_{t-1} - \frac{\gamma}{1 - \beta_1^t}\,
            \frac{m_t}{\sqrt{v_t} \cdot \left(1 / \sqrt{1 - \beta_2^t}\right) + \epsilon}

    ``weight_decay`` defaults to ``1e-2`` as in ``torch.optim.AdamW``.
    """
    return adam_(
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        step=step,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        decoupled_weight_decay=True,
        amsgrad=amsgrad,
        max_exp_avg_sq=max_exp_avg_sq,
        maximize=maximize,
        skip_if_nonfinite=skip_if_nonfinite,
        stochastic_rounding=stochastic_rounding,
        seed=seed,
        master=master,
    )


@_for_each_tensor
def adamax_(
    param,
    grad,
    exp_avg,
    exp_inf,
    *,
    step,
    lr=2e-3,
    beta1=0.9,
    beta2=0.999,
    eps=1e-8,
    weight_decay=0.0,
    maximize=False,
):
    r"""Adamax (Kingma & Ba 2015, section 7.1): Adam with the infinity norm, in place.

    .. math::
        g_t &= \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\,\theta_{t-1} \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t \\
        u_t &= \max(\beta_2 u_{t-1},\ |g_t| + \epsilon) \\
        \theta_t &= \theta_{t-1} - \frac{\gamma}{1 - \beta_1^t}\, \frac{m_t}{u_t}

    with :math:`\gamma` = ``lr``, :math:`m` = ``exp_avg``, :math:`u` = ``exp_inf``,
    :math:`t` = ``step``, :math:`\lambda` = ``weight_decay``.

    Note:
        :math:`\epsilon` is added to :math:`|g_t|` inside the maximum, as in
        ``torch.optim.Adamax``; the paper has no :math:`\epsilon`.
    """
    g = _gradient(grad, param, weight_decay, maximize)
    exp_avg[...] = beta1 * exp_avg + (1 - beta1) * g
    exp_inf[...] = np.maximum(beta2 * exp_inf, np.abs(g) + eps)
    param -= lr / (1 - beta1**step) * exp_avg / exp_inf


def _nadam_mu_product(beta1, momentum_decay, step):
    r""":math:`\prod_{i=1}^t \mu_i`, multiplied in this order as ``torch.optim.NAdam``
    accumulates its state ``mu_product``, with two shortcuts that bound the loop: below
    :math:`2^{-54}` the product no longer matters (:math:`1 - \prod` rounds to 1 whatever
    follows), and once :math:`\mu_i = \beta_1` exactly (:math:`0.96^{i\psi} < 2^{-53}`) it stays
    so, and the rest is one power."""
    product = 1.0
    for i in range(1, step + 1):
        factor = 1 - 0.5 * 0.96 ** (i * momentum_decay)
        if factor == 1:
            return product * beta1 ** (step - i + 1)
        product *= beta1 * factor
        if product <= 2.0**-54:
            return product
    return product


@_for_each_tensor
def nadam_(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    *,
    step,
    lr=2e-3,
    beta1=0.9,
    beta2=0.999,
    eps=1e-8,
    weight_decay=0.0,
    momentum_decay=4e-3,
    mu_product=None,
    decoupled_weight_decay=False,
    maximize=False,
):
    r"""NAdam (Dozat 2016, "Incorporating Nesterov Momentum into Adam"), in place, with the
    momentum schedule of ``torch.optim.NAdam``; NAdamW as an option.

    .. math::
        g_t &= \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\,\theta_{t-1} \\
        \mu_t &= \beta_1 \left(1 - \tfrac12\, 0.96^{t\psi}\right) \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t \\
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2 \\
        \theta_t &= \theta_{t-1} - \gamma\,
            \frac{\frac{1 - \mu_t}{1 - \prod_{i=1}^{t} \mu_i}\, g_t
                + \frac{\mu_{t+1}}{1 - \prod_{i=1}^{t+1} \mu_i}\, m_t}
            {\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}

    with :math:`\gamma` = ``lr``, :math:`m` = ``exp_avg``, :math:`v` = ``exp_avg_sq``,
    :math:`t` = ``step``, :math:`\psi` = ``momentum_decay``, :math:`\lambda` =
    ``weight_decay``, :math:`\prod_{i=1}^{t} \mu_i` = ``mu_product``. With
    ``decoupled_weight_decay`` (NAdamW) the L2 term is dropped from :math:`g_t` and
    :math:`\theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda)` comes first.

    Note:
        ``torch.optim.NAdam`` keeps :math:`\prod_{i=1}^t \mu_i` as state (``mu_product``),
        multiplied by each step's :math:`\mu_t`. ``mu_product=None`` computes it from
        ``step`` in double by multiplying :math:`\mu_1, \mu_2, \ldots` in the same order (see
        ``_nadam_mu_product``), all with this call's :math:`\beta_1`: the same product as
        torch's when :math:`\beta_1` never changed and torch keeps it in float64 (in float32,
        torch's default, its steps move by about 1e-7 relative). Where :math:`\beta_1`
        changes during training (a one-cycle schedule's momentum), pass the running product,
        this step's :math:`\mu_t` included, as the classes do.
    """
    g = -grad if maximize else grad
    if decoupled_weight_decay:
        param *= 1 - lr * weight_decay
    elif weight_decay:
        g = g + weight_decay * param
    exp_avg[...] = beta1 * exp_avg + (1 - beta1) * g
    exp_avg_sq[...] = beta2 * exp_avg_sq + (1 - beta2) * g * g
    mu = beta1 * (1 - 0.5 * 0.96 ** (step * momentum_decay))
    mu_next = beta1 * (1 - 0.5 * 0.96 ** ((step + 1) * momentum_decay))
    if mu_product is None:
        mu_product = _nadam_mu_product(beta1, momentum_decay, step)
    grad_step = lr * (1 - mu) / (1 - mu_product)
    avg_step = lr * mu_next / (1 - mu_product * mu_next)
    denom = np.sqrt(exp_avg_sq / (1 - beta2**step)) + eps
    param -= (grad_step * g + avg_step * exp_avg) / denom


@_for_each_tensor
def radam_(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    *,
    step,
    lr=1e-3,
    beta1=0.9,
    beta2=0.999,
    eps=1e-8,
    weight_decay=0.0,
    decoupled_weight_decay=False,
    maximize=False,
):
    r"""RAdam (Liu et al. 2020, "On the Variance of the Adaptive Learning Rate and Beyond"), in
    place, as ``torch.optim.RAdam``; decoupled weight decay as an option.

    .. math::
        g_t &= \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\,\theta_{t-1} \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t \\
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2 \\
        \rho_\infty &= \frac{2}{1 - \beta_2} - 1, \qquad
            \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1 - \beta_2^t} \\
        r_t &= \sqrt{\frac{(\rho_t - 4)(\rho_t - 2)\,\rho_\infty}
            {(\rho_\infty - 4)(\rho_\infty - 2)\,\rho_t}} \\
        \theta_t &= \theta_{t-1} - \frac{\gamma}{1 - \beta_1^t} \begin{cases}
            r_t \sqrt{1 - \beta_2^t}\, \dfrac{m_t}{\sqrt{v_t} + \epsilon} & \rho_t > 5 \\
            m_t & \text{otherwise} \end{cases}

    with :math:`\gamma` = ``lr``, :math:`m` = ``exp_avg``, :math:`v` = ``exp_avg_sq``,
    :math:`t` = ``step``, :math:`\lambda` = ``weight_decay``. With ``decoupled_weight_decay``
    the L2 term is dropped from :math:`g_t` and
    :math:`\theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda)` comes first.

    Note:
        The branch depends on the step only: with the default :math:`\beta_2 = 0.999`, steps
        1 to 5 are momentum SGD with bias correction and the rectified step starts at 6; with
        :math:`\beta_2 \le 2/3` (:math:`\rho_\infty \le 5`) it never does. The test
        :math:`\rho_t > 5` is torch's; the paper's Algorithm 2 has :math:`\rho_t > 4`.
    """
    g = -grad if maximize else grad
    if decoupled_weight_decay:
        param *= 1 - lr * weight_decay
    elif weight_decay:
        g = g + weight_decay * param
    exp_avg[...] = beta1 * exp_avg + (1 - beta1) * g
    exp_avg_sq[...] = beta2 * exp_avg_sq + (1 - beta2) * g * g
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    rho_inf = 2 / (1 - beta2) - 1
    rho = rho_inf - 2 * step * beta2**step / bias_correction2
    if rho > 5:
        rect = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
        step_size = lr * rect * math.sqrt(bias_correction2) / bias_correction1
        param -= step_size * exp_avg / (np.sqrt(exp_avg_sq) + eps)
    else:
        param -= lr / bias_correction1 * exp_avg


@_for_each_tensor
def adagrad_(
    param, grad, sum_sq, *, step, lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False
):
    r"""Adagrad (Duchi, Hazan & Singer 2011), in place.

    .. math::
        g_t &= \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\,\theta_{t-1} \\
        s_t &= s_{t-1} + g_t^2 \\
        \theta_t &= \theta_{t-1} - \frac{\gamma}{1 + (t - 1)\,\eta}\,
            \frac{g_t}{\sqrt{s_t} + \epsilon}

    with :math:`\gamma` = ``lr``, :math:`\eta` = ``lr_decay``, :math:`s` = ``sum_sq``,
    :math:`t` = ``step``, :math:`\lambda` = ``weight_decay``.
    """
    g = _gradient(grad, param, weight_decay, maximize)
    sum_sq[...] = sum_sq + g * g
    param -= lr / (1 + (step - 1) * lr_decay) * g / (np.sqrt(sum_sq) + eps)


@_for_each_tensor
def rmsprop_(
    param,
    grad,
    square_avg,
    *,
    lr=1e-2,
    alpha=0.99,
    eps=1e-8,
    weight_decay=0.0,
    momentum=0.0,
    momentum_buffer=None,
    centered=False,
    grad_avg=None,
    maximize=False,
):
    r"""RMSprop (Hinton 2012), optionally centered (Graves 2013) and with momentum, in place.

    .. math::
        g_t &= \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\,\theta_{t-1} \\
        s_t &= \alpha\, s_{t-1} + (1 - \alpha)\, g_t^2 \\
        \bar g_t &= \alpha\, \bar g_{t-1} + (1 - \alpha)\, g_t
            \quad\text{(centered only)} \\
        d_t &= \sqrt{\max(s_t - \bar g_t^2, 0)} + \epsilon \ \text{ if centered, else }
            \sqrt{s_t} + \epsilon \\
        b_t &= \mu\, b_{t-1} + g_t / d_t, \quad \theta_t = \theta_{t-1} - \gamma\, b_t
            \quad\text{if } \mu > 0 \\
        \theta_t &= \theta_{t-1} - \gamma\, g_t / d_t \quad\text{otherwise}

    with :math:`\gamma` = ``lr``, :math:`s` = ``square_avg``, :math:`\bar g` = ``grad_avg``,
    :math:`b` = ``momentum_buffer`` (formerly ``momentum_buf``, deprecated),
    :math:`\mu` = ``momentum``, :math:`\lambda` = ``weight_decay``.

    Note:
        :math:`\epsilon` is added outside the square root, as in ``torch.optim.RMSprop``;
        TensorFlow adds it inside. :math:`s_t \ge \bar g_t^2` holds exactly but not always
        after rounding: the max with 0 keeps a NaN out where torch would give one.
    """
    g = _gradient(grad, param, weight_decay, maximize)
    square_avg[...] = alpha * square_avg + (1 - alpha) * g * g
    if centered:
        grad_avg[...] = alpha * grad_avg + (1 - alpha) * g
        # s >= gbar^2 exactly, not always after rounding (low-precision or quantized state)
        denom = np.sqrt(np.maximum(square_avg - grad_avg * grad_avg, 0)) + eps
    else:
        denom = np.sqrt(square_avg) + eps
    if momentum:
        momentum_buffer[...] = momentum * momentum_buffer + g / denom
        param -= lr * momentum_buffer
    else:
        param -= lr * g / denom


@_for_each_tensor
def lion_(
    param, grad, exp_avg, *, lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False
):
    r"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), in place.

    .. math::
        \theta_{t-1} &\leftarrow \theta_{t-1}(1 - \gamma\lambda) \\
        c_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t \\
        \theta_t &= \theta_{t-1} - \gamma\, \operatorname{sign}(c_t) \\
        m_t &= \beta_2 m_{t-1} + (1 - \beta_2)\, g_t

    with :math:`\gamma` = ``lr``, :math:`m` = ``exp_avg``, :math:`\lambda` = ``weight_decay``
    (decoupled) and :math:`g_t` the gradient, negated when ``maximize``. The update has the
    same size for every coordinate: Lion usually wants a learning rate 3-10x smaller and a
    weight decay 3-10x larger than AdamW.
    """
    g = -grad if maximize else grad
    if weight_decay:
        param *= 1 - lr * weight_decay
    c = beta1 * exp_avg + (1 - beta1) * g
    param -= lr * np.sign(c)
    exp_avg[...] = beta2 * exp_avg + (1 - beta2) * g


_SCHEDULEFREE_OVERFLOW = (
    "Invalid averaging weights: step**r * lr_max**weight_lr_power, or their sum with "
    "weight_sum, is past a double's range (lower r, lr or weight_lr_power)"
)


def schedulefree_averaging(
    step, lr, *, warmup_steps=0, r=0.0, weight_lr_power=2.0, lr_max=0.0, weight_sum=0.0
):
    r"""The scalars of step ``step`` of Schedule-Free (Defazio et al. 2024), in double, in the
    order of the ``schedulefree`` package: returns ``(lr_t, lr_max, weight_sum, ckp1)``, the
    warmed-up learning rate, the running maximum and sum through this step, and the averaging
    weight :math:`c_{t}` of this step.

    .. math::
        \gamma_t &= \gamma \min(1, t / T_{\text{warmup}}) \\
        \gamma_{\max} &\leftarrow \max(\gamma_{\max}, \gamma_t) \\
        w_t &= t^r \gamma_{\max}^{p}, \qquad W \leftarrow W + w_t, \qquad c_t = w_t / W

    with :math:`p` = ``weight_lr_power`` and :math:`c_t = 0` when :math:`W = 0`. ``lr_max`` and
    ``weight_sum`` are the values from before this step (0 at step 1), as the update functions
    take them: a caller of :func:`fusedopt.schedulefree_adamw_` or
    :func:`fusedopt.schedulefree_sgd_` passes them and then keeps the returned ones for the
    next step (the classes do this for each parameter group).
    """
    k = step - 1
    lr = lr * ((k + 1) / warmup_steps if k < warmup_steps else 1.0)
    lr_max = max(lr, lr_max)
    try:
        weight = (k + 1) ** r * lr_max**weight_lr_power
    except OverflowError:
        weight = math.inf
    weight_sum = weight_sum + weight
    if not math.isfinite(weight_sum):  # as the kernels' rule: c_t would be inf / inf
        raise ValueError(_SCHEDULEFREE_OVERFLOW)
    ckp1 = weight / weight_sum if weight_sum != 0 else 0.0
    return lr, lr_max, weight_sum, ckp1


def _schedulefree_update(param, u, z, lr, ckp1, beta, weight_decay):
    """The update Schedule-Free AdamW and SGD share, from the (normalized) gradient ``u``."""
    if weight_decay:
        u = u + weight_decay * param
    new_z = z - lr * u
    param[...] = param + ckp1 * (z - param) + lr * (beta * (1 - ckp1) - 1) * u
    z[...] = new_z


@_for_each_tensor
def schedulefree_adamw_(
    param,
    grad,
    z,
    exp_avg_sq,
    *,
    step,
    lr=0.0025,
    beta1=0.9,
    beta2=0.999,
    eps=1e-8,
    weight_decay=0.0,
    warmup_steps=0.0,
    r=0.0,
    weight_lr_power=2.0,
    lr_max=0.0,
    weight_sum=0.0,
):
    r"""Schedule-Free AdamW (Defazio et al. 2024, "The Road Less Scheduled"), in place, as
    ``schedulefree.AdamWScheduleFree``: the param holds :math:`y_t`, where the gradient is taken.

    .. math::
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2 \\
        u_t &= \frac{g_t}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon} + \lambda\, y_{t-1} \\
        z_t &= z_{t-1} - \gamma_t\, u_t \\
        x_t &= (1 - c_t)\, x_{t-1} + c_t\, z_t \\
        y_t &= (1 - \beta_1)\, z_t + \beta_1 x_t
             = y_{t-1} + c_t (z_{t-1} - y_{t-1}) + \gamma_t (\beta_1 (1 - c_t) - 1)\, u_t

    with :math:`g_t` the gradient at :math:`y_{t-1}`, :math:`v` = ``exp_avg_sq``,
    :math:`\lambda` = ``weight_decay`` (taken at :math:`y`), and the warmed-up learning rate
    :math:`\gamma_t` and averaging weight :math:`c_t` of :func:`schedulefree_averaging` from
    ``step``, ``lr``, ``warmup_steps``, ``r``, ``weight_lr_power``, ``lr_max`` and
    ``weight_sum``. The average :math:`x_t` (the weights to evaluate) is not stored: it is
    :math:`x = y + (1 - 1/\beta_1)(z - y)`. Start ``z`` at the param's value and ``exp_avg_sq``
    at zero.
    """
    lr, _, _, ckp1 = schedulefree_averaging(
        step,
        lr,
        warmup_steps=warmup_steps,
        r=r,
        weight_lr_power=weight_lr_power,
        lr_max=lr_max,
        weight_sum=weight_sum,
    )
    exp_avg_sq[...] = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    u = grad / (np.sqrt(exp_avg_sq / (1 - beta2**step)) + eps)
    _schedulefree_update(param, u, z, lr, ckp1, beta1, weight_decay)


@_for_each_tensor
def schedulefree_sgd_(
    param,
    grad,
    z,
    *,
    step,
    lr=1.0,
    momentum=0.9,
    weight_decay=0.0,
    warmup_steps=0.0,
    r=0.0,
    weight_lr_power=2.0,
    lr_max=0.0,
    weight_sum=0.0,
):
    r"""Schedule-Free SGD (Defazio et al. 2024, "The Road Less Scheduled"), in place, as
    ``schedulefree.SGDScheduleFree``: the param holds :math:`y_t`, where the gradient is taken.

    .. math::
        u_t &= g_t + \lambda\, y_{t-1} \\
        z_t &= z_{t-1} - \gamma_t\, u_t \\
        x_t &= (1 - c_t)\, x_{t-1} + c_t\, z_t \\
        y_t &= (1 - \mu)\, z_t + \mu\, x_t
             = y_{t-1} + c_t (z_{t-1} - y_{t-1}) + \gamma_t (\mu (1 - c_t) - 1)\, u_t

    with :math:`\mu` = ``momentum`` in (0, 1), :math:`\lambda` = ``weight_decay`` (taken at
    :math:`y`), and :math:`\gamma_t`, :math:`c_t` as in :func:`schedulefree_adamw_`. The
    average is :math:`x = y + (1 - 1/\mu)(z - y)`. Start ``z`` at the param's value.
    """
    lr, _, _, ckp1 = schedulefree_averaging(
        step,
        lr,
        warmup_steps=warmup_steps,
        r=r,
        weight_lr_power=weight_lr_power,
        lr_max=lr_max,
        weight_sum=weight_sum,
    )
    _schedulefree_update(param, grad, z, lr, ckp1, momentum, weight_decay)


@_for_each_tensor
def lamb_(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    *,
    step,
    lr=1e-3,
    beta1=0.9,
    beta2=0.999,
    eps=1e-6,
    weight_decay=0.0,
    decoupled_weight_decay=True,
    clamp=10.0,
    maximize=False,
):
    r"""LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning"), in place, as
    ``pytorch_optimizer.Lamb`` (4.1) computes it with its defaults: a per-tensor trust ratio
    :math:`\min(\lVert\theta\rVert, c) / (\lVert u\rVert + \epsilon)` on an Adam direction.

    .. math::
        g_t &= \pm\nabla_\theta f_t(\theta_{t-1}) \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t \\
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2 \\
        \theta' &= \theta_{t-1}(1 - \gamma\lambda) \text{ (decoupled) or } \theta_{t-1} \\
        u_t &= \frac{m_t}{\sqrt{v_t} + \epsilon} \;(+\, \lambda\theta' \text{ if not decoupled}) \\
        r_t &= \begin{cases} \dfrac{\min(\lVert\theta'\rVert, c)}{\lVert u_t\rVert + \epsilon}
            & \lVert\theta'\rVert \ne 0,\ \lVert u_t\rVert \ne 0 \\ 1 & \text{otherwise}
            \end{cases} \\
        \theta_t &= \theta' - \frac{\gamma}{1 - \beta_1^t}\, r_t\, u_t

    with :math:`\gamma` = ``lr``, :math:`\lambda` = ``weight_decay``, :math:`c` = ``clamp``,
    norms over the whole tensor (each tensor of a list has its own :math:`r_t`), summed in
    double in the kernels' fixed order (``_sum_squares``).

    Note:
        The variant is ``pytorch_optimizer.Lamb``'s, the CPU LAMB most users compare with: the
        step is divided by the first moment's bias correction only, and :math:`v` is not
        corrected; decoupled weight decay (its default) shrinks :math:`\theta` before the norms
        and is not part of :math:`u`; the weight norm is clamped at 10. The paper's Algorithm 2
        instead corrects both moments and puts :math:`\lambda\theta` inside :math:`u`
        (``decoupled_weight_decay=False`` and ``clamp=inf`` come closest). The fused kernel
        makes two passes over a list of tensors: the norms, then the update.
    """
    g = -grad if maximize else grad
    exp_avg[...] = beta1 * exp_avg + (1 - beta1) * g
    exp_avg_sq[...] = beta2 * exp_avg_sq + (1 - beta2) * g * g
    if decoupled_weight_decay and weight_decay:
        param *= 1 - weight_decay * lr
    update = exp_avg / (np.sqrt(exp_avg_sq) + eps)
    if not decoupled_weight_decay and weight_decay:
        update = update + weight_decay * param
    weight_norm = min(math.sqrt(_sum_squares(param)), clamp)
    update_norm = math.sqrt(_sum_squares(update))
    trust = 1.0 if weight_norm == 0 or update_norm == 0 else weight_norm / (update_norm + eps)
    if math.isnan(trust):  # the canonical NaN: a sum's NaN payload depends on its order
        trust = math.nan
    factor = lr / (1 - beta1**step) * trust
    if math.isnan(factor):
        # every param NaN: its own NaN, else the factor's, as the kernel's param - factor; a
        # product with update could keep either NaN, by NumPy's build and the array's length
        param -= factor
    else:
        param -= factor * update


# ---------------------------------------------------------------------- matrix optimizers

_CHUNK = 2048  # the kernels' chunk (fusedopt._core.CHUNK): the norm's partial sums
MUON_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def _sum_squares(x):
    r""":math:`\sum x^2` in double, in the kernels' order (``csrc/kernels/utility.hpp``): over
    the array in memory order, per chunk of 2048 elements eight running sums over ``i % 8``
    combined pairwise, then the chunks' sums added in order. Bit-identical to the kernels'."""
    flat = x.ravel(order="K").astype(np.float64)
    total = 0.0
    for start in range(0, flat.size, _CHUNK):
        chunk = flat[start : start + _CHUNK]
        lanes = np.zeros(-(-chunk.size // 8) * 8)
        lanes[: chunk.size] = chunk * chunk
        a = np.add.accumulate(lanes.reshape(-1, 8), axis=0)[-1]  # sequential, lane by lane
        total += ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
    return total


def _lerp(start, end, weight, compute):
    """``torch.lerp(start, end, weight)`` as torch writes it for one element: two formulas that
    are exact at weight 0 and 1 respectively; the weights in double, applied in ``compute``."""
    if abs(weight) < 0.5:
        return start + compute(weight) * (end - start)
    return end - (end - start) * compute(1 - weight)


def muon_adjusted_lr(lr, adjust_lr_fn, shape):
    r"""The learning rate of a ``shape`` (A x B) matrix, as ``torch.optim.Muon`` adjusts it:
    ``"original"`` (or None, Keller Jordan's) :math:`\gamma\sqrt{\max(1, A/B)}`;
    ``"match_rms_adamw"`` (Moonshot's) :math:`0.2\,\gamma\sqrt{\max(A, B)}`."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    return lr * (0.2 * math.sqrt(max(rows, cols)))  # torch's order


def newton_schulz(x, coefficients=MUON_NS_COEFFICIENTS, steps=5, eps=1e-7):
    r"""The Newton-Schulz quintic iteration of Muon on a 2-D array ``x`` in its own dtype:
    ``x`` (transposed if it has more rows than columns) divided by
    :math:`\max(\lVert x\rVert_F, \epsilon)`, then ``steps`` times
    :math:`A = XX^T,\ B = bA + cA^2,\ X \leftarrow aX + BX`; returned in ``x``'s shape. The
    norm is :func:`_sum_squares` in double, rounded to ``x``'s dtype."""
    compute = x.dtype.type
    scale = max(compute(math.sqrt(_sum_squares(x))), compute(eps))
    u = x / scale
    transposed = u.shape[0] > u.shape[1]
    X = u.T if transposed else u
    a, b, c = coefficients
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.T if transposed else X


def muon_(
    param,
    grad,
    momentum_buffer,
    *,
    lr=1e-3,
    weight_decay=0.1,
    momentum=0.95,
    nesterov=True,
    ns_coefficients=MUON_NS_COEFFICIENTS,
    eps=1e-7,
    ns_steps=5,
    adjust_lr_fn=None,
    skip_if_nonfinite=False,
    stochastic_rounding=False,
    seed=None,
    master=None,
):
    r"""Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"), in
    place, as ``torch.optim.Muon``, for 2-D parameters (one matrix or a list of them).

    .. math::
        B_t &= \mu B_{t-1} + (1 - \mu)\, g_t \\
        \tilde B_t &= \begin{cases} (1 - \mu)\, g_t + \mu B_t & \text{nesterov} \\
            B_t & \text{otherwise} \end{cases} \\
        X_0 &= \tilde B_t / \max(\lVert \tilde B_t \rVert_F, \epsilon), \qquad
            X_{k+1} = a X_k + (b X_k X_k^T + c (X_k X_k^T)^2) X_k \\
        \theta_t &= \theta_{t-1}(1 - \gamma\lambda) - \gamma' X_K

    with :math:`B` = ``momentum_buffer``, :math:`\mu` = ``momentum``, :math:`(a, b, c)` =
    ``ns_coefficients``, :math:`K` = ``ns_steps``, :math:`\gamma` = ``lr``, :math:`\lambda` =
    ``weight_decay`` and :math:`\gamma'` = :func:`muon_adjusted_lr` (``adjust_lr_fn``). The
    iteration runs on :math:`X^T` when the matrix has more rows than columns, so that
    :math:`XX^T` is the smaller Gram matrix. The moving averages are ``torch.lerp``'s
    formulas (:func:`_lerp`).

    Everything runs in float32 (float64 for float64 parameters): bfloat16 and float16 arrays are
    converted, and what is written is rounded once, as by the element-wise functions
    (:func:`_in_compute_type`): with ``master`` the step runs on the float32 master and the
    param is the master rounded; an int8 momentum buffer (a QuantizedState) is decoded and
    encoded back; ``stochastic_rounding`` rounds a bfloat16 or float16 param (slot 0) and a
    bfloat16 buffer (slot 1) with the random bits of (``seed``, step 0, tensor, element):
    ``seed`` is required where random bits are drawn, a new one each call.
    ``torch.optim.Muon`` runs the iteration in bfloat16.
    """
    if isinstance(param, np.ndarray):
        param, grad, momentum_buffer = [param], [grad], [momentum_buffer]
        master = None if master is None else [master]
    lr, weight_decay, momentum, eps, ns_steps, seed = map(
        _python_number, (lr, weight_decay, momentum, eps, ns_steps, seed)
    )
    ns_coefficients = tuple(map(_python_number, ns_coefficients))
    seed = _seed("muon_", seed, False, stochastic_rounding, [param, momentum_buffer])
    for buf in momentum_buffer:  # refused before any write, as the kernels refuse them
        if isinstance(buf, QuantizedState):
            _check_scales("muon_(): momentum_buffer", buf.scales)
    if skip_if_nonfinite and not all(np.isfinite(g.astype(np.float64)).all() for g in grad):
        return False
    hyper = dict(
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        nesterov=nesterov,
        ns_coefficients=ns_coefficients,
        eps=eps,
        ns_steps=ns_steps,
        adjust_lr_fn=adjust_lr_fn,
    )
    masters = [None] * len(param) if master is None else master
    for t, (p, g, buf, m) in enumerate(zip(param, grad, momentum_buffer, masters)):
        if p.size:
            rounding = (stochastic_rounding, seed, 0)
            _in_compute_type(_muon_tensor, p, g, [buf], hyper, ["momentum_buffer"], rounding, t, m)
    return True


def _muon_tensor(
    p, g, buf, *, lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn
):
    """Muon's step of one matrix whose arrays are all in the compute type, in place."""
    compute = p.dtype.type
    m = _lerp(buf, g, 1 - momentum, compute)
    buf[...] = m
    u = _lerp(g, m, momentum, compute) if nesterov else m
    update = newton_schulz(u, ns_coefficients, ns_steps, eps)
    step = muon_adjusted_lr(lr, adjust_lr_fn, p.shape)
    p[...] = p * compute(1 - lr * weight_decay) - compute(step) * update


def _lane_sums_of_squares(x):
    r""":math:`\sum_j x_{ij}^2` of each row of ``x`` (last axis) in double, in the kernels'
    order (``sum_squares`` of ``csrc/kernels/utility.hpp`` over the whole row)."""
    x = x.astype(np.float64)
    cols = x.shape[-1]
    lanes = np.zeros(x.shape[:-1] + (-(-cols // 8) * 8,))
    lanes[..., :cols] = x * x
    lanes = lanes.reshape(x.shape[:-1] + (-1, 8))
    a = np.moveaxis(np.add.accumulate(lanes, axis=-2)[..., -1, :], -1, 0)
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))


def adafactor_(
    param,
    grad,
    row_var,
    col_var,
    variance,
    *,
    step,
    lr=1e-2,
    beta2_decay=-0.8,
    eps=(None, 1e-3),
    d=1.0,
    weight_decay=0.0,
    maximize=False,
    stochastic_rounding=False,
    seed=0,
    master=None,
):
    r"""Adafactor (Shazeer & Stern 2018, "Adafactor: Adaptive Learning Rates with Sublinear
    Memory Cost"), in place, as ``torch.optim.Adafactor`` (torch 2.13's variant): factored
    second moments over the last two dimensions of every parameter of 2 or more, a full one
    for vectors, a relative step size and update clipping.

    .. math::
        \beta_{2,t} &= 1 - t^{c}, \qquad \rho_t = \min(\gamma, 1/\sqrt t), \qquad
            \alpha_t = \max(\epsilon_2, \mathrm{RMS}(\theta_{t-1}))\, \rho_t \\
        \theta_{t-1} &\leftarrow \theta_{t-1}(1 - \gamma\lambda) \\
        R_t &= \beta_{2,t} R_{t-1} + (1 - \beta_{2,t})\, \mathrm{mean}_j(g_t^2), \qquad
            C_t = \beta_{2,t} C_{t-1} + (1 - \beta_{2,t})\, \mathrm{mean}_i(g_t^2) \\
        \hat V_t &= R_t C_t / \max(\mathrm{mean}_i R_t, \epsilon_1)
            \quad (\text{vectors: } V_t = \beta_{2,t} V_{t-1} + (1 - \beta_{2,t})\, g_t^2) \\
        U_t &= g_t / \sqrt{\max(\hat V_t, \epsilon_1^2)}, \qquad
            \theta_t = \theta_{t-1} - \frac{\alpha_t}{\max(1, \mathrm{RMS}(U_t) / d)}\, U_t

    with :math:`\gamma` = ``lr``, :math:`c` = ``beta2_decay``, :math:`(\epsilon_1,
    \epsilon_2)` = ``eps`` (:math:`\epsilon_1` None: the param dtype's machine epsilon),
    :math:`\lambda` = ``weight_decay``, :math:`t` = ``step``; :math:`R` = ``row_var`` (the
    param's shape with a last dimension of 1), :math:`C` = ``col_var`` (a second-to-last
    dimension of 1), :math:`V` = ``variance`` (vectors and scalars; the others are None). The
    moments are ``torch.lerp``'s formulas (:func:`_lerp`). Every mean and norm is a sum in
    double, in the kernels' order; the moments are float32 (float64 for float64 params).

    Low-precision params as in the element-wise functions (:func:`_in_compute_type`): with
    ``master`` the step is the float32 step of the master (its RMS; :math:`\epsilon_1`'s
    default is float32's) and the param is the master rounded; ``stochastic_rounding`` rounds a
    bfloat16 or float16 param with the random bits of (``seed``, ``step``, tensor, element), slot 0.
    """
    if isinstance(param, np.ndarray):
        param, grad, row_var, col_var, variance = [param], [grad], [row_var], [col_var], [variance]
        master = None if master is None else [master]
    # NumPy scalars as the Python numbers they equal, as _for_each_tensor reads them
    step, lr, beta2_decay, d, weight_decay, seed = map(
        _python_number, (step, lr, beta2_decay, d, weight_decay, seed)
    )
    eps1, eps2 = map(_python_number, eps)
    hyper = dict(
        weight=step**beta2_decay,
        rho=min(lr, 1 / step**0.5),
        eps2=eps2,
        d=d,
        decay=1 - lr * weight_decay,
        maximize=maximize,
    )
    masters = [None] * len(param) if master is None else master
    for t, (p, g, r, c, v, m) in enumerate(zip(param, grad, row_var, col_var, variance, masters)):
        if p.size == 0:
            continue
        e1 = float(ml_dtypes.finfo((p if m is None else m).dtype).eps) if eps1 is None else eps1
        rounding = (stochastic_rounding, seed, step)
        names = ["row_var", "col_var", "variance"]
        _in_compute_type(
            _adafactor_tensor, p, g, [r, c, v], {**hyper, "eps1": e1}, names, rounding, t, m
        )
    return True


def _adafactor_tensor(p, g, r, c, v, *, weight, rho, eps1, eps2, d, decay, maximize):
    """Adafactor's step of one tensor whose arrays are all in the compute type, in place."""
    compute = p.dtype.type
    if maximize:
        g = -g
    alpha = max(eps2, math.sqrt(_sum_squares(p)) / math.sqrt(p.size)) * rho
    if p.ndim >= 2:
        rows, cols = p.shape[-2:]
        row_mean = (_lane_sums_of_squares(g) / cols).astype(compute)[..., None]
        col_squares = np.add.accumulate(g.astype(np.float64) ** 2, axis=-2)[..., -1:, :]
        col_mean = (col_squares / rows).astype(compute)
        r[...] = _lerp(r, row_mean, weight, compute)
        c[...] = _lerp(c, col_mean, weight, compute)
        row_total = np.add.accumulate(r.astype(np.float64), axis=-2)[..., -1:, :]
        denom = np.maximum((row_total / rows).astype(compute), compute(eps1))
        estimate = r * c / denom
    else:
        v[...] = _lerp(v, g * g, weight, compute)
        estimate = v
    u = g / np.sqrt(np.maximum(estimate, compute(eps1 * eps1)))
    clip = max(1.0, math.sqrt(_sum_squares(u)) / (math.sqrt(p.size) * d))
    p[...] = p * compute(decay) - compute(alpha / clip) * u
