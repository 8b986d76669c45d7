"""The Tinker backend, against a test double of the SDK's TrainingClient.

The double speaks the real ``tinker`` types (Datum, ModelInput, TensorData,
ForwardBackwardOutput, AdamParams, OptimStepResponse) and computes on a local
torch model, so we can check what reaches "the service": the data conversions,
the linearized weights, and the gradient that lands on the model.
"""

from __future__ import annotations

import copy
import datetime
import sys
import threading
import typing
import warnings

import pytest
import tinker
import torch
import trio

import tinkex
from tinkex import (
    AdamParams,
    BackendError,
    Datum,
    RegularizerError,
    RegularizerSpec,
    SpecError,
    TrainingClient,
)
from tinkex._backends.tinker import (
    LOSS_FN_INPUTS,
    TinkerBackend,
    from_tinker_datum,
    from_tinker_output,
    to_tinker_adam_params,
    to_tinker_datum,
)
from tinkex._backends.tiny import ByteTokenizer, build_tiny_model

# --------------------------------------------------------------------------- the SDK double


class Done:
    """What the SDK's futures offer: a blocking ``.result()``."""

    def __init__(self, value):
        self._value = value

    def result(self, timeout=None):
        if isinstance(self._value, BaseException):
            raise self._value
        return self._value


#: What the double's "service" takes per loss; like the real one, it rejects other inputs.
SERVICE_INPUTS = {
    "cross_entropy": {"target_tokens", "weights"},
    "importance_sampling": {"target_tokens", "logprobs", "advantages", "weights"},
}


class FakeTinkerTrainingClient:
    """``tinker.TrainingClient``'s forward / forward_backward / optim_step on a local model.

    Like the service it serves top-K ``(N, K)`` target tokens (logprobs of shape
    ``(N, K)``), and refuses a loss input its loss does not take (any input goes for a
    loss name it does not know).
    """

    def __init__(self, model):
        self.model = model
        self.calls: list[tuple[str, object]] = []
        self.loss_fns: list[str] = []
        self.threads: list[int] = []
        self.fail_next: BaseException | None = None
        self.optimizer = None

    def _enter(self, name, payload):
        self.calls.append((name, payload))
        self.threads.append(threading.get_ident())
        if self.fail_next is not None:
            err, self.fail_next = self.fail_next, None
            return err
        return None

    def _refused(self, data, loss_fn):
        self.loss_fns.append(loss_fn)
        accepted = SERVICE_INPUTS.get(loss_fn)
        for i, d in enumerate(data):
            extra = set(d.loss_fn_inputs) - accepted if accepted is not None else set()
            if extra:
                return ValueError(f"datum {i}: {loss_fn!r} takes no loss inputs {sorted(extra)}")
        return None

    def _logprobs(self, datum) -> torch.Tensor:
        assert isinstance(datum, tinker.Datum)
        assert isinstance(datum.model_input, tinker.ModelInput)
        ids = torch.tensor([datum.model_input.to_ints()])
        targets = datum.loss_fn_inputs["target_tokens"]
        assert isinstance(targets, tinker.TensorData) and targets.dtype == "int64"
        t = targets.to_torch()
        logits = self.model(input_ids=ids).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        # (N,) targets: one logprob per position; (N, K) top-K targets: K per position
        return lp.gather(-1, t[:, None])[:, 0] if t.dim() == 1 else lp.gather(-1, t)

    def _output(self, lps, loss):
        return tinker.ForwardBackwardOutput(
            loss_fn_output_type="ArrayRecord",
            loss_fn_outputs=[{"logprobs": tinker.TensorData.from_torch(lp.detach())} for lp in lps],
            metrics={"loss:sum": float(loss)},
        )

    def _loss(self, data, lps, loss_fn):
        if loss_fn == "cross_entropy":
            return sum(
                -(d.loss_fn_inputs["weights"].to_torch() * lp).sum()
                for d, lp in zip(data, lps, strict=True)
            )
        if loss_fn == "importance_sampling":
            return sum(
                -(
                    torch.exp(lp - d.loss_fn_inputs["logprobs"].to_torch())
                    * d.loss_fn_inputs["advantages"].to_torch()
                ).sum()
                for d, lp in zip(data, lps, strict=True)
            )
        return None  # a loss this double only records

    def forward(self, data, loss_fn, loss_fn_config=None):
        if err := self._enter("forward", data) or self._refused(data, loss_fn):
            return Done(err)
        assert loss_fn == "cross_entropy"
        with torch.no_grad():
            lps = [self._logprobs(d) for d in data]
            loss = self._loss(data, lps, loss_fn)
        return Done(self._output(lps, loss))

    def forward_backward(self, data, loss_fn, loss_fn_config=None):
        if err := self._enter("forward_backward", data) or self._refused(data, loss_fn):
            return Done(err)
        lps = [self._logprobs(d) for d in data]
        loss = self._loss(data, lps, loss_fn)
        if loss is None:
            return Done(self._output(lps, 0.0))
        loss.backward()
        return Done(self._output(lps, loss.detach()))

    def optim_step(self, params):
        if err := self._enter("optim_step", params):
            return Done(err)
        assert isinstance(params, tinker.AdamParams)
        norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), params.grad_clip_norm or 1e30
        )
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(self.model.parameters())
        for g in self.optimizer.param_groups:
            g.update(
                lr=params.learning_rate,
                betas=(params.beta1, params.beta2),
                eps=params.eps,
                weight_decay=params.weight_decay,
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return Done(tinker.OptimStepResponse(metrics={"grad_norm": float(norm)}))

    def save_state(self, name, ttl_seconds=None):
        self._enter("save_state", name)
        return Done(tinker.types.SaveWeightsResponse(path=f"tinker://run-1/weights/{name}"))

    def load_state_with_optimizer(self, path, weights_access_token=None):
        warnings.warn("deprecated", FutureWarning, stacklevel=2)  # as the real SDK does
        self._enter("load_state_with_optimizer", path)
        return Done(None)

    def get_tokenizer(self):
        return ByteTokenizer()


# --------------------------------------------------------------------------- helpers

TOK = ByteTokenizer()


def make_data(texts=("hello tinker", "composed", "grad")) -> list[Datum]:
    out = []
    for i, text in enumerate(texts):
        ids = TOK.encode(text)
        n = len(ids) - 1
        out.append(
            Datum(
                model_input=ids[:-1],
                loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0 + i] * n},
            )
        )
    return out


