"""The Tinker backend: train on the Tinker service through the official ``tinker`` SDK.

Install the SDK with ``pip install 'tinkex[tinker]'`` and set ``TINKER_API_KEY``.
Without either, :meth:`TinkerBackend.create` raises :class:`tinkex.BackendError`
at once, saying which is missing; nothing touches the network.

The SDK's calls return futures whose ``.result()`` blocks; every such call runs
in a Trio worker thread, never on the Trio loop. Data cross the boundary
through :func:`to_tinker_datum` / :func:`from_tinker_datum` (both ways, exact,
shapes kept: top-K ``target_tokens`` of shape ``(N, K)`` stay ``(N, K)``, and so
do the logprobs the service returns for them, see :func:`from_tinker_output`).

The service rejects loss inputs its loss does not take, so a request carries
only the inputs of the chosen built-in loss (:data:`LOSS_FN_INPUTS`), as the
SDK's own ``forward_backward_custom`` does; every other input (``mask``,
``reference_logprobs``, ...) stays on this side, where the composed loss's
terms still read it from the caller's data.

Only the linearized custom-loss method works here (the service keeps the
graph, not us): forward, compose locally, then a weighted cross-entropy
``forward_backward`` with ``weights = -d(loss)/d(logprobs)``. The alternative
that plugs into the SDK's own ``forward_backward_custom`` is
``tinkex.Pipeline(...).as_loss_fn()`` (see ``docs/training.md``).
"""

from __future__ import annotations

import importlib
import inspect
import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import trio

from .._errors import BackendError, SpecError
from .._inputs import loss_input, model_input_ints
from .._types import Datum

if TYPE_CHECKING:
    from .._training import AdamParams

__all__ = [
    "DEFAULT_LORA_RANK",
    "LOSS_FN_INPUTS",
    "STEP_METADATA_KEY",
    "LossInputs",
    "TinkerBackend",
    "from_tinker_datum",
    "from_tinker_output",
    "to_tinker_adam_params",
    "to_tinker_datum",
]

#: The LoRA rank used when ``lora_rank`` is None (the SDK's own default).
DEFAULT_LORA_RANK = 32

_INSTALL_HINT = "pip install 'tinkex[tinker]'"

#: The checkpoint ``user_metadata`` key where :meth:`TinkerBackend.save_state` records ``step``.
STEP_METADATA_KEY = "tinkex_step"

_UNFETCHED: Any = object()  # the tokenizer has not been asked for yet


def _import_sdk() -> Any | None:
    try:
        return importlib.import_module("tinker")
    except ImportError:
        return None


# --------------------------------------------------------------------------- loss inputs


class LossInputs(NamedTuple):
    """The ``loss_fn_inputs`` a built-in Tinker loss takes.

    Attributes:
        required: the inputs it cannot run without (checked here, before any request).
        optional: the inputs it also reads when a datum has them.
    """

    required: frozenset[str]
    optional: frozenset[str] = frozenset()

    @property
    def accepted(self) -> frozenset[str]:
        """Every input the loss takes: what a request for it may carry."""
        return self.required | self.optional


_RL = frozenset({"target_tokens", "logprobs", "advantages"})
_CLIP = frozenset({"clip_low_threshold", "clip_high_threshold"})

