"""Helpers for the tinker-cookbook tests (``test_cookbook*.py``): the cookbook's data, the
SDK's side with only the network replaced, and the regularizers' math written out by hand.

Everything is the real ``tinker-cookbook`` (0.6.1, installed by ``make``): data come from its
dataset builders and renderers (a byte-level tokenizer registered with its
``register_tokenizer``; nothing from a hub), losses are its own functions, and the recipes'
loops run with stand-in clients that replace only the network calls. A missing cookbook is
an ImportError when the tests are collected: they never skip.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import chz
import datasets
import pytest
import tinker
import torch
from tinker_cookbook import renderers
from tinker_cookbook.completers import TokensWithLogprobs
from tinker_cookbook.distillation.sdft import build_reverse_kl_datums, reverse_kl_custom_loss
from tinker_cookbook.preference import train_dpo
from tinker_cookbook.preference.dpo_datasets import DPODatasetBuilderFromComparisons
from tinker_cookbook.preference.preference_datasets import ComparisonDatasetBuilder
from tinker_cookbook.preference.types import Comparison, LabeledComparison
from tinker_cookbook.recipes.decisions import forecasting
from tinker_cookbook.recipes.decisions.decision import Decision, DecisionRenderer
from tinker_cookbook.recipes.decisions.forecasting import brier_score_loss
from tinker_cookbook.recipes.decisions.train import decision_dist_datums, probability_loss
from tinker_cookbook.rl.data_processing import trajectory_to_data
from tinker_cookbook.rl.types import Trajectory, Transition
from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig
from tinker_cookbook.tokenizer_utils import get_tokenizer, register_tokenizer

import tinkex
from tinkex._backends.tiny import ByteTokenizer

# --------------------------------------------------------------------------- tokenizer

TOKENIZER = "tinkex-tests/byte-tokenizer"


class CookbookByteTokenizer(ByteTokenizer):
    """tinkex's byte tokenizer, with the ``name_or_path`` the cookbook's renderers record."""

    name_or_path = TOKENIZER


register_tokenizer(TOKENIZER, CookbookByteTokenizer)


def role_colon_renderer() -> renderers.Renderer:
    return renderers.get_renderer("role_colon", get_tokenizer(TOKENIZER))


# --------------------------------------------------------------------------- numbers


def logprobs_like(shape: Sequence[int], seed: int) -> torch.Tensor:
    """Plausible target-token logprobs: log(u), u uniform in [0.05, 1), about -0.8 nats each."""
    g = torch.Generator().manual_seed(seed)
    return torch.log(torch.rand(tuple(shape), generator=g) * 0.95 + 0.05)


def tokens_of(datum: tinker.Datum) -> tuple[int, ...]:
    return tuple(datum.model_input.to_ints())


def with_inputs(datum: tinker.Datum, **tensors: torch.Tensor) -> tinker.Datum:
    """The same ``tinker.Datum`` with more loss inputs (``reference_logprobs`` for ``kl``)."""
    inputs = dict(datum.loss_fn_inputs)
    inputs.update({k: tinker.TensorData.from_torch(v) for k, v in tensors.items()})
    return tinker.Datum(model_input=datum.model_input, loss_fn_inputs=inputs)


L2_WEIGHT = 0.01
KL_WEIGHT = 0.1


def composed_regularizers() -> list[tinkex.RegularizerSpec]:
    return [
        tinkex.regularizer("l2", weight=L2_WEIGHT),
        tinkex.regularizer("kl", weight=KL_WEIGHT),
    ]


def counted(datum: tinker.Datum, lp: torch.Tensor) -> torch.Tensor:
    """Where the first-party regularizers count a logprob: every present weights/mask > 0."""
    keep = torch.ones(lp.shape, dtype=torch.bool)
    for key in ("weights", "mask"):
        if key in datum.loss_fn_inputs:
            value = datum.loss_fn_inputs[key].to_torch()
            if value.dim() == 1 and lp.dim() == 2:
                value = value[:, None]
            keep &= (value > 0).expand(lp.shape)
    return keep


def hand_l2(data, logprobs) -> tuple[float, list[torch.Tensor]]:
    """``l2`` with its defaults (reduction="sum", mask="weights"): Σ lp² over counted elements."""
    masks = [counted(d, lp) for d, lp in zip(data, logprobs, strict=True)]
    lps = [lp.double() for lp in logprobs]
    value = sum(float((lp[m] ** 2).sum()) for lp, m in zip(lps, masks, strict=True))
    return value, [2 * lp * m for lp, m in zip(lps, masks, strict=True)]


def hand_kl(data, logprobs) -> tuple[float, list[torch.Tensor]]:
    """``kl`` with its defaults (k3, clip 100): mean of e^r - r - 1, r = ref - lp, counted elements."""
    masks = [counted(d, lp) for d, lp in zip(data, logprobs, strict=True)]
    refs = [d.loss_fn_inputs["reference_logprobs"].to_torch().double() for d in data]
    n = sum(int(m.sum()) for m in masks)
    value, grads = 0.0, []
    for lp, ref, m in zip(logprobs, refs, masks, strict=True):
        r = (ref - lp.double()).clamp(-100.0, 100.0)
        value += float((torch.exp(r) - r - 1)[m].sum()) / n
        grads.append((1 - torch.exp(r)) * m / n)
    return value, grads


@dataclass(frozen=True)
class Reference:
    """What a loss gives when run on its own: value, d(loss)/d(logprobs), metrics."""

    value: float
    grads: list[torch.Tensor]
    metrics: dict[str, float]


def run_alone(loss_fn, data, logprobs) -> Reference:
    leaves = [lp.clone().detach().requires_grad_(True) for lp in logprobs]
    loss, metrics = loss_fn(data, leaves)
    loss.backward()
    return Reference(float(loss.detach()), [lp.grad.clone() for lp in leaves], dict(metrics))


def expected_composed(case: Case) -> Reference:
    """The cookbook's loss plus the hand-computed ``l2`` and ``kl`` terms."""
    ref = run_alone(case.loss_fn, case.data, case.logprobs)
    l2, g_l2 = hand_l2(case.data, case.logprobs)
    kl, g_kl = hand_kl(case.data, case.logprobs)
    grads = [
        (g.double() + L2_WEIGHT * a + KL_WEIGHT * b).float()
        for g, a, b in zip(ref.grads, g_l2, g_kl, strict=True)
    ]
    return Reference(ref.value + L2_WEIGHT * l2 + KL_WEIGHT * kl, grads, ref.metrics)


