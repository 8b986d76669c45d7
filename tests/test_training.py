"""TrainingClient on the local backend: the composed gradient really reaches the model.

Every check compares against torch written by hand on a copy of the same tiny
model: autograd on the composed loss, AdamW from ``torch.optim``.
"""

from __future__ import annotations

import copy
import math
import threading
from pathlib import Path

import attrs
import pytest
import torch
import trio

import tinkex
from tinkex import (
    AdamParams,
    BackendError,
    Datum,
    ForwardBackwardOutput,
    RegularizerError,
    RegularizerSpec,
    SpecError,
    TrainingClient,
)

REL = 1e-4

# --------------------------------------------------------------------------- helpers

TEXTS = ["hello tinkex", "a composed loss", "ok"]


def make_data(tokenizer, texts=TEXTS) -> list[Datum]:
    data = []
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text)
        n = len(ids) - 1
        weights = [0.0] * min(2, n) + [1.0 + 0.5 * i] * (n - min(2, n))  # prompt tokens masked
        data.append(
            Datum(
                model_input=ids[:-1],
                loss_fn_inputs={"target_tokens": ids[1:], "weights": weights},
            )
        )
    return data


def cross_entropy(data, logprobs):
    loss = sum(
        -(tinkex.loss_input(d, "weights", like=lp) * lp).sum()
        for d, lp in zip(data, logprobs, strict=True)
    )
    return loss, {"tokens": float(sum(lp.numel() for lp in logprobs))}


def squares(data, logprobs):
    return sum((lp**2).mean() for lp in logprobs), {}


async def confidence(data, logprobs):  # an async term
    await trio.lowlevel.checkpoint()
    return sum(lp.exp().sum() for lp in logprobs), {"n": 1.0}


def regs():
    return [RegularizerSpec(squares, 0.1, "squares"), RegularizerSpec(confidence, 0.5, "conf")]


def hand_logprobs(model, datum) -> torch.Tensor:
    """One sequence at a time, straight from the logits."""
    ids = torch.tensor([datum.tokens()])
    logits = model(input_ids=ids).logits.float()[0]
    tgt = datum.loss_fn_inputs["target_tokens"]
    return torch.log_softmax(logits, -1).gather(-1, tgt[:, None])[:, 0]


def hand_composed_loss(model, data) -> torch.Tensor:
    lps = [hand_logprobs(model, d) for d in data]
    base = sum(-(d.loss_fn_inputs["weights"] * lp).sum() for d, lp in zip(data, lps, strict=True))
    sq = sum((lp**2).mean() for lp in lps)
    conf = sum(lp.exp().sum() for lp in lps)
    return base + 0.1 * sq + 0.5 * conf