#: The loss inputs of each built-in Tinker loss (``tinker.types.LossFnType``, SDK 0.38.0).
#:
#: The SDK has no such table; this one comes from its documentation:
#:
#: - ``cross_entropy``: ``target_tokens``, ``weights`` (Tinker docs, "Loss functions",
#:   https://tinker-docs.thinkingmachines.ai/losses, *Input tensors*; and the SDK's
#:   ``TrainingClient.forward_backward_custom`` docstring: a custom loss "receives every
#:   ``loss_fn_inputs`` field, but only ``target_tokens`` and ``weights`` are sent").
#: - ``importance_sampling``, ``ppo``, ``cispo``, ``dro``: ``target_tokens``, ``logprobs``
#:   (the sampler's), ``advantages`` (same page, *Input tensors*; the loss-functions
#:   tutorial's "Required loss_fn_inputs" table). ``weights`` is optional: the docs' RL
#:   datum example (https://tinker-docs.thinkingmachines.ai/tinker/losses) sends it
#:   with ``importance_sampling``.
#: - ``gspo``: the RL inputs plus ``sequence_ratio_mask``
#:   (https://tinker-docs.thinkingmachines.ai/tinker/losses/gspo).
#: - ``clip_low_threshold`` / ``clip_high_threshold``: the SDK's ``tinker.Datum`` knows
#:   them as loss inputs (``tinker/types/datum.py``, ``_KEY_TO_TYPE``) though the docs
#:   show them as ``loss_fn_config``; a datum that carries them is meant for a clipped
#:   loss (``ppo``, ``cispo``, ``gspo``), so those send them rather than drop them.
#:
#: ``stable_reinforce`` (alpha; its API may change) and ``custom`` (a server-side
#: ``LossHandle``) are left out on purpose, like any name not listed here: their data
#: go to the service as given.
LOSS_FN_INPUTS: dict[str, LossInputs] = {
    "cross_entropy": LossInputs(frozenset({"target_tokens", "weights"})),
    "importance_sampling": LossInputs(_RL, frozenset({"weights"})),
    "ppo": LossInputs(_RL, frozenset({"weights"}) | _CLIP),
    "cispo": LossInputs(_RL, frozenset({"weights"}) | _CLIP),
    "dro": LossInputs(_RL, frozenset({"weights"})),
    "gspo": LossInputs(_RL, frozenset({"weights", "sequence_ratio_mask"}) | _CLIP),
}


# --------------------------------------------------------------------------- conversions


def to_tinker_datum(datum: Any, *, default_weight: float | None = None) -> Any:
    """A ``tinker.Datum`` with the same tokens and loss inputs (``tinker.Datum`` passes through).

    Every loss input keeps its shape and values: top-K ``target_tokens`` of shape
    ``(N, K)`` stay ``(N, K)``, and so do their ``weights`` (``(N,)`` weights stay ``(N,)``).
    Integer inputs become ``int64``, floating ones ``float32`` (Tinker's two dtypes).

    Args:
        datum: a :class:`tinkex.Datum` (or a ``tinker.Datum``, returned as is unless a
            default weight must be added).
        default_weight: when given and the datum has no ``weights``, add weights of this
            value with the shape of its ``target_tokens`` (``(N,)`` or ``(N, K)``; Tinker's
            cross-entropy wants them).

    Raises:
        BackendError: the Tinker SDK is not installed.
    """
    tinker = _require_sdk()
    if isinstance(datum, tinker.Datum):
        if default_weight is None or "weights" in datum.loss_fn_inputs:
            return datum
        inputs = dict(datum.loss_fn_inputs)
        inputs["weights"] = _full(tinker, _target_shape(datum), default_weight)
        return _tinker_datum(tinker, datum, datum.model_input, inputs)
    mi = getattr(datum, "model_input", None)
    model_input = (
        mi
        if isinstance(mi, tinker.ModelInput)
        else tinker.ModelInput.from_ints(model_input_ints(datum))
    )
    inputs: dict[str, Any] = {}
    for key in datum.loss_fn_inputs:
        inputs[key] = _tensor_data(tinker, loss_input(datum, key))
    if default_weight is not None and "weights" not in inputs:
        inputs["weights"] = _full(tinker, _target_shape(datum), default_weight)
    return tinker.Datum(model_input=model_input, loss_fn_inputs=inputs)


def from_tinker_datum(datum: Any) -> Datum:
    """A :class:`tinkex.Datum` with the tokens and loss inputs of a ``tinker.Datum``.

    Loss inputs become tensors (``TensorData.to_torch()``: ``int64`` or ``float32``) of
    the same shape: top-K ``target_tokens`` ``(N, K)`` stay ``(N, K)``.
    """
    return Datum(
        model_input=model_input_ints(datum),
        loss_fn_inputs={k: loss_input(datum, k) for k in datum.loss_fn_inputs},
    )