def assert_grads(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> None:
    """Per-datum gradients (or weights) equal, to 1e-6."""
    assert len(got) == len(want), f"{len(got)} gradients, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape, f"datum {i}: shape {tuple(g.shape)}, expected {tuple(w.shape)}"
        torch.testing.assert_close(
            g.float(), w.float(), rtol=1e-6, atol=1e-6, msg=lambda m, i=i: f"datum {i}: {m}"
        )


def assert_value(got: float, want: float) -> None:
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6), f"got {got!r}, expected {want!r}"


def assert_drop_in_metrics(metrics: dict[str, float], own: dict[str, float], *, regs: bool) -> None:
    """The loss's own keys at the top level with its values, and tinkex's keys beside them."""
    for key, value in own.items():
        assert key in metrics, f"the loss's own metric {key!r} is missing: {sorted(metrics)}"
        assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (
            f"{key!r}: {metrics[key]!r}, the loss's own value is {value!r}"
        )
    tinkex_keys = {"loss_total", "regularizer_total", "base_loss/value"}
    tinkex_keys |= {f"base_loss/{k}" for k in own}
    if regs:
        tinkex_keys |= {f"reg/{n}/{f}" for n in ("l2", "kl") for f in ("value", "contribution")}
    missing = sorted(tinkex_keys - metrics.keys())
    assert not missing, f"tinkex's metrics {missing} are missing: {sorted(metrics)}"
    prefixed = [k for k in metrics if k.startswith("tinkex/")]
    assert not prefixed, f"no key collides here, yet {prefixed} were moved"
    not_float = {k: v for k, v in metrics.items() if not isinstance(v, float)}
    assert not not_float, f"metrics must be plain floats: {not_float}"


# --------------------------------------------------------------------------- the SDK's side