def cross_entropy(data, logprobs):
    loss = sum(
        -(tinkex.loss_input(d, "weights", like=lp) * lp).sum()
        for d, lp in zip(data, logprobs, strict=True)
    )
    return loss, {}


def squares(data, logprobs):
    return sum((lp**2).mean() for lp in logprobs), {}


def regs():
    return [RegularizerSpec(squares, 0.25, "squares")]


def hand_grads(model, data) -> torch.Tensor:
    ref = copy.deepcopy(model)
    total = 0
    for d in data:
        ids = torch.tensor([d.tokens()])
        lp = torch.log_softmax(ref(input_ids=ids).logits[0].float(), -1)
        lp = lp.gather(-1, d.loss_fn_inputs["target_tokens"][:, None])[:, 0]
        total = total - (d.loss_fn_inputs["weights"] * lp).sum() + 0.25 * (lp**2).mean()
    total.backward()
    return grads_of(ref)


def grads_of(model) -> torch.Tensor:
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
            for p in model.parameters()
        ]
    )


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture
def fake():
    return FakeTinkerTrainingClient(build_tiny_model(0))


@pytest.fixture
async def tc(fake):
    async with await TrainingClient.create(
        backend="tinker", base_model="Qwen/Qwen3-8B", training_client=fake
    ) as client:
        yield client


# --------------------------------------------------------------------------- conversions


def test_datum_converts_both_ways_exactly():
    ours = Datum(
        model_input=[257, 1, 2, 3],
        loss_fn_inputs={"target_tokens": [1, 2, 3, 258], "weights": [0.0, 0.5, 1.0, 2.0]},
    )
    theirs = to_tinker_datum(ours)
    assert isinstance(theirs, tinker.Datum) and isinstance(theirs.model_input, tinker.ModelInput)
    assert theirs.model_input.to_ints() == [257, 1, 2, 3]
    assert theirs.loss_fn_inputs["target_tokens"].dtype == "int64"
    assert theirs.loss_fn_inputs["weights"].dtype == "float32"
    assert theirs.loss_fn_inputs["weights"].data == [0.0, 0.5, 1.0, 2.0]
    back = from_tinker_datum(theirs)
    assert back == ours
    assert back.loss_fn_inputs["target_tokens"].dtype == torch.int64


def test_tinker_datum_passes_through_and_gets_default_weights():
    theirs = tinker.Datum(
        model_input=tinker.ModelInput.from_ints([5, 6, 7]),
        loss_fn_inputs={"target_tokens": [6, 7, 8]},
    )
    assert to_tinker_datum(theirs) is theirs
    weighted = to_tinker_datum(theirs, default_weight=1.0)
    assert weighted.loss_fn_inputs["weights"].data == [1.0, 1.0, 1.0]
    assert weighted.model_input is theirs.model_input
    assert (
        to_tinker_datum(make_data()[0], default_weight=3.0).loss_fn_inputs["weights"].data[0] == 1.0
    )


def test_output_and_adam_params_conversions():
    out = tinker.ForwardBackwardOutput(
        loss_fn_output_type="ArrayRecord",
        loss_fn_outputs=[
            {"logprobs": tinker.TensorData(data=[-1.0, -2.5], dtype="float32", shape=[2])}
        ],
    )
    (lp,) = from_tinker_output(out)
    assert lp.dtype == torch.float32 and lp.tolist() == [-1.0, -2.5]
    bad = tinker.ForwardBackwardOutput(loss_fn_output_type="x", loss_fn_outputs=[{}])
    with pytest.raises(BackendError, match="no 'logprobs' for datum 0"):
        from_tinker_output(bad)
    params = AdamParams(
        learning_rate=3e-4, beta1=0.8, beta2=0.9, eps=1e-8, weight_decay=0.1, grad_clip_norm=2.0
    )
    assert to_tinker_adam_params(params) == tinker.AdamParams(
        learning_rate=3e-4, beta1=0.8, beta2=0.9, eps=1e-8, weight_decay=0.1, grad_clip_norm=2.0
    )


# --------------------------------------------------------------------------- top-K shapes

K = 3
VOCAB = ByteTokenizer.vocab_size


def td(tensor: torch.Tensor) -> tinker.TensorData:
    return tinker.TensorData.from_torch(tensor)


