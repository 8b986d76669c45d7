"""Greedy generation samples while training (``tinkex train``'s ``[samples]``).

Generation needs the model in this process: the local backend's
``tc.backend.model`` and ``tc.tokenizer``. A backend without one (Tinker) gives
no samples; :func:`can_sample` says so, and the loop warns once.

Each prompt is rendered exactly as the training prompts are
(:class:`tinkex._dataset.Renderer`: the plain template or the chat template),
decoded greedily one prompt at a time (no padding, so the completion of a
prompt never depends on the others), and only the new tokens are decoded,
special tokens skipped. The work runs in a Trio worker thread under
``torch.no_grad()``, holding the client's lock so no training call interleaves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["can_sample", "greedy_completions", "local_model"]


def local_model(tc: Any) -> Any | None:
    """The torch model behind a training client, or ``None`` when it has none here."""
    model = getattr(getattr(tc, "backend", None), "model", None)
    return model if model is not None and hasattr(model, "parameters") else None


def can_sample(tc: Any) -> bool:
    """Whether samples can be generated: a local model and a tokenizer that decodes."""
    return local_model(tc) is not None and callable(getattr(tc.tokenizer, "decode", None))


def _generate_one(
    model: Any,
    ids: list[int],
    max_new_tokens: int,
    stop: list[int],
    should_stop: Callable[[], bool] | None = None,
) -> list[int]:
    """Greedy continuation of ``ids``: ``model.generate(do_sample=False)`` where the
    model has it, else argmax decoding with a forward per token.

    Never past the model's context (``max_position_embeddings``): positions beyond
    it have no embedding the model was trained with.
    """
    import torch

    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(context, int) and context > 0:
        max_new_tokens = max(0, min(max_new_tokens, context - len(ids)))
    if max_new_tokens == 0:
        return []

    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.int64, device=device)
    if callable(getattr(model, "generate", None)):
        from transformers import GenerationConfig

        pad = stop[0] if stop else 0
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=stop or None,
            pad_token_id=pad,
        )
        extra: dict[str, Any] = {}
        if should_stop is not None:
            from transformers import StoppingCriteria, StoppingCriteriaList

            class _Asked(StoppingCriteria):  # checked after every new token
                def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                    return torch.full(
                        (input_ids.shape[0],), should_stop(), dtype=torch.bool, device=device
                    )

            extra["stopping_criteria"] = StoppingCriteriaList([_Asked()])
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=config,
            **extra,
        )
        return [int(t) for t in out[0, len(ids) :].tolist()]
    new: list[int] = []
    for _ in range(max_new_tokens):  # pragma: no cover - every transformers model has generate
        logits = model(input_ids=input_ids).logits[0, -1]
        token = int(torch.argmax(logits))
        new.append(token)
        if token in stop or (should_stop is not None and should_stop()):
            break
        input_ids = torch.cat([input_ids, input_ids.new_tensor([[token]])], dim=1)
    return new


async def greedy_completions(
    tc: Any,
    prompts: Sequence[str],
    renderer: Any,
    *,
    max_new_tokens: int,
    should_stop: Callable[[], bool] | None = None,
) -> list[str] | None:
    """The greedy completion of each prompt (new tokens only, special tokens skipped).

    ``should_stop`` (checked after every token): when it turns true, generation
    stops at once and the result is ``None`` -- a Ctrl-C does not wait for a long
    generation, and no cut-short completion is passed off as a sample.

    Args:
        tc: a :class:`tinkex.TrainingClient` whose backend has a local model.
        prompts: the prompts, as written (``renderer`` renders them).
        renderer: a :class:`tinkex._dataset.Renderer` for ``tc.tokenizer``.
        max_new_tokens: the most tokens generated per prompt.

    Raises:
        BackendError: the client has no local model.
    """
    import trio

    from ._errors import BackendError

    model = local_model(tc)
    if model is None:
        raise BackendError("samples need a model in this process (the local backend)")
    tokenizer = tc.tokenizer
    encoded = [renderer.prompt_ids(p) for p in prompts]
    stop = renderer.stop_ids()

    def run() -> list[str]:
        import torch

        texts: list[str] = []
        with torch.no_grad():
            for ids in encoded:
                new = _generate_one(model, ids, max_new_tokens, stop, should_stop)
                if should_stop is not None and should_stop():
                    return None
                texts.append(str(tokenizer.decode(new, skip_special_tokens=True)))
        return texts

    lock = getattr(tc, "_lock", None)  # one model call at a time, as the client's own
    async with lock if lock is not None else contextlib.nullcontext():
        try:
            return await trio.to_thread.run_sync(run)
        except Exception as exc:
            raise BackendError(f"generating samples failed: {type(exc).__name__}: {exc}") from exc
