"""One progress line for long jobs: items/s and ETA, on stderr, quiet when not wanted."""

from __future__ import annotations

import sys


class Progress:
    def __init__(self, *, total: int | None, unit: str = "it", desc: str = "label", enabled: bool = True):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True,
                             smoothing=0.1, mininterval=0.5)

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
