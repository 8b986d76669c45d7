"""Benchmark: composing a loss with 8 regularizers and tracking gradient norms.

Compares ``tinkex.compute_loss(..., track_grad_norms=True)`` (both ``parallel``
modes, timed inside one ``trio.run`` as a trainer calls it) with:

- reference: hand-written torch that evaluates each term once and takes its
  gradient with ``torch.autograd.grad(retain_graph=True)``, then sums the
  weighted gradients and takes the norms -- the same work, no framework;
- ref. in a thread: the same reference, run off the Trio thread with
  ``trio.to_thread.run_sync`` -- the floor for anything that, like tinkex's
  sync terms, must not block the loop (not a target, a yardstick);
- seed-style: the Tinkex port's method -- a separate forward+backward per term
  to get its gradient norm, plus one more forward+backward of the total.

Prints median times and, per method, the median over rounds of its time divided
by the reference's time in the same round (ours / reference). Targets: at
[64, 8192] parallel <= 1.0 x the reference and sequential <= 1.10 x the reference
run in a thread (sequential runs every sync term off the Trio thread, so that is
its floor); at [8, 512] both modes <= 2.0 x the reference. Timing here is noisy:
read ratios, not absolute times, and run it more than once (docs/performance.md
says why running torch off the main thread costs more on CPU).

    python bench/bench_compose.py [--repeats N] [--shapes 64x8192,8x512]
"""

from __future__ import annotations

import argparse
import functools
import math
import random
import statistics
import time

import torch
import trio

import tinkex
from tinkex import RegularizerSpec

WEIGHTS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0]


def base_loss(data, lp):
    return -(lp * data["w"]).sum() / data["n"], {}


def t_l2(data, lp):
    return (lp * lp).sum(), {}


def t_l1(data, lp):
    return lp.abs().sum(), {}


def t_entropy(data, lp):
    q = torch.softmax(lp, dim=-1)
    return -(q * torch.log_softmax(lp, dim=-1)).sum(dim=-1).mean(), {}


def t_kl(data, lp):
    r = (data["ref"] - lp).clamp(-100.0, 100.0)
    return (torch.exp(r) - r - 1).mean(), {}


def t_probs(data, lp):
    return torch.exp(lp).mean(), {}


def t_var(data, lp):
    return lp.var(dim=-1).mean(), {}


def t_center(data, lp):
    return ((lp - lp.mean()) ** 2).mean(), {}


def t_consistency(data, lp):
    return ((lp - data["ref"]) ** 2).mean(), {}


TERMS = [t_l2, t_l1, t_entropy, t_kl, t_probs, t_var, t_center, t_consistency]


def make_inputs(b: int, t: int):
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(b, t, generator=g) * 5
    data = {
        "w": (torch.rand(b, t, generator=g) > 0.3).float(),
        "ref": -torch.rand(b, t, generator=g) * 5,
    }
    data["n"] = data["w"].sum().clamp_min(1)
    return data, lp


def _norm(g):
    return float(torch.linalg.vector_norm(g, dtype=torch.float32))


def reference(data, lp):
    """Hand-written torch: each term once, autograd.grad(retain_graph=True), weighted sum."""
    leaf = lp.detach().requires_grad_(True)
    loss = base_loss(data, leaf)[0]
    (g_total,) = torch.autograd.grad(loss, leaf, retain_graph=True)
    g_total = g_total.clone()
    out = {"base": (loss.item(), _norm(g_total))}
    for w, fn in zip(WEIGHTS, TERMS, strict=True):
        value = fn(data, leaf)[0]
        (g,) = torch.autograd.grad(value, leaf, retain_graph=True)
        out[fn.__name__] = (value.item(), _norm(g))
        g_total.add_(g, alpha=w)
    out["total"] = _norm(g_total)
    return out


def seed_style(data, lp):
    """The Tinkex port: separate forward+backward per term, then one more pass for the total."""
    out = {}
    for fn in [base_loss, *TERMS]:
        leaf = lp.detach().requires_grad_(True)
        value = fn(data, leaf)[0]
        value.backward()
        out[fn.__name__] = (value.item(), _norm(leaf.grad))
    leaf = lp.detach().requires_grad_(True)
    total = base_loss(data, leaf)[0] + sum(
        w * fn(data, leaf)[0] for w, fn in zip(WEIGHTS, TERMS, strict=True)
    )
    total.backward()
    out["total"] = _norm(leaf.grad)
    return out


