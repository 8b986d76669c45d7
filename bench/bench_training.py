"""One training step with a composed loss: tinkex's fused and linearized steps vs hand-written torch.

Every variant trains its own copy of the same tiny model on the same batch with
the same composed loss (cross-entropy + 0.1 * mean squared logprob + 0.05 *
mean token probability, the two regularizers written inline as RegularizerSpec
functions) and an AdamW step:

- plain:      hand-written torch: forward, the composed loss written out, backward, AdamW step.
- fused:      ``await tc.forward_backward_custom(..., mode="fused")`` + ``await tc.optim_step(...)``.
- linearized: the same with ``mode="linearized"`` (Tinker's method: two forwards).

Variants run interleaved in one process (rotating order); each reports the
median of ``--steps`` timed steps after ``--warmup`` untimed ones. Targets:
fused / plain <= 1.10, linearized / plain <= 1.6.

    python bench/bench_training.py [--steps 40] [--batch 16] [--seq-len 128] [--threads 1] [--check]

``--check`` exits with status 1 when a ratio misses its target.

What the ratio measures: tinkex adds a roughly fixed cost per step (composing
the loss through the pipeline, about 1.5-2 ms here, and three worker-thread
hops), so the ratio shrinks as the step grows. On this tiny model a batch of
16 x 128 tokens takes ~45 ms by hand; at 8 x 128 (~25 ms) fused is ~1.1. The
last line prints that fixed cost in milliseconds. On a shared, busy machine the
medians move by +-10%; run it a few times and read the min column too.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
import trio

import tinkex
from tinkex import AdamParams, Datum, RegularizerSpec, TrainingClient

TARGETS = {"fused": 1.10, "linearized": 1.6}
SQ_W, PROB_W = 0.1, 0.05


# --------------------------------------------------------------------------- the composed loss


def cross_entropy(data, logprobs):
    weights = torch.cat(
        [tinkex.loss_input(d, "weights", like=lp) for d, lp in zip(data, logprobs, strict=True)]
    )
    return -(weights * torch.cat(list(logprobs))).sum(), {}


def mean_square(data, logprobs):
    return torch.cat(list(logprobs)).pow(2).mean(), {}


def mean_prob(data, logprobs):
    return torch.cat(list(logprobs)).exp().mean(), {}


REGULARIZERS = [
    RegularizerSpec(mean_square, SQ_W, "mean_square"),
    RegularizerSpec(mean_prob, PROB_W, "mean_prob"),
]


# --------------------------------------------------------------------------- the plain torch step


def plain_step(model, opt, input_ids, targets, weights) -> float:
    """Forward, the composed loss by hand, backward, AdamW step."""
    logits = model(input_ids=input_ids, use_cache=False).logits.float()
    lp = logits.gather(-1, targets[..., None])[..., 0] - torch.logsumexp(logits, -1)
    loss = -(weights * lp).sum() + SQ_W * lp.pow(2).mean() + PROB_W * lp.exp().mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


# --------------------------------------------------------------------------- main


def make_data(batch: int, seq_len: int, seed: int = 0) -> list[Datum]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (batch, seq_len + 1), generator=g)
    return [
        Datum(
            model_input=row[:-1].tolist(),
            loss_fn_inputs={"target_tokens": row[1:], "weights": torch.ones(seq_len)},
        )
        for row in ids
    ]


async def run(steps: int, warmup: int, batch: int, seq_len: int) -> dict[str, list[float]]:
    params = AdamParams(learning_rate=1e-4)
    data = make_data(batch, seq_len)
    fused = await TrainingClient.create(backend="local", base_model="tiny", device="cpu", seed=0)
    linear = await TrainingClient.create(backend="local", base_model="tiny", device="cpu", seed=0)
    model = copy.deepcopy(fused.backend.model)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=params.learning_rate,
        betas=(params.beta1, params.beta2),
        eps=params.eps,
        weight_decay=params.weight_decay,
    )
    input_ids = torch.stack([torch.tensor(d.tokens()) for d in data])
    targets = torch.stack([d.loss_fn_inputs["target_tokens"] for d in data])
    weights = torch.stack([d.loss_fn_inputs["weights"] for d in data])

    async def step_plain() -> None:
        plain_step(model, opt, input_ids, targets, weights)

    async def step_fused() -> None:
        await fused.forward_backward_custom(
            data, cross_entropy, regularizers=REGULARIZERS, mode="fused"
        )
        await fused.optim_step(params)

    async def step_linear() -> None:
        await linear.forward_backward_custom(
            data, cross_entropy, regularizers=REGULARIZERS, mode="linearized"
        )
        await linear.optim_step(params)

    variants = {"plain": step_plain, "fused": step_fused, "linearized": step_linear}
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for i in range(warmup + steps):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            start = time.perf_counter()
            await variants[name]()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    await fused.aclose()
    await linear.aclose()
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: stable timings on a small shared machine)",
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when a ratio misses its target"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    times = trio.run(run, args.steps, args.warmup, args.batch, args.seq_len)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    plain = medians["plain"]
    print(
        f"one training step, tiny Llama, batch {args.batch} x {args.seq_len} tokens, "
        f"CE + 2 regularizers + AdamW, median of {args.steps}, torch threads {torch.get_num_threads()}"
    )
    print(f"{'variant':<12} {'median ms':>10} {'min ms':>8} {'ratio':>7} {'target':>7}  ok")
    ok = True
    for name, value in medians.items():
        ratio = value / plain
        target = TARGETS.get(name)
        passed = target is None or ratio <= target
        ok &= passed
        target_s = f"{target:.2f}" if target else "-"
        print(
            f"{name:<12} {value * 1e3:>10.2f} {min(times[name]) * 1e3:>8.2f} {ratio:>7.3f} "
            f"{target_s:>7}  {'yes' if passed else 'NO'}"
        )
    print(
        f"fixed cost per step over plain: fused {(medians['fused'] - plain) * 1e3:+.2f} ms, "
        f"linearized {(medians['linearized'] - plain) * 1e3:+.2f} ms"
    )
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