def on_asyncio_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a fresh thread inside a running asyncio loop, as the SDK runs a custom
    loss (its ``tinker-custom-loss`` thread), and return its result or raise its error."""
    box: dict[str, Any] = {}

    async def main() -> Any:
        return fn()

    def target() -> None:
        try:
            box["value"] = asyncio.run(main())
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name="tinker-custom-loss-stand-in")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def call_like_the_sdk(loss_fn, data, logprobs) -> tuple[torch.Tensor, dict, list[torch.Tensor]]:
    """``loss_fn`` called as the SDK calls it: fresh leaf tensors, then ``loss.backward()``."""

    def step():
        leaves = [lp.clone().detach().requires_grad_(True) for lp in logprobs]
        loss, metrics = loss_fn(data, leaves)
        loss.backward()
        return loss.detach(), metrics, [lp.grad for lp in leaves]

    return on_asyncio_thread(step)


def forward_output(logprobs: Sequence[torch.Tensor]) -> tinker.ForwardBackwardOutput:
    """The service's answer to the SDK's forward request: each datum's logprobs, shape kept."""
    return tinker.ForwardBackwardOutput(
        loss_fn_output_type="ArrayRecord",
        loss_fn_outputs=[
            {"logprobs": tinker.TensorData.from_torch(lp.detach())} for lp in logprobs
        ],
        metrics={},
    )


@dataclass(frozen=True)
class SdkStep:
    """What the SDK's ``_compute_custom_loss`` produced: the value, the weights it would send
    (``-dL/dlogprobs``) and the metrics (which the SDK returns with ``loss:sum`` added)."""

    loss_sum: float
    weights: list[torch.Tensor]
    metrics: dict[str, float]


def sdk_custom_loss(data, loss_fn, logprobs) -> SdkStep:
    """The SDK's own client-side step between its forward and backward requests."""
    forward = forward_output(logprobs)
    result = on_asyncio_thread(
        lambda: tinker.TrainingClient._compute_custom_loss(data, loss_fn, forward)
    )
    weights = [d.loss_fn_inputs["weights"].to_torch() for d in result.data]
    return SdkStep(result.loss_sum, weights, dict(result.metrics))


class Done:
    """An SDK future that is already done: ``.result()``, and awaitable."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self, timeout: float | None = None) -> Any:
        return self.value

    def __await__(self):
        return self.value
        yield  # pragma: no cover - makes this a generator


class TrainingClientStandIn:
    """``tinker.TrainingClient`` with only the network replaced.

    ``forward_backward_custom`` records the loss function, runs the SDK's own
    client-side step (``_compute_custom_loss``) on the policy's logprobs (``policy``:
    datum -> tensor, fixed) and answers with the metrics the SDK would (the loss's,
    plus ``loss:sum``). Futures are already done: ``.result()`` or ``await``.
    """

    def __init__(self, policy: Callable[[tinker.Datum], torch.Tensor]) -> None:
        self.policy = policy
        self.loss_fns: list[Callable] = []
        self.steps: list[SdkStep] = []
        self.optim_steps: list[Any] = []

    def forward_backward_custom(self, data, loss_fn):
        self.loss_fns.append(loss_fn)
        step = sdk_custom_loss(data, loss_fn, [self.policy(d) for d in data])
        self.steps.append(step)
        metrics = {**step.metrics, "loss:sum": step.loss_sum}
        return Done(
            tinker.ForwardBackwardOutput(
                loss_fn_output_type="ArrayRecord", loss_fn_outputs=[], metrics=metrics
            )
        )

    def optim_step(self, adam_params):
        self.optim_steps.append(adam_params)
        return Done(tinker.OptimStepResponse(metrics={}))

    def save_weights_and_get_sampling_client(self):
        return Done(DecisionSamplerStandIn())

    def save_state(self, name, ttl_seconds=None):
        return Done(SimpleNamespace(path=f"tinker://stand-in/state/{name}"))

    def save_weights_for_sampler(self, name, ttl_seconds=None):
        return Done(SimpleNamespace(path=f"tinker://stand-in/sampler/{name}"))


class WithRegularizers:
    """A ``tinker.TrainingClient`` whose custom losses get tinkex regularizers (docs/tinker.md)."""

    def __init__(self, client, regularizers, **pipeline_options) -> None:
        self._client = client
        self._regularizers = list(regularizers)
        self._options = pipeline_options

    def forward_backward_custom(self, data, loss_fn, **kwargs):
        composed = tinkex.Pipeline(loss_fn, regularizers=self._regularizers, **self._options)
        return self._client.forward_backward_custom(data, composed.as_loss_fn(), **kwargs)

    def __getattr__(self, name):
        return getattr(self._client, name)


# --------------------------------------------------------------------------- DPO data

COMPARISONS = [  # prompt, completion A, completion B, preferred
    ("What is 2 + 2?", "4.", "It is 5, probably.", "A"),
    ("Name the capital of France.", "Lyon is the capital.", "Paris.", "B"),
    ("Say hello politely.", "Hello, nice to meet you!", "What do you want?", "A"),
    ("Is water wet?", "No idea, stop asking.", "Yes: it wets what it touches.", "B"),
]


@chz.chz
class InMemoryComparisons(ComparisonDatasetBuilder):
    """The cookbook's comparison builder over :data:`COMPARISONS`, built in memory."""

    def get_train_and_test_datasets(self):
        rows = [{"prompt": p, "a": a, "b": b, "label": lab} for p, a, b, lab in COMPARISONS]
        return datasets.Dataset.from_list(rows), None

    def example_to_labeled_comparison(self, example):
        comparison = Comparison(
            prompt_conversation=[{"role": "user", "content": example["prompt"]}],
            completion_A=[{"role": "assistant", "content": example["a"]}],
            completion_B=[{"role": "assistant", "content": example["b"]}],
        )
        return LabeledComparison(comparison=comparison, label=example["label"])


