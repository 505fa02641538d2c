"""Progress of long offline jobs (preprocessing, checkpoint conversion), one helper for all of them.

    progress = Progress(total_files, "reading", unit="files")      # or total_bytes=... for a byte stream
    progress.step("mp_rank_00", tensors=24)                        # one item done
    progress.update(documents, bytes_read)                         # or: absolute counts so far
    progress.close()

On a terminal with `tqdm` installed (the `progress` extra) it is a tqdm bar with rate and ETA. Otherwise it
prints Megatron's periodic lines (`Processed 1000 documents (512.3 docs/s, 3.21 MB/s).`) every
`log_interval` items, or at each quarter when no interval is given; on a terminal those lines carry an ETA
when the total is known.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

__all__ = ["Progress"]

_MB = 1024.0 * 1024.0


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return (f"{hours}:" if hours else "") + f"{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """Counts finished items (and bytes, and tensors) and shows it as a bar or as periodic lines."""

    def __init__(self, total: Optional[int] = None, label: str = "Processed", enabled: bool = True,
                 stream: Optional[TextIO] = None, *, unit: str = "items", total_bytes: Optional[int] = None,
                 log_interval: Optional[int] = None):
        self.total = int(total) if total else None
        self.total_bytes = int(total_bytes) if total_bytes else None
        self.label, self.unit, self.enabled = label, unit, enabled
        self.stream = stream or sys.stderr
        self.log_interval = log_interval
        self.count = self.bytes = self.tensors = 0
        self.start = time.time()
        self.tty = bool(enabled and getattr(self.stream, "isatty", lambda: False)())
        self._bar = self._make_bar() if self.tty else None
        self._quarter = 0

    def _make_bar(self):
        try:
            from tqdm import tqdm
        except ImportError:
            return None  # plain lines (with an ETA) on the terminal
        if self.total_bytes:  # the bar follows the bytes: MB/s and ETA from the input size
            return tqdm(total=self.total_bytes, desc=self.label, unit="B", unit_scale=True, unit_divisor=1024,
                        file=self.stream, dynamic_ncols=True)
        return tqdm(total=self.total, desc=self.label, unit=" " + self.unit, file=self.stream, dynamic_ncols=True)

    # ---- counting ---------------------------------------------------------------------------------------
    def step(self, what: str = "", tensors: int = 0, nbytes: int = 0) -> None:
        """One more item finished (`what` names it; `tensors` / `nbytes` it held)."""
        self.update(self.count + 1, self.bytes + nbytes, tensors=self.tensors + tensors, what=what)

    def update(self, count: int, nbytes: Optional[int] = None, tensors: Optional[int] = None, what: str = "") -> None:
        """Absolute counts so far: items, and bytes / tensors when they are tracked."""
        previous_bytes, previous_count = self.bytes, self.count
        self.count = int(count)
        self.bytes = int(nbytes) if nbytes is not None else self.bytes
        self.tensors = int(tensors) if tensors is not None else self.tensors
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update((self.bytes - previous_bytes) if self.total_bytes else (self.count - previous_count))
            postfix = {self.unit: self.count} if self.total_bytes else {}
            if self.tensors:
                postfix["tensors"] = self.tensors
            if what:
                postfix["last"] = what
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
        elif self._due():
            self.stream.write(self.line(what) + "\n")
            self.stream.flush()

    def _due(self) -> bool:
        if self.log_interval:
            return self.count % self.log_interval == 0
        fraction = self.fraction()
        if fraction is None:
            return True
        quarter = int(4 * fraction)
        if quarter > self._quarter or fraction >= 1.0:
            self._quarter = quarter + (1 if fraction >= 1.0 else 0)
            return True
        return False

    def fraction(self) -> Optional[float]:
        """Share of the work done, when a total is known."""
        if self.total_bytes:
            return min(self.bytes / self.total_bytes, 1.0)
        if self.total:
            return min(self.count / self.total, 1.0)
        return None

    def line(self, what: str = "") -> str:
        """The periodic line: `<label> N <unit> (rate <unit>/s[, MB/s]).` plus tensors, share and ETA."""
        elapsed = max(time.time() - self.start, 1e-9)
        short = {"documents": "docs"}.get(self.unit, self.unit)
        rates = [f"{self.count / elapsed:.1f} {short}/s"]
        if self.bytes:
            rates.append(f"{self.bytes / elapsed / _MB:.2f} MB/s")
        text = f"{self.label} {self.count}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"
        if self.tensors:
            text += f", {self.tensors} tensors"
        text += f" ({', '.join(rates)})."
        fraction = self.fraction()
        if fraction is not None:
            text += f" {fraction * 100:.1f}%"
            if self.tty and 0 < fraction < 1:
                text += f", ETA {_clock(elapsed * (1 - fraction) / fraction)}"
        return text + (f" {what}" if what else "")

    def close(self) -> None:
        """Finish the bar (a no-op for plain lines)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
