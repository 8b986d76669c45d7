"""`tinkex train` with held-out evaluation, generation samples and a learning-rate schedule.

The runs go through the `tinkex` command in-process (click's CliRunner) on the tiny
embedded model with a handful of short steps, so each takes a few seconds. The
values are checked against hand recomputations: the held-out metrics through
`tinkex.compute_loss` on the checkpointed model, the completions by greedy
decoding of the same model, the learning rates by `tinkex.schedules`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner

import tinkex
from tinkex._cli import cli
from tinkex._config import build_regularizers, load_config
from tinkex._dataset import Renderer, batch_indices, eval_split, load_examples
from tinkex._loop import Callbacks, StopFlag, make_base_loss, prepare_data, run_training
from tinkex.schedules import learning_rate

CONFIG = """
[model]
device = "cpu"

[data]
limit = 24
max_length = 40

[loss]
reference = "initial_model"

[[regularizers]]
name = "kl"
as = "kl_ref"
weight = 0.2

[[regularizers]]
name = "l2"
weight = 0.01
reduction = "mean"

[optimizer]
learning_rate = 3e-3

[scheduler]
warmup_steps = 2
decay = "cosine"
min_lr_ratio = 0.1

[training]
steps = 6
batch_size = 4
checkpoint_every = 3

[eval]
fraction = 0.25
every = 2

