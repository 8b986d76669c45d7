"""Training with a composed loss: :class:`TrainingClient`, :class:`AdamParams`, :class:`ForwardBackwardOutput`.

The path of one step reads top to bottom::

    forward (backend)  ->  compose_loss (pipeline)  ->  backward (backend)  ->  optim_step (backend)

``forward_backward_custom`` has two ways of sending the composed gradient back:

- ``"fused"`` (local backend): one forward that keeps its autograd graph; the
  composed gradient d(loss)/d(logprobs) is back-propagated through it once.
- ``"linearized"`` (any backend, Tinker's method): a forward without a graph,
  then a weighted cross-entropy forward/backward with ``weights = -d(loss)/d(logprobs)``.
  Since d/dθ Σ w·lp = Σ w·dlp/dθ, that surrogate has exactly the composed loss's
  gradient at the current parameters.

A backend implements :class:`tinkex._backends.Backend` (the linearized step), and
:class:`tinkex._backends.FusedBackend` when it can keep the forward graph
(``forward_graph``); both are ``typing.Protocol`` s, checked when a client is created.

Backends are registered by plugins (``tinkex_register_backends``); ``local`` and
``tinker`` are built in.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import attrs
import structlog
import torch
import trio

from ._backends import FusedBackend, missing_members
from ._config import AdamParams  # the [optimizer] section of a config is this class
from ._errors import BackendError, SpecError
from ._inputs import loss_input
from ._pipeline import DEFAULT_TIMEOUT, Pipeline
from ._types import CustomLossOutput, RegularizerSpec, check_step

__all__ = ["AdamParams", "ForwardBackwardOutput", "TrainingClient"]

_log = structlog.get_logger("tinkex")

_MODES = ("auto", "fused", "linearized")


@attrs.frozen
class ForwardBackwardOutput:
    """What a ``forward_backward*`` call returns.

    Attributes:
        loss_fn_outputs: one dict per datum, ``{"logprobs": tensor}`` (detached), as in Tinker.
        metrics: Tinker-style metrics: ``"loss:sum"`` is the (composed) loss; for a custom
            loss also the base loss's own metrics exactly as it returned them (a NaN
            included, as the SDK passes them on), and every key of
            ``custom.flat_metrics()`` (one equal to a base-loss key moves to
            ``tinkex/<key>``; see :func:`tinkex.drop_in_metrics`), and for the linearized
            mode ``"surrogate_loss:sum"`` (the weighted cross-entropy actually back-propagated).
        custom: the structured :class:`~tinkex.CustomLossOutput` of a custom loss; ``None``
            for ``forward_backward``.
    """

    loss_fn_outputs: list[dict[str, torch.Tensor]]
    metrics: dict[str, float]
    custom: CustomLossOutput | None = None


def _debug(event: str, **fields: Any) -> None:
    if structlog.is_configured():
        _log.debug(event, **fields)


class TrainingClient:
    """Train a model with a composed loss; the async (Trio) counterpart of Tinker's ``TrainingClient``.

    Create one with :meth:`create` and use it as an async context manager::

        async with await TrainingClient.create(backend="local", base_model="tiny") as tc:
            fb = await tc.forward_backward_custom(data, base_loss_fn, regularizers=[...])
            await tc.optim_step(AdamParams(learning_rate=1e-3))

    Operations on one client run one at a time, in call order (like Tinker's
    request ordering). Gradients accumulate across ``forward_backward*`` calls
    until :meth:`optim_step`. A failure before the backward (a bad datum, a
    failing or timed-out regularizer, a failed forward) back-propagates nothing:
    parameters, gradients and optimizer state are unchanged and the client stays
    usable.

    Attributes:
        backend: the backend object; for the local backend ``backend.model`` is the
            torch module.
    """

    def __init__(self, backend: Any) -> None:
        """Wrap an already created backend (see :meth:`create` for the usual way)."""
        self.backend = backend
        self._lock = trio.Lock()
        self._closed = False
        self._pipeline_cache: tuple[Any, tuple[Any, ...], Any] | None = None

    @classmethod
    async def create(
        cls,
        backend: str = "local",
        base_model: str = "tiny",
        device: str | torch.device | None = "auto",
        lora_rank: int | None = None,
        seed: int = 0,
        **backend_kwargs: Any,
    ) -> TrainingClient:
        """Create a client on a registered backend.

        Args:
            backend: ``"local"`` (a transformers model in this process), ``"tinker"``
                (the Tinker service), or a name a plugin registered.
            base_model: ``"tiny"`` (local: the embedded tiny Llama), a known model name
                such as ``"smollm2-135m-instruct"`` (``tinkex models fetch``), a ``.gguf``
                file, a local model directory or a hub id (see ``docs/models.md``), or
                (tinker) the service's model name.
            device: ``"auto"`` picks cuda, then mps, then cpu (local backend).
            lora_rank: train a LoRA adapter of this rank (local: peft; tinker: default 32).
            seed: initialisation seed.
            **backend_kwargs: passed to the backend's factory.

        Raises:
            BackendError: unknown backend, a missing model directory, the Tinker SDK or
                API key missing, ...
            SpecError: a bad argument.
        """
        from ._plugins import get_backend_factory

        factory = get_backend_factory(backend)
        instance = await factory(
            base_model=base_model, device=device, lora_rank=lora_rank, seed=seed, **backend_kwargs
        )
        missing = missing_members(instance)
        if missing:
            with contextlib.suppress(Exception):
                await instance.aclose()
            raise BackendError(
                f"the {backend!r} backend's factory returned {type(instance).__name__}, which "
                f"lacks {', '.join(missing)} of the backend protocol (docs/training.md, "
                f"'Writing a backend')"
            )
        return cls(instance)

    # ----------------------------------------------------------------- lifecycle

    @property
    def tokenizer(self) -> Any:
        """The backend's tokenizer (``encode``/``decode``); may be ``None`` for a bare model directory."""
        return self.backend.tokenizer

    @property
    def step(self) -> int:
        """The number of optimizer steps taken (restored by :meth:`load_state`)."""
        return int(getattr(self.backend, "step", 0))

    async def __aenter__(self) -> TrainingClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Release the backend. Further calls raise :class:`~tinkex.BackendError`."""
        if not self._closed:
            self._closed = True
            await self.backend.aclose()

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError(
                "this TrainingClient is closed; create a new one with TrainingClient.create()"
            )

    # ----------------------------------------------------------------- passes

    async def forward(self, data: Sequence[Any]) -> list[torch.Tensor]:
        """Per-datum log-probabilities of ``target_tokens`` (no gradients, nothing accumulates).

        Args:
            data: :class:`tinkex.Datum` or ``tinker.Datum`` objects with ``target_tokens``.

        Raises:
            SpecError: unusable data.  BackendError: the backend failed.
        """
        self._check_open()
        data = list(data)
        async with self._lock:
            return await self.backend.forward(data)

    async def forward_backward(
        self, data: Sequence[Any], loss_fn: str = "cross_entropy"
    ) -> ForwardBackwardOutput:
        """A built-in loss's forward/backward; gradients accumulate until :meth:`optim_step`.

        ``"cross_entropy"`` is Tinker's weighted cross-entropy ``-(weights * logprobs).sum()``;
        a datum without ``weights`` counts every token with weight 1. The local backend
        has only that loss; the tinker backend takes any loss name the service offers
        (``"importance_sampling"``, ``"ppo"``, ...) and sends each datum only the inputs
        that loss takes.

        Raises:
            SpecError: a loss the backend does not have, or unusable data.
            BackendError: the backend failed.
        """
        self._check_open()
        data = list(data)
        async with self._lock:
            logprobs, metrics = await self.backend.forward_backward(data, loss_fn)
        return ForwardBackwardOutput(
            loss_fn_outputs=[{"logprobs": lp} for lp in logprobs], metrics=dict(metrics)
        )

    async def forward_backward_custom(
        self,
        data: Sequence[Any],
        base_loss_fn: Callable[[Any, Any], Any],
        *,
        regularizers: Sequence[RegularizerSpec] = (),
        track_grad_norms: bool = False,
        parallel: bool = True,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_concurrency: int | None = None,
        mode: Literal["auto", "fused", "linearized"] = "auto",
        step: int | None = None,
    ) -> ForwardBackwardOutput:
        """Forward, compose base loss + regularizers, and back-propagate the composed gradient.

        The loss is composed by :func:`tinkex.compose_loss` (same arguments); the base
        loss and the regularizers receive ``data`` as given and one logprob tensor per datum.

        Args:
            timeout: seconds each regularizer may run. The base loss runs without a
                limit (as in Tinker's SDK) unless ``timeout`` is given explicitly.
            mode: ``"fused"`` keeps the forward graph and back-propagates once (local
                backend only); ``"linearized"`` is Tinker's two-pass method (forward, then a
                cross-entropy step with ``weights = -d(loss)/d(logprobs)``); ``"auto"`` picks
                fused where the backend supports it. Both give the same parameter gradients.
            step: the 1-based optimizer step whose scheduled weights to use (a weight
                that is a :class:`tinkex.schedules.Schedule` takes its value there);
                default ``tc.step + 1``, the step these gradients go into, read when
                the call runs (after the calls before it). A resumed client
                (:meth:`load_state`) continues the schedule exactly.

        Returns:
            :class:`ForwardBackwardOutput` with ``custom`` (the :class:`~tinkex.CustomLossOutput`),
            ``metrics`` (``"loss:sum"`` = the composed loss, the base loss's own metrics
            and ``custom.flat_metrics()``) and the per-datum logprobs.

        Raises:
            RegularizerError: a term failed or timed out, or the base loss does not depend
                on the logprobs (nothing was back-propagated).
            SpecError: a bad argument or unusable data (nothing was back-propagated).
            BackendError: the backend failed.
        """
        self._check_open()
        if mode not in _MODES:
            raise SpecError(f"mode must be one of {', '.join(map(repr, _MODES))}, got {mode!r}")
        fused_ok = isinstance(self.backend, FusedBackend)
        if mode == "fused" and not fused_ok:
            raise SpecError(
                f"mode='fused' needs a backend that keeps the forward graph (the local backend); "
                f"the {getattr(self.backend, 'name', type(self.backend).__name__)!r} backend supports "
                f"mode='linearized' (or 'auto')"
            )
        use_fused = mode == "fused" or (mode == "auto" and fused_ok)
        step = check_step(step)
        data = list(data)
        if not data:
            raise SpecError("data must contain at least one Datum, got an empty list")
        try:
            specs = tuple(regularizers) if regularizers is not None else ()
        except TypeError:
            raise SpecError(
                f"regularizers must be a sequence of RegularizerSpec, got {regularizers!r}"
            ) from None
        pipeline = self._pipeline_for(
            base_loss_fn,
            specs,
            track_grad_norms,
            parallel,
            timeout,
            type(timeout),  # the default equals 30.0 but leaves the base loss unbounded
            max_concurrency,
        )
        start = time.perf_counter()
        async with self._lock:
            # the weights of this step, resolved before the forward: a bad one sends nothing
            terms = pipeline._terms_at(self.step + 1 if step is None else step, drop_in=True)
            extra: dict[str, float] = {}
            if use_fused:
                graph = await self.backend.forward_graph(data)
                try:
                    composed, own = await pipeline._drop_in(data, graph.logprobs, terms=terms)
                except BaseException:
                    graph.discard()
                    raise
                await graph.backward(composed.logprob_grads)
                logprobs = graph.logprobs
            else:
                logprobs = await self.backend.forward(data)
                composed, own = await pipeline._drop_in(data, logprobs, terms=terms)
                surrogate = _linearized_data(data, composed.logprob_grads)
                _, sur_metrics = await self.backend.forward_backward(surrogate, "cross_entropy")
                if "loss:sum" in sur_metrics:
                    extra["surrogate_loss:sum"] = float(sur_metrics["loss:sum"])
        output: CustomLossOutput = composed.output
        # as the SDK's: the base loss's own keys, tinkex's, and "loss:sum" (the composed loss)
        metrics = {**own, "loss:sum": float(output.loss_total), **extra}
        _debug(
            "training.forward_backward_custom",
            mode="fused" if use_fused else "linearized",
            loss_total=output.loss_total,
            duration_s=time.perf_counter() - start,
        )
        return ForwardBackwardOutput(
            loss_fn_outputs=[{"logprobs": lp} for lp in logprobs], metrics=metrics, custom=output
        )

    def _pipeline_for(self, base_loss_fn: Callable[[Any, Any], Any], *options: Any) -> Any:
        """The :class:`~tinkex.Pipeline` for these arguments (the last one is reused).

        A training loop passes the same loss and specs every step; building the
        pipeline validates them, which need not happen again. Specs compare by
        value (a scheduled weight by its schedule), and the pipeline resolves
        scheduled weights per call, so one cached pipeline serves every step.
        """
        cached = self._pipeline_cache
        if cached is not None and cached[0] is base_loss_fn and cached[1] == options:
            return cached[2]
        regularizers, track_grad_norms, parallel, timeout, _, max_concurrency = options
        pipeline = Pipeline(
            base_loss_fn,
            regularizers=regularizers,
            track_grad_norms=track_grad_norms,
            parallel=parallel,
            timeout=timeout,
            max_concurrency=max_concurrency,
        )
        self._pipeline_cache = (base_loss_fn, options, pipeline)
        return pipeline

    # ----------------------------------------------------------------- optimizer and state

    async def optim_step(self, params: AdamParams | None = None) -> dict[str, float]:
        """Apply one AdamW step to the accumulated gradients and clear them.

        Returns the backend's metrics; the local backend reports ``grad_norm`` (the
        parameters' gradient norm before clipping), ``grad_norm_clipped``,
        ``learning_rate`` and ``step``. With no accumulated gradient nothing changes.

        Raises:
            SpecError: ``params`` is not an :class:`AdamParams`.
            BackendError: the backend failed (e.g. a non-finite gradient norm).
        """
        self._check_open()
        if params is None:
            params = AdamParams()
        if not isinstance(params, AdamParams):
            raise SpecError(f"optim_step expects tinkex.AdamParams, got {type(params).__name__}")
        async with self._lock:
            metrics = await self.backend.optim_step(params)
        _debug(
            "training.optim_step",
            **{k: v for k, v in metrics.items() if k in ("grad_norm", "step")},
        )
        return dict(metrics)

    async def save_state(self, path: str) -> str:
        """Save weights (or the LoRA adapter), optimizer state and step; returns where it went.

        Local backend: ``path`` is a directory, written atomically (temp dir, then rename).
        Tinker backend: ``path`` is the checkpoint name; the ``tinker://`` path is returned.
        """
        self._check_open()
        async with self._lock:
            return await self.backend.save_state(path)

    async def load_state(self, path: str) -> None:
        """Restore a checkpoint written by :meth:`save_state` (weights, optimizer state, step).

        Raises:
            BackendError: no checkpoint there, or it does not fit this model.
        """
        self._check_open()
        async with self._lock:
            await self.backend.load_state(path)


@attrs.frozen
class _SurrogateDatum:
    """A datum of the linearized step: the caller's inputs and targets, new weights.

    Built from data the forward pass already accepted, so it skips
    :class:`~tinkex.Datum`'s validation; backends read it through
    ``model_input_ints`` / ``loss_input`` like any datum.
    """

    model_input: Any
    loss_fn_inputs: dict[str, torch.Tensor]


def _linearized_data(data: Sequence[Any], logprob_grads: Any) -> list[_SurrogateDatum]:
    """Tinker's surrogate data: same inputs and targets, ``weights = -d(loss)/d(logprobs)``."""
    grads = [logprob_grads] if isinstance(logprob_grads, torch.Tensor) else list(logprob_grads)
    if len(grads) != len(data):
        raise SpecError(f"expected one logprob gradient per datum ({len(data)}), got {len(grads)}")
    out = []
    for datum, grad in zip(data, grads, strict=True):
        model_input = getattr(datum, "model_input", None)
        if model_input is None:
            raise SpecError(f"expected a Datum with .model_input, got {type(datum).__name__}")
        targets = loss_input(datum, "target_tokens", dtype=torch.int64)
        out.append(
            _SurrogateDatum(
                model_input=model_input,
                loss_fn_inputs={"target_tokens": targets, "weights": -grad.detach()},
            )
        )
    return out