def hand_grads(model, data) -> torch.Tensor:
    ref = copy.deepcopy(model)
    ref.zero_grad(set_to_none=True)
    hand_composed_loss(ref, data).backward()
    return flat_grads(ref)


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def flat_grads(model) -> torch.Tensor:
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
            for p in trainable(model)
        ]
    )


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def randomize_lora_b(model, seed=1) -> None:
    """peft starts B at 0 (so A has no gradient); make both matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture
async def tc():
    async with await TrainingClient.create(backend="local", base_model="tiny", seed=0) as client:
        yield client


# --------------------------------------------------------------------------- values


def test_adam_params_defaults_match_tinker():
    import tinker

    ours = attrs.asdict(AdamParams())
    theirs = tinker.AdamParams().model_dump()
    assert ours == {k: theirs[k] for k in ours}
    assert ours == {
        "learning_rate": 1e-4,
        "beta1": 0.9,
        "beta2": 0.95,
        "eps": 1e-12,
        "weight_decay": 0.0,
        "grad_clip_norm": 0.0,
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("learning_rate", -1e-3),
        ("learning_rate", math.nan),
        ("beta1", 1.0),
        ("beta2", -0.1),
        ("eps", -1.0),
        ("weight_decay", True),
        ("grad_clip_norm", math.inf),
    ],
)
def test_adam_params_validation_names_field_and_value(field, value):
    with pytest.raises(SpecError, match=rf"AdamParams\.{field} .*got {value!r}"):
        AdamParams(**{field: value})


# --------------------------------------------------------------------------- forward


async def test_forward_equals_logits_one_sequence_at_a_time(tc):
    data = make_data(tc.tokenizer)
    lps = await tc.forward(data)
    assert [lp.shape for lp in lps] == [(len(d),) for d in data]
    with torch.no_grad():
        for d, lp in zip(data, lps, strict=True):
            torch.testing.assert_close(lp, hand_logprobs(tc.backend.model, d), rtol=1e-5, atol=1e-5)
    assert all(p.grad is None for p in tc.backend.model.parameters())


async def test_forward_backward_cross_entropy_matches_autograd(tc):
    data = make_data(tc.tokenizer)
    model = tc.backend.model
    ref = copy.deepcopy(model)
    loss = sum(-(d.loss_fn_inputs["weights"] * hand_logprobs(ref, d)).sum() for d in data)
    loss.backward()

    fb = await tc.forward_backward(data, loss_fn="cross_entropy")
    assert isinstance(fb, ForwardBackwardOutput) and fb.custom is None
    assert fb.metrics["loss:sum"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert rel_err(flat_grads(model), flat_grads(ref)) < REL
    assert len(fb.loss_fn_outputs) == len(data)
    assert fb.loss_fn_outputs[0]["logprobs"].shape == (len(data[0]),)


async def test_forward_backward_rejects_other_loss_names(tc):
    with pytest.raises(SpecError, match="'importance_sampling'"):
        await tc.forward_backward(make_data(tc.tokenizer), loss_fn="importance_sampling")


# --------------------------------------------------------------------------- the composed gradient


@pytest.mark.parametrize("lora_rank", [None, 4])
@pytest.mark.parametrize("mode", ["fused", "linearized", "auto"])
async def test_custom_step_gradient_equals_autograd_on_composed_loss(mode, lora_rank):
    async with await TrainingClient.create(base_model="tiny", seed=3, lora_rank=lora_rank) as tc:
        model = tc.backend.model
        if lora_rank:
            randomize_lora_b(model)
        data = make_data(tc.tokenizer)
        expected = hand_grads(model, data)

        fb = await tc.forward_backward_custom(
            data, cross_entropy, regularizers=regs(), track_grad_norms=True, mode=mode
        )
        assert rel_err(flat_grads(model), expected) < REL
        if lora_rank:
            assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
            assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)

        with torch.no_grad():
            hand = float(hand_composed_loss(model, data))
        assert fb.custom.loss_total == pytest.approx(hand, rel=1e-5)
        assert fb.metrics["loss:sum"] == fb.custom.loss_total
        assert fb.metrics["reg/conf/contribution"] == pytest.approx(
            0.5 * fb.custom.regularizers["conf"].value
        )
        assert set(fb.custom.flat_metrics()) <= set(fb.metrics)
        assert ("surrogate_loss:sum" in fb.metrics) == (mode == "linearized")


async def test_linearized_surrogate_is_cross_entropy_with_minus_gradient_weights(tc):
    data = make_data(tc.tokenizer)
    fb = await tc.forward_backward_custom(data, cross_entropy, regularizers=regs(), mode="fused")
    lps = [o["logprobs"] for o in fb.loss_fn_outputs]
    composed = await tinkex.compose_loss(data, lps, cross_entropy, regularizers=regs())
    # the surrogate's value: sum(-w * lp) with w = -dL/dlp
    expected = sum(float((g * lp).sum()) for g, lp in zip(composed.logprob_grads, lps, strict=True))
    tc.backend.model.zero_grad(set_to_none=True)
    fb2 = await tc.forward_backward_custom(
        data, cross_entropy, regularizers=regs(), mode="linearized"
    )
    assert fb2.metrics["surrogate_loss:sum"] == pytest.approx(expected, rel=1e-5)


async def test_gradients_accumulate_until_optim_step(tc):
    data = make_data(tc.tokenizer)
    model = tc.backend.model
    first, second = data[:2], data[2:]
    expected = hand_grads(model, first) + hand_grads(model, second)
    await tc.forward_backward_custom(first, cross_entropy, regularizers=regs(), mode="fused")
    await tc.forward_backward_custom(second, cross_entropy, regularizers=regs(), mode="linearized")
    assert rel_err(flat_grads(model), expected) < REL
    metrics = await tc.optim_step(AdamParams(learning_rate=1e-3))
    assert metrics["grad_norm"] == pytest.approx(float(expected.norm()), rel=1e-4)
    assert all(p.grad is None for p in model.parameters())


async def test_fused_and_linearized_give_the_same_step(tc):
    data = make_data(tc.tokenizer)
    twin = TrainingClient(copy.deepcopy(tc.backend))
    await tc.forward_backward_custom(data, cross_entropy, regularizers=regs(), mode="fused")
    await twin.forward_backward_custom(data, cross_entropy, regularizers=regs(), mode="linearized")
    await tc.optim_step(AdamParams(learning_rate=1e-2))
    await twin.optim_step(AdamParams(learning_rate=1e-2))
    assert rel_err(flat_params(tc.backend.model), flat_params(twin.backend.model)) < 1e-5


# --------------------------------------------------------------------------- optimizer


def reference_adamw_step(model, data, params: AdamParams, opt=None):
    model.zero_grad(set_to_none=True)
    hand_composed_loss(model, data).backward()
    norm = float(
        torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip_norm or math.inf)
    )
    if opt is None:
        opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    for g in opt.param_groups:
        g.update(
            lr=params.learning_rate,
            betas=(params.beta1, params.beta2),
            eps=params.eps,
            weight_decay=params.weight_decay,
        )
    opt.step()
    return opt, norm


async def test_optim_step_is_torch_adamw_with_clipping_and_changing_params(tc):
    data = make_data(tc.tokenizer)
    ref = copy.deepcopy(tc.backend.model)
    schedule = [
        AdamParams(learning_rate=1e-2, weight_decay=0.1, grad_clip_norm=1.0),
        AdamParams(learning_rate=5e-3, beta1=0.8, weight_decay=0.1, grad_clip_norm=1.0),
        AdamParams(learning_rate=5e-3, beta1=0.8),
    ]
    opt = None
    for i, params in enumerate(schedule, start=1):
        await tc.forward_backward_custom(data, cross_entropy, regularizers=regs())
        metrics = await tc.optim_step(params)
        opt, norm = reference_adamw_step(ref, data, params, opt)
        assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-4)
        assert norm > 1.0  # so clipping really happened in the first two steps
        expected_clipped = min(norm, params.grad_clip_norm) if params.grad_clip_norm else norm
        assert metrics["grad_norm_clipped"] == pytest.approx(expected_clipped, rel=1e-4)
        assert metrics["step"] == i and tc.step == i
        assert metrics["learning_rate"] == params.learning_rate
        assert rel_err(flat_params(tc.backend.model), flat_params(ref)) < 1e-5


async def test_optim_step_without_gradient_changes_nothing(tc):
    before = flat_params(tc.backend.model).clone()
    metrics = await tc.optim_step(AdamParams(learning_rate=1.0, weight_decay=0.5))
    assert metrics["grad_norm"] == 0.0 and metrics["step"] == 0
    assert torch.equal(flat_params(tc.backend.model), before)
    assert tc.step == 0 and tc.backend._optimizer is None


async def test_optim_step_rejects_tinker_params(tc):
    import tinker

    with pytest.raises(SpecError, match=r"tinkex\.AdamParams"):
        await tc.optim_step(tinker.AdamParams())


# --------------------------------------------------------------------------- failure safety


def exploding(data, logprobs):
    raise ValueError("boom")


def optimizer_state(tc):
    opt = tc.backend._optimizer
    return {
        k: {n: t.clone() for n, t in v.items() if isinstance(t, torch.Tensor)}
        for k, v in opt.state.items()
    }


@pytest.mark.parametrize("mode", ["fused", "linearized"])
async def test_failing_regularizer_leaves_everything_unchanged(tc, mode):
    data = make_data(tc.tokenizer)
    model = tc.backend.model
    await tc.forward_backward_custom(data, cross_entropy)
    await tc.optim_step(AdamParams(learning_rate=1e-3))  # optimizer state exists
    await tc.forward_backward_custom(data, cross_entropy, regularizers=regs())  # grads accumulated
    params, grads, state = (
        flat_params(model).clone(),
        flat_grads(model).clone(),
        optimizer_state(tc),
    )

    bad = [*regs(), RegularizerSpec(exploding, 1.0, "exploding")]
    with pytest.raises(RegularizerError) as info:
        await tc.forward_backward_custom(data, cross_entropy, regularizers=bad, mode=mode)
    assert info.value.name == "exploding"
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(SpecError, match="outside the model's vocabulary"):
        await tc.forward_backward_custom(
            [Datum(model_input=[1, 9999], loss_fn_inputs={"target_tokens": [2, 3]})],
            cross_entropy,
            mode=mode,
        )

    assert torch.equal(flat_params(model), params)
    assert torch.equal(flat_grads(model), grads)
    after = optimizer_state(tc)
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k][n], state[k][n]) for k in state for n in state[k])

    # still usable: the next call adds exactly its own gradient
    expected = grads + hand_grads(model, data)
    await tc.forward_backward_custom(data, cross_entropy, regularizers=regs(), mode=mode)
    assert rel_err(flat_grads(model), expected) < REL


async def test_bad_mode_and_empty_data_raise_spec_error(tc):
    data = make_data(tc.tokenizer)
    with pytest.raises(SpecError, match="mode must be one of"):
        await tc.forward_backward_custom(data, cross_entropy, mode="twice")
    with pytest.raises(SpecError, match="at least one Datum"):
        await tc.forward_backward_custom([], cross_entropy)
    with pytest.raises(SpecError, match="target_tokens"):
        await tc.forward([Datum(model_input=[1, 2, 3])])


async def test_closed_client_refuses_calls():
    tc = await TrainingClient.create(seed=0)
    async with tc:
        pass
    with pytest.raises(BackendError, match="closed"):
        await tc.forward(make_data(tc.tokenizer))


async def test_unknown_backend_lists_available():
    with pytest.raises(BackendError, match=r"unknown backend 'nope'.*local.*tinker"):
        await TrainingClient.create(backend="nope")


# --------------------------------------------------------------------------- threads and ordering


async def test_model_work_runs_off_the_trio_thread(tc, monkeypatch):
    model = tc.backend.model
    seen: list[int] = []
    original = model.forward

    def spy(*args, **kwargs):
        seen.append(threading.get_ident())
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    data = make_data(tc.tokenizer)
    await tc.forward(data)
    await tc.forward_backward_custom(data, cross_entropy, mode="fused")
    await tc.forward_backward_custom(data, cross_entropy, mode="linearized")
    assert len(seen) == 4  # one forward per pass: fused 1, linearized 2
    assert threading.get_ident() not in seen


async def test_concurrent_calls_are_serialised_and_all_count(tc):
    data = make_data(tc.tokenizer)
    expected = 3 * hand_grads(tc.backend.model, data)
    async with trio.open_nursery() as nursery:
        for mode in ("fused", "linearized", "fused"):
            nursery.start_soon(
                lambda m=mode: tc.forward_backward_custom(
                    data, cross_entropy, regularizers=regs(), mode=m
                )
            )
    assert rel_err(flat_grads(tc.backend.model), expected) < REL


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("lora_rank", [None, 2])
async def test_save_and_load_state_resume_exactly(tmp_path: Path, lora_rank):
    params = AdamParams(learning_rate=1e-2)
    async with await TrainingClient.create(seed=0, lora_rank=lora_rank) as tc:
        data = make_data(tc.tokenizer)
        for _ in range(2):
            await tc.forward_backward_custom(data, cross_entropy, regularizers=regs())
            await tc.optim_step(params)
        ckpt = tmp_path / "ckpt"
        assert await tc.save_state(str(ckpt)) == str(ckpt.absolute())
        assert entries(tmp_path) == ["ckpt"]  # no temp dirs left
        await tc.forward_backward_custom(data, cross_entropy, regularizers=regs())
        await tc.optim_step(params)
        after_three = flat_params(tc.backend.model).clone()
        await tc.save_state(str(ckpt))  # overwriting works
        assert entries(tmp_path) == ["ckpt"]

    async with await TrainingClient.create(seed=99, lora_rank=lora_rank) as fresh:
        await fresh.load_state(str(tmp_path / "ckpt"))
        assert fresh.step == 3
        if lora_rank is None:
            assert torch.equal(flat_params(fresh.backend.model), after_three)

    # resume from step 2 in a fresh client: the third step matches exactly
    async with await TrainingClient.create(seed=0, lora_rank=lora_rank) as a:
        for _ in range(2):
            await a.forward_backward_custom(data, cross_entropy, regularizers=regs())
            await a.optim_step(params)
        await a.save_state(str(tmp_path / "two"))
    async with await TrainingClient.create(seed=0, lora_rank=lora_rank) as b:
        await b.load_state(str(tmp_path / "two"))
        assert b.step == 2
        await b.forward_backward_custom(data, cross_entropy, regularizers=regs())
        await b.optim_step(params)
        assert rel_err(flat_params(b.backend.model), after_three) < 1e-6


async def test_lora_checkpoint_holds_only_the_adapter(tmp_path: Path):
    from safetensors.torch import load_file

    async with await TrainingClient.create(seed=0, lora_rank=2) as tc:
        await tc.save_state(str(tmp_path / "c"))
    names = list(load_file(str(tmp_path / "c" / "weights.safetensors")))
    assert names and all("lora_" in n for n in names)


async def test_load_state_errors_leave_the_model_alone(tc, tmp_path: Path):
    before = flat_params(tc.backend.model).clone()
    with pytest.raises(BackendError, match="no tinkex checkpoint"):
        await tc.load_state(str(tmp_path / "missing"))
    async with await TrainingClient.create(seed=0, lora_rank=2) as other:
        await other.save_state(str(tmp_path / "lora"))
    with pytest.raises(BackendError, match="lora_rank=2"):
        await tc.load_state(str(tmp_path / "lora"))
    assert torch.equal(flat_params(tc.backend.model), before)


async def test_non_finite_gradient_skips_the_step_and_drops_the_gradient(tc):
    data = make_data(tc.tokenizer)
    await tc.forward_backward_custom(data, cross_entropy)
    await tc.optim_step(AdamParams(learning_rate=1e-3))
    params, state = flat_params(tc.backend.model).clone(), optimizer_state(tc)
    await tc.forward_backward_custom(data, cross_entropy)
    next(iter(tc.backend.model.parameters())).grad[0, 0] = math.inf
    with pytest.raises(BackendError, match="gradient norm is inf; the optimizer step was skipped"):
        await tc.optim_step(AdamParams(learning_rate=1e-3))
    assert torch.equal(flat_params(tc.backend.model), params)
    assert all(p.grad is None for p in tc.backend.model.parameters())
    after = optimizer_state(tc)
    assert all(torch.equal(after[k][n], state[k][n]) for k in state for n in state[k])
    assert tc.step == 1


@pytest.mark.parametrize("mode", ["fused", "linearized"])
async def test_failing_forward_is_a_backend_error_and_changes_nothing(tc, mode, monkeypatch):
    data = make_data(tc.tokenizer)
    model = tc.backend.model
    await tc.forward_backward_custom(data, cross_entropy)
    grads = flat_grads(model).clone()

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    with monkeypatch.context() as m:
        m.setattr(model, "forward", broken)
        with pytest.raises(
            BackendError, match="local backend forward failed: RuntimeError: device lost"
        ):
            await tc.forward_backward_custom(data, cross_entropy, regularizers=regs(), mode=mode)
    assert torch.equal(flat_grads(model), grads)
    expected = grads + hand_grads(model, data)
    await tc.forward_backward_custom(data, cross_entropy, regularizers=regs(), mode=mode)
    assert rel_err(flat_grads(model), expected) < REL


async def test_tinker_datums_train_the_local_backend_too(tc):
    from tinkex._backends.tinker import to_tinker_datum

    data = make_data(tc.tokenizer)
    expected = hand_grads(tc.backend.model, data)
    theirs = [to_tinker_datum(d) for d in data]
    fb = await tc.forward_backward_custom(
        theirs, cross_entropy, regularizers=regs(), mode="linearized"
    )
    assert rel_err(flat_grads(tc.backend.model), expected) < REL
    assert [lp.shape for lp in await tc.forward(theirs)] == [(len(d),) for d in data]
    assert fb.custom.base_loss.value > 0


async def test_save_state_never_replaces_something_that_is_not_a_checkpoint(tc, tmp_path: Path):
    precious = tmp_path / "project"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(BackendError, match="is not a tinkex checkpoint; refusing"):
        await tc.save_state(str(precious))
    assert (precious / "notes.txt").read_text() == "keep me"
    assert entries(tmp_path) == ["project"]
    empty = tmp_path / "empty"
    empty.mkdir()
    await tc.save_state(str(empty))
    assert "tinkex_state.json" in entries(empty)


async def test_a_refused_load_leaves_training_exactly_as_if_it_never_happened(tmp_path: Path):
    """A LoRA checkpoint carrying a full model's optimizer.pt: refused, and the next step is
    the same as a twin client's that never tried to load it."""
    import json

    params = AdamParams(learning_rate=1e-2)
    async with await TrainingClient.create(seed=0) as full:
        data = make_data(full.tokenizer)
        await full.forward_backward_custom(data, cross_entropy)
        await full.optim_step(params)
        await full.save_state(str(tmp_path / "full"))
    async with (
        await TrainingClient.create(seed=0, lora_rank=2) as tc,
        await TrainingClient.create(seed=0, lora_rank=2) as twin,
    ):
        for client in (tc, twin):
            randomize_lora_b(client.backend.model)
            await client.forward_backward_custom(data, cross_entropy, regularizers=regs())
            await client.optim_step(params)
        await tc.save_state(str(tmp_path / "lora"))
        foreign = (tmp_path / "full" / "optimizer.pt").read_bytes()
        (tmp_path / "lora" / "optimizer.pt").write_bytes(foreign)
        meta = json.loads((tmp_path / "lora" / "tinkex_state.json").read_text())
        meta["files"]["optimizer.pt"] = len(foreign)  # a consistent-looking checkpoint
        (tmp_path / "lora" / "tinkex_state.json").write_text(json.dumps(meta))

        before, state = flat_params(tc.backend.model).clone(), optimizer_state(tc)
        await tc.forward_backward_custom(data, cross_entropy)  # pending gradients stay too
        grads = flat_grads(tc.backend.model).clone()
        with pytest.raises(
            BackendError, match=r"optimizer\.pt' does not fit this model's optimizer"
        ):
            await tc.load_state(str(tmp_path / "lora"))
        assert torch.equal(flat_params(tc.backend.model), before)
        assert torch.equal(flat_grads(tc.backend.model), grads)
        after = optimizer_state(tc)
        assert after.keys() == state.keys()
        assert all(torch.equal(after[k][n], state[k][n]) for k in state for n in state[k])
        assert tc.step == 1

        await twin.forward_backward_custom(data, cross_entropy)
        await tc.optim_step(params)
        await twin.optim_step(params)
        assert torch.equal(flat_params(tc.backend.model), flat_params(twin.backend.model))
        assert tc.step == twin.step == 2