def topk_data(texts=("top k", "distill me"), seed=0) -> list[tinker.Datum]:
    """tinker.Datum s with top-K (N, K) target tokens, (N,) weights and teacher logprobs (N, K)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, text in enumerate(texts):
        ids = TOK.encode(text)
        n = len(ids) - 1
        targets = torch.randint(0, VOCAB, (n, K), generator=gen)
        targets[:, 0] = torch.tensor(ids[1:])
        teacher = torch.log_softmax(torch.randn(n, K, generator=gen), -1)
        out.append(
            tinker.Datum(
                model_input=tinker.ModelInput.from_ints(ids[:-1]),
                loss_fn_inputs={
                    "target_tokens": td(targets),
                    "weights": td(torch.full((n,), 1.0 + i)),
                    "teacher_logprobs": td(teacher),
                },
            )
        )
    return out


def topk_distill(data, logprobs):
    """Top-K distillation: sum_t w_t sum_k p_teacher[t, k] (log p_teacher[t, k] - logprob[t, k])."""
    loss = 0
    for d, lp in zip(data, logprobs, strict=True):
        teacher = tinkex.loss_input(d, "teacher_logprobs", like=lp)
        w = tinkex.loss_input(d, "weights", like=lp)
        assert lp.shape == teacher.shape  # (N, K): the shape the loss expects
        loss = loss + (w[:, None] * teacher.exp() * (teacher - lp)).sum()
    return loss, {}


def topk_hand_grads(model, data) -> torch.Tensor:
    """Autograd on the composed loss itself (topk_distill + 0.25 * squares), on a copy."""
    ref = copy.deepcopy(model)
    total = 0
    for d in data:
        ids = torch.tensor([d.model_input.to_ints()])
        lp = torch.log_softmax(ref(input_ids=ids).logits[0].float(), -1)
        lp = lp.gather(-1, d.loss_fn_inputs["target_tokens"].to_torch())
        teacher = d.loss_fn_inputs["teacher_logprobs"].to_torch()
        w = d.loss_fn_inputs["weights"].to_torch()
        total = total + (w[:, None] * teacher.exp() * (teacher - lp)).sum() + 0.25 * (lp**2).mean()
    total.backward()
    return grads_of(ref)


def n_positions(datum) -> int:
    return len(datum.model_input.to_ints())


@pytest.mark.parametrize("weights_shape", ["(N, K)", "(N,)"])
def test_top_k_datum_round_trip_is_exact_and_keeps_shapes(weights_shape):
    targets = torch.tensor([[1, 2, 3], [2, 9, 4], [3, 0, 258], [258, 7, 5]])
    weights = (
        torch.tensor([[1.0, 0.5, 0.25], [0.0, 0.0, 0.0], [2.0, -1.0, 0.5], [1.0, 1.0, 1.0]])
        if weights_shape == "(N, K)"
        else torch.tensor([1.0, 0.0, 2.0, 0.5])
    )
    theirs = tinker.Datum(
        model_input=tinker.ModelInput.from_ints([257, 1, 2, 3]),
        loss_fn_inputs={"target_tokens": td(targets), "weights": td(weights)},
    )
    ours = from_tinker_datum(theirs)
    assert ours.loss_fn_inputs["target_tokens"].shape == (4, K)
    assert ours.loss_fn_inputs["target_tokens"].dtype == torch.int64
    assert torch.equal(ours.loss_fn_inputs["target_tokens"], targets)
    assert torch.equal(ours.loss_fn_inputs["weights"], weights)

    back = to_tinker_datum(ours)
    assert back.model_input.to_ints() == [257, 1, 2, 3]
    assert back.loss_fn_inputs.keys() == theirs.loss_fn_inputs.keys()
    for key, sent in theirs.loss_fn_inputs.items():
        got = back.loss_fn_inputs[key]
        assert (got.dtype, got.shape, got.data) == (sent.dtype, sent.shape, sent.data)
    assert back.loss_fn_inputs["target_tokens"].shape == [4, K]
    assert from_tinker_datum(back) == ours


def test_default_weights_take_the_shape_of_top_k_targets():
    theirs = tinker.Datum(
        model_input=tinker.ModelInput.from_ints([5, 6]),
        loss_fn_inputs={"target_tokens": td(torch.tensor([[6, 1], [7, 2]]))},
    )
    weighted = to_tinker_datum(theirs, default_weight=0.5)
    assert weighted.loss_fn_inputs["weights"].shape == [2, 2]
    assert weighted.loss_fn_inputs["weights"].data == [0.5] * 4
    assert weighted.loss_fn_inputs["target_tokens"] is theirs.loss_fn_inputs["target_tokens"]


def test_default_weights_of_a_tinkex_datum_with_top_k_targets():
    ours = Datum(model_input=[5, 6], loss_fn_inputs={"target_tokens": [[6, 1], [7, 2]]})
    weighted = to_tinker_datum(ours, default_weight=1.0)
    assert weighted.loss_fn_inputs["target_tokens"].shape == [2, 2]
    assert weighted.loss_fn_inputs["weights"].shape == [2, 2]
    assert weighted.loss_fn_inputs["weights"].data == [1.0] * 4


def test_from_tinker_output_keeps_the_top_k_shape():
    out = tinker.ForwardBackwardOutput(
        loss_fn_output_type="ArrayRecord",
        loss_fn_outputs=[
            {
                "logprobs": tinker.TensorData(
                    data=[-1.0, -2.0, -3.0, -4.0, -5.0, -6.0], dtype="float32", shape=[2, 3]
                )
            },
            {"logprobs": td(torch.tensor([[-0.5, -1.5]]))},
            {"logprobs": tinker.TensorData(data=[-1.0, -2.5], dtype="float32", shape=[2])},
        ],
    )
    a, b, c = from_tinker_output(out)
    assert a.shape == (2, 3) and a.tolist() == [[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]]
    assert b.shape == (1, 2) and b.dtype == torch.float32
    assert c.shape == (2,)


# --------------------------------------------------------------------------- setup errors


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("no network attempt allowed")

    monkeypatch.setattr(tinker, "ServiceClient", refuse)


async def test_missing_sdk_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tinker", None)  # `import tinker` now raises ImportError
    monkeypatch.setenv("TINKER_API_KEY", "tml-test")
    with pytest.raises(BackendError) as info:
        await TrainingClient.create(backend="tinker", base_model="Qwen/Qwen3-8B")
    assert "pip install 'tinkex[tinker]'" in str(info.value)
    assert "TINKER_API_KEY" not in str(info.value)


async def test_missing_key_says_what_to_set(monkeypatch, no_network):
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    with pytest.raises(BackendError) as info:
        await TrainingClient.create(backend="tinker", base_model="Qwen/Qwen3-8B")
    assert "TINKER_API_KEY" in str(info.value)
    assert "pip install" not in str(info.value)


async def test_missing_both_says_both(monkeypatch):
    monkeypatch.setitem(sys.modules, "tinker", None)
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    with pytest.raises(BackendError, match=r"pip install 'tinkex\[tinker\]'.*TINKER_API_KEY"):
        await TrainingClient.create(backend="tinker", base_model="Qwen/Qwen3-8B")


async def test_tiny_is_refused_for_tinker(monkeypatch, no_network):
    monkeypatch.setenv("TINKER_API_KEY", "tml-test")
    with pytest.raises(BackendError, match="base_model='tiny' is the local backend"):
        await TrainingClient.create(backend="tinker")


async def test_create_goes_through_the_service_client_in_a_thread(monkeypatch, fake):
    seen = {}

    class FakeService:
        def __init__(self, api_key=None, base_url=None):
            seen["init"] = (api_key, base_url)

        def create_lora_training_client(self, base_model, rank=32, seed=None):
            seen["create"] = (base_model, rank, seed, threading.get_ident())
            return Done(fake)

    monkeypatch.setattr(tinker, "ServiceClient", FakeService)
    monkeypatch.setenv("TINKER_API_KEY", "tml-env")
    async with await TrainingClient.create(
        backend="tinker", base_model="meta-llama/Llama-3.2-1B", lora_rank=8, seed=4
    ) as tc:
        assert tc.backend.client is fake
        assert isinstance(tc.tokenizer, ByteTokenizer)  # from client.get_tokenizer()
    assert seen["init"] == ("tml-env", None)
    assert seen["create"][:3] == ("meta-llama/Llama-3.2-1B", 8, 4)
    assert seen["create"][3] != threading.get_ident()


async def test_service_errors_become_backend_errors(monkeypatch):
    class Refusing:
        def __init__(self, **kwargs):
            pass

        def create_lora_training_client(self, **kwargs):
            return Done(tinker.BadRequestError.__new__(tinker.BadRequestError))

    monkeypatch.setattr(tinker, "ServiceClient", Refusing)
    with pytest.raises(BackendError, match="could not create a Tinker training client for 'x/y'"):
        await TrainingClient.create(backend="tinker", base_model="x/y", api_key="tml-arg")


# --------------------------------------------------------------------------- training through the double


async def test_linearized_custom_step_sends_the_composed_gradient(tc, fake):
    data = make_data()
    expected = hand_grads(fake.model, data)
    fb = await tc.forward_backward_custom(data, cross_entropy, regularizers=regs(), mode="auto")
    assert [name for name, _ in fake.calls] == ["forward", "forward_backward"]
    assert rel_err(grads_of(fake.model), expected) < 1e-4

    # what reached the service: tinker.Datum with weights = -d(loss)/d(logprobs)
    lps = [o["logprobs"] for o in fb.loss_fn_outputs]
    composed = await tinkex.compose_loss(data, lps, cross_entropy, regularizers=regs())
    sent = fake.calls[1][1]
    assert all(isinstance(d, tinker.Datum) for d in sent)
    for d, g, ours in zip(sent, composed.logprob_grads, data, strict=True):
        assert d.model_input.to_ints() == ours.tokens()
        torch.testing.assert_close(d.loss_fn_inputs["weights"].to_torch(), -g)
    assert fb.metrics["loss:sum"] == pytest.approx(float(composed.loss))
    assert fb.metrics["surrogate_loss:sum"] == pytest.approx(
        sum(float((g * lp).sum()) for g, lp in zip(composed.logprob_grads, lps, strict=True)),
        rel=1e-5,
    )
    assert fb.custom.regularizers["squares"].weight == 0.25


async def test_tinker_data_work_too_and_regularizers_see_them(tc, fake):
    data = make_data()
    theirs = [to_tinker_datum(d) for d in data]
    seen_types = []

    def spy(data, logprobs):
        seen_types.extend(type(d) for d in data)
        return squares(data, logprobs)

    expected = hand_grads(fake.model, data)
    await tc.forward_backward_custom(
        theirs, cross_entropy, regularizers=[RegularizerSpec(spy, 0.25, "squares")]
    )
    assert set(seen_types) == {tinker.Datum}
    assert rel_err(grads_of(fake.model), expected) < 1e-4


async def test_fused_is_refused_on_tinker(tc):
    with pytest.raises(
        SpecError, match=r"mode='fused'.*'tinker' backend supports mode='linearized'"
    ):
        await tc.forward_backward_custom(make_data(), cross_entropy, mode="fused")


async def test_sdk_calls_run_in_worker_threads(tc, fake):
    data = make_data()
    await tc.forward(data)
    await tc.forward_backward(data)
    await tc.forward_backward_custom(data, cross_entropy)
    await tc.optim_step(AdamParams())
    assert len(fake.threads) == 5
    assert threading.get_ident() not in fake.threads


async def test_optim_step_reaches_the_service_as_tinker_adam_params(tc, fake):
    data = make_data()
    ref = copy.deepcopy(fake.model)
    params = AdamParams(learning_rate=1e-2, weight_decay=0.01, grad_clip_norm=1.0)
    await tc.forward_backward_custom(data, cross_entropy, regularizers=regs())
    metrics = await tc.optim_step(params)
    assert fake.calls[-1][1] == to_tinker_adam_params(params)
    assert metrics["step"] == 1.0 and tc.step == 1 and metrics["grad_norm"] > 1.0
    assert metrics["learning_rate"] == 1e-2
    # the same step done by hand
    ref_grads = hand_grads(ref, data)
    with torch.no_grad():
        offset = 0
        for p in ref.parameters():
            p.grad = ref_grads[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    torch.optim.AdamW(
        ref.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.01
    ).step()
    for a, b in zip(fake.model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


async def test_failures_send_nothing_and_keep_the_client_usable(tc, fake):
    data = make_data()

    def boom(data, logprobs):
        raise RuntimeError("bad term")

    with pytest.raises(RegularizerError) as info:
        await tc.forward_backward_custom(
            data, cross_entropy, regularizers=[RegularizerSpec(boom, 1.0, "boom")]
        )
    assert info.value.name == "boom"
    assert [name for name, _ in fake.calls] == ["forward"]  # no backward reached the service
    assert all(p.grad is None for p in fake.model.parameters())

    fake.fail_next = tinker.APIConnectionError.__new__(tinker.APIConnectionError)
    with pytest.raises(BackendError, match="Tinker forward failed"):
        await tc.forward(data)

    expected = hand_grads(fake.model, data)
    await tc.forward_backward_custom(data, cross_entropy, regularizers=regs())
    assert rel_err(grads_of(fake.model), expected) < 1e-4


async def test_save_and_load_state_use_tinker_paths(tc, fake):
    path = await tc.save_state("ckpt-1")
    assert path == "tinker://run-1/weights/ckpt-1"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        await tc.load_state(path)
    assert fake.calls[-1] == ("load_state_with_optimizer", path)


async def test_unknown_arguments_are_rejected(fake):
    with pytest.raises(SpecError, match="'lora_alpha'"):
        await TinkerBackend.create(training_client=fake, lora_alpha=4)


def test_pipeline_as_loss_fn_through_the_sdks_own_linearization(fake):
    """The documented alternative: the SDK's forward_backward_custom with Pipeline.as_loss_fn().

    ``_compute_custom_loss`` is the SDK's own step between its forward and its
    backward request; the weights it would send must be -d(loss)/d(logprobs).
    """
    data = [to_tinker_datum(d) for d in make_data()]
    pipeline = tinkex.Pipeline(cross_entropy, regularizers=regs())
    forward = fake.forward(data, "cross_entropy").result()
    lps = from_tinker_output(forward)
    composed = trio.run(pipeline.compose, data, lps)

    result = tinker.TrainingClient._compute_custom_loss(data, pipeline.as_loss_fn(), forward)
    assert result.loss_sum == pytest.approx(composed.output.loss_total, rel=1e-6)
    assert result.metrics["reg/squares/contribution"] == pytest.approx(
        composed.output.regularizers["squares"].contribution
    )
    for sent, g in zip(result.data, composed.logprob_grads, strict=True):
        torch.testing.assert_close(sent.loss_fn_inputs["weights"].to_torch(), -g)

    # and that backward gives the model the composed gradient
    expected = hand_grads(fake.model, [from_tinker_datum(d) for d in data])
    fake.forward_backward(result.data, "cross_entropy").result()
    assert rel_err(grads_of(fake.model), expected) < 1e-4


# --------------------------------------------------------------------------- top-K training


async def test_linearized_custom_step_on_top_k_data_gives_the_autograd_gradient(tc, fake):
    data = topk_data()
    expected = topk_hand_grads(fake.model, data)
    fb = await tc.forward_backward_custom(data, topk_distill, regularizers=regs())
    assert rel_err(grads_of(fake.model), expected) < 1e-4
    assert [o["logprobs"].shape for o in fb.loss_fn_outputs] == [(n_positions(d), K) for d in data]

    (fwd_name, fwd), (bwd_name, bwd) = fake.calls
    assert (fwd_name, bwd_name) == ("forward", "forward_backward")
    lps = [o["logprobs"] for o in fb.loss_fn_outputs]
    composed = await tinkex.compose_loss(data, lps, topk_distill, regularizers=regs())
    for ours, f, b, g in zip(data, fwd, bwd, composed.logprob_grads, strict=True):
        shape = [n_positions(ours), K]
        # the teacher's logprobs never reach the service; (N,) weights cover the K targets
        assert set(f.loss_fn_inputs) == set(b.loss_fn_inputs) == {"target_tokens", "weights"}
        assert f.loss_fn_inputs["target_tokens"] is ours.loss_fn_inputs["target_tokens"]
        assert f.loss_fn_inputs["weights"].shape == shape
        w = ours.loss_fn_inputs["weights"].to_torch()
        assert torch.equal(f.loss_fn_inputs["weights"].to_torch(), w[:, None].expand(-1, K))
        # the surrogate step: weights = -d(loss)/d(logprobs), of the logprobs' shape
        assert b.loss_fn_inputs["target_tokens"].shape == shape
        assert b.loss_fn_inputs["weights"].shape == shape
        torch.testing.assert_close(b.loss_fn_inputs["weights"].to_torch(), -g)


def test_the_sdks_own_custom_loss_step_on_top_k_data_agrees_with_tinkex(fake):
    """``tinker.TrainingClient._compute_custom_loss`` on (N, K) data, with Pipeline.as_loss_fn()."""
    data = topk_data()
    expected = topk_hand_grads(fake.model, data)
    pipeline = tinkex.Pipeline(topk_distill, regularizers=regs())
    forward_data = [  # what the SDK's forward sends: target_tokens and zero weights
        tinker.Datum(
            model_input=d.model_input,
            loss_fn_inputs={
                "target_tokens": d.loss_fn_inputs["target_tokens"],
                "weights": td(torch.zeros(n_positions(d), K)),
            },
        )
        for d in data
    ]
    forward = fake.forward(forward_data, "cross_entropy").result()
    lps = from_tinker_output(forward)
    assert [lp.shape for lp in lps] == [(n_positions(d), K) for d in data]
    composed = trio.run(pipeline.compose, data, lps)

    result = tinker.TrainingClient._compute_custom_loss(data, pipeline.as_loss_fn(), forward)
    assert result.loss_sum == pytest.approx(composed.output.loss_total, rel=1e-6)
    for sent, g in zip(result.data, composed.logprob_grads, strict=True):
        assert list(g.shape) == sent.loss_fn_inputs["target_tokens"].shape
        torch.testing.assert_close(sent.loss_fn_inputs["weights"].to_torch(), -g)

    fake.forward_backward(result.data, "cross_entropy").result()
    assert rel_err(grads_of(fake.model), expected) < 1e-4


class FlatOutputs(FakeTinkerTrainingClient):
    """A service answer whose logprobs come back flat, without a shape (or cut short)."""

    def __init__(self, model, cut: int = 0):
        super().__init__(model)
        self.cut = cut

    def _output(self, lps, loss):
        return tinker.ForwardBackwardOutput(
            loss_fn_output_type="ArrayRecord",
            loss_fn_outputs=[
                {
                    "logprobs": tinker.TensorData(
                        data=lp.detach().reshape(-1).tolist()[self.cut :], dtype="float32"
                    )
                }
                for lp in lps
            ],
            metrics={"loss:sum": float(loss)},
        )


async def test_flat_logprobs_take_the_targets_shape_and_a_wrong_count_is_an_error():
    data = topk_data()
    flat = FlatOutputs(build_tiny_model(0))
    async with await TrainingClient.create(
        backend="tinker", base_model="Qwen/Qwen3-8B", training_client=flat
    ) as tc:
        lps = await tc.forward(data)
    assert [lp.shape for lp in lps] == [(n_positions(d), K) for d in data]

    short = FlatOutputs(build_tiny_model(0), cut=1)
    async with await TrainingClient.create(
        backend="tinker", base_model="Qwen/Qwen3-8B", training_client=short
    ) as tc:
        with pytest.raises(BackendError, match=r"logprobs of shape \(\d+,\) for datum 0"):
            await tc.forward(data)


# --------------------------------------------------------------------------- what reaches the service


def rl_data() -> list[Datum]:
    """Data carrying inputs for client-side terms (reference_logprobs, mask) and for RL losses."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for d in make_data():
        n = len(d)
        out.append(
            Datum(
                model_input=d.tokens(),
                loss_fn_inputs={
                    **d.loss_fn_inputs,
                    "reference_logprobs": -torch.rand(n, generator=gen) * 3,
                    "mask": (torch.arange(n) % 3 != 0).float(),
                    "logprobs": -torch.rand(n, generator=gen) * 3,
                    "advantages": torch.randn(n, generator=gen),
                },
            )
        )
    return out