def from_tinker_output(output: Any) -> list[torch.Tensor]:
    """The per-datum ``logprobs`` of a ``tinker.ForwardBackwardOutput`` as float32 tensors.

    Each keeps its ``TensorData.shape``: ``(N,)`` for ``(N,)`` target tokens, ``(N, K)``
    for top-K ``(N, K)`` ones.

    Raises:
        BackendError: an output has no ``logprobs``.
    """
    out = []
    for i, record in enumerate(output.loss_fn_outputs):
        td = record.get("logprobs")
        if td is None:
            raise BackendError(
                f"the Tinker service returned no 'logprobs' for datum {i} (got keys {sorted(record)})"
            )
        tensor = td.to_torch() if hasattr(td, "to_torch") else torch.as_tensor(td)
        shape = getattr(td, "shape", None)
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            tensor = tensor.reshape(tuple(int(n) for n in shape))
        out.append(tensor.to(torch.float32))
    return out


def to_tinker_adam_params(params: AdamParams) -> Any:
    """The ``tinker.AdamParams`` with the same hyper-parameters."""
    tinker = _require_sdk()
    return tinker.AdamParams(
        learning_rate=float(params.learning_rate),
        beta1=float(params.beta1),
        beta2=float(params.beta2),
        eps=float(params.eps),
        weight_decay=float(params.weight_decay),
        grad_clip_norm=float(params.grad_clip_norm),
    )


def _require_sdk() -> Any:
    tinker = _import_sdk()
    if tinker is None:
        raise BackendError(f"the Tinker SDK is not installed; install it with `{_INSTALL_HINT}`")
    return tinker


# --------------------------------------------------------------------------- backend


