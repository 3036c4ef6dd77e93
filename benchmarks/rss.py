"""Peak resident memory of this process during a block, above its level at the block's start."""

from __future__ import annotations

import ctypes
import threading

import psutil


class PeakRSS:
    """`with PeakRSS() as peak: ...` then `peak.mib`: the highest RSS seen (sampled every 10 ms)
    minus the RSS when the block began."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.mib = 0.0

    def _sample(self):
        proc, top = psutil.Process(), 0
        while not self._stop.wait(self.interval):
            top = max(top, proc.memory_info().rss)
        self._top = max(top, proc.memory_info().rss)

    def __enter__(self):
        # Memory the process freed but still holds goes back first (glibc keeps freed heap blocks
        # below its trim threshold): otherwise a block reusing an earlier block's pages reads ~0.
        getattr(ctypes.CDLL(None), "malloc_trim", lambda pad: 0)(0)
        self._base = psutil.Process().memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.mib = (self._top - self._base) / 2**20
