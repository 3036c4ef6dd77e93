"""Progress of long operations: `progress` is a callable (total=, desc=) -> an object with
update(n) and close(), which tqdm fits; without one nothing is shown (the library never prints)."""

from __future__ import annotations

from collections.abc import Callable


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(progress: Callable | None, total: int, desc: str):
    return progress(total=total, desc=desc) if progress else _NoProgress()
