"""The local backend: a transformers causal LM trained in this process.

``base_model="tiny"`` builds the embedded tiny Llama (:mod:`tinkex._backends.tiny`);
any other value is a local Hugging Face model directory, loaded with
``from_pretrained(path, local_files_only=True)`` (never the hub). ``lora_rank``
wraps the model in a peft LoRA adapter, and only the adapter is trained.

All model work (forwards, backwards, optimizer steps, checkpoint I/O) runs in a
Trio worker thread, one hop per operation, so the Trio loop stays responsive.
Operations must not overlap: :class:`tinkex.TrainingClient` serialises them.

Sequences of different lengths are batched with right padding and an
attention mask; a causal model's logprobs for the real tokens are then the
same as for each sequence alone (position ids start at 0 for every row).
"""

from __future__ import annotations

import json
import math
import os
import shutil
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
    """Right-padded token ids, targets and weights of a list of data."""

    input_ids: torch.Tensor  # [B, T] int64
    targets: torch.Tensor  # [B, T] int64 (0 where padded)
    attention_mask: torch.Tensor | None  # [B, T] int64, None when no row is padded
    lengths: tuple[int, ...]
    weights: torch.Tensor | None  # [B, T] float32 (0 where padded), when requested


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
        SpecError: empty data, an empty sequence, a missing ``target_tokens``, a length
            mismatch, or a token id outside the model's vocabulary.
    """
    if len(data) == 0:
        raise SpecError("data must contain at least one Datum, got an empty list")
    ids_rows: list[list[int]] = []
    target_rows: list[torch.Tensor] = []
    weight_rows: list[torch.Tensor] = []
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
        targets = targets.reshape(-1)
        if targets.numel() != len(ids):
            raise SpecError(
                f"data[{i}]: target_tokens has {targets.numel()} elements but model_input has "
                f"{len(ids)} tokens; they must match"
            )
        ids_rows.append(ids)
        target_rows.append(targets.to(device))
        if weights:
            w = loss_input(datum, "weights", dtype=torch.float32)
            if w is None:
                w = torch.full((len(ids),), float(default_weight))
            w = w.reshape(-1)
            if w.numel() != len(ids):
                raise SpecError(
                    f"data[{i}]: weights has {w.numel()} elements but model_input has "
                    f"{len(ids)} tokens; they must match"
                )
            weight_rows.append(w.to(device))
    lengths = tuple(len(r) for r in ids_rows)
    width = max(lengths)
    pad = torch.nn.utils.rnn.pad_sequence
    input_ids = torch.tensor([r + [0] * (width - len(r)) for r in ids_rows], dtype=torch.int64)
    input_ids = input_ids.to(device)
    targets_t = pad(target_rows, batch_first=True)
    weights_t = pad(weight_rows, batch_first=True) if weights else None
    # one range check for the whole batch (padding is 0, a valid id)
    if (
        int(input_ids.min()) < 0
        or int(input_ids.max()) >= vocab_size
        or (int(targets_t.min()) < 0 or int(targets_t.max()) >= vocab_size)
    ):
        for i, (ids, tgt) in enumerate(zip(ids_rows, target_rows, strict=True)):
            for x in (*ids, *tgt.tolist()):
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
        lengths=lengths,
        weights=weights_t,
    )


async def _in_thread(what: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a Trio worker thread; unexpected errors become :class:`BackendError`.

    The call is not cancellable half-way (Trio waits for the thread), so model
    state is never left half-updated. Our own typed errors pass through.
    """
    try:
        return await trio.to_thread.run_sync(fn)
    except TinkexError:
        raise
    except Exception as exc:
        raise BackendError(f"local backend {what} failed: {type(exc).__name__}: {exc}") from exc


