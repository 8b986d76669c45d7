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


class FakeTinkerTrainingClient:
    """``tinker.TrainingClient``'s forward / forward_backward / optim_step on a local model."""

    def __init__(self, model):
        self.model = model
        self.calls: list[tuple[str, object]] = []
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

    def _logprobs(self, datum) -> torch.Tensor:
        assert isinstance(datum, tinker.Datum)
        assert isinstance(datum.model_input, tinker.ModelInput)
        ids = torch.tensor([datum.model_input.to_ints()])
        targets = datum.loss_fn_inputs["target_tokens"]
        assert isinstance(targets, tinker.TensorData) and targets.dtype == "int64"
        logits = self.model(input_ids=ids).logits[0].float()
        return torch.log_softmax(logits, -1).gather(-1, targets.to_torch()[:, None])[:, 0]

    def _output(self, lps, loss):
        return tinker.ForwardBackwardOutput(
            loss_fn_output_type="ArrayRecord",
            loss_fn_outputs=[{"logprobs": tinker.TensorData.from_torch(lp.detach())} for lp in lps],
            metrics={"loss:sum": float(loss)},
        )

    def forward(self, data, loss_fn, loss_fn_config=None):
        if err := self._enter("forward", data):
            return Done(err)
        assert loss_fn == "cross_entropy"
        with torch.no_grad():
            lps = [self._logprobs(d) for d in data]
            loss = sum(
                -(d.loss_fn_inputs["weights"].to_torch() * lp).sum()
                for d, lp in zip(data, lps, strict=True)
            )
        return Done(self._output(lps, loss))

    def forward_backward(self, data, loss_fn, loss_fn_config=None):
        if err := self._enter("forward_backward", data):
            return Done(err)
        assert loss_fn == "cross_entropy"
        lps = [self._logprobs(d) for d in data]
        loss = sum(
            -(d.loss_fn_inputs["weights"].to_torch() * lp).sum()
            for d, lp in zip(data, lps, strict=True)
        )
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
