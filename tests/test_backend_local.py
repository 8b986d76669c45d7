"""The local backend: the tiny model and byte tokenizer, model directories, batching, LoRA, devices."""

from __future__ import annotations

import copy
import errno
import io
import json
import os
import time
from pathlib import Path

import pytest
import torch

from tinkex import AdamParams, BackendError, Datum, SpecError, TrainingClient
from tinkex._backends import local as local_mod
from tinkex._backends.local import LocalBackend, resolve_device
from tinkex._backends.tiny import (
    TOKENIZER_FILE,
    ByteTokenizer,
    build_tiny_model,
    load_tokenizer,
)


def datum(ids: list[int]) -> Datum:
    return Datum(model_input=ids[:-1], loss_fn_inputs={"target_tokens": ids[1:]})


def params_of(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# --------------------------------------------------------------------------- the tiny model


def test_tiny_model_shape_and_determinism():
    a, b, c = build_tiny_model(0), build_tiny_model(0), build_tiny_model(1)
    cfg = a.config
    assert type(a).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (2, 64, 4)
    assert cfg.vocab_size == ByteTokenizer.vocab_size == 259
    assert cfg.attention_dropout == 0.0 and not a.training
    assert torch.equal(params_of(a), params_of(b))
    assert not torch.equal(params_of(a), params_of(c))
    ids = torch.tensor([[257, 104, 105]])
    torch.testing.assert_close(a(input_ids=ids).logits, a(input_ids=ids).logits, rtol=0, atol=0)


def test_building_does_not_disturb_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(5)
    assert torch.equal(torch.rand(3), expected)


def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    ids = tok.encode("héllo ✓")
    assert ids[0] == tok.bos_token_id and all(0 <= i < 256 for i in ids[1:])
    assert len(ids) == 1 + len("héllo ✓".encode())
    assert tok.decode(ids) == "héllo ✓"
    assert tok.encode("ab", add_special_tokens=False) == [97, 98]
    assert tok.decode([257, 104, 105, 258, 256]) == "hi"
    assert tok.decode([257, 104, 105, 258], skip_special_tokens=False) == "<s>hi</s>"
    assert tok.decode(torch.tensor([104, 105])) == "hi"
    assert tok(["a", "b"], add_special_tokens=False) == {"input_ids": [[97], [98]]}
    with pytest.raises(ValueError, match="token id 300"):
        tok.decode([300])


def test_byte_tokenizer_saves_and_loads(tmp_path: Path):
    ByteTokenizer().save_pretrained(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    (tmp_path / TOKENIZER_FILE).write_text('{"type": "other"}')
    with pytest.raises(BackendError, match="not a tinkex byte tokenizer"):
        ByteTokenizer.from_pretrained(tmp_path)
    assert load_tokenizer(tmp_path / "nothing") is None


def test_hf_tokenizer_directory_loads_through_autotokenizer(tmp_path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path).encode("hello world") == [1, 2]


# --------------------------------------------------------------------------- model directories


async def test_tiny_model_saved_to_a_directory_loads_back(tmp_path: Path):
    async with await TrainingClient.create(seed=7) as tc:
        tc.backend.save_pretrained(tmp_path)
        data = [datum(tc.tokenizer.encode("round trip"))]
        expected = await tc.forward(data)
    assert (tmp_path / "config.json").is_file() and (tmp_path / TOKENIZER_FILE).is_file()
    async with await TrainingClient.create(base_model=str(tmp_path), seed=0) as loaded:
        assert isinstance(loaded.tokenizer, ByteTokenizer)
        assert type(loaded.backend.model).__name__ == "LlamaForCausalLM"
        torch.testing.assert_close(await loaded.forward(data), expected, rtol=1e-6, atol=1e-6)
    async with await TrainingClient.create(base_model=str(tmp_path), lora_rank=2) as adapted:
        assert all(
            "lora_" in n for n, p in adapted.backend.model.named_parameters() if p.requires_grad
        )
        torch.testing.assert_close(await adapted.forward(data), expected, rtol=1e-5, atol=1e-5)


async def test_missing_paths_fail_fast_naming_them(tmp_path: Path, monkeypatch):
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("from_pretrained must not be reached")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "no-such-model"
    start = time.perf_counter()
    with pytest.raises(BackendError) as info:
        await TrainingClient.create(base_model=str(missing))
    assert str(info.value) == (
        f"base_model {str(missing)!r} does not exist; the local backend takes 'tiny', a model "
        f"directory, a .gguf file, a known model name (`tinkex models list`) or a Hugging Face "
        f"hub id 'org/name'"
    )
    with pytest.raises(BackendError, match=r"'Qwen/Qwen3-8B' is not a local path.*HF_HUB_OFFLINE"):
        await TrainingClient.create(base_model="Qwen/Qwen3-8B")
    with pytest.raises(BackendError, match=r"the GGUF file '.*x\.gguf' does not exist"):
        await TrainingClient.create(base_model=str(tmp_path / "x.gguf"))
    assert time.perf_counter() - start < 1.0
    with pytest.raises(BackendError, match="no config.json"):
        await TrainingClient.create(base_model=str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(BackendError, match="is a file but not a .gguf file"):
        await TrainingClient.create(base_model=str(tmp_path / "weights.bin"))


async def test_bad_arguments():
    with pytest.raises(SpecError, match="lora_rank must be a positive int"):
        await LocalBackend.create(lora_rank=0)
    with pytest.raises(SpecError, match="unknown argument.*'temperature'"):
        await LocalBackend.create(temperature=1.0)
    with pytest.raises(SpecError) as info:
        await LocalBackend.create(dtype="fp8")
    assert str(info.value) == (
        "dtype must be one of 'auto', 'float32', 'bfloat16', 'float16', got 'fp8'"
    )
    with pytest.raises(SpecError, match="got torch.int8"):
        await LocalBackend.create(dtype=torch.int8)
    with pytest.raises(SpecError, match="base_model must be 'tiny', a model directory"):
        await LocalBackend.create(base_model="")


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        ("auto", torch.float32),
        (None, torch.float32),
        ("float32", torch.float32),
        ("bfloat16", torch.bfloat16),
        (torch.float16, torch.float16),
    ],
)
async def test_dtype_loads_the_model_in_it_and_logprobs_stay_float32(
    tmp_path: Path, dtype, expected
):
    data = [datum(list(b"dtype check"))]
    async with await TrainingClient.create(seed=1, dtype=dtype, device="cpu") as tc:
        assert tc.backend.dtype == expected
        assert {p.dtype for p in tc.backend.model.parameters()} == {expected}
        (lp,) = await tc.forward(data)
        tc.backend.save_pretrained(tmp_path)
    assert lp.dtype == torch.float32 and bool(torch.isfinite(lp).all())
    async with await TrainingClient.create(seed=1, device="cpu") as ref:
        (want,) = await ref.forward(data)
    tolerance = {torch.float32: 0.0, torch.bfloat16: 0.1, torch.float16: 0.02}[expected]
    torch.testing.assert_close(lp, want, rtol=0, atol=tolerance)
    # a saved directory loads in the dtype asked for, whatever it was saved in
    async with await TrainingClient.create(base_model=str(tmp_path), device="cpu") as tc:
        assert tc.backend.dtype == torch.float32  # "auto" on the CPU
    async with await TrainingClient.create(
        base_model=str(tmp_path), device="cpu", dtype="bfloat16"
    ) as tc:
        assert tc.backend.dtype == torch.bfloat16


def test_auto_dtype_is_bfloat16_on_cuda_that_has_it(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert local_mod._torch_dtype("auto", cuda, tiny=False) == torch.bfloat16
    assert local_mod._torch_dtype("auto", cuda, tiny=True) == torch.float32
    assert local_mod._torch_dtype("float16", cuda, tiny=True) == torch.float16
    assert local_mod._torch_dtype("auto", torch.device("cpu"), tiny=False) == torch.float32
    assert local_mod._torch_dtype("auto", torch.device("mps"), tiny=False) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert local_mod._torch_dtype("auto", cuda, tiny=False) == torch.float32


# --------------------------------------------------------------------------- batching


async def test_padded_batch_equals_one_sequence_at_a_time():
    backend = await LocalBackend.create(seed=1)
    tok = backend.tokenizer
    data = [
        datum(tok.encode(t)) for t in ["a much longer sequence of bytes", "short", "mid length"]
    ]
    batched = await backend.forward(data)
    for d, lp in zip(data, batched, strict=True):
        (alone,) = await backend.forward([d])
        assert lp.shape == alone.shape == (len(d),)
        torch.testing.assert_close(lp, alone, rtol=1e-5, atol=1e-5)


async def test_batched_gradients_equal_per_sequence_gradients():
    backend = await LocalBackend.create(seed=2)
    tok = backend.tokenizer
    data = [datum(tok.encode(t)) for t in ["padding must not leak", "into grads"]]
    await backend.forward_backward(data)
    batched = torch.cat([p.grad.reshape(-1) for p in backend.model.parameters()])
    backend.model.zero_grad(set_to_none=True)
    for d in data:
        await backend.forward_backward([d])
    summed = torch.cat([p.grad.reshape(-1) for p in backend.model.parameters()])
    assert float((batched - summed).abs().max() / summed.abs().max()) < 1e-5


async def test_weights_default_to_one_for_cross_entropy():
    backend = await LocalBackend.create(seed=0)
    d = datum(backend.tokenizer.encode("xyz"))
    (lp,), metrics = await backend.forward_backward([d])
    assert metrics["loss:sum"] == pytest.approx(float(-lp.sum()), rel=1e-6)


# --------------------------------------------------------------------------- top-K targets


def topk_datum(text: str, k: int, seed: int, weights: str = "none") -> Datum:
    """A Datum with (N, k) target tokens: the next byte first, then k - 1 random ids."""
    ids = ByteTokenizer().encode(text)
    n = len(ids) - 1
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, ByteTokenizer.vocab_size, (n, k), generator=gen)
    targets[:, 0] = torch.tensor(ids[1:])
    inputs: dict[str, torch.Tensor] = {"target_tokens": targets}
    if weights == "(N,)":
        inputs["weights"] = torch.rand(n, generator=gen) + 0.5
    elif weights == "(N, K)":
        inputs["weights"] = torch.rand(n, k, generator=gen) - 0.25
    return Datum(model_input=ids[:-1], loss_fn_inputs=inputs)


def alone_logprobs(model, d: Datum) -> torch.Tensor:
    """log_softmax of one unpadded sequence, gathered at its targets ((N,) or (N, K))."""
    lp = torch.log_softmax(model(input_ids=torch.tensor([d.tokens()])).logits[0].float(), -1)
    targets = d.loss_fn_inputs["target_tokens"]
    return lp.gather(-1, targets[:, None])[:, 0] if targets.dim() == 1 else lp.gather(-1, targets)


def topk_loss(data, logprobs):
    """A loss that needs (N, K): a softmax over each position's K candidates, plus squares."""
    loss = 0
    for lp in logprobs:
        loss = loss - torch.log_softmax(lp, -1)[:, 0].sum() + 0.1 * (lp**2).mean()
    return loss, {}


async def test_top_k_targets_give_k_logprobs_per_position_in_a_mixed_batch():
    backend = await LocalBackend.create(seed=3)
    data = [
        topk_datum("a longer top-k sequence", 3, seed=0),
        datum(backend.tokenizer.encode("plain targets")),
        topk_datum("k of two", 2, seed=1),
    ]
    batched = await backend.forward(data)
    assert [lp.shape for lp in batched] == [(len(data[0]), 3), (len(data[1]),), (len(data[2]), 2)]
    with torch.no_grad():
        for d, lp in zip(data, batched, strict=True):
            torch.testing.assert_close(lp, alone_logprobs(backend.model, d), rtol=1e-5, atol=1e-5)
    graph = await backend.forward_graph(data)
    assert [lp.shape for lp in graph.logprobs] == [lp.shape for lp in batched]
    graph.discard()


@pytest.mark.parametrize("mode", ["fused", "linearized"])
async def test_top_k_custom_step_gives_the_autograd_gradient(mode):
    data = [topk_datum("top-k gradient", 4, seed=2), topk_datum("second one", 4, seed=3)]
    async with await TrainingClient.create(seed=0) as tc:
        ref = copy.deepcopy(tc.backend.model)
        loss, _ = topk_loss(data, [alone_logprobs(ref, d) for d in data])
        loss.backward()
        expected = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
        fb = await tc.forward_backward_custom(data, topk_loss, mode=mode)
        got = torch.cat([p.grad.reshape(-1) for p in tc.backend.model.parameters()])
    assert [o["logprobs"].shape for o in fb.loss_fn_outputs] == [(len(d), 4) for d in data]
    assert fb.metrics["loss:sum"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-4


@pytest.mark.parametrize("weights", ["none", "(N,)", "(N, K)"])
async def test_top_k_cross_entropy_weights_each_target(weights):
    backend = await LocalBackend.create(seed=0)
    d = topk_datum("weighted", 3, seed=4, weights=weights)
    (lp,), metrics = await backend.forward_backward([d])
    assert lp.shape == (len(d), 3)
    w = d.loss_fn_inputs.get("weights", torch.ones(len(d)))
    w = w[:, None] if w.dim() == 1 else w
    assert metrics["loss:sum"] == pytest.approx(float(-(w * lp).sum()), rel=1e-5)


async def test_top_k_shapes_that_do_not_fit_are_refused_naming_the_datum():
    class Loose:  # a datum that skips tinkex.Datum's own checks
        def __init__(self, targets, weights=None):
            self.model_input = [1, 2, 3]
            self.loss_fn_inputs = {"target_tokens": targets}
            if weights is not None:
                self.loss_fn_inputs["weights"] = weights

    backend = await LocalBackend.create(seed=0)
    with pytest.raises(SpecError, match=r"data\[1\]: target_tokens has shape \(2, 3\).*\(3, K\)"):
        await backend.forward([datum([1, 2, 3, 4]), Loose(torch.zeros(2, 3, dtype=torch.int64))])
    with pytest.raises(SpecError, match=r"data\[0\]: weights has shape \(3, 2\).*\(3, 3\)"):
        await backend.forward_backward(
            [Loose(torch.zeros(3, 3, dtype=torch.int64), torch.ones(3, 2))]
        )


# --------------------------------------------------------------------------- LoRA


async def test_lora_trains_only_the_adapter():
    async with await TrainingClient.create(seed=0, lora_rank=4) as tc:
        model = tc.backend.model
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
        assert any("mlp" in n for n in trainable) and any("self_attn" in n for n in trainable)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        data = [datum(tc.tokenizer.encode("lora only"))]
        # initially B = 0: the adapter is a no-op, so logprobs equal the base model's
        base = build_tiny_model(0)
        with torch.no_grad():
            ids = torch.tensor([data[0].tokens()])
            ref = torch.log_softmax(base(input_ids=ids).logits[0], -1)
        ref = ref.gather(-1, data[0].loss_fn_inputs["target_tokens"][:, None])[:, 0]
        torch.testing.assert_close((await tc.forward(data))[0], ref, rtol=1e-5, atol=1e-5)
        for _ in range(2):
            await tc.forward_backward(data)
            await tc.optim_step(AdamParams(learning_rate=1e-2))
        for n, p in model.named_parameters():
            if n in frozen:
                assert torch.equal(p, frozen[n]), n
        assert any(
            not torch.equal(p, adapters[n]) for n, p in model.named_parameters() if n in adapters
        )


# --------------------------------------------------------------------------- devices


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == torch.device("cuda")


def test_unavailable_or_bad_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SpecError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(SpecError, match="'gpu0'"):
        resolve_device("gpu0")
    assert resolve_device("cpu") == torch.device("cpu")


def test_backend_module_does_not_import_the_tinker_sdk():
    assert "tinker" not in local_mod.__dict__


# --------------------------------------------------------------------------- checkpoints

TEXTS = ("checkpoints must survive", "a crash", "and a full disk")


async def train(tc: TrainingClient, steps: int, lr: float = 1e-2) -> None:
    data = [datum(tc.tokenizer.encode(t)) for t in TEXTS]
    for _ in range(steps):
        await tc.forward_backward(data)
        await tc.optim_step(AdamParams(learning_rate=lr))


def trainable_params(tc: TrainingClient) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone() for n, p in tc.backend.model.named_parameters() if p.requires_grad
    }


def entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


class Snapshot:
    """Everything a refused load_state must leave alone."""

    def __init__(self, tc: TrainingClient) -> None:
        self.tc = tc
        self.params = trainable_params(tc)
        self.optimizer = tc.backend._optimizer
        self.adam = tc.backend._adam
        self.state = copy.deepcopy(self.optimizer.state_dict()) if self.optimizer else None
        self.step = tc.step

    def assert_unchanged(self) -> None:
        tc = self.tc
        after = trainable_params(tc)
        assert after.keys() == self.params.keys()
        for name, value in self.params.items():
            assert torch.equal(after[name], value), name
        assert tc.backend._optimizer is self.optimizer and tc.backend._adam == self.adam
        now = tc.backend._optimizer.state_dict()
        assert now["param_groups"] == self.state["param_groups"]
        assert now["state"].keys() == self.state["state"].keys()
        for index, entry in self.state["state"].items():
            assert now["state"][index].keys() == entry.keys()
            for key, value in entry.items():
                assert torch.equal(now["state"][index][key], value), (index, key)
        assert tc.step == self.step


def rewrite(ckpt: Path, name: str, data: bytes, *, record_size: bool = True) -> None:
    """Replace a checkpoint file; with record_size the state file agrees with its new size."""
    (ckpt / name).write_bytes(data)
    if record_size:
        meta = json.loads((ckpt / "tinkex_state.json").read_text())
        meta["files"][name] = len(data)
        (ckpt / "tinkex_state.json").write_text(json.dumps(meta))


@pytest.fixture
async def trained_elsewhere(tmp_path: Path) -> Path:
    """A one-step checkpoint of the tiny model (seed 0) at tmp_path/ckpt."""
    async with await TrainingClient.create(seed=0) as tc:
        await train(tc, 1)
        await tc.save_state(str(tmp_path / "ckpt"))
    return tmp_path / "ckpt"


@pytest.fixture
async def busy():
    """A client with its own state (seed 1, two steps) that refused loads must keep."""
    async with await TrainingClient.create(seed=1) as tc:
        await train(tc, 2, lr=3e-3)
        yield tc


async def optimizer_of_another_model(tmp_path: Path) -> bytes:
    """optimizer.pt of a LoRA client of the same tiny model (another parameter set)."""
    async with await TrainingClient.create(seed=0, lora_rank=2) as other:
        await train(other, 1)
        await other.save_state(str(tmp_path / "lora"))
    return (tmp_path / "lora" / "optimizer.pt").read_bytes()


def _edit_optimizer(ckpt: Path, edit) -> bytes:
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    edit(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _wrong_moment_shape(state) -> None:
    state["state"][0]["exp_avg"] = torch.zeros(3, 3)


def _one_parameter_less(state) -> None:
    state["param_groups"][0]["params"] = state["param_groups"][0]["params"][:-1]
    del state["state"][max(state["state"])]


def _two_groups(state) -> None:
    state["param_groups"].append(dict(state["param_groups"][0], params=[]))


def _no_lr(state) -> None:
    del state["param_groups"][0]["lr"]


@pytest.mark.parametrize(
    "damage",
    ["another model", "moment shape", "one parameter less", "two groups", "no lr", "truncated"],
)
async def test_a_mismatched_optimizer_state_is_refused_before_anything_changes(
    trained_elsewhere: Path, busy: TrainingClient, damage: str
):
    ckpt = trained_elsewhere
    data = (ckpt / "optimizer.pt").read_bytes()
    if damage == "another model":
        rewrite(ckpt, "optimizer.pt", await optimizer_of_another_model(ckpt.parent))
    elif damage == "truncated":
        rewrite(ckpt, "optimizer.pt", data[: len(data) // 2], record_size=False)
    else:
        edit = {
            "moment shape": _wrong_moment_shape,
            "one parameter less": _one_parameter_less,
            "two groups": _two_groups,
            "no lr": _no_lr,
        }[damage]
        rewrite(ckpt, "optimizer.pt", _edit_optimizer(ckpt, edit))
    before = Snapshot(busy)
    with pytest.raises(BackendError) as info:
        await busy.load_state(str(ckpt))
    message = str(info.value)
    assert "optimizer.pt" in message and "\n" not in message
    before.assert_unchanged()
    # the client still trains
    await train(busy, 1)
    assert busy.step == 3


async def test_a_truncated_optimizer_file_from_an_old_checkpoint_names_the_file(
    trained_elsewhere: Path, busy: TrainingClient
):
    ckpt = trained_elsewhere
    meta = json.loads((ckpt / "tinkex_state.json").read_text())
    del meta["files"]  # checkpoints written before sizes were recorded
    (ckpt / "tinkex_state.json").write_text(json.dumps(meta))
    data = (ckpt / "optimizer.pt").read_bytes()
    rewrite(ckpt, "optimizer.pt", data[: len(data) // 2], record_size=False)
    before = Snapshot(busy)
    with pytest.raises(BackendError, match=r"optimizer\.pt' is damaged: RuntimeError") as info:
        await busy.load_state(str(ckpt))
    assert "\n" not in str(info.value)
    before.assert_unchanged()


def _meta_edits():
    def drop(key):
        def edit(meta):
            del meta[key]

        return edit

    def put(key, value):
        def edit(meta):
            meta[key] = value

        return edit

    def bad_adam(meta):
        meta["adam_params"]["learning_rate"] = -1.0

    def unknown_adam(meta):
        meta["adam_params"] = {"lr": 1e-3}

    return {
        "missing step": drop("step"),
        "missing parameters": drop("parameters"),
        "step is a string": put("step", "1"),
        "step is a bool": put("step", True),
        "parameters is a number": put("parameters", 7),
        "lora_rank is a string": put("lora_rank", "2"),
        "format version": put("format_version", 99),
        "files is a list": put("files", ["weights.safetensors"]),
        "negative learning rate": bad_adam,
        "unknown AdamParams field": unknown_adam,
    }


@pytest.mark.parametrize("edit", [*_meta_edits(), "truncated", "not an object", "not utf-8"])
async def test_a_damaged_state_file_is_a_one_line_backend_error_naming_it(
    trained_elsewhere: Path, busy: TrainingClient, edit: str
):
    state_file = trained_elsewhere / "tinkex_state.json"
    text = state_file.read_text()
    if edit == "truncated":
        state_file.write_text(text[: len(text) // 2])
    elif edit == "not an object":
        state_file.write_text("[1, 2]")
    elif edit == "not utf-8":
        state_file.write_bytes(b"\xff\xfe{}")
    else:
        meta = json.loads(text)
        _meta_edits()[edit](meta)
        state_file.write_text(json.dumps(meta))
    before = Snapshot(busy)
    with pytest.raises(BackendError) as info:
        await busy.load_state(str(trained_elsewhere))
    message = str(info.value)
    assert type(info.value) is BackendError
    assert str(state_file) in message and "\n" not in message
    before.assert_unchanged()


@pytest.mark.parametrize("damage", ["truncated", "truncated, old format", "header", "shape"])
async def test_a_damaged_weights_file_is_a_one_line_backend_error_naming_it(
    trained_elsewhere: Path, busy: TrainingClient, damage: str
):
    from safetensors.torch import load_file, save

    ckpt = trained_elsewhere
    data = (ckpt / "weights.safetensors").read_bytes()
    if damage == "truncated":
        rewrite(ckpt, "weights.safetensors", data[: len(data) // 2], record_size=False)
        expected = "is damaged: it has"
    elif damage == "truncated, old format":
        meta = json.loads((ckpt / "tinkex_state.json").read_text())
        del meta["files"]
        (ckpt / "tinkex_state.json").write_text(json.dumps(meta))
        rewrite(ckpt, "weights.safetensors", data[: len(data) - 100], record_size=False)
        expected = "is damaged: SafetensorError"
    elif damage == "header":
        rewrite(ckpt, "weights.safetensors", b"\xff" * 8 + data[8:])
        expected = "is damaged: SafetensorError"
    else:
        tensors = load_file(str(ckpt / "weights.safetensors"))
        name = sorted(tensors)[0]
        tensors[name] = torch.zeros(2, 2)
        rewrite(ckpt, "weights.safetensors", save(tensors))
        expected = f"parameter {name!r} has shape (2, 2)"
    before = Snapshot(busy)
    with pytest.raises(BackendError) as info:
        await busy.load_state(str(ckpt))
    message = str(info.value)
    assert str(ckpt / "weights.safetensors") in message and expected in message
    assert "\n" not in message
    before.assert_unchanged()


async def test_a_checkpoint_of_another_base_model_is_refused(
    trained_elsewhere: Path, tmp_path: Path
):
    async with await TrainingClient.create(seed=0) as tc:
        tc.backend.save_pretrained(tmp_path / "model")
    async with await TrainingClient.create(base_model=str(tmp_path / "model")) as tc:
        before = Snapshot(tc) if tc.backend._optimizer else None
        params = trainable_params(tc)
        with pytest.raises(
            BackendError, match=r"base_model='tiny' but this client has base_model="
        ):
            await tc.load_state(str(trained_elsewhere))
        assert before is None and tc.step == 0
        assert all(torch.equal(p, params[n]) for n, p in trainable_params(tc).items())


def _crash_after(monkeypatch: pytest.MonkeyPatch, directory_renames: int) -> None:
    """Let ``directory_renames`` renames of directories through, then fail every later one.

    Renames of files (the atomic writes inside the new checkpoint) are not counted.
    """
    done = 0

    def wrap(real):
        def rename(src, dst, *args, **kwargs):
            nonlocal done
            if Path(src).is_dir():
                done += 1
                if done > directory_renames:
                    raise OSError(errno.EIO, "simulated crash")
            return real(src, dst, *args, **kwargs)

        return rename

    monkeypatch.setattr(os, "replace", wrap(os.replace))
    monkeypatch.setattr(os, "rename", wrap(os.rename))


@pytest.mark.parametrize("renames_done", [0, 1])
async def test_a_crash_while_replacing_a_checkpoint_leaves_one_loadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, renames_done: int
):
    ckpt = tmp_path / "ckpt"
    async with await TrainingClient.create(seed=0) as tc:
        await train(tc, 1)
        await tc.save_state(str(ckpt))
        saved = trainable_params(tc)
        await train(tc, 1)
        with monkeypatch.context() as m:
            _crash_after(m, renames_done)
            with pytest.raises(OSError, match="simulated crash"):
                await tc.save_state(str(ckpt))
        if renames_done == 1:  # the old checkpoint is aside, the new one not yet in place
            assert not ckpt.exists() and (tmp_path / ".ckpt.old").is_dir()
        assert not [n for n in entries(tmp_path) if ".tmp-" in n]

    async with await TrainingClient.create(seed=5) as fresh:
        await fresh.load_state(str(ckpt))  # the API recovers, not only the CLI
        assert fresh.step == 1
        after = trainable_params(fresh)
        assert all(torch.equal(after[n], p) for n, p in saved.items())
        await train(fresh, 1)
        await fresh.save_state(str(ckpt))  # completes the interrupted replacement
        assert entries(tmp_path) == ["ckpt"]
    async with await TrainingClient.create(seed=6) as again:
        await again.load_state(str(ckpt))
        assert again.step == 2


async def test_an_incomplete_checkpoint_falls_back_to_the_one_set_aside(
    trained_elsewhere: Path, tmp_path: Path
):
    ckpt, aside = trained_elsewhere, tmp_path / ".ckpt.old"
    os.replace(ckpt, aside)
    ckpt.mkdir()  # what a crash half-way through deleting a damaged checkpoint can leave
    (ckpt / "tinkex_state.json").write_text((aside / "tinkex_state.json").read_text())
    async with await TrainingClient.create(seed=3) as tc:
        await tc.load_state(str(ckpt))
        assert tc.step == 1
        await train(tc, 1)
        await tc.save_state(str(ckpt))
    assert entries(tmp_path) == ["ckpt"]
    async with await TrainingClient.create(seed=3) as tc:
        await tc.load_state(str(ckpt))
        assert tc.step == 2


needs_proc = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


@needs_proc
async def test_checkpoint_files_are_0644_and_synced_before_and_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", _fd_path(fd)))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        events.append(("replace", os.fspath(src), os.fspath(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ckpt = tmp_path / "ckpt"
    async with await TrainingClient.create(seed=0) as tc:
        await train(tc, 1)
        await tc.save_state(str(ckpt))
        first = list(events)
        events.clear()
        await train(tc, 1)
        await tc.save_state(str(ckpt))  # over the existing one
        second = list(events)

    names = {"weights.safetensors", "optimizer.pt", "tinkex_state.json"}
    assert set(entries(ckpt)) == names
    for name in names:
        assert (ckpt / name).stat().st_mode & 0o777 == 0o644, name
    synced = {os.path.basename(e[1]).split(".tmp-")[0] for e in first if e[0] == "fsync"}
    assert {"." + n for n in names} <= synced  # every file, before its rename
    for events_ in (first, second):
        moves = [i for i, e in enumerate(events_) if e[0] == "replace" and e[2] == str(ckpt)]
        assert len(moves) == 1
        i = moves[0]
        assert os.path.basename(events_[i][1]).startswith(".ckpt.tmp-")
        assert ("fsync", str(tmp_path)) in events_[i + 1 :]  # the rename itself is durable
    aside = [e for e in second if e[0] == "replace" and e[1] == str(ckpt)]
    assert aside == [("replace", str(ckpt), str(tmp_path / ".ckpt.old"))]


@needs_proc
@pytest.mark.parametrize("writing", ["weights", "optimizer"])
async def test_a_full_disk_is_a_storage_error_and_leaves_no_temporary_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writing: str
):
    from tinkex import StorageError

    ckpt = tmp_path / "ckpt"
    async with await TrainingClient.create(seed=0) as tc:
        await train(tc, 1)
        await tc.save_state(str(ckpt))
        await train(tc, 1)
        with monkeypatch.context() as m:
            if writing == "weights":
                real_write_bytes = Path.write_bytes

                def write_bytes(self, data):
                    if self.name.startswith(".weights.safetensors.tmp-"):
                        real_write_bytes(self, data[: len(data) // 2])
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    return real_write_bytes(self, data)

                m.setattr(Path, "write_bytes", write_bytes)
            else:  # the real torch.save, whose writes fail half-way
                real_write = os.write

                def write(fd, data):
                    name = os.path.basename(_fd_path(fd))
                    if name.startswith(".optimizer.pt.tmp-") and os.fstat(fd).st_size > 1000:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    return real_write(fd, data)

                m.setattr(os, "write", write)
            with pytest.raises(StorageError, match="disk is full") as info:
                await tc.save_state(str(ckpt))
        assert info.value.errno == errno.ENOSPC and "\n" not in str(info.value)
        assert entries(tmp_path) == ["ckpt"]  # no .ckpt.tmp-*, no .ckpt.old
        assert entries(ckpt) == ["optimizer.pt", "tinkex_state.json", "weights.safetensors"]
    async with await TrainingClient.create(seed=0) as fresh:
        await fresh.load_state(str(ckpt))
        assert fresh.step == 1


async def test_training_float16_weights_is_refused_before_anything_changes():
    """Adam's eps (1e-8) rounds to 0 in float16: the second step used to be NaN."""
    data = [datum(list(b"half precision"))]
    async with await TrainingClient.create(seed=1, dtype="float16", device="cpu") as tc:
        await tc.forward_backward(data)
        before = [p.detach().clone() for p in tc.backend.model.parameters()]
        with pytest.raises(SpecError, match="float16 weights"):
            await tc.optim_step(AdamParams(learning_rate=1e-3))
        after = list(tc.backend.model.parameters())
        assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    async with await TrainingClient.create(
        seed=1, dtype="float16", device="cpu", lora_rank=2
    ) as tc:
        await tc.forward_backward(data)  # the adapter is float32: trains
        assert (await tc.optim_step(AdamParams(learning_rate=1e-3)))["step"] == 1.0
