"""tqdm progress bars, imported only when one is shown."""
from __future__ import annotations


class _Silent:
    def update(self, n: int) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, enabled: bool, *, unit: str, desc: str):
    """A tqdm bar, or an object with the same `update`/`close` that shows nothing."""
    if not enabled:
        return _Silent()
    from tqdm import tqdm

    scaled = unit == "B"
    return tqdm(total=total, unit=unit, unit_scale=scaled, unit_divisor=1000, desc=desc, leave=False)
