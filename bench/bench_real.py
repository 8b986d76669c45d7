"""One LoRA training step on a real pretrained model (SmolLM2-135M-Instruct): tinkex vs hand-written.

Every variant trains its own copy of the model, loaded from the model cache
(``tinkex models fetch smollm2-135m-instruct``; this script fetches it when it is
missing), with a rank-8 LoRA adapter on every linear layer (peft,
``target_modules="all-linear"``, the same seed, so the same adapter), on the same
batch, with the same composed loss and an AdamW step:

    loss = cross-entropy (per counted token) + 0.01 * l2(logprobs, mean) + 0.1 * kl(k3, to the
           logprobs of the model before training)

- hand:       transformers + peft written by hand: forward, target-token logprobs, the
              loss above written out, backward, AdamW step.
- fused:      ``await tc.forward_backward_custom(..., mode="fused")`` with the ``l2``
              and ``kl`` plugins, then ``await tc.optim_step(...)``.
- linearized: the same with ``mode="linearized"`` (Tinker's method: two forwards).

Variants run interleaved in one process (rotating order); each reports the median of
``--steps`` timed steps after ``--warmup`` untimed ones. Targets: fused / hand <= 1.05,
linearized / hand <= 1.6. Before timing, the hand-written loss is checked against
tinkex's composed loss on the same weights.

Then, each in a fresh subprocess: loading the model from the GGUF (dequantised at
load) and from the converted safetensors cache (seconds and peak RSS), and one
training process (the model, LoRA, three fused steps: its peak RSS).

    python bench/bench_real.py [--steps 10] [--warmup 2] [--batch 4] [--seq-len 64] [--threads N]

Exit status 1 when a ratio misses its target.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

NAME = "smollm2-135m-instruct"
TARGETS = {"fused": 1.05, "linearized": 1.6}
L2_W, KL_W = 0.01, 0.1
RANK = 8


def peak_rss_mb() -> float:
    """This process's peak resident set size, in MB (Linux reports kB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1e3


# --------------------------------------------------------------------------- children


def child(mode: str, batch: int, seq_len: int) -> dict[str, float]:
    """Measure one thing in this (fresh) process; print it as JSON."""
    import torch
    import transformers  # noqa: F401  (imports are not load time)
    import trio

    import tinkex
    from tinkex import _models

    cached = _models.cached_model(NAME)
    assert cached is not None

    async def run() -> dict[str, float]:
        out: dict[str, float] = {}
        if mode == "load-gguf":
            start = time.perf_counter()
            tc = await tinkex.TrainingClient.create(base_model=str(cached.gguf), device="cpu")
            out["load_s"] = time.perf_counter() - start
            await tc.aclose()
        elif mode == "load-cache":
            times = []
            for _ in range(3):
                start = time.perf_counter()
                tc = await tinkex.TrainingClient.create(base_model=NAME, device="cpu")
                times.append(time.perf_counter() - start)
                await tc.aclose()
                del tc
            out["load_s"] = statistics.median(times)
        elif mode == "train":
            tc = await tinkex.TrainingClient.create(
                base_model=NAME, device="cpu", lora_rank=RANK, seed=0
            )
            data = make_data(batch, seq_len)
            data = with_reference(data, await tc.forward(data))
            regs = regularizers()
            times = []
            for _ in range(3):
                start = time.perf_counter()
                await tc.forward_backward_custom(data, cross_entropy, regularizers=regs)
                await tc.optim_step(tinkex.AdamParams(learning_rate=1e-4))
                times.append(time.perf_counter() - start)
            out["step_s"] = min(times)
            await tc.aclose()
        elif mode == "train-hand":
            data = make_data(batch, seq_len)
            tc = await tinkex.TrainingClient.create(base_model=NAME, device="cpu")
            data = with_reference(data, await tc.forward(data))
            await tc.aclose()
            del tc
            _, step = hand_step(cached.hf_dir, tinkex.AdamParams(learning_rate=1e-4), data)
            times = []
            for _ in range(3):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            out["step_s"] = min(times)
        out["peak_rss_mb"] = peak_rss_mb()
        out["threads"] = torch.get_num_threads()
        return out

    return trio.run(run)


