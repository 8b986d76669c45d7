"""The embedded default model: a tiny random-initialised Llama and a byte-level tokenizer.

``TrainingClient.create(base_model="tiny")`` builds these locally, so tinkex can
train, test and benchmark offline with nothing to download. The model is a real
``transformers.LlamaForCausalLM`` (2 layers, hidden size 64, 4 heads, no dropout),
initialised from ``seed``; the tokenizer maps each UTF-8 byte to its own id and
adds three special tokens.

Saved with ``save_pretrained(dir)`` (model and tokenizer into the same
directory), the pair loads back through the ordinary local-directory path:
``from_pretrained(dir, local_files_only=True)`` for the model, and
:func:`load_tokenizer`, which recognises :data:`TOKENIZER_FILE` and otherwise
falls back to ``transformers.AutoTokenizer``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .._errors import BackendError
from .._files import atomic_write_text

__all__ = [
    "TOKENIZER_FILE",
    "ByteTokenizer",
    "build_tiny_model",
    "load_tokenizer",
    "tiny_config",
]

#: The file our byte-level tokenizer is saved to; :func:`load_tokenizer` looks for it.
TOKENIZER_FILE = "tinkex_tokenizer.json"

_TOKENIZER_TYPE = "tinkex-byte"


class ByteTokenizer:
    """A byte-level tokenizer: ids 0-255 are the UTF-8 bytes, then pad, bos and eos.

    ``encode(text)`` prepends ``bos`` (like Llama's tokenizers; pass
    ``add_special_tokens=False`` to leave it out); ``decode(ids)`` drops the
    special tokens unless ``skip_special_tokens=False``. Invalid UTF-8 decodes
    with replacement characters, never an error.
    """

    pad_token_id: int = 256
    bos_token_id: int = 257
    eos_token_id: int = 258
    vocab_size: int = 259

    pad_token = "<pad>"
    bos_token = "<s>"
    eos_token = "</s>"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The token ids of ``text``: its UTF-8 bytes, after ``bos`` when ``add_special_tokens``."""
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids`` (a list or a 1-d tensor).

        Raises:
            ValueError: an id is outside ``[0, vocab_size)``.
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        out = bytearray()
        names = {
            self.pad_token_id: self.pad_token,
            self.bos_token_id: self.bos_token,
            self.eos_token_id: self.eos_token,
        }
        for raw in ids:
            i = int(raw)
            if 0 <= i < 256:
                out.append(i)
            elif i in names:
                if not skip_special_tokens:
                    out.extend(names[i].encode())
            else:
                raise ValueError(
                    f"token id {i} is outside the byte tokenizer's vocabulary [0, {self.vocab_size})"
                )
        return out.decode("utf-8", errors="replace")

    def __call__(
        self, text: str | Sequence[str], add_special_tokens: bool = True
    ) -> dict[str, Any]:
        """HF-style call: ``{"input_ids": ids}`` (a list of lists for a list of texts)."""
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens)}
        return {"input_ids": [self.encode(t, add_special_tokens) for t in text]}

    def __len__(self) -> int:
        return self.vocab_size

    def save_pretrained(self, directory: str | os.PathLike[str]) -> list[str]:
        """Write :data:`TOKENIZER_FILE` into ``directory`` (created if needed); returns the paths written."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        target = path / TOKENIZER_FILE
        atomic_write_text(
            target,
            json.dumps(
                {
                    "type": _TOKENIZER_TYPE,
                    "version": 1,
                    "pad_token_id": self.pad_token_id,
                    "bos_token_id": self.bos_token_id,
                    "eos_token_id": self.eos_token_id,
                    "vocab_size": self.vocab_size,
                },
                indent=2,
            )
            + "\n",
        )
        return [str(target)]

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> ByteTokenizer:
        """Load a tokenizer saved by :meth:`save_pretrained`.

        Raises:
            BackendError: the file is missing or is not a tinkex byte tokenizer.
        """
        target = Path(directory) / TOKENIZER_FILE
        try:
            meta = json.loads(target.read_text())
        except (OSError, ValueError) as exc:
            raise BackendError(f"cannot read the byte tokenizer at {str(target)!r}: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("type") != _TOKENIZER_TYPE:
            raise BackendError(
                f'{str(target)!r} is not a tinkex byte tokenizer (expected "type": {_TOKENIZER_TYPE!r})'
            )
        return cls()

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


def tiny_config(**overrides: Any) -> Any:
    """The ``transformers.LlamaConfig`` of the tiny model; keyword arguments override fields."""
    from transformers import LlamaConfig

    tok = ByteTokenizer
    fields: dict[str, Any] = {
        "vocab_size": tok.vocab_size,
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 1024,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "initializer_range": 0.1,
    }
    fields.update(overrides)
    return LlamaConfig(**fields)


def build_tiny_model(seed: int = 0, **config_overrides: Any) -> Any:
    """A freshly initialised tiny ``LlamaForCausalLM`` in float32, in eval mode.

    The same ``seed`` gives the same weights; the global torch RNG is left as it was.
    """
    import torch
    from transformers import LlamaForCausalLM

    config = tiny_config(**config_overrides)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.to(torch.float32)
    model.eval()  # no dropout anyway; eval keeps a forward deterministic
    return model


def load_tokenizer(directory: str | os.PathLike[str]) -> Any:
    """The tokenizer saved in a local model directory, or ``None`` when it has none.

    Our :class:`ByteTokenizer` when :data:`TOKENIZER_FILE` is there; otherwise
    ``transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)``.
    A directory without tokenizer files gives ``None``: training on token ids
    works without one.
    """
    path = Path(directory)
    if (path / TOKENIZER_FILE).is_file():
        return ByteTokenizer.from_pretrained(path)
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((path / name).is_file() for name in tokenizer_files):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many types here
        raise BackendError(f"cannot load the tokenizer in {str(path)!r}: {exc}") from exc