[samples]
max_new_tokens = 12
"""

LRS = [0.0015, 0.003, None, 0.00165, None, 0.0003]  # hand values at steps 1, 2, 4, 6


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def train(*args: str):
    result = CliRunner().invoke(cli, ["train", *args], catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "run.toml"
    path.write_text(CONFIG, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def full(tmp_path_factory, config):
    """One uninterrupted 6-step run, shared by the tests that read it."""
    run = tmp_path_factory.mktemp("runs") / "full"
    result = train(str(config), "--out", str(run))
    assert result.exit_code == 0, result.output
    return run, result


def prepared(run: Path):
    """The run's data, split and rendered as the run did (the tiny model's tokenizer)."""
    from tinkex._backends.tiny import ByteTokenizer

    cfg = load_config(run / "config.toml")
    return cfg, prepare_data(cfg, ByteTokenizer(), load_examples(cfg))


# --------------------------------------------------------------------------- one run


def test_held_out_examples_are_never_trained_on(full):
    run, _ = full
    _, prep = prepared(run)
    train_idx, held_idx = eval_split(24, 0.25, seed=0)
    assert (prep.train_indices, prep.held_out_indices) == (train_idx, held_idx)
    assert len(held_idx) == 6 and len(prep.train) == 18
    trained = {
        train_idx[i] for step in range(1, 7) for i in batch_indices(step, 4, len(prep.train), 0)
    }
    assert trained and not trained & set(held_idx)
    # the run trained exactly those batches: their input tokens, step by step
    for rec in lines(run / "metrics.jsonl"):
        batch = batch_indices(rec["step"], 4, len(prep.train), 0)
        assert rec["metrics"]["tokens"] == sum(len(prep.train[i][0]) for i in batch)
    trainer = json.loads((run / "checkpoint" / "trainer.json").read_text())
    assert (trainer["examples"], trainer["eval_examples"]) == (18, 6)
    assert trainer["eval_sha256"]


def test_learning_rate_of_every_step_is_the_schedule(full):
    run, _ = full
    logged = [r["metrics"]["learning_rate"] for r in lines(run / "metrics.jsonl")]
    expected = [
        learning_rate(s, 3e-3, total_steps=6, warmup_steps=2, decay="cosine", min_lr_ratio=0.1)
        for s in range(1, 7)
    ]
    assert logged == expected
    for got, hand in zip(logged, LRS, strict=True):
        if hand is not None:
            assert got == pytest.approx(hand, rel=1e-12)


def test_eval_values_on_the_metrics_line_equal_a_recomputation(full):
    run, _ = full
    recs = lines(run / "metrics.jsonl")
    assert [r["step"] for r in recs if "eval" in r] == [2, 4, 6]
    held = recs[-1]["eval"]
    assert set(held) == {"base_loss", "loss_total", "terms"}
    assert set(held["terms"]) == {"kl_ref", "l2"}
    assert held["loss_total"] == pytest.approx(
        held["base_loss"] + 0.2 * held["terms"]["kl_ref"] + 0.01 * held["terms"]["l2"]
    )
    cfg, prep = prepared(run)

    async def recompute():
        async with await tinkex.TrainingClient.create(
            backend="local", base_model="tiny", device="cpu", seed=0
        ) as tc:
            plain = [
                tinkex.Datum(model_input=m, loss_fn_inputs={"target_tokens": t})
                for m, t, _ in prep.held_out
            ]
            reference = await tc.forward(plain)  # the initial model's
            await tc.load_state(str(run / "checkpoint" / "state"))  # the model after step 6
            data = [
                tinkex.Datum(
                    model_input=m,
                    loss_fn_inputs={
                        "target_tokens": t,
                        "weights": w,
                        "reference_logprobs": ref,
                        "original_logprobs": ref,
                    },
                )
                for (m, t, w), ref in zip(prep.held_out, reference, strict=True)
            ]
            logprobs = await tc.forward(data)
            return await tinkex.compute_loss(
                data, logprobs, make_base_loss("tokens"), regularizers=build_regularizers(cfg)
            )

    out = trio.run(recompute)
    assert held["base_loss"] == pytest.approx(out.base_loss.value, rel=1e-5)
    for name, reg in out.regularizers.items():
        assert held["terms"][name] == pytest.approx(reg.value, rel=1e-5, abs=1e-7)
    # mean NLL per response token, by hand
    import torch

    held_lps = _lps(run, prep)
    nll = -sum(
        float((lp * torch.tensor(w)).sum())
        for lp, (_, _, w) in zip(held_lps, prep.held_out, strict=True)
    )
    tokens = sum(sum(w) for _, _, w in prep.held_out)
    assert held["base_loss"] == pytest.approx(nll / tokens, rel=1e-5)


def _lps(run: Path, prep):
    async def go():
        async with await tinkex.TrainingClient.create(
            backend="local", base_model="tiny", device="cpu", seed=0
        ) as tc:
            await tc.load_state(str(run / "checkpoint" / "state"))
            data = [
                tinkex.Datum(model_input=m, loss_fn_inputs={"target_tokens": t})
                for m, t, _ in prep.held_out
            ]
            return await tc.forward(data)

    return trio.run(go)


def test_samples_file_summary_and_terminal(full):
    run, result = full
    cfg, prep = prepared(run)
    rows = lines(run / "samples.jsonl")
    prompts = prep.held_out_prompts[:3]  # the default: the first held-out prompts
    assert [(r["step"], r["prompt"]) for r in rows] == [
        (step, p) for step in (0, 2, 4, 6) for p in prompts
    ]
    assert all(set(r) == {"step", "prompt", "completion"} for r in rows)

    from tinkex._backends.tiny import ByteTokenizer
    from tinkex._sampling import greedy_completions

    async def complete():
        async with await tinkex.TrainingClient.create(
            backend="local", base_model="tiny", device="cpu", seed=0
        ) as tc:
            renderer = Renderer.for_config(cfg, ByteTokenizer())
            before = await greedy_completions(tc, prompts, renderer, max_new_tokens=12)
            await tc.load_state(str(run / "checkpoint" / "state"))
            after = await greedy_completions(tc, prompts, renderer, max_new_tokens=12)
            return before, after

    before, after = trio.run(complete)
    assert [r["completion"] for r in rows[:3]] == before  # step 0: the initial model
    assert [r["completion"] for r in rows[-3:]] == after  # step 6: the checkpointed one
    assert before != after

    summary = json.loads((run / "summary.json").read_text())
    recs = lines(run / "metrics.jsonl")
    evals = {r["step"]: r["eval"] for r in recs if "eval" in r}
    best = min(evals, key=lambda s: evals[s]["base_loss"])
    assert summary["eval"] == {
        "evaluations": 3,
        "last": {"step": 6, **evals[6]},
        "best": {"step": best, **evals[best]},
    }
    assert summary["samples"] == {
        "step": 6,
        "samples": [{"prompt": p, "completion": c} for p, c in zip(prompts, after, strict=True)],
    }
    out = result.stdout
    assert f"eval base_loss {evals[6]['base_loss']:.4f} at step 6" in out
    assert "3 evaluations" in out and "samples at step 6 (greedy):" in out
    assert f"  {prompts[0]} -> " in out
    assert "samples.jsonl" in out
    assert "eval: 6 examples held out" in result.stderr
    assert "lr 0.003 cosine to 0.0003, warmup 2" in result.stderr

    report = CliRunner().invoke(cli, ["report", "--no-plots", str(run)])
    assert report.exit_code == 0, report.output
    assert f"eval base_loss {evals[6]['base_loss']:.4f} at step 6" in report.output
    assert "samples at step 6 (greedy):" in report.output


# --------------------------------------------------------------------------- resume


def test_resume_continues_eval_samples_and_schedule_without_duplicates(full, config, tmp_path):
    run_full, _ = full
    run = tmp_path / "stopped"
    cfg = load_config(config)
    stop = StopFlag()

    def after(record):
        if record.step == 3:
            stop.set()

    result = trio.run(
        lambda: run_training(
            cfg,
            run,
            load_examples(cfg),
            build_regularizers(cfg),
            stop=stop,
            callbacks=Callbacks(on_step=after),
        )
    )
    assert (result.stopped, result.last_step, result.checkpoint_step) == ("interrupted", 3, 3)
    # a later session that died after writing step 4 (and half a line)
    full_metrics = (run_full / "metrics.jsonl").read_text().splitlines()
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write(full_metrics[3] + "\n" + full_metrics[4][:30])
    with (run / "samples.jsonl").open("a") as fh:
        fh.write(json.dumps({"step": 4, "prompt": "p", "completion": "c"}) + '\n{"step": 4, "pro')

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "repaired ...: its last line was cut short"
        resumed = train("--resume", str(run), "-q")
    assert resumed.exit_code == 0, resumed.output

    got, want = lines(run / "metrics.jsonl"), lines(run_full / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert [r["metrics"]["learning_rate"] for r in got] == [
        r["metrics"]["learning_rate"] for r in want
    ]
    assert [r["step"] for r in got if "eval" in r] == [2, 4, 6]
    for a, b in zip(got, want, strict=True):
        assert a["output"]["loss_total"] == pytest.approx(b["output"]["loss_total"], rel=1e-4)
        if "eval" in b:
            assert a["eval"]["base_loss"] == pytest.approx(b["eval"]["base_loss"], rel=1e-4)
    samples, samples_full = lines(run / "samples.jsonl"), lines(run_full / "samples.jsonl")
    assert [(r["step"], r["prompt"]) for r in samples] == [
        (r["step"], r["prompt"]) for r in samples_full
    ]
    assert samples == samples_full  # greedy: the same completions, none twice, none missing

    # the held-out set is part of what a resume checks
    changed = train("--resume", str(run), "--steps", "8", "--set", "eval.fraction=0.5")
    assert changed.exit_code == 2
    assert "the held-out eval set" in changed.output and "--force" in changed.output


# --------------------------------------------------------------------------- chat format


def test_chat_format_end_to_end_on_a_model_directory_with_a_chat_template(tmp_path):
    from tests.test_data import chat_tokenizer
    from tinkex._backends.tiny import build_tiny_model

    tokenizer = chat_tokenizer()
    model_dir = tmp_path / "chat-model"
    model = build_tiny_model(
        0, vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "chat.jsonl"
    rows = [
        {"prompt": "what is 2 + 2 ?", "response": "4"},
        {"prompt": "reverse abc", "response": "cba"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 4), encoding="utf-8")
    config = tmp_path / "chat.toml"
    config.write_text(
        f"""
