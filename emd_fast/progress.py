"""Progress of long work on stderr: on a terminal one tqdm bar with live figures; elsewhere (``--quiet``, a log file,
a pipe) a one-line summary every LINE_EVERY_S seconds instead, so that a log holds readable lines rather than a bar's
carriage returns. Work that ends before the first line is due stays silent."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

LINE_EVERY_S = 30.0


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m{s:02d}s" if hours else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """``total`` units of work from ``initial``; ``update(k)`` after each k of them, ``figures(**f)`` to show some
    (strings). A bar when ``bar`` (default: stderr is a terminal and not ``quiet``), else the one-line summaries;
    nothing at all when not ``enabled`` (ranks other than 0). Use it as a context manager or ``close()`` it."""

    def __init__(self, total: int, desc: str, unit: str = "it", initial: int = 0, quiet: bool = False,
                 enabled: bool = True, bar: bool | None = None, leave: bool = True, every_s: float | None = None):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.every_s = LINE_EVERY_S if every_s is None else every_s
        self.n = self.start_n = initial
        self.t0 = self.last_line = time.perf_counter()
        self.lines = 0
        self.shown: dict[str, str] = {}
        bar = (not quiet and sys.stderr.isatty()) if bar is None else bar
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=leave,
                        file=sys.stderr) if enabled and bar else None

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
        elif self.enabled and time.perf_counter() - self.last_line >= self.every_s:
            self.line()

    def figures(self, **shown: str) -> None:
        """Figures shown beside the count (the bar's postfix), e.g. losses and metrics."""
        self.shown = shown
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)

    def line(self, done: bool = False) -> None:
        """One summary line: count, rate, time left (or taken) and the figures."""
        now = time.perf_counter()
        elapsed, done_units = now - self.t0, self.n - self.start_n
        rate = done_units / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.n) / rate if rate > 0 else float("nan")
        when = f"in {_duration(elapsed)}" if done else f"{_duration(left)} left" if rate > 0 else "starting"
        figures = "".join(f", {k} {v}" for k, v in self.shown.items())
        print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / max(self.total, 1):.0f}%), "
              f"{rate:.3g} {self.unit}/s, {when}{figures}", file=sys.stderr, flush=True)
        self.last_line, self.lines = now, self.lines + 1

    def close(self, done: bool = True) -> None:
        """End the bar; in line mode a last line when earlier ones were printed and the work is ``done``."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.lines and done:
            self.line(done=True)
        self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, kind, *exc) -> None:
        self.close(done=kind is None)
