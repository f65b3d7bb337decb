"""Bit-for-bit comparison of two builds: run every fused update on fixed inputs and save all
outputs, then compare two saved files byte for byte.

    python bench/snapshot.py save before.npz      # with one build installed
    python bench/snapshot.py save after.npz       # with the other
    python bench/snapshot.py diff before.npz after.npz

Written against the public functions only (positional arrays, keyword hyperparameters), so it
runs on older builds too; FUSEDOPT_SIMD picks the level. Covers every function that existed
before adamax_, each with the hyperparameter sets that took every branch, float32 and float64,
sizes around SIMD widths, chunks and the parallel threshold, and a list of five tensors.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np

# function -> (state buffers passed positionally, hyperparameter sets; "_opt" lists the
# optional buffers a set switches on, passed by their old keywords, which still work)
CASES = {
    "sgd_": ((), [dict(lr=0.1), dict(lr=0.05, weight_decay=0.1, maximize=True)]),
    "momentum_": (
        ("buf",),
        [
            dict(lr=0.1, momentum=0.9),
            dict(lr=0.1, momentum=0.9, dampening=0.9, weight_decay=0.01),
            dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1, maximize=True),
        ],
    ),
    "adam_": (
        ("exp_avg", "exp_avg_sq"),
        [
            dict(),
            dict(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1),
            dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
            dict(lr=0.01, amsgrad=True, _opt=("max_exp_avg_sq",)),
        ],
    ),
    "adamw_": (
        ("exp_avg", "exp_avg_sq"),
        [
            dict(),
            dict(lr=0.01, weight_decay=0.2, amsgrad=True, maximize=True, _opt=("max_exp_avg_sq",)),
        ],
    ),
    "adagrad_": (
        ("sum_sq",),
        [dict(), dict(lr=0.1, lr_decay=0.01, weight_decay=0.1, eps=1e-6, maximize=True)],
    ),
    "rmsprop_": (
        ("square_avg",),
        [
            dict(),
            dict(lr=0.001, alpha=0.9, eps=1e-6, weight_decay=0.1, maximize=True),
            dict(lr=0.001, momentum=0.9, _opt=("momentum_buf",)),
            dict(lr=0.001, centered=True, weight_decay=0.01, _opt=("grad_avg",)),
            dict(
                lr=0.001,
                momentum=0.5,
                centered=True,
                maximize=True,
                _opt=("momentum_buf", "grad_avg"),
            ),
        ],
    ),
    "lion_": (
        ("exp_avg",),
        [dict(), dict(lr=1e-3, beta1=0.8, beta2=0.9, weight_decay=0.1, maximize=True)],
    ),
}
TAKES_STEP = {"adam_", "adamw_", "adagrad_"}
NONNEGATIVE = {"exp_avg_sq", "sum_sq", "square_avg", "max_exp_avg_sq"}
SIZES = [0, 1, 7, 17, 2047, 2049, 16389, 100003, "list"]
LIST_SHAPES = [(0,), (3,), (2049,), (5, 7), (17000,)]


def run() -> dict:
    import fusedopt

    out = {}
    for name, (state, cases) in CASES.items():
        fn = getattr(fusedopt, name)
        for ci, case in enumerate(cases):
            case = dict(case)
            optional = case.pop("_opt", ())
            for dtype in (np.float32, np.float64):
                for n in SIZES:
                    rng = np.random.default_rng([ci, len(name), 0 if n == "list" else n])
                    shapes = LIST_SHAPES if n == "list" else [(n,)]
                    tensors = []
                    for shape in shapes:
                        arrays = {"param": rng.standard_normal(shape).astype(dtype)}
                        for b in state + optional:
                            x = rng.standard_normal(shape)
                            arrays[b] = (np.abs(x) if b in NONNEGATIVE else x * 0.1).astype(dtype)
                        if "grad_avg" in arrays:  # a variance that is not negative
                            arrays["square_avg"] = (
                                arrays["square_avg"] + arrays["grad_avg"] ** 2
                            ).astype(dtype)
                        tensors.append(arrays)
                    for step in (1, 2, 3):
                        grads = [
                            rng.standard_normal(t["param"].shape).astype(dtype) for t in tensors
                        ]

                        def pick(b, tensors=tensors, as_list=n == "list"):
                            return [t[b] for t in tensors] if as_list else tensors[0][b]

                        args = [pick("param"), grads if n == "list" else grads[0]]
                        args += [pick(b) for b in state]
                        keywords = {b: pick(b) for b in optional}
                        if name in TAKES_STEP:
                            keywords["step"] = step
                        fn(*args, **keywords, **case)
                    for i, t in enumerate(tensors):
                        for b, v in t.items():
                            out[f"{name}|{ci}|{np.dtype(dtype).name}|{n}|{i}|{b}"] = v
    return out


def main(argv) -> int:
    if len(argv) == 3 and argv[1] == "save":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the old keywords
            out = run()
        np.savez(argv[2], **out)
        print(f"{len(out)} arrays saved to {argv[2]}")
        return 0
    if len(argv) == 4 and argv[1] == "diff":
        a, b = np.load(argv[2]), np.load(argv[3])
        if sorted(a.files) != sorted(b.files):
            print("the files hold different cases")
            return 1
        differ = [
            k for k in a.files if a[k].dtype != b[k].dtype or a[k].tobytes() != b[k].tobytes()
        ]
        print(f"{len(a.files)} arrays compared byte for byte: {len(differ)} differ {differ[:5]}")
        return 1 if differ else 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
