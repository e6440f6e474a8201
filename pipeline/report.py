"""Stage reports: rows read, written, and skipped by reason (with example ids)."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from pipeline.atomic import write_json


class Report:
    """Counts what a stage read, wrote and skipped, by reason.

    `skip(reason, id)` counts one skipped item and remembers its id (up to `max_ids` per
    reason, so a report stays small on millions of rows); `note(reason, id)` counts an
    item that was kept but altered (converted image, truncated caption, ...).
    """

    def __init__(self, stage: str, max_ids: int = 1000):
        self.stage = stage
        self.max_ids = max_ids
        self.read = 0
        self.written = 0
        self.skipped: Counter[str] = Counter()
        self.noted: Counter[str] = Counter()
        self._ids: dict[str, list[str]] = defaultdict(list)
        self.extra: dict[str, Any] = {}

    def _remember(self, key: str, item_id: Any) -> None:
        if item_id is not None and len(self._ids[key]) < self.max_ids:
            self._ids[key].append(str(item_id))

    def skip(self, reason: str, item_id: Any = None, n: int = 1) -> None:
        self.skipped[reason] += n
        self._remember(f"skipped:{reason}", item_id)

    def note(self, reason: str, item_id: Any = None, n: int = 1) -> None:
        self.noted[reason] += n
        self._remember(f"noted:{reason}", item_id)

    def merge(self, other: Report) -> None:
        self.read += other.read
        self.written += other.written
        self.skipped.update(other.skipped)
        self.noted.update(other.noted)
        for key, ids in other._ids.items():
            room = self.max_ids - len(self._ids[key])
            self._ids[key].extend(ids[: max(room, 0)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "read": self.read,
            "written": self.written,
            "skipped_total": sum(self.skipped.values()),
            "skipped": dict(sorted(self.skipped.items())),
            "noted": dict(sorted(self.noted.items())),
            "ids": {k: v for k, v in sorted(self._ids.items())},
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        rep = cls(data.get("stage", "?"))
        rep.read = data.get("read", 0)
        rep.written = data.get("written", 0)
        rep.skipped.update(data.get("skipped", {}))
        rep.noted.update(data.get("noted", {}))
        for k, v in data.get("ids", {}).items():
            rep._ids[k] = list(v)
        return rep

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    def summary(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"{self.stage}: read {self.read}, wrote {self.written}, skipped {skipped}"
