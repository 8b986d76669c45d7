"""The local backend: the tiny model and byte tokenizer, model directories, batching, LoRA, devices."""

from __future__ import annotations

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


async def test_missing_directory_fails_fast_naming_it(tmp_path: Path, monkeypatch):
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("from_pretrained must not be reached")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    missing = tmp_path / "no-such-model"
    start = time.perf_counter()
    with pytest.raises(BackendError, match=r"no-such-model.*never downloads"):
        await TrainingClient.create(base_model=str(missing))
    with pytest.raises(BackendError, match="'Qwen/Qwen3-8B'"):
        await TrainingClient.create(base_model="Qwen/Qwen3-8B")
    assert time.perf_counter() - start < 1.0
    with pytest.raises(BackendError, match="no config.json"):
        await TrainingClient.create(base_model=str(tmp_path))


async def test_bad_arguments():
    with pytest.raises(SpecError, match="lora_rank must be a positive int"):
        await LocalBackend.create(lora_rank=0)
    with pytest.raises(SpecError, match="unknown argument.*'temperature'"):
        await LocalBackend.create(temperature=1.0)


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
