"""Training data: prompt/response pairs -> tokens with masked prompts -> batches.

:func:`sft_datums` is the public helper (``tinkex.sft_datums``): it turns
``(prompt, response)`` pairs into :class:`tinkex.Datum` s whose ``weights`` count
only the response tokens, the way ``tinkex train`` does. The rest serves the
main job: reading the JSONL data file, rendering prompts (:class:`Renderer`: a
plain template or the tokenizer's chat template), the held-out split and the
batch order (pure functions of the seed, so a resumed run continues exactly),
and the file's content hash that a resume checks.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._errors import ConfigError, SpecError
from ._files import decode_utf8
from ._rules import describe

__all__ = [
    "Renderer",
    "batch_indices",
    "encode_pair",
    "eval_split",
    "file_sha256",
    "has_chat_template",
    "load_eval_examples",
    "load_examples",
    "load_pairs",
    "sft_datums",
    "tokenize_examples",
    "tokenize_pairs",
]

#: one tokenized example: (model_input, target_tokens, weights)
Example = tuple[list[int], list[int], list[float]]


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
    """The ``(prompt, response)`` pairs of a ``tinkex train`` config's ``[data]``
    section, prompts as written (a :class:`Renderer` applies the template or the
    chat template when they are tokenized; see :func:`load_pairs`)."""
    d = cfg.data
    return load_pairs(
        cfg.data_path,
        prompt_field=d.prompt_field,
        response_field=d.response_field,
        limit=d.limit,
    )


def load_eval_examples(cfg: Any) -> list[tuple[str, str]] | None:
    """The pairs of ``[eval] path`` (same fields as ``[data]``, no limit), or
    ``None`` when the config has no eval file.

    Raises:
        ConfigError: as :func:`load_pairs`, the message naming ``eval.path``.
    """
    path = cfg.eval_path
    if path is None:
        return None
    d = cfg.data
    try:
        return load_pairs(path, prompt_field=d.prompt_field, response_field=d.response_field)
    except ConfigError as exc:
        raise ConfigError(f"eval.path: {exc}") from None


def eval_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train, held_out)`` indices of ``n`` examples, ``fraction`` of them held out.

    ``k = max(1, floor(fraction * n + 0.5))`` examples are held out, chosen by
    ``seed`` alone (``random.Random(f"tinkex-eval:{seed}").sample(range(n), k)``);
    both lists are in increasing order and together are ``range(n)``.

    Raises:
        ConfigError: nothing would be left to train on.
    """
    k = max(1, math.floor(fraction * n + 0.5))
    if k >= n:
        raise ConfigError(
            f"eval.fraction = {fraction!r} of {n} example(s) holds out {k}, leaving none to "
            f"train on; lower eval.fraction or add examples"
        )
    held = sorted(random.Random(f"tinkex-eval:{seed}").sample(range(n), k))
    chosen = set(held)
    return [i for i in range(n) if i not in chosen], held


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


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` can render chats: ``apply_chat_template`` and a ``chat_template``."""
    return bool(getattr(tokenizer, "chat_template", None)) and callable(
        getattr(tokenizer, "apply_chat_template", None)
    )


#: stands in for a response when the chat template is rendered to find what follows one
_RESPONSE_MARK = "TINKEXRESPONSEMARK"


def _assistant_end(tokenizer: Any) -> str:
    """The text the chat template puts after an assistant message's content (its
    end-of-turn token(s)), trailing whitespace dropped; ``""`` when it puts none."""
    messages = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": _RESPONSE_MARK},
    ]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that cannot render this: fall back to EOS
        return ""
    if not isinstance(text, str) or _RESPONSE_MARK not in text:
        return ""
    return text[text.rindex(_RESPONSE_MARK) + len(_RESPONSE_MARK) :].rstrip()


class Renderer:
    """How prompts and responses become token ids for one tokenizer.

    ``format="plain"``: the prompt is ``template.format(prompt=...)`` encoded
    with the tokenizer's special tokens (e.g. BOS); the response is encoded
    without them and followed by EOS.

    ``format="chat"``: the prompt is the single user message rendered by the
    tokenizer's chat template with the generation prompt,
    ``apply_chat_template([{"role": "user", "content": prompt}],
    add_generation_prompt=True, tokenize=False)``, encoded without adding
    special tokens (the template writes its own); the response is encoded
    followed by the text the template puts after an assistant message (its
    end-of-turn token(s), e.g. ``<|im_end|>``; EOS when it puts none). A
    tokenizer without a chat template (the tiny model's byte tokenizer) keeps
    the plain template, and a warning says so once.

    Attributes:
        chat: whether the chat template is used.
        end_text: what follows a response in chat format (``""`` in plain format).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        format: str = "plain",
        template: str = "{prompt}",
        warn: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.chat = format == "chat" and has_chat_template(tokenizer)
        if format == "chat" and not self.chat and warn:
            warnings.warn(
                f"data.format = 'chat' but the tokenizer ({type(tokenizer).__name__}) has no "
                f"chat template; prompts use data.template ({template!r}) instead",
                stacklevel=2,
            )
        self.end_text = _assistant_end(tokenizer) if self.chat else ""

    @classmethod
    def for_config(cls, cfg: Any, tokenizer: Any, *, warn: bool = True) -> Renderer:
        """The renderer of a ``tinkex train`` config's ``[data]`` section."""
        return cls(tokenizer, format=cfg.data.format, template=cfg.data.template, warn=warn)

    def prompt_text(self, prompt: str) -> str:
        """The prompt as the model sees it (before tokenization)."""
        if self.chat:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            return str(text)
        return self.template.format(prompt=prompt)

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's token ids: what a response is generated after."""
        return _encode(self.tokenizer, self.prompt_text(prompt), specials=not self.chat)

    def response_ids(self, response: str) -> list[int]:
        """The response's token ids, end-of-turn (chat) or EOS included."""
        if self.chat and self.end_text:
            return _encode(self.tokenizer, response + self.end_text, specials=False)
        ids = _encode(self.tokenizer, response, specials=False)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return [*ids, int(eos)] if eos is not None else ids

    def stop_ids(self) -> list[int]:
        """Token ids that end a generated response: EOS, and in chat format the
        first token of the end-of-turn text."""
        out = []
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None:
            out.append(int(eos))
        if self.chat and self.end_text:
            first = _encode(self.tokenizer, self.end_text, specials=False)[:1]
            out += [i for i in first if i not in out]
        return out

    def encode(self, prompt: str, response: str, max_length: int) -> Example | None:
        """``(model_input, target_tokens, weights)`` of one pair, or ``None`` if nothing is left.

        The sequence is :meth:`prompt_ids` + :meth:`response_ids`, cut to
        ``max_length + 1`` tokens; ``model_input = tokens[:-1]``, ``target_tokens
        = tokens[1:]``, and ``weights`` is 1 where the target is a response token
        (EOS or end-of-turn included), 0 where it is part of the prompt. ``None``
        when the cut leaves no response token.
        """
        p = self.prompt_ids(prompt)
        tokens = (p + self.response_ids(response))[: max_length + 1]
        if len(tokens) <= len(p) or len(tokens) < 2:
            return None
        targets = tokens[1:]
        # target t is tokens[t + 1]: a response token when t + 1 >= len(p)
        weights = [1.0 if t + 1 >= len(p) else 0.0 for t in range(len(targets))]
        return tokens[:-1], targets, weights


def encode_pair(
    tokenizer: Any, prompt: str, response: str, max_length: int
) -> tuple[list[int], list[int], list[float]] | None:
    """``(model_input, target_tokens, weights)`` of one pair, or ``None`` if nothing is left.

    The sequence is ``encode(prompt)`` (with the tokenizer's special tokens, e.g.
    BOS) + ``encode(response)`` + EOS, cut to ``max_length + 1`` tokens;
    ``model_input = tokens[:-1]``, ``target_tokens = tokens[1:]``, and ``weights``
    is 1 where the target is a response token or EOS, 0 where it is part of the
    prompt. ``None`` when the cut leaves no response token. (``prompt`` is used
    as given: :class:`Renderer` with ``template="{prompt}"``.)
    """
    return Renderer(tokenizer).encode(prompt, response, max_length)


def _check_tokenizer(tokenizer: Any, max_length: int, context_length: int | None) -> None:
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


def tokenize_examples(
    pairs: Sequence[tuple[str, str]],
    renderer: Renderer,
    max_length: int,
    *,
    context_length: int | None = None,
    what: str = "data",
) -> tuple[list[Example], list[int]]:
    """Tokenise pairs with ``renderer``; return the examples and the indices (into
    ``pairs``) of the pairs they come from (the dropped ones are missing).

    Raises:
        ConfigError: no tokenizer; ``max_length`` beyond the model's
            ``context_length``; every example dropped (``what`` names the set:
            ``"data"`` or ``"eval.path"``).
    """
    _check_tokenizer(renderer.tokenizer, max_length, context_length)
    out, kept = [], []
    for i, (prompt, response) in enumerate(pairs):
        example = renderer.encode(prompt, response, max_length)
        if example is not None:
            out.append(example)
            kept.append(i)
    if not out:
        where = "" if what == "data" else f"{what}: "
        raise ConfigError(
            f"{where}no example fits data.max_length = {max_length} tokens with at least one "
            f"response token; raise data.max_length"
        )
    return out, kept


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
    _check_tokenizer(tokenizer, max_length, context_length)
    examples, kept = tokenize_examples(
        pairs, Renderer(tokenizer), max_length, context_length=context_length
    )
    return examples, len(pairs) - len(kept)


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