SPECS = [
    RegularizerSpec(fn=fn, weight=w, name=fn.__name__) for w, fn in zip(WEIGHTS, TERMS, strict=True)
]


async def measure(b: int, t: int, repeats: int) -> dict[str, list[float]]:
    data, lp = make_inputs(b, t)
    pipelines = {
        "tinkex parallel": tinkex.Pipeline(
            base_loss, regularizers=SPECS, track_grad_norms=True, parallel=True
        ),
        "tinkex sequential": tinkex.Pipeline(
            base_loss, regularizers=SPECS, track_grad_norms=True, parallel=False
        ),
    }
    # correctness first: all methods agree
    ref = reference(data, lp)
    for name, p in pipelines.items():
        out = await p.compute(data, lp)
        assert math.isclose(out.total_grad_norm, ref["total"], rel_tol=1e-4), (
            name,
            out.total_grad_norm,
            ref["total"],
        )

    async def run_reference() -> None:
        reference(data, lp)

    async def run_seed_style() -> None:
        seed_style(data, lp)

    async def run_reference_in_a_thread() -> None:
        await trio.to_thread.run_sync(reference, data, lp)

    methods = {
        "reference": run_reference,
        "ref. in a thread": run_reference_in_a_thread,
        "seed-style": run_seed_style,
        **{name: functools.partial(p.compute, data, lp) for name, p in pipelines.items()},
    }
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(3):  # warm-up
        for fn in methods.values():
            await fn()
    names = list(methods)
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        # interleaved so drift hits every method alike, each round in a new order so
        # that no method always follows the same one (what ran just before changes the
        # cost: OpenMP workers of another thread, memory glibc just gave back to the OS)
        shuffle(names)
        for name in names:
            t0 = time.perf_counter()
            await methods[name]()
            times[name].append(time.perf_counter() - t0)
    return times


#: (shape, method) -> (the method it is compared with, the largest ratio allowed)
TARGETS = {
    ((64, 8192), "tinkex parallel"): ("reference", 1.0),
    ((64, 8192), "tinkex sequential"): ("ref. in a thread", 1.10),
    ((8, 512), "tinkex parallel"): ("reference", 2.0),
    ((8, 512), "tinkex sequential"): ("reference", 2.0),
}


def paired_ratio(times: dict[str, list[float]], name: str, baseline: str) -> float:
    """Median over rounds of ``name``'s time / ``baseline``'s time in the same round.

    Pairing each time with the baseline's time in the same round cancels the slow
    drift of a shared machine; the median keeps one page-fault storm from deciding.
    """
    pairs = zip(times[name], times[baseline], strict=True)
    return statistics.median(t / r for t, r in pairs)


def summarize(times: dict[str, list[float]]) -> dict[str, tuple[float, float]]:
    """Per method: (median ms, paired ratio to the reference)."""
    return {
        name: (statistics.median(ts) * 1e3, paired_ratio(times, name, "reference"))
        for name, ts in times.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--shapes", default="64x8192,8x512")
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, 8 terms + base loss"
    )
    print(f"{'shape':>10} {'method':>18} {'median ms':>10} {'/ reference':>12}  target")
    ok = True
    for b, t in shapes:
        times = trio.run(measure, b, t, args.repeats)
        for name, (ms, ratio) in summarize(times).items():
            mark = ""
            if ((b, t), name) in TARGETS:
                baseline, target = TARGETS[(b, t), name]
                got = paired_ratio(times, name, baseline)
                passed = got <= target
                ok &= passed
                mark = f"{got:.2f} / {baseline} <= {target:.2f} {'ok' if passed else 'MISSED'}"
            print(f"{f'{b}x{t}':>10} {name:>18} {ms:>10.3f} {ratio:>12.2f}  {mark}")
        stats = summarize(times)
        ours = min(stats["tinkex parallel"][1], stats["tinkex sequential"][1])
        print(f"{'':>10} seed-style / tinkex (best mode): {stats['seed-style'][1] / ours:.2f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
