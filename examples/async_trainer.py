"""A Trio training loop with a composed loss on the local backend.

Fine-tunes the embedded tiny model on the shipped instruction/response pairs
with cross-entropy + an entropy bonus + KL to the reference (the same model's
logprobs at step 0), and prints every few steps what each term contributes to
the loss and which share of the gradient it is responsible for.

    python examples/async_trainer.py [--steps 60] [--batch-size 16]

Needs the first-party plugins ``tinkex-reg-entropy`` and ``tinkex-reg-kl``
(``make`` installs them; or ``pip install ./plugins/tinkex-reg-entropy ./plugins/tinkex-reg-kl``).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import trio

import tinkex
from tinkex import AdamParams, Datum, TrainingClient

DATA = Path(__file__).parent / "data" / "instructions.jsonl"
TEMPLATE = "Q: {prompt}\nA: "


def load_examples(tokenizer, limit: int | None = None) -> list[Datum]:
    """Prompt tokens get weight 0, response tokens (and the closing eos) weight 1."""
    with open(DATA, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()][:limit]
    pairs = [(TEMPLATE.format(prompt=r["prompt"]), r["response"]) for r in rows]
    return tinkex.sft_datums(pairs, tokenizer, max_length=256)


def mean_cross_entropy(data, logprobs):
    """Negative log-likelihood per counted (response) token."""
    weights = [
        tinkex.loss_input(d, "weights", like=lp) for d, lp in zip(data, logprobs, strict=True)
    ]
    total = sum(-(w * lp).sum() for w, lp in zip(weights, logprobs, strict=True))
    tokens = sum(w.sum() for w in weights)
    return total / tokens, {"tokens": float(tokens)}


def report(step: int, out: tinkex.CustomLossOutput) -> None:
    """Each term's contribution to the loss and its share of the gradient norm."""
    shares = out.grad_shares()  # weight * grad_norm over the sum across terms
    contributions = {"base_loss": out.base_loss.value}
    contributions.update((name, reg.contribution) for name, reg in out.regularizers.items())
    parts = "  ".join(
        f"{name} {value:+.4f} ({100 * shares.get(name, 0.0):4.1f}% grad)"
        for name, value in contributions.items()
    )
    print(f"step {step:4d}  loss {out.loss_total:.4f}  |  {parts}")


async def main(
    steps: int = 60,
    batch_size: int = 16,
    learning_rate: float = 1e-2,
    log_every: int = 10,
    limit: int | None = None,
) -> tuple[float, float]:
    """Train; return the composed loss on a fixed evaluation batch before and after."""
    async with await TrainingClient.create(backend="local", base_model="tiny", seed=0) as tc:
        examples = load_examples(tc.tokenizer, limit)
        # the reference: the same model's logprobs before the first step
        reference = await tc.forward(examples)
        data = [
            Datum(
                model_input=d.tokens(),
                loss_fn_inputs={**d.loss_fn_inputs, "reference_logprobs": ref},
            )
            for d, ref in zip(examples, reference, strict=True)
        ]
        regularizers = [
            tinkex.regularizer("entropy", weight=0.05, mode="maximize"),
            tinkex.regularizer("kl", weight=0.2, estimator="k3", name="kl_ref"),
        ]
        pipeline = tinkex.Pipeline(mean_cross_entropy, regularizers=regularizers)
        rng = random.Random(0)
        evaluation = rng.sample(data, min(32, len(data)))

        async def evaluate() -> float:
            return (await pipeline.compute(evaluation, await tc.forward(evaluation))).loss_total

        start = await evaluate()
        print(f"evaluation loss before training: {start:.4f}")
        params = AdamParams(learning_rate=learning_rate, grad_clip_norm=1.0)
        for step in range(1, steps + 1):
            batch = rng.sample(data, min(batch_size, len(data)))
            fb = await tc.forward_backward_custom(
                batch, mean_cross_entropy, regularizers=regularizers, track_grad_norms=True
            )
            await tc.optim_step(params)
            if step % log_every == 0 or step in (1, steps):
                report(step, fb.custom)
        end = await evaluate()
        print(f"evaluation loss after {steps} steps: {end:.4f} (from {start:.4f})")
        return start, end


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Trio training loop with a composed loss")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args()
    trio.run(main, args.steps, args.batch_size, args.learning_rate, args.log_every)
