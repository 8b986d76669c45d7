"""Training data: prompt/response pairs -> tokens with masked prompts -> batches.

:func:`sft_datums` is the public helper (``tinkex.sft_datums``): it turns
``(prompt, response)`` pairs into :class:`tinkex.Datum` s whose ``weights`` count
only the response tokens, the way ``tinkex train`` does. The rest serves the
main job: reading the JSONL data file, the batch order (a pure function of the
seed and the step, so a resumed run continues exactly), and the file's content
hash that a resume checks.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._errors import ConfigError, SpecError
from ._files import decode_utf8
from ._rules import describe

__all__ = [
    "batch_indices",
    "encode_pair",
    "file_sha256",
    "load_examples",
    "load_pairs",
    "sft_datums",
    "tokenize_pairs",
]


def load_pairs(
    path: Path,
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    template: str = "{prompt}",
    limit: int | None = None,
) -> list[tuple[str, str]]:
    """Read a JSONL file of objects into ``(template.format(prompt=...), response)`` pairs.

    Raises:
        ConfigError: one line naming the file (and line) when the file is
            missing, unreadable, not UTF-8, a line is not a JSON object, a field is
            missing or not a string, or there is no example.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"data file not found: {path} (a relative path in a config file resolves "
            f"against the file's directory, one given with --set against the current one)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read data file {path}: {exc.strerror or exc}") from None
    text = decode_utf8(raw, path, ConfigError, "save the data file as UTF-8")
    pairs: list[tuple[str, str]] = []
    # split on newlines only: JSON strings may hold U+2028, U+0085 and friends raw
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ConfigError(
                f"{path}:{lineno}: each line must be a JSON object, got {describe(row)}"
            )
        for key in (prompt_field, response_field):
            if not isinstance(row.get(key), str):
                raise ConfigError(
                    f"{path}:{lineno}: field {key!r} missing or not a string "
                    f"(fields are named by data.prompt_field / data.response_field)"
                )
        pairs.append((template.format(prompt=row[prompt_field]), row[response_field]))
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs:
        raise ConfigError(f"data file {path} has no examples")
    return pairs


def load_examples(cfg: Any) -> list[tuple[str, str]]:
    """The pairs of a ``tinkex train`` config's ``[data]`` section (see :func:`load_pairs`)."""
    d = cfg.data
    return load_pairs(
        cfg.data_path,
        prompt_field=d.prompt_field,
        response_field=d.response_field,
        template=d.template,
        limit=d.limit,
    )


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex), to notice a data file that changed."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- tokens


def _encode(tokenizer: Any, text: str, *, specials: bool) -> list[int]:
    try:
        ids = tokenizer.encode(text, add_special_tokens=specials)
    except TypeError:  # a tokenizer without the keyword
        ids = tokenizer.encode(text)
    return [int(i) for i in ids]


def encode_pair(
    tokenizer: Any, prompt: str, response: str, max_length: int
) -> tuple[list[int], list[int], list[float]] | None:
    """``(model_input, target_tokens, weights)`` of one pair, or ``None`` if nothing is left.

    The sequence is ``encode(prompt)`` (with the tokenizer's special tokens, e.g.
    BOS) + ``encode(response)`` + EOS, cut to ``max_length + 1`` tokens;
    ``model_input = tokens[:-1]``, ``target_tokens = tokens[1:]``, and ``weights``
    is 1 where the target is a response token or EOS, 0 where it is part of the
    prompt. ``None`` when the cut leaves no response token.
    """
    p = _encode(tokenizer, prompt, specials=True)
    r = _encode(tokenizer, response, specials=False)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        r = [*r, int(eos)]
    tokens = (p + r)[: max_length + 1]
    if len(tokens) <= len(p) or len(tokens) < 2:
        return None
    targets = tokens[1:]
    # target t is tokens[t + 1]: a response token when t + 1 >= len(p)
    weights = [1.0 if t + 1 >= len(p) else 0.0 for t in range(len(targets))]
    return tokens[:-1], targets, weights


def tokenize_pairs(
    pairs: Sequence[tuple[str, str]],
    tokenizer: Any,
    max_length: int,
    *,
    context_length: int | None = None,
) -> tuple[list[tuple[list[int], list[int], list[float]]], int]:
    """Tokenise pairs with :func:`encode_pair`; return the examples and how many were dropped.

    Raises:
        ConfigError: no tokenizer; ``max_length`` beyond the model's
            ``context_length`` (positions it was built for); every example dropped.
    """
    if tokenizer is None or not hasattr(tokenizer, "encode"):
        raise ConfigError(
            "the model has no tokenizer; use a model directory that includes one, "
            'or base_model = "tiny"'
        )
    if context_length is not None and max_length > context_length:
        raise ConfigError(
            f"data.max_length = {max_length} is longer than the model's context of "
            f"{context_length} positions; set data.max_length <= {context_length}"
        )
    out, dropped = [], 0
    for prompt, response in pairs:
        example = encode_pair(tokenizer, prompt, response, max_length)
        if example is None:
            dropped += 1
        else:
            out.append(example)
    if not out:
        raise ConfigError(
            f"no example fits data.max_length = {max_length} tokens with at least one response "
            f"token; raise data.max_length"
        )
    return out, dropped


def sft_datums(
    pairs: Sequence[tuple[str, str]],
    tokenizer: Any,
    *,
    max_length: int,
    context_length: int | None = None,
) -> list[Any]:
    """Supervised fine-tuning data: one :class:`tinkex.Datum` per ``(prompt, response)`` pair.

    Each datum holds ``model_input`` and ``loss_fn_inputs`` ``target_tokens`` and
    ``weights``, with the prompt masked out (weight 0) and the response plus EOS
    counted (weight 1), as Tinker's cross-entropy expects. Sequences longer than
    ``max_length`` tokens are cut from the end; a pair left with no response token
    is dropped.

    Args:
        pairs: ``(prompt, response)`` strings; apply any chat or prompt template first.
        tokenizer: anything with ``encode(text, add_special_tokens=...)`` and
            ``eos_token_id`` (a Hugging Face tokenizer, ``tc.tokenizer``).
        max_length: the longest sequence, in tokens.
        context_length: the model's positions, when known; a larger ``max_length``
            is refused.

    Raises:
        SpecError: no tokenizer, ``max_length`` beyond ``context_length``, or no
            pair left.
    """
    from ._types import Datum

    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise SpecError(f"max_length must be an int >= 2, got {describe(max_length)}")
    examples, _ = tokenize_pairs(pairs, tokenizer, max_length, context_length=context_length)
    return [
        Datum(model_input=m, loss_fn_inputs={"target_tokens": t, "weights": w})
        for m, t, w in examples
    ]


# --------------------------------------------------------------------------- batches


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The example indices of ``step`` (1-based): consecutive slices of a stream of
    per-epoch shuffles, so the order depends only on ``(seed, step)``."""
    start = (step - 1) * batch_size
    out = []
    perms: dict[int, list[int]] = {}
    for g in range(start, start + batch_size):
        epoch, i = divmod(g, n)
        perm = perms.get(epoch)
        if perm is None:
            perm = list(range(n))
            random.Random(f"tinkex-data:{seed}:{epoch}").shuffle(perm)
            perms[epoch] = perm
        out.append(perm[i])
    return out