def dpo_dataset_builder() -> DPODatasetBuilderFromComparisons:
    return DPODatasetBuilderFromComparisons(
        comparison_builder=InMemoryComparisons(),
        common_config=ChatDatasetBuilderCommonConfig(
            model_name_for_tokenizer=TOKENIZER,
            renderer_name="role_colon",
            max_length=None,
            batch_size=len(COMPARISONS),
        ),
    )


class ReferenceClientStandIn:
    """The reference ``tinker.SamplingClient``: ``compute_logprobs(seq).coroutine()``."""

    def __init__(self, by_sequence: dict[tuple[int, ...], torch.Tensor]) -> None:
        self.by_sequence = by_sequence

    def compute_logprobs(self, seq: tinker.ModelInput):
        values = [None, *self.by_sequence[tuple(seq.to_ints())].tolist()]  # no logprob for token 0

        async def coroutine():
            return values

        return SimpleNamespace(coroutine=coroutine)


class DatasetStandIn:
    def __init__(self, batch: list[tinker.Datum]) -> None:
        self.batch = batch

    def get_batch(self, index: int) -> list[tinker.Datum]:
        return list(self.batch)

    def __len__(self) -> int:
        return 1


class MetricsLoggerStandIn:
    store = None

    def __init__(self) -> None:
        self.logged: list[dict[str, Any]] = []

    def log_metrics(self, metrics, step=None):
        self.logged.append(dict(metrics))


@dataclass(frozen=True)
class DpoRun:
    data: list[tinker.Datum]  # the cookbook's interleaved chosen/rejected datums
    policy: dict[tuple[int, ...], torch.Tensor]
    reference: dict[tuple[int, ...], torch.Tensor]  # by datum tokens, one per logprob
    reference_by_sequence: dict[tuple[int, ...], torch.Tensor]
    client: TrainingClientStandIn
    logged: list[dict[str, Any]]
    log_path: str


def run_dpo_update(training_client, data, reference_by_sequence, log_path) -> MetricsLoggerStandIn:
    """One ``train_dpo.do_update`` step, the cookbook's code, on stand-in clients."""
    config = train_dpo.Config(
        log_path=log_path,
        model_name=TOKENIZER,
        recipe_name="tinkex-tests",
        dataset_builder=dpo_dataset_builder(),
        eval_every=0,
        infrequent_eval_every=0,
        save_every=0,
    )
    logger = MetricsLoggerStandIn()
    train_dpo.do_update(
        epoch_idx=0,
        batch_idx=0,
        n_batches=1,
        total_steps=1,
        config=config,
        training_client=training_client,
        reference_client=ReferenceClientStandIn(reference_by_sequence),
        evaluators=[],
        infrequent_evaluators=[],
        dataset=DatasetStandIn(data),
        ml_logger=logger,
        log_path=log_path,
        tokenizer=get_tokenizer(TOKENIZER),
    )
    return logger


@functools.cache
def dpo_run(log_path: str) -> DpoRun:
    dataset, _ = dpo_dataset_builder()()
    data = dataset.get_batch(0)
    assert len(data) == 2 * len(COMPARISONS)
    policy, reference, by_sequence = {}, {}, {}
    for i, datum in enumerate(data):
        n = datum.model_input.length
        # the reference is the policy's starting point: after a few steps they differ a little
        reference[tokens_of(datum)] = logprobs_like((n,), seed=200 + i)
        drift = 0.05 * torch.randn(n, generator=torch.Generator().manual_seed(100 + i))
        policy[tokens_of(datum)] = (reference[tokens_of(datum)] + drift).clamp(max=-1e-4)
        last_target = int(datum.loss_fn_inputs["target_tokens"].data[-1])
        by_sequence[(*tokens_of(datum), last_target)] = reference[tokens_of(datum)]
    client = TrainingClientStandIn(lambda d: policy[tokens_of(d)])
    logger = run_dpo_update(client, data, by_sequence, log_path)
    return DpoRun(data, policy, reference, by_sequence, client, logger.logged, log_path)