def _target_logprobs(model: Any, batch: _Batch) -> torch.Tensor:
    """[B, T] float32 log-probabilities of each target token (garbage where padded)."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    logits = out.logits.float()
    picked = logits.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _split(lp: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
    return [lp[row, :k] for row, k in enumerate(lengths)]


# --------------------------------------------------------------------------- fused pass


class GraphForward:
    """A forward pass that kept its autograd graph, waiting for the composed gradient.

    ``logprobs`` are detached per-datum views (safe to hand to a loss); call
    :meth:`backward` once with d(loss)/d(logprobs), or :meth:`discard` to drop the
    graph without touching any gradient.
    """

    def __init__(self, batch: _Batch, lp: torch.Tensor) -> None:
        self._lengths = batch.lengths
        self._lp: torch.Tensor | None = lp
        self.logprobs: list[torch.Tensor] = _split(lp.detach(), batch.lengths)

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
        if len(grads) != len(self._lengths):
            raise SpecError(
                f"expected {len(self._lengths)} logprob gradients (one per datum), got {len(grads)}"
            )
        for row, (k, g) in enumerate(zip(self._lengths, grads, strict=True)):
            if g.numel() != k:
                raise SpecError(f"logprob gradient {row} has {g.numel()} elements, expected {k}")
        self._lp = None

        def run() -> None:
            rows = [g.reshape(-1).to(device=lp.device, dtype=lp.dtype) for g in grads]
            # [B, T] like lp, zeros where padded (pad_sequence pads to the longest = T)
            full = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
            lp.backward(full)

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
        tokenizer: the tokenizer (``None`` for a model directory without one).
        device: the torch device the model lives on.
        step: the number of optimizer steps taken.
    """

    name = "local"
    supports_fused = True

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: torch.device,
        *,
        base_model: str,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.base_model = base_model
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self.step = 0
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._named_params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self._vocab_size = int(model.get_input_embeddings().weight.shape[0])
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
        dtype: torch.dtype | str | None = None,
        **unknown: Any,
    ) -> LocalBackend:
        """Build or load the model (in a worker thread) and return the backend.

        Args:
            base_model: ``"tiny"`` for the embedded tiny Llama, or a local Hugging Face
                model directory.
            device: ``"auto"`` (cuda, then mps, then cpu), or a torch device.
            lora_rank: when given, train a peft LoRA adapter of this rank on all linear
                layers (the base weights are frozen).
            seed: seeds the tiny model's initialisation and the adapter's.
            lora_alpha: LoRA scaling numerator (default: ``lora_rank``, a scale of 1).
            dtype: load a model directory in this dtype (default: as saved).

        Raises:
            BackendError: the directory does not exist or is not a model, the device is
                unavailable, or the model cannot be loaded.
            SpecError: a bad ``lora_rank`` or an unknown keyword argument.
        """
        if unknown:
            raise SpecError(
                f"unknown argument(s) for the local backend: {', '.join(map(repr, sorted(unknown)))}; "
                f"it accepts base_model, device, lora_rank, seed, lora_alpha, dtype"
            )
        if lora_rank is not None and (
            isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1
        ):
            raise SpecError(f"lora_rank must be a positive int or None, got {lora_rank!r}")
        if not isinstance(base_model, (str, os.PathLike)):
            raise SpecError(
                f"base_model must be 'tiny' or a model directory path, got {base_model!r}"
            )
        dev = resolve_device(device)
        base_model = os.fspath(base_model)
        _check_model_dir(base_model)  # a stat or two: fail fast, before any thread hop
        alpha = (
            float(lora_alpha)
            if lora_alpha is not None
            else (float(lora_rank) if lora_rank else None)
        )

        def build() -> LocalBackend:
            if base_model == "tiny":
                from .tiny import ByteTokenizer, build_tiny_model

                model = build_tiny_model(seed)
                tokenizer: Any = ByteTokenizer()
            else:
                model, tokenizer = _load_directory(Path(base_model).expanduser(), dtype)
            if lora_rank is not None:  # on the CPU: the same adapter init on every device
                model = _wrap_lora(model, lora_rank, alpha, seed)
            model.to(dev)
            model.eval()
            return cls(
                model, tokenizer, dev, base_model=base_model, lora_rank=lora_rank, lora_alpha=alpha
            )

        return await _in_thread("model loading", build)

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write the model (or, with LoRA, the adapter) and the tokenizer with ``save_pretrained``.

        A full model saved this way is a valid ``base_model`` for a new client.
        Runs on the calling thread (it is blocking I/O).
        """
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
                return _split(_target_logprobs(self.model, batch), batch.lengths)

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

        ``weights`` defaults to 1 for every token of a datum that has none.

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
            return _split(lp.detach(), batch.lengths), value

        logprobs, value = await _in_thread("forward_backward", run)
        return logprobs, {"loss:sum": value}

    # ----------------------------------------------------------------- optimizer

    def _optimizer_for(self, params: AdamParams) -> torch.optim.AdamW:
        group = {
            "lr": float(params.learning_rate),
            "betas": (float(params.beta1), float(params.beta2)),
            "eps": float(params.eps),
            "weight_decay": float(params.weight_decay),
        }
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
            grads = [p.grad for p in self._params if p.grad is not None]
            if not grads:
                return {
                    "grad_norm": 0.0,
                    "grad_norm_clipped": 0.0,
                    "learning_rate": float(params.learning_rate),
                    "step": float(self.step),
                }
            with torch.no_grad():
                norm = float(_total_norm(grads))
                if not math.isfinite(norm):
                    for p in self._params:
                        p.grad = None
                    raise BackendError(
                        f"gradient norm is {norm}; the optimizer step was skipped and the accumulated "
                        f"gradients were dropped (lower the learning rate or check the loss)"
                    )
                clipped = norm
                max_norm = float(params.grad_clip_norm)
                if max_norm > 0 and norm > max_norm:  # as torch.nn.utils.clip_grad_norm_
                    coef = max_norm / (norm + 1e-6)
                    torch._foreach_mul_(grads, coef)
                    clipped = norm * coef
                opt = self._optimizer_for(params)
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

        Atomic: everything is written into a temporary sibling directory which is then
        renamed into place; an existing checkpoint at ``path`` is replaced only once the
        new one is complete. Returns the path.

        Raises:
            BackendError: ``path`` exists and is neither an empty directory nor a tinkex
                checkpoint (nothing there is touched), or writing failed.
        """

        def run() -> str:
            target = Path(path).expanduser().absolute()
            from safetensors.torch import save_file

            if target.exists() and not (
                target.is_dir() and ((target / _STATE_FILE).is_file() or not any(target.iterdir()))
            ):
                raise BackendError(
                    f"{os.fspath(target)!r} exists and is not a tinkex checkpoint; refusing to "
                    f"replace it (choose a new path, or remove it first)"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                tensors = {
                    n: p.detach().to("cpu").contiguous().clone()
                    for n, p in self._named_params.items()
                }
                save_file(tensors, os.fspath(tmp / _WEIGHTS_FILE))
                if self._optimizer is not None:
                    torch.save(self._optimizer.state_dict(), tmp / _OPTIMIZER_FILE)
                meta = {
                    "format_version": _FORMAT_VERSION,
                    "backend": self.name,
                    "base_model": self.base_model,
                    "lora_rank": self.lora_rank,
                    "lora_alpha": self.lora_alpha,
                    "step": self.step,
                    "adam_params": None if self._adam is None else attrs.asdict(self._adam),
                    "parameters": sorted(self._named_params),
                }
                (tmp / _STATE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
                _fsync_dir(tmp)
                old = None
                if target.exists():
                    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
                    os.rename(target, old)
                os.rename(tmp, target)
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return os.fspath(target)

        return await _in_thread("save_state", run)

    async def load_state(self, path: str | os.PathLike[str]) -> None:
        """Restore weights, optimizer state and step saved by :meth:`save_state`.

        Everything is read and checked before anything is changed; accumulated
        gradients are dropped.

        Raises:
            BackendError: no checkpoint at ``path``, or it belongs to a different model
                (other parameter names or shapes, other LoRA rank).
        """

        def run() -> None:
            source = Path(path).expanduser()
            from safetensors.torch import load_file

            from .._training import AdamParams

            state_file = source / _STATE_FILE
            if not state_file.is_file():
                raise BackendError(
                    f"no tinkex checkpoint at {os.fspath(source)!r} (missing {_STATE_FILE})"
                )
            meta = json.loads(state_file.read_text())
            if meta.get("lora_rank") != self.lora_rank:
                raise BackendError(
                    f"checkpoint {os.fspath(source)!r} has lora_rank={meta.get('lora_rank')!r} but this "
                    f"client has lora_rank={self.lora_rank!r}; create the client with the same lora_rank"
                )
            tensors = load_file(os.fspath(source / _WEIGHTS_FILE))
            missing = sorted(set(self._named_params) - set(tensors))
            extra = sorted(set(tensors) - set(self._named_params))
            if missing or extra:
                raise BackendError(
                    f"checkpoint {os.fspath(source)!r} does not match this model: "
                    f"missing {missing[:5]}, unexpected {extra[:5]}"
                )
            for name, p in self._named_params.items():
                if tuple(tensors[name].shape) != tuple(p.shape):
                    raise BackendError(
                        f"checkpoint {os.fspath(source)!r}: parameter {name!r} has shape "
                        f"{tuple(tensors[name].shape)}, the model has {tuple(p.shape)}"
                    )
            adam = AdamParams(**meta["adam_params"]) if meta.get("adam_params") else None
            opt_state = None
            if (source / _OPTIMIZER_FILE).is_file():
                opt_state = torch.load(
                    source / _OPTIMIZER_FILE, map_location=self.device, weights_only=True
                )
            # everything read and checked: apply
            with torch.no_grad():
                for name, p in self._named_params.items():
                    p.copy_(tensors[name].to(device=p.device, dtype=p.dtype))
                    p.grad = None
            self._optimizer = None
            self._adam = None
            if adam is not None:
                opt = self._optimizer_for(adam)
                if opt_state is not None:
                    opt.load_state_dict(opt_state)
            self.step = int(meta.get("step", 0))

        await _in_thread("load_state", run)


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of ``grads`` (one fused pass where torch has it)."""
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if get_total_norm is not None:
        return get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def _fsync_dir(path: Path) -> None:
    for child in path.iterdir():
        with open(child, "rb") as fh:
            os.fsync(fh.fileno())


def _check_model_dir(base_model: str) -> None:
    """Raise BackendError at once (no hub access) unless ``base_model`` is "tiny" or a model directory."""
    if base_model == "tiny":
        return
    path = os.path.expanduser(base_model)
    if not os.path.isdir(path):
        raise BackendError(
            f"base_model {base_model!r} is neither 'tiny' nor an existing local model directory; "
            f"the local backend never downloads: pass a directory saved with save_pretrained()"
        )
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise BackendError(
            f"base_model directory {base_model!r} has no config.json; "
            f"it is not a Hugging Face model directory"
        )


def _load_directory(path: Path, dtype: torch.dtype | str | None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    from .tiny import load_tokenizer

    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(os.fspath(path), **kwargs)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ...
        raise BackendError(f"cannot load a causal LM from {os.fspath(path)!r}: {exc}") from exc
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
