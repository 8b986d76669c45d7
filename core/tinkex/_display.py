"""What ``tinkex train`` shows: the start line, a progress bar, notes (all on stderr).

The final table goes to stdout. Nothing here is shown with ``--quiet`` or with
``TINKEX_LOG_JSON=1`` (stderr is then JSON lines only).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Display", "LiveStream"]


class LiveStream:
    """A text stream that prints whole lines through a rich console (above a live bar)."""

    def __init__(self, console: Any) -> None:
        self._console = console
        self._buf = ""

    def write(self, text: str) -> int:
        from rich.text import Text

        self._buf += text
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            self._console.print(Text.from_ansi(line))
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return bool(self._console.is_terminal)


class Display:
    """Progress bar (stderr), start line and final table (stdout); silent when quiet."""

    def __init__(self, *, quiet: bool, bar: bool, text_on_stderr: bool = True) -> None:
        from rich.console import Console

        self.quiet = quiet
        self.stderr_quiet = quiet or not text_on_stderr  # JSON logs: stderr is JSON only
        self.err = Console(stderr=True)
        self.out = Console()
        self.bar = bar and not quiet
        self._progress: Any = None
        self._task: Any = None

    def start(self, info: dict[str, Any]) -> None:
        if self.stderr_quiet:
            return
        from rich.markup import escape

        what = "resuming" if info["resumed"] else "training"
        ref = " · reference logprobs: initial model" if info["reference"] else ""
        extra = ""
        if info.get("schedule"):
            extra += f" · {info['schedule']}"
        if info.get("eval_examples"):
            source = info.get("eval_source")
            origin = "held out" if source == "held out" else f"from {source}"
            extra += f" · eval: {info['eval_examples']} examples {origin}"
        if info.get("samples"):
            extra += f" · samples: {info['samples']} prompts"
        first, total = info["start_step"] + 1, info["total_steps"]
        steps = f"steps {first}..{total}" if first <= total else f"{info['start_step']} steps done"
        self.err.print(
            f"[bold]tinkex train[/] {what} {escape(str(info['base_model']))} "
            f"({escape(str(info['backend']))}, {escape(str(info['device']))}) -> {escape(str(info['run_dir']))}\n"
            f"  {info['examples']} examples · {steps} · "
            f"terms: {escape(', '.join(info['terms']))}{ref}{escape(extra)}",
            highlight=False,
            soft_wrap=True,
        )
        if not self.bar:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        held = [TextColumn("eval [bold]{task.fields[eval]}")] if info.get("eval_examples") else []
        self._progress = Progress(
            TextColumn("[bold blue]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss [bold]{task.fields[loss]}"),
            *held,
            TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.err,
            transient=False,
        )
        self._task = self._progress.add_task(
            "train",
            total=info["total_steps"],
            completed=info["start_step"],
            loss="-",
            tps="-",
            eval="-",
        )
        self._progress.start()

    def step(self, record: Any) -> None:
        if self._progress is not None:
            fields = {}
            if getattr(record, "eval", None) is not None:
                fields["eval"] = f"{record.eval['base_loss']:.4f}"
            self._progress.update(
                self._task,
                completed=record.step,
                loss=f"{record.output.loss_total:.4f}",
                tps=f"{record.metrics.get('tokens_per_s', 0.0):,.0f}",
                **fields,
            )

    def note(self, text: str) -> None:
        if not self.stderr_quiet:
            self.err.print(text, highlight=False, soft_wrap=True)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def log_stream(self) -> Any:
        return LiveStream(self.err) if self.bar else None