# --------------------------------------------------------------------------- SDFT data

TOP_K = 4


class TeacherStandIn:
    """The teacher ``tinker.SamplingClient``: top-K prompt logprobs at every position."""

    def sample(self, prompt, num_samples, sampling_params, **kwargs):
        assert kwargs["include_prompt_logprobs"] and kwargs["topk_prompt_logprobs"] == TOP_K
        length = prompt.length
        topk: list[Any] = [None]
        for position in range(1, length):
            g = torch.Generator().manual_seed(1000 * length + position)
            k = 2 if position % 5 == 0 else TOP_K  # sometimes fewer than K: padding slots
            ids = torch.randperm(256, generator=g)[:k].tolist()
            lps = sorted((logprobs_like((k,), seed=position) * 2).tolist(), reverse=True)
            topk.append(list(zip(ids, lps, strict=True)))

        async def coroutine():
            return SimpleNamespace(topk_prompt_logprobs=topk)

        return SimpleNamespace(coroutine=coroutine)


SDFT_EPISODES = [  # student prompt, teacher prompt, the student's completion
    ("Translate to French: cat", "Translate to French (answer: le chat): cat", " le chat"),
    ("Spell dog backwards.", "Spell dog backwards (answer: god).", " g-o-d, that is god"),
]


def rl_datums() -> tuple[list[tinker.Datum], list[dict[str, int]], list[tinker.ModelInput]]:
    """RL datums as the cookbook builds them from rollouts (``trajectory_to_data``)."""
    tok = get_tokenizer(TOKENIZER)
    data, metadata, teacher_prompts = [], [], []
    for group, (prompt, teacher_prompt, completion) in enumerate(SDFT_EPISODES):
        ob = tinker.ModelInput.from_ints(tok.encode(f"User: {prompt}\n\nAssistant:"))
        tokens = tok.encode(completion, add_special_tokens=False)
        ac = TokensWithLogprobs(
            tokens=tokens, maybe_logprobs=logprobs_like((len(tokens),), seed=group).tolist()
        )
        transition = Transition(ob=ob, ac=ac, reward=1.0, episode_done=True)
        trajectory = Trajectory(transitions=[transition], final_ob=tinker.ModelInput.empty())
        for datum in trajectory_to_data(trajectory, traj_advantage=0.5):
            data.append(datum)
            metadata.append({"group_idx": group, "traj_idx": 0})
        teacher_prompts.append(
            tinker.ModelInput.from_ints(tok.encode(f"User: {teacher_prompt}\n\nAssistant:"))
        )
    return data, metadata, teacher_prompts


@functools.cache
def sdft_datums() -> list[tinker.Datum]:
    data, metadata, teacher_prompts = rl_datums()
    out, _ = asyncio.run(
        build_reverse_kl_datums(data, metadata, TeacherStandIn(), teacher_prompts, topk=TOP_K)
    )
    return out


# --------------------------------------------------------------------------- decisions data

DECISIONS = [
    (Decision("Is the sky blue on a clear day?", [("yes", ""), ("no", "")]), {"yes": 1.0}),
    (
        Decision("Which is a fruit?", [("apple", "a fruit"), ("carrot", ""), ("leek", "")]),
        {"apple": 0.8, "carrot": 0.2},
    ),
    (Decision("Pick a prime.", [("four", ""), ("six", ""), ("seven", "")]), {"seven": 1.0}),
]


@functools.cache
def decision_datums() -> list[tinker.Datum]:
    return decision_dist_datums(DecisionRenderer(role_colon_renderer()), DECISIONS)


class DecisionSamplerStandIn:
    """The ``tinker.SamplingClient`` the decisions recipe scores validation decisions with."""

    def sample(self, prompt, num_samples, sampling_params, target_prompt_logprobs=None, **kwargs):
        shape = tuple(target_prompt_logprobs.shape)  # (prompt length - 1, number of choices)
        scores = logprobs_like(shape, seed=prompt.length)
        return Done(SimpleNamespace(target_prompt_logprobs=tinker.TensorData.from_torch(scores)))