class TinkerBackend:
    """Drives a ``tinker.TrainingClient`` (a LoRA training run on the Tinker service).

    Create it with :meth:`create`; :class:`tinkex.TrainingClient` drives it. Every
    blocking SDK call (``future.result()``, the tokenizer fetch, checkpoint look-ups)
    runs in a worker thread.

    Attributes:
        client: the SDK's ``TrainingClient`` (or a test double with the same methods).
        step: optimizer steps taken (restored by :meth:`load_state`).
    """

    name = "tinker"

    def __init__(
        self,
        client: Any,
        *,
        service_client: Any = None,
        base_model: str | None = None,
        tokenizer: Any = _UNFETCHED,
        rest_client: Any = None,
    ) -> None:
        """Wrap an SDK training client; prefer :meth:`create`, which also fetches the tokenizer.

        Built directly, call ``await backend.fetch_tokenizer()`` before reading
        :attr:`tokenizer` (or pass ``tokenizer=``).
        """
        self.client = client
        self.service_client = service_client
        self.base_model = base_model
        self.step = 0
        self._tokenizer: Any = tokenizer
        self._rest_client = rest_client
        self._saved_steps: dict[str, int] = {}

    @classmethod
    async def create(
        cls,
        *,
        base_model: str = "tiny",
        device: Any = "auto",
        lora_rank: int | None = None,
        seed: int = 0,
        api_key: str | None = None,
        base_url: str | None = None,
        training_client: Any = None,
        rest_client: Any = None,
        **unknown: Any,
    ) -> TinkerBackend:
        """Check the SDK and the API key, create a LoRA training client, fetch the tokenizer.

        The tokenizer (``get_tokenizer()``, which may download) is fetched here, in a
        worker thread, so reading :attr:`tokenizer` later never blocks the Trio loop.

        Args:
            base_model: the service's model name, e.g. ``"Qwen/Qwen3-8B"``.
            device: ignored (the service decides); accepted so the signature matches ``local``.
            lora_rank: LoRA rank (default :data:`DEFAULT_LORA_RANK`).
            seed: the adapter's initialisation seed.
            api_key: the Tinker API key (default: the ``TINKER_API_KEY`` environment variable).
            base_url: the service URL (default: the SDK's).
            training_client: an existing ``tinker.TrainingClient`` (or a test double) to
                drive instead of creating one; skips the key check.
            rest_client: the ``tinker.RestClient`` :meth:`load_state` reads checkpoint
                metadata with (default: one over the training client's connection).

        Raises:
            BackendError: the SDK is not installed (``pip install 'tinkex[tinker]'``), no
                API key is set (``TINKER_API_KEY``), or the service refused.
            SpecError: an unknown keyword argument or a bad ``lora_rank``.
        """
        if unknown:
            raise SpecError(
                f"unknown argument(s) for the tinker backend: {', '.join(map(repr, sorted(unknown)))}; it accepts "
                f"base_model, device, lora_rank, seed, api_key, base_url, training_client, rest_client"
            )
        if training_client is not None:
            backend = cls(training_client, base_model=base_model, rest_client=rest_client)
            await backend.fetch_tokenizer()
            return backend
        sdk = _import_sdk()
        key = api_key or os.environ.get("TINKER_API_KEY")
        missing = []
        if sdk is None:
            missing.append(f"install the Tinker SDK with `{_INSTALL_HINT}`")
        if not key:
            missing.append("set the TINKER_API_KEY environment variable (or pass api_key=...)")
        if missing:
            raise BackendError(f"the tinker backend is not usable: {' and '.join(missing)}")
        if base_model == "tiny":
            raise BackendError(
                "base_model='tiny' is the local backend's embedded model; for backend='tinker' pass a "
                "model the service offers, e.g. base_model='Qwen/Qwen3-8B'"
            )
        rank = DEFAULT_LORA_RANK if lora_rank is None else lora_rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise SpecError(f"lora_rank must be a positive int or None, got {lora_rank!r}")

        def connect() -> tuple[Any, Any]:
            service = sdk.ServiceClient(api_key=key, base_url=base_url)
            client = service.create_lora_training_client(
                base_model=base_model, rank=rank, seed=seed
            ).result()
            return service, client

        try:
            service, client = await trio.to_thread.run_sync(connect)
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(
                f"could not create a Tinker training client for {base_model!r}: {exc}"
            ) from exc
        backend = cls(
            client, service_client=service, base_model=base_model, rest_client=rest_client
        )
        await backend.fetch_tokenizer()
        return backend

    @property
    def tokenizer(self) -> Any:
        """The service model's tokenizer, as fetched by :meth:`fetch_tokenizer` (``None`` if unavailable).

        Never fetches: reading it never blocks the Trio loop.

        Raises:
            BackendError: the tokenizer was never fetched (a backend built directly,
                not with :meth:`create`).
        """
        if self._tokenizer is _UNFETCHED:
            raise BackendError(
                "the Tinker tokenizer has not been fetched: `await backend.fetch_tokenizer()` "
                "first (TinkerBackend.create does it)"
            )
        return self._tokenizer

    async def fetch_tokenizer(self) -> Any:
        """Fetch ``client.get_tokenizer()`` in a worker thread, once; returns it (``None`` if unavailable)."""
        if self._tokenizer is _UNFETCHED:
            self._tokenizer = await trio.to_thread.run_sync(_get_tokenizer, self.client)
        return self._tokenizer

    async def _call(self, what: str, fn: Any, *args: Any, quiet: bool = False) -> Any:
        """Run ``fn(*args).result()`` in a worker thread; SDK errors become BackendError.

        ``quiet`` silences the SDK's FutureWarnings (deprecations) for this call.
        """

        def run() -> Any:
            if not quiet:
                return fn(*args).result()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                return fn(*args).result()

        try:
            return await trio.to_thread.run_sync(run)
        except (BackendError, SpecError):
            raise
        except Exception as exc:
            raise BackendError(f"Tinker {what} failed: {type(exc).__name__}: {exc}") from exc

    async def forward(self, data: Sequence[Any]) -> list[torch.Tensor]:
        """Per-datum target-token logprobs from the service (no gradients).

        Sent as the SDK's ``forward_backward_custom`` sends its forward: a ``cross_entropy``
        forward carrying only ``target_tokens`` and ``weights`` (zeros where a datum has
        none). The logprobs have the shape of each datum's ``target_tokens``: ``(N,)``,
        or ``(N, K)`` for top-K targets.
        """
        tdata = _convert(data, "cross_entropy", default_weight=0.0)
        out = await self._call("forward", self.client.forward, tdata, "cross_entropy")
        return _check_outputs(from_tinker_output(out), tdata)

    async def forward_backward(
        self, data: Sequence[Any], loss_fn: str = "cross_entropy"
    ) -> tuple[list[torch.Tensor], dict[str, float]]:
        """The service's ``forward_backward`` (gradients accumulate there until ``optim_step``).

        For a built-in loss of :data:`LOSS_FN_INPUTS` each datum carries only the inputs
        that loss takes (the service rejects others; ``mask``, ``reference_logprobs``, ...
        stay here), and one lacking a required input is refused before anything is sent.
        ``cross_entropy`` adds weights of 1 (the targets' shape) where a datum has none,
        and repeats ``(N,)`` weights over the K targets of ``(N, K)`` top-K targets. Any
        other loss name (``stable_reinforce``, ``custom``, a newer SDK's losses) is
        sent with each datum's inputs exactly as given.

        Raises:
            SpecError: ``loss_fn`` is not a non-empty string, a datum has no
                ``target_tokens``, or it lacks an input the loss requires.
            BackendError: the service refused or failed.
        """
        if not isinstance(loss_fn, str) or not loss_fn:
            raise SpecError(
                f"loss_fn must be a Tinker loss name such as 'cross_entropy', got {loss_fn!r}"
            )
        tdata = _convert(data, loss_fn, default_weight=1.0 if loss_fn == "cross_entropy" else None)
        out = await self._call("forward_backward", self.client.forward_backward, tdata, loss_fn)
        metrics = {str(k): float(v) for k, v in (getattr(out, "metrics", None) or {}).items()}
        return _check_outputs(from_tinker_output(out), tdata), metrics

    async def optim_step(self, params: AdamParams) -> dict[str, float]:
        """The service's AdamW step; returns its metrics (plus ``learning_rate`` and ``step``)."""
        response = await self._call(
            "optim_step", self.client.optim_step, to_tinker_adam_params(params)
        )
        self.step += 1
        metrics = {str(k): float(v) for k, v in (getattr(response, "metrics", None) or {}).items()}
        metrics.setdefault("learning_rate", float(params.learning_rate))
        metrics["step"] = float(self.step)
        return metrics

    async def save_state(self, path: str) -> str:
        """Save a service-side checkpoint named ``path``; returns its ``tinker://`` path.

        ``step`` goes with it, as the checkpoint's ``user_metadata``
        (:data:`STEP_METADATA_KEY`), where the SDK supports that.
        """
        name, step = str(path), self.step
        save = self.client.save_state
        if _accepts(save, "user_metadata"):
            metadata = {STEP_METADATA_KEY: str(step)}
            response = await self._call(
                "save_state", lambda n: save(n, user_metadata=metadata), name
            )
        else:
            response = await self._call("save_state", save, name)
        where = str(getattr(response, "path", name) or name)
        self._saved_steps[where] = step
        return where

    async def load_state(self, path: str) -> None:
        """Load weights, optimizer state and ``step`` from a ``tinker://`` checkpoint path.

        ``step`` is the one recorded by :meth:`save_state`: remembered for checkpoints
        this backend saved, otherwise read from the checkpoint's ``user_metadata``
        through the REST API before anything is loaded. A checkpoint that records no
        step (saved without tinkex) loads with ``step = 0`` and a warning.

        Raises:
            BackendError: the service refused, or the checkpoint's metadata could not be
                read (nothing was loaded then).
        """
        where = str(path)
        step = self._saved_steps.get(where)
        if step is None:
            step = await self._recorded_step(where)
        # the SDK marks this method deprecated (FutureWarning) but it is the one that
        # restores optimizer state on an existing client
        await self._call("load_state", self.client.load_state_with_optimizer, where, quiet=True)
        if step is None:
            warnings.warn(
                f"Tinker checkpoint {where!r} records no tinkex step (it was not saved by "
                f"tinkex's save_state); step restarts at 0",
                UserWarning,
                stacklevel=2,
            )
            step = 0
        self.step = step

    async def _recorded_step(self, path: str) -> int | None:
        """The step :meth:`save_state` recorded in the checkpoint's ``user_metadata``, or None.

        None also when there is no REST client to ask or ``path`` is not a ``tinker://`` path.

        Raises:
            BackendError: the look-up failed, or the recorded value is not a step.
        """
        run_id = _training_run_id(path)
        if run_id is None:
            return None

        def lookup() -> str | None:
            rest = self._rest()
            if rest is None:
                return None
            response = rest.list_checkpoints(run_id).result()
            for checkpoint in getattr(response, "checkpoints", None) or ():
                if getattr(checkpoint, "tinker_path", None) == path:
                    metadata = getattr(checkpoint, "user_metadata", None) or {}
                    return metadata.get(STEP_METADATA_KEY)
            return None

        try:
            raw = await trio.to_thread.run_sync(lookup)
        except Exception as exc:
            raise BackendError(
                f"could not read the metadata of Tinker checkpoint {path!r} (nothing was loaded): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if raw is None:
            return None
        try:
            step = int(raw)
        except (TypeError, ValueError):
            step = -1
        if step < 0:
            raise BackendError(
                f"Tinker checkpoint {path!r} records {STEP_METADATA_KEY}={raw!r}, not a step "
                f"count (nothing was loaded)"
            )
        return step

    def _rest(self) -> Any:
        """The REST client for checkpoint metadata (blocking to build: call it in a thread)."""
        if self._rest_client is None:
            sdk = _import_sdk()
            holder = getattr(self.client, "holder", None)
            if sdk is not None and holder is not None and hasattr(sdk, "RestClient"):
                self._rest_client = sdk.RestClient(holder)
        return self._rest_client

    async def aclose(self) -> None:
        """Nothing to release locally; the SDK's session ends with its own client."""


def _get_tokenizer(client: Any) -> Any:
    """``client.get_tokenizer()`` (blocking: it may download), or None when unavailable."""
    get = getattr(client, "get_tokenizer", None)
    if get is None:
        return None
    try:
        return get()
    except Exception:  # no network, no tokenizer: training on ids still works
        return None


def _accepts(fn: Any, keyword: str) -> bool:
    """Whether ``fn`` takes the keyword argument ``keyword`` (older SDKs lack some)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return keyword in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _training_run_id(path: str) -> str | None:
    """The training run of a ``tinker://<run>/weights/<name>`` path, or None."""
    if not path.startswith("tinker://"):
        return None
    run_id = path[len("tinker://") :].split("/", 1)[0]
    return run_id or None


def _convert(data: Sequence[Any], loss_fn: str, *, default_weight: float | None) -> list[Any]:
    """The ``tinker.Datum`` s a request for ``loss_fn`` sends (see :func:`_service_datum`)."""
    if len(data) == 0:
        raise SpecError("data must contain at least one Datum, got an empty list")
    tinker = _require_sdk()
    return [
        _service_datum(tinker, i, datum, loss_fn, default_weight) for i, datum in enumerate(data)
    ]


def _service_datum(
    tinker: Any, index: int, datum: Any, loss_fn: str, default_weight: float | None
) -> Any:
    """``datum`` as the service takes it for ``loss_fn``; the caller's datum is not changed.

    For a loss of :data:`LOSS_FN_INPUTS`: only the inputs it takes (the others stay
    client-side), its required inputs checked; ``(N,)`` weights of ``(N, K)`` top-K
    targets repeated over the K targets of each position. Any other loss name: every
    input as given. Then, with ``default_weight``, weights for a datum without them.
    A ``tinker.Datum`` that needs no change is returned as is.
    """
    targets = loss_input(datum, "target_tokens")
    if targets is None:
        raise SpecError(f"data[{index}] has no loss_fn_inputs['target_tokens']")
    given = list(datum.loss_fn_inputs)
    spec = LOSS_FN_INPUTS.get(loss_fn)
    if spec is not None:
        missing = sorted(
            spec.required - set(given) - ({"weights"} if default_weight is not None else set())
        )
        if missing:
            raise SpecError(
                f"data[{index}] lacks loss_fn_inputs {', '.join(map(repr, missing))}, which Tinker's "
                f"{loss_fn!r} loss takes (it takes {', '.join(sorted(spec.accepted))})"
            )
        keys = [k for k in given if k in spec.accepted]
    else:
        keys = given
    inputs: dict[str, Any] = {}
    for key in keys:
        value = datum.loss_fn_inputs[key]
        if isinstance(value, tinker.TensorData):
            inputs[key] = value  # already the wire type: sent exactly as the caller built it
        else:
            inputs[key] = _tensor_data(tinker, loss_input(datum, key))
    if spec is not None and "weights" in inputs:
        weights = loss_input(datum, "weights")
        if weights.dim() == 1 and targets.dim() == 2 and weights.shape[0] == targets.shape[0]:
            inputs["weights"] = _tensor_data(tinker, weights[:, None].expand(targets.shape))
    if default_weight is not None and "weights" not in inputs:
        inputs["weights"] = _full(tinker, tuple(targets.shape), default_weight)
    if (
        isinstance(datum, tinker.Datum)
        and inputs.keys() == datum.loss_fn_inputs.keys()
        and all(inputs[k] is datum.loss_fn_inputs[k] for k in inputs)
    ):
        return datum
    mi = getattr(datum, "model_input", None)
    model_input = (
        mi
        if isinstance(mi, tinker.ModelInput)
        else tinker.ModelInput.from_ints(model_input_ints(datum))
    )
    return _tinker_datum(tinker, datum, model_input, inputs)


def _tinker_datum(tinker: Any, source: Any, model_input: Any, inputs: dict[str, Any]) -> Any:
    """A ``tinker.Datum``; a ``tinker.Datum`` source's provenance spans go with it."""
    return tinker.Datum(
        model_input=model_input,
        loss_fn_inputs=inputs,
        model_input_spans=getattr(source, "model_input_spans", None),
        loss_fn_input_spans=getattr(source, "loss_fn_input_spans", None),
    )


def _tensor_data(tinker: Any, tensor: torch.Tensor) -> Any:
    """``tensor`` as a dense ``tinker.TensorData`` of the same shape and values.

    Tinker's wire dtypes are ``int64`` and ``float32``: integer tensors go as ``int64``,
    everything else (floating, and ``bool`` masks such as ``ids != pad``) as ``float32``.
    """
    dtype = torch.float32
    if not tensor.is_floating_point() and tensor.dtype != torch.bool:
        dtype = torch.int64
    return tinker.TensorData.from_torch(tensor.detach().to("cpu", dtype).contiguous())


def _full(tinker: Any, shape: tuple[int, ...], value: float) -> Any:
    return tinker.TensorData.from_torch(torch.full(shape, float(value), dtype=torch.float32))


def _target_shape(datum: Any) -> tuple[int, ...]:
    """The shape of ``datum``'s ``target_tokens``, or ``(len(model_input),)`` without them."""
    targets = loss_input(datum, "target_tokens")
    if targets is not None:
        return tuple(targets.shape)
    return (len(model_input_ints(datum)),)


def _check_outputs(logprobs: list[torch.Tensor], data: list[Any]) -> list[torch.Tensor]:
    """One logprob tensor per datum, each of its ``target_tokens``' shape.

    An output that came back flat (no ``TensorData.shape``) takes the targets' shape.
    """
    if len(logprobs) != len(data):
        raise BackendError(
            f"the Tinker service returned {len(logprobs)} outputs for {len(data)} data"
        )
    out = []
    for i, (lp, datum) in enumerate(zip(logprobs, data, strict=True)):
        shape = _target_shape(datum)
        if tuple(lp.shape) != shape:
            if lp.numel() != torch.Size(shape).numel():
                raise BackendError(
                    f"the Tinker service returned logprobs of shape {tuple(lp.shape)} for datum {i}, "
                    f"whose target_tokens have shape {shape}"
                )
            lp = lp.reshape(shape)
        out.append(lp)
    return out
