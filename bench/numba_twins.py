"""numba twins of the update rules, for the benchmark: each formula of ``fusedopt.reference`` as
one ``@njit(parallel=True)`` loop over the elements, the best a user could write in Python
without C++. Each twin has the signature of its reference function (one tensor, contiguous).

Scalars are cast to the array's dtype before the loop, as NumPy does with Python floats, so a
twin computes in float32 for float32 arrays; it agrees with the reference to float rounding
(the compiler may reorder nothing, but numba evaluates ``a / b * c`` and NumPy's temporaries
alike, so most results are bit-identical). ``check`` compares every twin with the reference.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict

import numpy as np
from numba import njit, prange

from fusedopt.reference import _nadam_mu_product


@njit(parallel=True, cache=True)
def _sgd(param, grad, lr, l2, maximize):
    for i in prange(param.size):
        g = -grad[i] if maximize else grad[i]
        g = g + l2 * param[i] if l2 != 0 else g
        param[i] = param[i] - lr * g


@njit(parallel=True, cache=True)
def _momentum(
    param, grad, momentum_buffer, lr, momentum, one_minus_dampening, l2, nesterov, maximize
):
    for i in prange(param.size):
        g = -grad[i] if maximize else grad[i]
        g = g + l2 * param[i] if l2 != 0 else g
        b = momentum * momentum_buffer[i] + one_minus_dampening * g
        momentum_buffer[i] = b
        param[i] = param[i] - lr * (g + momentum * b if nesterov else b)


@njit(parallel=True, cache=True)
def _adam(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    max_exp_avg_sq,
    amsgrad,
    decay,
    l2,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    step_size,
    inverse_bias_correction2_sqrt,
    maximize,
):
    for i in prange(param.size):
        p = param[i] * decay
        g = -grad[i] if maximize else grad[i]
        g = g + l2 * p if l2 != 0 else g
        m = beta1 * exp_avg[i] + one_minus_beta1 * g
        v = beta2 * exp_avg_sq[i] + one_minus_beta2 * g * g
        exp_avg[i] = m
        exp_avg_sq[i] = v
        if amsgrad:
            v = max(max_exp_avg_sq[i], v)
            max_exp_avg_sq[i] = v
        param[i] = p - step_size * m / (math.sqrt(v) * inverse_bias_correction2_sqrt + eps)


@njit(parallel=True, cache=True)
def _adamax(
    param, grad, exp_avg, exp_inf, l2, beta1, one_minus_beta1, beta2, eps, step_size, maximize
):
    for i in prange(param.size):
        g = -grad[i] if maximize else grad[i]
        g = g + l2 * param[i] if l2 != 0 else g
        m = beta1 * exp_avg[i] + one_minus_beta1 * g
        a = beta2 * exp_inf[i]
        b = abs(g) + eps
        u = a if a >= b or math.isnan(a) else b  # numpy.maximum: NaN if either is NaN
        exp_avg[i] = m
        exp_inf[i] = u
        param[i] = param[i] - step_size * m / u


@njit(parallel=True, cache=True)
def _adagrad(param, grad, sum_sq, clr, l2, eps, maximize):
    for i in prange(param.size):
        g = -grad[i] if maximize else grad[i]
        g = g + l2 * param[i] if l2 != 0 else g
        s = sum_sq[i] + g * g
        sum_sq[i] = s
        param[i] = param[i] - clr * g / (math.sqrt(s) + eps)


@njit(parallel=True, cache=True)
def _rmsprop(
    param,
    grad,
    square_avg,
    momentum_buffer,
    grad_avg,
    lr,
    alpha,
    one_minus_alpha,
    eps,
    l2,
    momentum,
    centered,
    maximize,
):
    for i in prange(param.size):
        g = -grad[i] if maximize else grad[i]
        g = g + l2 * param[i] if l2 != 0 else g
        s = alpha * square_avg[i] + one_minus_alpha * g * g
        square_avg[i] = s
        if centered:
            a = alpha * grad_avg[i] + one_minus_alpha * g
            grad_avg[i] = a
            denom = math.sqrt(s - a * a) + eps
        else:
            denom = math.sqrt(s) + eps
        if momentum != 0:
            b = momentum * momentum_buffer[i] + g / denom
            momentum_buffer[i] = b
            param[i] = param[i] - lr * b
        else:
            param[i] = param[i] - lr * g / denom


@njit(parallel=True, cache=True)
def _lion(
    param, grad, exp_avg, lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, maximize
):
    for i in prange(param.size):
        p = param[i] * decay
        g = -grad[i] if maximize else grad[i]
        m = exp_avg[i]
        c = beta1 * m + one_minus_beta1 * g
        param[i] = p - lr * np.sign(c)
        exp_avg[i] = beta2 * m + one_minus_beta2 * g


@njit(parallel=True, cache=True)
def _nadam(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    decay,
    l2,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    grad_step,
    avg_step,
    bias_correction2,
    maximize,
):
    for i in prange(param.size):
        p = param[i] * decay
        g = -grad[i] if maximize else grad[i]
        g = g + l2 * p if l2 != 0 else g
        m = beta1 * exp_avg[i] + one_minus_beta1 * g
        v = beta2 * exp_avg_sq[i] + one_minus_beta2 * g * g
        exp_avg[i] = m
        exp_avg_sq[i] = v
        param[i] = p - (grad_step * g + avg_step * m) / (math.sqrt(v / bias_correction2) + eps)


@njit(parallel=True, cache=True)
def _radam(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    decay,
    l2,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    step_size,
    rectified,
    maximize,
):
    for i in prange(param.size):
        p = param[i] * decay
        g = -grad[i] if maximize else grad[i]
        g = g + l2 * p if l2 != 0 else g
        m = beta1 * exp_avg[i] + one_minus_beta1 * g
        v = beta2 * exp_avg_sq[i] + one_minus_beta2 * g * g
        exp_avg[i] = m
        exp_avg_sq[i] = v
        param[i] = p - (step_size * m / (math.sqrt(v) + eps) if rectified else step_size * m)


def _flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1)  # a view: the twins take contiguous arrays only


def sgd_(param, grad, *, lr, weight_decay=0.0, maximize=False):
    t = param.dtype.type
    _sgd(_flat(param), _flat(grad), t(lr), t(weight_decay), maximize)


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
    t = param.dtype.type
    _momentum(
        _flat(param),
        _flat(grad),
        _flat(momentum_buffer),
        t(lr),
        t(momentum),
        t(1 - dampening),
        t(weight_decay),
        nesterov,
        maximize,
    )


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
    t = param.dtype.type
    decay = 1 - lr * weight_decay if decoupled_weight_decay else 1.0
    l2 = 0.0 if decoupled_weight_decay else weight_decay
    maximum = _flat(max_exp_avg_sq) if amsgrad else param[:0].reshape(-1)
    _adam(
        _flat(param),
        _flat(grad),
        _flat(exp_avg),
        _flat(exp_avg_sq),
        maximum,
        amsgrad,
        t(decay),
        t(l2),
        t(beta1),
        t(1 - beta1),
        t(beta2),
        t(1 - beta2),
        t(eps),
        t(lr / (1 - beta1**step)),
        t(1 / math.sqrt(1 - beta2**step)),
        maximize,
    )


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
):
    adam_(
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
    )


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
    t = param.dtype.type
    _adamax(
        _flat(param),
        _flat(grad),
        _flat(exp_avg),
        _flat(exp_inf),
        t(weight_decay),
        t(beta1),
        t(1 - beta1),
        t(beta2),
        t(eps),
        t(lr / (1 - beta1**step)),
        maximize,
    )


def adagrad_(
    param, grad, sum_sq, *, step, lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False
):
    t = param.dtype.type
    _adagrad(
        _flat(param),
        _flat(grad),
        _flat(sum_sq),
        t(lr / (1 + (step - 1) * lr_decay)),
        t(weight_decay),
        t(eps),
        maximize,
    )


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
    t, empty = param.dtype.type, param[:0].reshape(-1)
    _rmsprop(
        _flat(param),
        _flat(grad),
        _flat(square_avg),
        _flat(momentum_buffer) if momentum else empty,
        _flat(grad_avg) if centered else empty,
        t(lr),
        t(alpha),
        t(1 - alpha),
        t(eps),
        t(weight_decay),
        t(momentum),
        centered,
        maximize,
    )


def lion_(
    param, grad, exp_avg, *, lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False
):
    t = param.dtype.type
    _lion(
        _flat(param),
        _flat(grad),
        _flat(exp_avg),
        t(lr),
        t(1 - lr * weight_decay),
        t(beta1),
        t(1 - beta1),
        t(beta2),
        t(1 - beta2),
        maximize,
    )


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
    t = param.dtype.type
    mu = beta1 * (1 - 0.5 * 0.96 ** (step * momentum_decay))
    mu_next = beta1 * (1 - 0.5 * 0.96 ** ((step + 1) * momentum_decay))
    if mu_product is None:
        mu_product = _nadam_mu_product(beta1, momentum_decay, step)
    _nadam(
        _flat(param),
        _flat(grad),
        _flat(exp_avg),
        _flat(exp_avg_sq),
        t(1 - lr * weight_decay if decoupled_weight_decay else 1.0),
        t(0.0 if decoupled_weight_decay else weight_decay),
        t(beta1),
        t(1 - beta1),
        t(beta2),
        t(1 - beta2),
        t(eps),
        t(lr * (1 - mu) / (1 - mu_product)),
        t(lr * mu_next / (1 - mu_product * mu_next)),
        t(1 - beta2**step),
        maximize,
    )


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
    t = param.dtype.type
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    rho_inf = 2 / (1 - beta2) - 1
    rho = rho_inf - 2 * step * beta2**step / bias_correction2
    rectified = rho > 5
    if rectified:
        rect = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
        step_size = lr * rect * math.sqrt(bias_correction2) / bias_correction1
    else:
        step_size = lr / bias_correction1
    _radam(
        _flat(param),
        _flat(grad),
        _flat(exp_avg),
        _flat(exp_avg_sq),
        t(1 - lr * weight_decay if decoupled_weight_decay else 1.0),
        t(0.0 if decoupled_weight_decay else weight_decay),
        t(beta1),
        t(1 - beta1),
        t(beta2),
        t(1 - beta2),
        t(eps),
        t(step_size),
        rectified,
        maximize,
    )


TWINS: Dict[str, Callable[..., Any]] = {
    "sgd": sgd_,
    "momentum": momentum_,
    "adam": adam_,
    "adamw": adamw_,
    "adamax": adamax_,
    "adagrad": adagrad_,
    "rmsprop": rmsprop_,
    "lion": lion_,
    "nadam": nadam_,
    "radam": radam_,
}


def check(spec, hyper, dtype, n: int = 1001, steps: int = 3) -> None:
    """Raises AssertionError unless the twin of `spec` agrees with fusedopt.reference to float
    rounding (a few ulps) over `steps` steps on random data."""
    rng = np.random.default_rng(0)
    arrays = {role: rng.standard_normal(n).astype(dtype) for role in ("param", "grad")}
    arrays.update({b: np.zeros(n, dtype) for b in spec.buffers(hyper)})
    expected = {k: v.copy() for k, v in arrays.items()}
    for step in range(1, steps + 1):
        spec.call(TWINS[spec.name], arrays, hyper, step)
        spec.call(spec.reference, expected, hyper, step)
    rtol = 64 * np.finfo(dtype).eps
    for role, value in expected.items():
        np.testing.assert_allclose(
            arrays[role], value, rtol=rtol, atol=rtol, err_msg=f"numba twin of {spec.name}: {role}"
        )