[model]
base_model = "{model_dir}"
device = "cpu"
[data]
path = "{data}"
format = "chat"
max_length = 32
[optimizer]
learning_rate = 1e-2
[training]
steps = 2
batch_size = 4
checkpoint_every = 0
[samples]
prompts = ["what is 2 + 2 ?"]
max_new_tokens = 4
""",
        encoding="utf-8",
    )
    run = tmp_path / "run"
    result = train(str(config), "--out", str(run), "-q")
    assert result.exit_code == 0, result.output
    assert "chat template" not in result.output  # no fallback warning

    renderer = Renderer(tokenizer, format="chat")
    examples = [renderer.encode(r["prompt"], r["response"], 32) for r in rows * 4]
    for rec in lines(run / "metrics.jsonl"):
        batch = batch_indices(rec["step"], 4, len(examples), 0)
        assert rec["metrics"]["tokens"] == sum(len(examples[i][0]) for i in batch)
    samples = lines(run / "samples.jsonl")
    assert [(r["step"], r["prompt"]) for r in samples] == [
        (0, "what is 2 + 2 ?"),
        (2, "what is 2 + 2 ?"),
    ]
    vocab = set(tokenizer.get_vocab())
    for r in samples:  # decoded words of the vocabulary, special tokens skipped
        assert set(r["completion"].split()) <= vocab - {"<|im_start|>", "<|im_end|>", "</s>"}


# --------------------------------------------------------------------------- no local model


class NoModelBackend:
    """The local backend behind the protocol only: no `.model` (as on Tinker)."""

    name = "nomodel"

    def __init__(self, inner):
        self._inner = inner

    @property
    def tokenizer(self):
        return self._inner.tokenizer

    @property
    def step(self):
        return self._inner.step

    async def forward(self, data):
        return await self._inner.forward(data)

    async def forward_backward(self, data, loss_fn):
        return await self._inner.forward_backward(data, loss_fn)

    async def optim_step(self, params):
        return await self._inner.optim_step(params)

    async def save_state(self, path):
        return await self._inner.save_state(path)

    async def load_state(self, path):
        return await self._inner.load_state(path)

    async def aclose(self):
        await self._inner.aclose()


async def _no_model_factory(**kwargs):
    from tinkex._backends.local import LocalBackend

    return NoModelBackend(await LocalBackend.create(**kwargs))


def test_a_backend_without_a_local_model_warns_once_and_still_evaluates(config, tmp_path):
    import tinkex.testing

    run = tmp_path / "run"
    with tinkex.testing.register_regularizers(backends={"nomodel": _no_model_factory}):
        with pytest.warns(UserWarning, match=r"no samples: .*'nomodel' backend has none") as got:
            result = train(
                str(config), "--out", str(run), "--backend", "nomodel", "--steps", "2", "-q"
            )
        assert result.exit_code == 0, result.output
        assert len([w for w in got if "no samples" in str(w.message)]) == 1
        assert not (run / "samples.jsonl").exists()
        assert [r["step"] for r in lines(run / "metrics.jsonl") if "eval" in r] == [2]
        # dtype and gguf_file are the local backend's: refused before anything starts
        bad = train(
            str(config),
            "--out",
            str(tmp_path / "bad"),
            "--backend",
            "nomodel",
            "--set",
            "model.dtype=bfloat16",
        )
    assert bad.exit_code == 2
    assert "model.dtype = 'bfloat16' applies to the local backend only" in bad.output
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (
            ["eval.fraction=0.99", "data.limit=2"],
            "eval.fraction = 0.99 of 2 example(s) holds out 2",
        ),
        (["eval.path=held.jsonl"], "eval.fraction (0.25) and eval.path"),
        (["scheduler.decay=exponential"], "scheduler.decay must be one of"),
        (["scheduler.warmup_steps=-1"], "scheduler.warmup_steps must be >= 0, got -1"),
        (["eval.fraction=1.0"], "eval.fraction must be > 0 and < 1, got 1.0"),
    ],
)
def test_bad_new_keys_exit_2_in_one_line_and_write_nothing(config, tmp_path, sets, needle):
    run = tmp_path / "run"
    args = [str(config), "--out", str(run)]
    for item in sets:
        args += ["--set", item]
    for extra in ([], ["--dry-run"]):
        result = train(*args, *extra)
        assert result.exit_code == 2, result.output
        assert needle in result.output and result.output.count("\n") == 1, result.output
        assert not run.exists()


def test_an_eval_file_with_no_usable_example_is_refused(config, tmp_path):
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"prompt": "x" * 80, "response": "y"}) + "\n", encoding="utf-8")
    own = tmp_path / "own.toml"
    own.write_text(
        config.read_text().replace("fraction = 0.25", f"path = '{held}'"), encoding="utf-8"
    )
    run = tmp_path / "run"
    for extra in ([], ["--dry-run"]):
        result = train(str(own), "--out", str(run), *extra)
        assert result.exit_code == 2, result.output
        assert "eval.path: no example fits data.max_length = 40 tokens" in result.output
    assert not run.exists()


def test_dry_run_covers_eval_and_schedule(config):
    result = train(str(config), "--dry-run", "--set", "samples.prompts=['hi']")
    assert result.exit_code == 0, result.output
    import tomllib

    resolved = tomllib.loads(result.stdout)
    assert resolved["eval"] == {"fraction": 0.25, "every": 2, "batch_size": 32}
    assert resolved["scheduler"] == {"warmup_steps": 2, "decay": "cosine", "min_lr_ratio": 0.1}
    assert resolved["samples"] == {"prompts": ["hi"], "max_new_tokens": 12}
    assert "ok: 18 examples" in result.stderr and "eval: 6 held out" in result.stderr
    assert "lr 0.003 cosine to 0.0003, warmup 2 (step 1: 0.0015, step 6: 0.0003)" in result.stderr


def test_a_forced_resume_never_pairs_reference_logprobs_with_other_examples(config, tmp_path):
    """The checkpoint's reference rows belong to the run's examples, by position."""
    run = tmp_path / "run"
    assert train(str(config), "--out", str(run), "--steps", "3", "-q").exit_code == 0
    changed = train("--resume", str(run), "--steps", "4", "--set", "eval.fraction=0.5", "--force")
    assert changed.exit_code == 2, changed.output
    assert "even with --force" in changed.output and "reference" in changed.output
    assert len(lines(run / "metrics.jsonl")) == 3  # nothing was written


def test_dry_run_checks_the_base_model_it_would_load(config):
    result = train(str(config), "--dry-run", "--set", 'model.base_model="smollm2"')
    assert result.exit_code == 2
    assert "did you mean the known model 'smollm2-135m-instruct'" in result.output


async def test_samples_stop_at_once_when_asked_and_give_nothing_cut_short():
    from tinkex._sampling import greedy_completions

    async with await tinkex.TrainingClient.create(base_model="tiny", device="cpu") as tc:
        renderer = Renderer(tc.tokenizer)
        asked = []

        def should_stop() -> bool:  # a Ctrl-C after the third token
            asked.append(1)
            return len(asked) > 3

        got = await greedy_completions(
            tc, ["Reverse: milk"], renderer, max_new_tokens=400, should_stop=should_stop
        )
        assert got is None and len(asked) < 10  # not the 400 tokens asked for
        full = await greedy_completions(tc, ["Reverse: milk"], renderer, max_new_tokens=5)
        assert isinstance(full, list) and len(full) == 1


def test_examples_dropped_from_the_eval_file_are_counted(tmp_path):
    held = tmp_path / "held.jsonl"
    rows = [{"prompt": f"Capital {i}?", "response": "Paris"} for i in range(3)]
    rows.append({"prompt": "x" * 200, "response": "too long for max_length"})
    held.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f'[data]\nmax_length = 40\n\n[eval]\npath = "{held.as_posix()}"\n', encoding="utf-8"
    )
    result = train(str(cfg), "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"eval: 3 examples from {held} (1 dropped)" in result.output