def masked_cross_entropy(data, logprobs):
    loss = sum(
        -(
            tinkex.loss_input(d, "weights", like=lp) * tinkex.loss_input(d, "mask", like=lp) * lp
        ).sum()
        for d, lp in zip(data, logprobs, strict=True)
    )
    return loss, {}


def to_reference(data, logprobs):
    return sum(
        ((lp - tinkex.loss_input(d, "reference_logprobs", like=lp)) ** 2).mean()
        for d, lp in zip(data, logprobs, strict=True)
    ), {}


def reference_hand_grads(model, data) -> torch.Tensor:
    ref = copy.deepcopy(model)
    total = 0
    for d in data:
        ids = torch.tensor([d.tokens()])
        lp = torch.log_softmax(ref(input_ids=ids).logits[0].float(), -1)
        lp = lp.gather(-1, d.loss_fn_inputs["target_tokens"][:, None])[:, 0]
        inputs = d.loss_fn_inputs
        total = (
            total
            - (inputs["weights"] * inputs["mask"] * lp).sum()
            + 0.5 * ((lp - inputs["reference_logprobs"]) ** 2).mean()
        )
    total.backward()
    return grads_of(ref)


async def test_the_service_gets_only_the_loss_inputs_and_the_terms_get_everything(tc, fake):
    data = rl_data()
    keys_before = [set(d.loss_fn_inputs) for d in data]
    seen: list[set[str]] = []

    def spy(data, logprobs):
        seen.extend(set(d.loss_fn_inputs) for d in data)
        return to_reference(data, logprobs)

    expected = reference_hand_grads(fake.model, data)
    await tc.forward_backward_custom(
        data, masked_cross_entropy, regularizers=[RegularizerSpec(spy, 0.5, "to_reference")]
    )
    assert rel_err(grads_of(fake.model), expected) < 1e-4
    assert [name for name, _ in fake.calls] == ["forward", "forward_backward"]
    for _, sent in fake.calls:
        assert all(set(d.loss_fn_inputs) == {"target_tokens", "weights"} for d in sent)
    assert seen == keys_before  # the terms read the caller's own data, every input there
    assert [set(d.loss_fn_inputs) for d in data] == keys_before  # and it is unchanged