def forecast_examples() -> list[Any]:
    return [
        forecasting.ForecastExample(
            submission_id=f"s{i}",
            event_ticker=f"EV{i}",
            event_title=f"Event {i}",
            market=f"Will thing {i} happen by February?",
            reference_material="None.",
            resolution_criteria="Resolves YES if it happens.",
            snapshot_time=datetime(2025, 1, 1, tzinfo=UTC),
            close_time=datetime(2025, 2, 1, tzinfo=UTC),
            category="test",
            outcome=i % 2,
        )
        for i in range(4)
    ]


# --------------------------------------------------------------------------- hand-built data


def weighted_cross_entropy(data, logprobs_list):
    """The SDK docstring's custom-loss shape: reads its inputs with ``.to_torch()``."""
    total = sum(
        -(d.loss_fn_inputs["weights"].to_torch() * lp).sum()
        for d, lp in zip(data, logprobs_list, strict=True)
    )
    count = sum(d.loss_fn_inputs["weights"].to_torch().sum() for d in data)
    return total / count, {"nll": float(total.detach() / count), "tokens": float(count)}


def hand_built_datums() -> list[tinker.Datum]:
    out = []
    for i, (tokens, weights) in enumerate(
        [([5, 6, 7, 8], [0.0, 1.0, 1.0, 1.0]), ([9, 10, 11], [0.0, 0.0, 1.0]), ([12, 13], [1, 1])]
    ):
        out.append(
            tinker.Datum(
                model_input=tinker.ModelInput.from_ints(tokens),
                loss_fn_inputs={
                    "target_tokens": tinker.TensorData.from_torch(
                        torch.tensor([*tokens[1:], 2 + i])
                    ),
                    "weights": tinker.TensorData.from_torch(torch.tensor(weights).float()),
                },
            )
        )
    return out


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    name: str
    loss_fn: Callable
    data: list[tinker.Datum]  # the cookbook's datums, plus reference_logprobs for kl
    logprobs: list[torch.Tensor]  # what the service returns: (N,), or (N, K) for top-K
    own_keys: frozenset[str]


def add_references(data: list[tinker.Datum], logprobs, seed: int) -> list[tinker.Datum]:
    return [
        with_inputs(d, reference_logprobs=logprobs_like(lp.shape, seed=seed + i))
        for i, (d, lp) in enumerate(zip(data, logprobs, strict=True))
    ]


def build_case(name: str, log_path: str) -> Case:
    if name == "dpo":
        run = dpo_run(log_path)
        data = [
            with_inputs(d, reference_logprobs=run.reference[tokens_of(d)]) for d in run.data
        ]  # the reference logprobs the cookbook already computed, one per datum
        logprobs = [run.policy[tokens_of(d)] for d in run.data]
        keys = {"dpo_loss", "accuracy", "margin", "chosen_reward", "rejected_reward"}
        return Case(name, run.client.loss_fns[0], data, logprobs, frozenset(keys))
    if name == "sdft":
        base = sdft_datums()
        logprobs = [
            logprobs_like(d.loss_fn_inputs["target_tokens"].shape, seed=300 + i)
            for i, d in enumerate(base)
        ]
        keys = {
            "sdft/reverse_kl_loss",
            "sdft/reverse_kl_mean",
            "sdft/student_entropy_mean",
            "sdft/reverse_kl_positions",
        }
        return Case(
            name, reverse_kl_custom_loss, add_references(base, logprobs, 400), logprobs, keys
        )
    if name == "decisions":
        base = decision_datums()
        logprobs = [
            logprobs_like(d.loss_fn_inputs["target_tokens"].shape, seed=500 + i)
            for i, d in enumerate(base)
        ]
        keys = frozenset({"loss", "target_prob:mean", "accuracy"})
        loss_fn = probability_loss(brier_score_loss)
        return Case(name, loss_fn, add_references(base, logprobs, 600), logprobs, keys)
    if name == "hand_built":
        base = hand_built_datums()
        logprobs = [
            logprobs_like((d.model_input.length,), seed=700 + i) for i, d in enumerate(base)
        ]
        keys = frozenset({"nll", "tokens"})
        return Case(
            name, weighted_cross_entropy, add_references(base, logprobs, 800), logprobs, keys
        )
    raise AssertionError(name)


CASES = ("dpo", "sdft", "decisions", "hand_built")