async def test_a_backend_must_conform_to_the_protocol_and_fused_needs_forward_graph():
    import tinkex.testing
    from tinkex._backends import Backend, FusedBackend

    class Partial:
        name, step, tokenizer = "partial", 0, None
        closed = False

        async def forward(self, data): ...
        async def forward_backward(self, data, loss_fn): ...
        async def save_state(self, path): ...
        async def load_state(self, path): ...

        async def aclose(self):
            type(self).closed = True

    async def make_partial(**kwargs):
        return Partial()

    with (
        tinkex.testing.register_regularizers(backends={"tt_partial": make_partial}),
        pytest.raises(tinkex.BackendError, match=r"lacks optim_step of the backend protocol"),
    ):
        await tinkex.TrainingClient.create(backend="tt_partial")
    assert Partial.closed  # what the factory made was closed again

    Partial.optim_step = lambda self, params: None
    assert isinstance(Partial(), Backend) and not isinstance(Partial(), FusedBackend)
    tc = tinkex.TrainingClient(Partial())
    with pytest.raises(tinkex.SpecError, match="mode='fused' needs a backend"):
        await tc.forward_backward_custom(
            [tinkex.Datum(model_input=[1], loss_fn_inputs={"target_tokens": [2]})],
            lambda d, lp: (lp[0].sum(), {}),
            mode="fused",
        )
