"""Progress on stdout: a tqdm bar on a terminal, plain lines in a log file.

A bar redraws itself with carriage returns, which a log file keeps as one endless line;
when stdout is not a terminal the progress is one plain line every `every_s` seconds
(the first after the first item, the last at the end): for training the step, epoch,
loss, learning rate, atoms/s and the time left (`TrainingProgress`); for a loop of unknown
length such as packing a file, the count and rate (`ItemProgress`).
"""

from __future__ import annotations

import datetime
import math
import sys
import time
from typing import Optional, TextIO

from tqdm import tqdm


def stderr_bars(wanted: bool) -> bool:
    """Whether to draw the tqdm bars that go to stderr (graph building, evaluation): only
    when wanted and stderr is a terminal."""
    return wanted and sys.stderr.isatty()


def eta_seconds(step: int, total_steps: float, seconds_per_step: float, elapsed: float,
                max_seconds: float) -> Optional[float]:
    """Time left until `total_steps`, or until `max_seconds` of step time when that comes
    first; None when neither bounds the run."""
    left = []
    if math.isfinite(total_steps):
        left.append(max(0.0, (total_steps - step) * seconds_per_step))
    if max_seconds:
        left.append(max(0.0, max_seconds - elapsed))
    return min(left) if left else None


class TrainingProgress:
    """Reports each training step: a tqdm bar when `stream` is a terminal, otherwise a plain
    line every `every_s` seconds; nothing when not `enabled`."""

    def __init__(self, enabled: bool, first_step: int, total_steps: float, max_seconds: float, every_s: float,
                 stream: Optional[TextIO] = None) -> None:
        self.stream = stream or sys.stdout
        self.total_steps, self.max_seconds, self.every_s = total_steps, max_seconds, every_s
        on_terminal = self.stream.isatty()
        self.bar = tqdm(total=None if max_seconds else total_steps, initial=first_step, desc="train", unit="step",
                        file=self.stream) if enabled and on_terminal else None
        self.plain = enabled and not on_terminal
        self.first_step = first_step
        self.started = time.perf_counter()
        self.printed_at = -math.inf
        self.unprinted: Optional[dict] = None

    def update(self, step: int, epoch: int, loss: float, lr: float, atoms_per_s: float, elapsed: float) -> None:
        """Record the state after `step` (`elapsed`: the run's step time in seconds)."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", atoms_s=f"{atoms_per_s:.0f}")
        elif self.plain:
            self.unprinted = dict(step=step, epoch=epoch, loss=loss, lr=lr, atoms_per_s=atoms_per_s, elapsed=elapsed)
            if time.perf_counter() - self.printed_at >= self.every_s:
                self._print()

    def _print(self) -> None:
        state, self.unprinted = self.unprinted, None
        now = time.perf_counter()
        self.printed_at = now
        seconds_per_step = (now - self.started) / max(1, state["step"] - self.first_step)
        eta = eta_seconds(state["step"], self.total_steps, seconds_per_step, state["elapsed"], self.max_seconds)
        total = f"/{self.total_steps}" if math.isfinite(self.total_steps) else ""
        left = "-" if eta is None else str(datetime.timedelta(seconds=round(eta)))
        print(f"step {state['step']}{total}  epoch {state['epoch']}  loss {state['loss']:.4f}  lr {state['lr']:.3g}  "
              f"atoms/s {state['atoms_per_s']:.0f}  ETA {left}", file=self.stream, flush=True)

    def close(self) -> None:
        """End the bar, or print the last state if its line is still due."""
        if self.bar is not None:
            self.bar.close()
        elif self.unprinted is not None:
            self._print()


class ItemProgress:
    """Progress of a loop whose length is not known in advance (frames streamed from a
    file): a tqdm bar when `stream` is a terminal, otherwise a plain line every `every_s`
    seconds with the count, the rate and the extra counts given to `update`; nothing when
    not `enabled`."""

    def __init__(self, enabled: bool, description: str, unit: str, every_s: float = 30.0,
                 stream: Optional[TextIO] = None) -> None:
        self.stream = stream or sys.stdout
        self.description, self.unit, self.every_s = description, unit, every_s
        on_terminal = self.stream.isatty()
        self.bar = tqdm(desc=description, unit=f" {unit}", file=self.stream, leave=False) \
            if enabled and on_terminal else None
        self.plain = enabled and not on_terminal
        self.count = 0
        self.extra: dict = {}
        self.started = time.perf_counter()
        self.printed_at = -math.inf
        self.unprinted = False

    def update(self, n: int = 1, **extra: int) -> None:
        self.count += n
        self.extra = extra
        if self.bar is not None:
            self.bar.update(n)
        elif self.plain:
            self.unprinted = True
            if time.perf_counter() - self.printed_at >= self.every_s:
                self._print()

    def _print(self) -> None:
        self.unprinted = False
        self.printed_at = time.perf_counter()
        rate = self.count / max(self.printed_at - self.started, 1e-9)
        extra = "".join(f"  {value} {key}" for key, value in self.extra.items())
        print(f"{self.description}: {self.count} {self.unit}{extra}  ({rate:.0f} {self.unit}/s)", file=self.stream,
              flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.unprinted:
            self._print()
