"""The executable specification: every update rule in plain NumPy, as written in the literature.

Each function has the signature of its fused twin in :mod:`fusedopt` and updates its arrays in
place, one tensor or a list of tensors. It does no validation. The fused kernels compute the same
operations in the same order (see the comment atop each ``csrc/kernels/*.hpp``), so they agree to
float rounding. Bias corrections and learning-rate factors are Python floats (double); NumPy
applies them to float32 arrays as float32.
"""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = ["adagrad_", "adam_", "adamw_", "lion_", "momentum_", "rmsprop_", "sgd_"]


def _for_each_tensor(update):
    """Lets a one-tensor update take lists of arrays too (then every array argument is a list),
    and skip the whole step when asked to and a gradient is not finite. Returns whether the
    step was applied."""

    @functools.wraps(update)
    def wrapper(param, grad, *arrays, skip_if_nonfinite=False, **hyper):
        grads = [grad] if isinstance(grad, np.ndarray) else grad
        if skip_if_nonfinite and not all(np.isfinite(g).all() for g in grads):
            return False
        if isinstance(param, np.ndarray):
            update(param, grad, *arrays, **hyper)
            return True
        arrays = (grad,) + arrays
        count = len(param)
        per_tensor = [[None] * count if a is None else a for a in arrays]
        buffers = {k: v for k, v in hyper.items() if isinstance(v, (list, tuple))}
        scalars = {k: v for k, v in hyper.items() if k not in buffers}
        for i in range(count):
            update(
                param[i],
                *(a[i] for a in per_tensor),
                **{k: v[i] for k, v in buffers.items()},
                **scalars,
            )
        return True

    return wrapper


def _gradient(grad, param, weight_decay, maximize):
    g = -grad if maximize else grad
    if weight_decay:
        g = g + weight_decay * param
    return g


@_for_each_tensor
def sgd_(param, grad, *, lr, weight_decay=0.0, maximize=False):
    g = _gradient(grad, param, weight_decay, maximize)
    param -= lr * g


@_for_each_tensor
def momentum_(
    param, grad, buf, *, lr, momentum, dampening=0.0, nesterov=False, weight_decay=0.0,
    maximize=False,
):
    g = _gradient(grad, param, weight_decay, maximize)
    buf[...] = momentum * buf + (1 - dampening) * g
    update = g + momentum * buf if nesterov else buf
    param -= lr * update


@_for_each_tensor
def adam_(
    param, grad, exp_avg, exp_avg_sq, *, step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
    weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, max_exp_avg_sq=None,
    maximize=False,
):
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
    denom = np.sqrt(v) / math.sqrt(1 - beta2**step) + eps
    param -= lr / (1 - beta1**step) * exp_avg / denom


def adamw_(param, grad, exp_avg, exp_avg_sq, *, step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
           weight_decay=1e-2, amsgrad=False, max_exp_avg_sq=None, maximize=False,
           skip_if_nonfinite=False):
    return adam_(param, grad, exp_avg, exp_avg_sq, step=step, lr=lr, beta1=beta1, beta2=beta2,
                 eps=eps, weight_decay=weight_decay, decoupled_weight_decay=True,
                 amsgrad=amsgrad, max_exp_avg_sq=max_exp_avg_sq, maximize=maximize,
                 skip_if_nonfinite=skip_if_nonfinite)


@_for_each_tensor
def adagrad_(param, grad, sum_sq, *, step, lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10,
             maximize=False):
    g = _gradient(grad, param, weight_decay, maximize)
    sum_sq[...] = sum_sq + g * g
    param -= lr / (1 + (step - 1) * lr_decay) * g / (np.sqrt(sum_sq) + eps)


@_for_each_tensor
def rmsprop_(
    param, grad, square_avg, *, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
    momentum_buf=None, centered=False, grad_avg=None, maximize=False,
):
    g = _gradient(grad, param, weight_decay, maximize)
    square_avg[...] = alpha * square_avg + (1 - alpha) * g * g
    if centered:
        grad_avg[...] = alpha * grad_avg + (1 - alpha) * g
        denom = np.sqrt(square_avg - grad_avg * grad_avg) + eps
    else:
        denom = np.sqrt(square_avg) + eps
    if momentum:
        momentum_buf[...] = momentum * momentum_buf + g / denom
        param -= lr * momentum_buf
    else:
        param -= lr * g / denom


@_for_each_tensor
def lion_(param, grad, exp_avg, *, lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.0,
          maximize=False):
    g = -grad if maximize else grad
    if weight_decay:
        param *= 1 - lr * weight_decay
    c = beta1 * exp_avg + (1 - beta1) * g
    param -= lr * np.sign(c)
    exp_avg[...] = beta2 * exp_avg + (1 - beta2) * g
