"""What ``tinkex train`` and ``tinkex sweep`` show: the start line, progress, notes (on stderr).

The final tables go to stdout. Nothing here is shown with ``--quiet`` or with
``TINKEX_LOG_JSON=1`` (stderr is then JSON lines only).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Display", "LiveStream", "SweepDisplay"]


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
            if info.get("eval_dropped"):
                extra += f" ({info['eval_dropped']} dropped)"
        if info.get("samples"):
            extra += f" · samples: {info['samples']} prompt{'s' if info['samples'] != 1 else ''}"
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


class SweepDisplay:
    """One progress view over a whole sweep (stderr): runs done / total, then one
    bar per running run (its step and loss); a line per finished run above them.
    Silent when quiet; no bars with ``bar=False`` (JSON logs)."""

    def __init__(self, *, quiet: bool, bar: bool) -> None:
        from rich.console import Console

        self.quiet = quiet
        self.err = Console(stderr=True)
        self.out = Console()
        self.bar = bar and not quiet
        self._progress: Any = None
        self._overall: Any = None
        self._tasks: dict[str, Any] = {}
        self._failed = 0

    def start(self, info: dict[str, Any]) -> None:
        """``info``: ``sweep_dir``, ``variants``, ``seeds``, ``runs``, ``done``,
        ``to_resume``, ``to_start``, ``jobs``, ``threads``, ``resumed`` (a re-run)."""
        if self.quiet:
            return
        from rich.markup import escape

        what = "resuming" if info["resumed"] else "running"
        state = f"{info['done']} done, " if info["done"] else ""
        state += f"{info['to_resume']} to resume, " if info["to_resume"] else ""
        state += f"{info['to_start']} to start"
        self.err.print(
            f"[bold]tinkex sweep[/] {what} {info['variants']} variants x {info['seeds']} "
            f"seed{'s' if info['seeds'] != 1 else ''} = {info['runs']} runs -> "
            f"{escape(str(info['sweep_dir']))}\n  {state} · jobs {info['jobs']} · "
            f"{info['threads']} torch thread{'s' if info['threads'] != 1 else ''} per run",
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
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=self.err,
            transient=False,
        )
        self._overall = self._progress.add_task(
            "[bold blue]sweep[/] runs", total=info["runs"], completed=info["done"], info=""
        )
        self._progress.start()

    def run_started(self, run: Any) -> None:
        if self._progress is None:
            return
        from rich.markup import escape

        self._tasks[run.label] = self._progress.add_task(
            f"  {escape(run.label)}",
            total=run.run.steps,
            completed=run.checkpoint_step,
            info="resuming" if run.state == "resume" else "starting",
        )

    def run_progress(self, run: Any) -> None:
        task = self._tasks.get(run.label)
        if self._progress is None or task is None:
            return
        loss = "-" if run.loss is None else f"{run.loss:.4f}"
        self._progress.update(task, completed=run.last_step, info=f"loss {loss}")

    def run_finished(self, run: Any) -> None:
        from rich.markup import escape

        task = self._tasks.pop(run.label, None)
        if self._progress is not None:
            if task is not None:
                self._progress.remove_task(task)
            self._failed += run.status == "failed"
            self._progress.update(
                self._overall,
                advance=1 if run.status == "completed" else 0,
                info=f"[red]{self._failed} failed[/]" if self._failed else "",
            )
        if self.quiet:
            return
        label = escape(run.label)
        took = f" in {run.process_s:.0f}s" if run.process_s is not None else ""
        if run.status == "completed":
            loss = "" if run.loss is None else f", loss {run.loss:.4f}"
            text = f"[green]done[/]    {label}: step {run.last_step}{loss}{took}"
        elif run.status == "interrupted":
            text = (
                f"[yellow]stopped[/] {label} at step {run.last_step} (checkpointed; "
                f"the next run of the sweep resumes it)"
            )
        else:
            code = "" if run.exit_code is None else f" (exit {run.exit_code})"
            text = f"[red]FAILED[/]  {label}{code}: {escape(run.error or 'failed')}"
        self.err.print(text, highlight=False, soft_wrap=True)

    def note(self, text: str) -> None:
        if not self.quiet:
            self.err.print(text, highlight=False, soft_wrap=True, markup=False)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