def run_child(mode: str, args: argparse.Namespace) -> dict[str, float]:
    argv = [sys.executable, __file__, "--child", mode, "--batch", str(args.batch)]
    argv += ["--seq-len", str(args.seq_len)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    for attempt in (1, 2):
        done = subprocess.run(
            argv, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
        )
        lines = done.stdout.strip().splitlines()
        if lines and lines[-1].startswith("{"):
            if done.returncode != 0:  # it measured, then failed at exit
                print(
                    f"note: child {mode} exited {done.returncode} after measuring", file=sys.stderr
                )
            return json.loads(lines[-1])
        print(
            f"child {mode} failed (attempt {attempt}, exit {done.returncode}): "
            f"{done.stderr.strip()[-500:]}",
            file=sys.stderr,
        )
    raise SystemExit(f"child {mode} failed twice")


# --------------------------------------------------------------------------- the composed loss


def make_data(batch: int, seq_len: int, seed: int = 0):
    import torch

    from tinkex import Datum

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49152, (batch, seq_len + 1), generator=g)
    weights = torch.cat([torch.zeros(seq_len // 2), torch.ones(seq_len - seq_len // 2)])
    return [
        Datum(
            model_input=row[:-1].tolist(),
            loss_fn_inputs={"target_tokens": row[1:], "weights": weights},
        )
        for row in ids
    ]


def with_reference(data, reference):
    from tinkex import Datum

    return [
        Datum(
            model_input=d.model_input,
            loss_fn_inputs={**d.loss_fn_inputs, "reference_logprobs": r.detach().clone()},
        )
        for d, r in zip(data, reference, strict=True)
    ]


def cross_entropy(data, logprobs):
    import torch

    import tinkex

    w = torch.stack(
        [tinkex.loss_input(d, "weights", like=lp) for d, lp in zip(data, logprobs, strict=True)]
    )
    lp = torch.stack(list(logprobs))
    return -(w * lp).sum() / w.sum(), {}


def regularizers():
    import tinkex

    return [
        tinkex.regularizer("l2", weight=L2_W, reduction="mean"),
        tinkex.regularizer("kl", weight=KL_W, name="kl_ref"),
    ]


def hand_loss(lp, weights, reference):
    """The same composed loss written out: CE + l2 (mean over counted tokens) + kl (k3, mean)."""
    import torch

    counted = weights > 0
    n = counted.sum()
    ce = -(weights * lp).sum() / weights.sum()
    l2 = torch.where(counted, lp.pow(2), 0).sum() / n
    r = (reference - lp).clamp(-100.0, 100.0)
    kl = torch.where(counted, torch.exp(r) - r - 1, 0).sum() / n
    return ce + L2_W * l2 + KL_W * kl


def hand_step(hf_dir, params, data):
    """The hand-written side: transformers + peft with the same adapter (same config, same seed).

    Returns ``(loss_fn, step)``: the composed loss on the current weights, and one
    training step (forward, the loss written out, backward, AdamW).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(hf_dir), local_files_only=True, dtype=torch.float32
    )
    config = LoraConfig(
        r=RANK,
        lora_alpha=RANK,
        lora_dropout=0.0,
        target_modules="all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        torch.manual_seed(0)
        model = get_peft_model(model, config)
    model.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        trainable,
        lr=params.learning_rate,
        betas=(params.beta1, params.beta2),
        eps=params.eps,
        weight_decay=params.weight_decay,
    )
    input_ids = torch.stack([torch.tensor(d.tokens()) for d in data])
    targets = torch.stack([torch.as_tensor(d.loss_fn_inputs["target_tokens"]) for d in data])
    weights = torch.stack([torch.as_tensor(d.loss_fn_inputs["weights"]) for d in data])
    reference = torch.stack([d.loss_fn_inputs["reference_logprobs"] for d in data])

    def loss_fn():
        logits = model(input_ids=input_ids, use_cache=False).logits.float()
        lp = logits.gather(-1, targets[..., None])[..., 0] - torch.logsumexp(logits, -1)
        return hand_loss(lp, weights, reference)

    def step() -> None:
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return loss_fn, step


# --------------------------------------------------------------------------- the comparison


async def compare(steps: int, warmup: int, batch: int, seq_len: int) -> dict[str, list[float]]:
    import torch

    from tinkex import AdamParams, TrainingClient, _models

    cached = _models.cached_model(NAME)
    assert cached is not None
    params = AdamParams(learning_rate=1e-4)
    fused = await TrainingClient.create(base_model=NAME, device="cpu", lora_rank=RANK, seed=0)
    linear = await TrainingClient.create(base_model=NAME, device="cpu", lora_rank=RANK, seed=0)
    data = make_data(batch, seq_len)
    data = with_reference(data, await fused.forward(data))
    regs = regularizers()

    hand_composed_loss, step_hand_sync = hand_step(cached.hf_dir, params, data)

    # the hand-written loss is tinkex's composed loss (same weights, before any step)
    fb = await fused.forward_backward_custom(data, cross_entropy, regularizers=regs)
    with torch.no_grad():
        mine = float(hand_composed_loss())
    for p in fused.backend.model.parameters():
        p.grad = None
    if abs(mine - fb.custom.loss_total) > 1e-5 * max(1.0, abs(mine)):
        raise SystemExit(f"hand loss {mine} != tinkex loss {fb.custom.loss_total}")

    async def step_hand() -> None:
        step_hand_sync()

    async def step_fused() -> None:
        await fused.forward_backward_custom(data, cross_entropy, regularizers=regs, mode="fused")
        await fused.optim_step(params)

    async def step_linear() -> None:
        await linear.forward_backward_custom(
            data, cross_entropy, regularizers=regs, mode="linearized"
        )
        await linear.optim_step(params)

    variants = {"hand": step_hand, "fused": step_fused, "linearized": step_linear}
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
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)"
    )
    parser.add_argument("--no-loads", action="store_true", help="skip the load/RSS subprocesses")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.seq_len)))
        return 0

    import trio

    from tinkex import _models

    cached = _models.cached_model(NAME) or _models.fetch_model(
        NAME, progress=lambda line: print(line, file=sys.stderr)
    )
    tokens = args.batch * args.seq_len
    if not args.no_loads:
        gguf = run_child("load-gguf", args)
        cache = run_child("load-cache", args)
        train = run_child("train", args)
        train_hand = run_child("train-hand", args)
        print(
            f"load {NAME}: from the GGUF {gguf['load_s']:.1f} s (peak RSS {gguf['peak_rss_mb']:.0f} MB), "
            f"from the safetensors cache {cache['load_s']:.2f} s (peak RSS {cache['peak_rss_mb']:.0f} MB)"
        )
        print(
            f"one training process (LoRA r={RANK}, batch {args.batch} x {args.seq_len}): peak RSS "
            f"{train['peak_rss_mb']:.0f} MB, fused step {train['step_s'] * 1e3:.0f} ms "
            f"({tokens / train['step_s']:,.0f} tokens/s); hand-written: peak RSS "
            f"{train_hand['peak_rss_mb']:.0f} MB, step {train_hand['step_s'] * 1e3:.0f} ms"
        )
    print(f"cache entry: {os.fspath(cached.directory)}")

    times = trio.run(compare, args.steps, args.warmup, args.batch, args.seq_len)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    hand = medians["hand"]
    print(
        f"one LoRA (r={RANK}, all-linear) training step, {NAME}, batch {args.batch} x "
        f"{args.seq_len} tokens, CE + l2 + kl + AdamW, median of {args.steps}, torch threads "
        f"{torch.get_num_threads()}; peak RSS of this process (3 model copies) {peak_rss_mb():.0f} MB"
    )
    print(
        f"{'variant':<12} {'median ms':>10} {'min ms':>8} {'tokens/s':>9} {'ratio':>7} {'target':>7}  ok"
    )
    ok = True
    for name, value in medians.items():
        ratio = value / hand
        target = TARGETS.get(name)
        passed = target is None or ratio <= target
        ok &= passed
        target_s = f"{target:.2f}" if target else "-"
        print(
            f"{name:<12} {value * 1e3:>10.1f} {min(times[name]) * 1e3:>8.1f} {tokens / value:>9,.0f} "
            f"{ratio:>7.3f} {target_s:>7}  {'yes' if passed else 'NO'}"
        )
    print(
        f"cost per step over hand: fused {(medians['fused'] - hand) * 1e3:+.1f} ms, "
        f"linearized {(medians['linearized'] - hand) * 1e3:+.1f} ms"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