async def test_forward_backward_sends_each_built_in_loss_only_its_inputs(tc, fake):
    data = rl_data()
    ref = copy.deepcopy(fake.model)
    loss = 0
    for d in data:
        lp = torch.log_softmax(ref(input_ids=torch.tensor([d.tokens()])).logits[0].float(), -1)
        lp = lp.gather(-1, d.loss_fn_inputs["target_tokens"][:, None])[:, 0]
        loss = loss - (d.loss_fn_inputs["weights"] * lp).sum()
    loss.backward()
    fb = await tc.forward_backward(data, "cross_entropy")
    sent = fake.calls[-1][1]
    assert all(set(d.loss_fn_inputs) == {"target_tokens", "weights"} for d in sent)
    assert fb.metrics["loss:sum"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert rel_err(grads_of(fake.model), grads_of(ref)) < 1e-4

    await tc.forward_backward(data, "importance_sampling")
    assert fake.loss_fns[-1] == "importance_sampling"
    for d, ours in zip(fake.calls[-1][1], data, strict=True):
        assert set(d.loss_fn_inputs) == {"target_tokens", "weights", "logprobs", "advantages"}
        for key in d.loss_fn_inputs:
            assert torch.equal(d.loss_fn_inputs[key].to_torch(), ours.loss_fn_inputs[key])


async def test_a_datum_lacking_a_required_input_is_refused_before_anything_is_sent(tc, fake):
    data = make_data()  # target_tokens and weights only
    with pytest.raises(
        SpecError, match=r"data\[0\] lacks loss_fn_inputs 'advantages', 'logprobs'.*'ppo'"
    ):
        await tc.forward_backward(data, "ppo")
    assert fake.calls == []


async def test_an_unknown_loss_name_gets_the_data_as_given(tc, fake):
    data = rl_data()
    await tc.forward_backward(data, "stable_reinforce")
    for d, ours in zip(fake.calls[-1][1], data, strict=True):
        assert set(d.loss_fn_inputs) == set(ours.loss_fn_inputs)
    theirs = [to_tinker_datum(d) for d in data]
    await tc.forward_backward(theirs, "a_newer_sdks_loss")
    assert all(a is b for a, b in zip(fake.calls[-1][1], theirs, strict=True))


async def test_a_tinker_datum_with_just_the_loss_inputs_passes_through(tc, fake):
    theirs = [to_tinker_datum(d) for d in make_data()]
    await tc.forward_backward(theirs, "cross_entropy")
    assert all(a is b for a, b in zip(fake.calls[-1][1], theirs, strict=True))


def test_the_loss_table_covers_the_sdks_built_in_losses():
    names = set(typing.get_args(tinker.types.LossFnType))
    assert set(LOSS_FN_INPUTS) <= names
    # documented pass-throughs: an alpha loss and server-side LossHandles
    assert names - set(LOSS_FN_INPUTS) == {"stable_reinforce", "custom"}
    for name, spec in LOSS_FN_INPUTS.items():
        assert "target_tokens" in spec.required, name
        assert not spec.required & spec.optional, name
    assert LOSS_FN_INPUTS["cross_entropy"].accepted == {"target_tokens", "weights"}


# --------------------------------------------------------------------------- tokenizer


class TokenizerSpy(FakeTinkerTrainingClient):
    """Records the thread each (blocking, network) ``get_tokenizer`` call runs in."""

    def __init__(self, model, tokenizer_error: BaseException | None = None):
        super().__init__(model)
        self.tokenizer_threads: list[int] = []
        self.tokenizer_error = tokenizer_error

    def get_tokenizer(self):
        self.tokenizer_threads.append(threading.get_ident())
        if self.tokenizer_error is not None:
            raise self.tokenizer_error
        return ByteTokenizer()


async def test_the_tokenizer_is_fetched_once_in_a_worker_thread_at_creation():
    spy = TokenizerSpy(build_tiny_model(0))
    async with await TrainingClient.create(
        backend="tinker", base_model="Qwen/Qwen3-8B", training_client=spy
    ) as tc:
        assert len(spy.tokenizer_threads) == 1
        assert spy.tokenizer_threads[0] != threading.get_ident()  # not the Trio thread
        assert isinstance(tc.tokenizer, ByteTokenizer)
        assert tc.tokenizer is tc.tokenizer
        assert len(spy.tokenizer_threads) == 1  # reading it never fetches


async def test_a_backend_built_directly_fetches_its_tokenizer_explicitly():
    spy = TokenizerSpy(build_tiny_model(0))
    backend = TinkerBackend(spy)
    with pytest.raises(BackendError, match=r"await backend\.fetch_tokenizer\(\)"):
        _ = backend.tokenizer
    assert spy.tokenizer_threads == []
    tokenizer = await backend.fetch_tokenizer()
    assert isinstance(tokenizer, ByteTokenizer) and backend.tokenizer is tokenizer
    assert spy.tokenizer_threads != [threading.get_ident()]
    assert await backend.fetch_tokenizer() is tokenizer and len(spy.tokenizer_threads) == 1
    assert TinkerBackend(spy, tokenizer=None).tokenizer is None


async def test_an_unavailable_tokenizer_is_none():
    spy = TokenizerSpy(build_tiny_model(0), tokenizer_error=OSError("offline"))
    async with await TrainingClient.create(
        backend="tinker", base_model="Qwen/Qwen3-8B", training_client=spy
    ) as tc:
        assert tc.tokenizer is None
        assert spy.tokenizer_threads[0] != threading.get_ident()


# --------------------------------------------------------------------------- step in checkpoints


class Service:
    """The service's side of checkpoints: tinker path -> user_metadata."""

    def __init__(self):
        self.checkpoints: dict[str, dict[str, str] | None] = {}


class MetadataClient(FakeTinkerTrainingClient):
    """A double whose save_state takes user_metadata, as the current SDK's does."""

    def __init__(self, model, service: Service):
        super().__init__(model)
        self.service = service

    def save_state(self, name, ttl_seconds=None, overwrite=False, user_metadata=None):
        self._enter("save_state", (name, user_metadata))
        path = f"tinker://run-1/weights/{name}"
        self.service.checkpoints[path] = user_metadata
        return Done(tinker.types.SaveWeightsResponse(path=path))


class FakeRest:
    """``tinker.RestClient.list_checkpoints`` over a Service."""

    def __init__(self, service: Service, fail: BaseException | None = None):
        self.service = service
        self.fail = fail
        self.calls: list[tuple[str, int]] = []

    def list_checkpoints(self, run_id):
        self.calls.append((run_id, threading.get_ident()))
        if self.fail is not None:
            return Done(self.fail)
        checkpoints = [
            tinker.types.Checkpoint(
                checkpoint_id=path.split("/", 3)[3],
                checkpoint_type="training",
                time=datetime.datetime(2025, 1, 1),
                tinker_path=path,
                user_metadata=metadata,
            )
            for path, metadata in self.service.checkpoints.items()
        ]
        return Done(tinker.types.CheckpointsListResponse(checkpoints=checkpoints))


async def steps(tc, n):
    for _ in range(n):
        await tc.forward_backward(make_data())
        await tc.optim_step(AdamParams(learning_rate=1e-3))


async def test_load_state_restores_the_step_of_the_checkpoint(tc, fake):
    await steps(tc, 1)
    path = await tc.save_state("ckpt-1")
    await steps(tc, 2)
    assert tc.step == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        await tc.load_state(path)
    assert tc.step == 1
    assert fake.calls[-1] == ("load_state_with_optimizer", path)
    metrics = await tc.optim_step(AdamParams())
    assert metrics["step"] == 2.0


async def test_load_state_reads_the_step_from_the_checkpoint_metadata_in_a_new_client():
    service = Service()
    first = MetadataClient(build_tiny_model(0), service)
    async with await TrainingClient.create(
        backend="tinker", base_model="Qwen/Qwen3-8B", training_client=first
    ) as tc:
        await steps(tc, 3)
        path = await tc.save_state("ckpt-3")
    assert service.checkpoints[path] == {"tinkex_step": "3"}

    rest = FakeRest(service)
    second = MetadataClient(build_tiny_model(0), service)
    async with await TrainingClient.create(
        backend="tinker", base_model="Qwen/Qwen3-8B", training_client=second, rest_client=rest
    ) as tc:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            await tc.load_state(path)
        assert tc.step == 3
    assert [run for run, _ in rest.calls] == ["run-1"]
    assert rest.calls[0][1] != threading.get_ident()  # the look-up blocks: a worker thread
    assert second.calls[-1] == ("load_state_with_optimizer", path)


async def test_a_failed_metadata_lookup_loads_nothing_and_keeps_the_step():
    service = Service()
    service.checkpoints["tinker://run-1/weights/c"] = {"tinkex_step": "4"}
    fail = tinker.APIConnectionError.__new__(tinker.APIConnectionError)
    client = MetadataClient(build_tiny_model(0), service)
    async with await TrainingClient.create(
        backend="tinker",
        base_model="Qwen/Qwen3-8B",
        training_client=client,
        rest_client=FakeRest(service, fail=fail),
    ) as tc:
        await steps(tc, 1)
        with pytest.raises(BackendError, match="could not read the metadata.*nothing was loaded"):
            await tc.load_state("tinker://run-1/weights/c")
        assert tc.step == 1
        assert "load_state_with_optimizer" not in [name for name, _ in client.calls]


@pytest.mark.parametrize("metadata", [None, {"other": "x"}, {"tinkex_step": "three"}])
async def test_a_checkpoint_without_a_usable_step(metadata):
    service = Service()
    path = "tinker://run-1/weights/foreign"
    service.checkpoints[path] = metadata
    client = MetadataClient(build_tiny_model(0), service)
    async with await TrainingClient.create(
        backend="tinker",
        base_model="Qwen/Qwen3-8B",
        training_client=client,
        rest_client=FakeRest(service),
    ) as tc:
        await steps(tc, 2)
        if metadata == {"tinkex_step": "three"}:
            with pytest.raises(BackendError, match="tinkex_step='three', not a step count"):
                await tc.load_state(path)
            assert tc.step == 2
            assert "load_state_with_optimizer" not in [name for name, _ in client.calls]
        else:  # not saved by tinkex: loads, and counting starts again
            with pytest.warns(UserWarning, match="records no tinkex step"):
                await tc.load_state(path)
            assert tc.step == 0
            assert client.calls[-1] == ("load_state_with_optimizer", path)


def test_bool_and_small_int_inputs_go_to_tinker_in_its_wire_dtypes():
    """Tinker's TensorData has int64 and float32 only; a bool mask used to be a raw ValueError."""
    from tinkex._backends.tinker import _tensor_data

    mask = _tensor_data(tinker, torch.tensor([True, False, True]))
    assert (mask.dtype, mask.data) == ("float32", [1.0, 0.0, 1.0])
    ids = _tensor_data(tinker, torch.tensor([[1, 2]], dtype=torch.uint8))
    assert (ids.dtype, ids.shape, ids.data) == ("int64", [1, 2], [1, 2])
    half = _tensor_data(tinker, torch.tensor([0.5], dtype=torch.float16))
    assert (half.dtype, half.data) == ("float32", [0.5])
