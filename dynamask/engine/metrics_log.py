"""Training metrics to a CSV file (and TensorBoard when it is installed)."""

from __future__ import annotations

import csv
import os
from typing import Any


class CsvLog:
    """Rows of scalars keyed by name; the header grows when new names appear (e.g. the dynamic phase's
    routing losses), rewriting the file once. ``truncate_after(iteration)`` drops rows a resumed run redoes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fields: list[str] = []
        if os.path.isfile(path):
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                self.fields = list(reader.fieldnames or [])

    def _rows(self) -> list[dict[str, str]]:
        if not os.path.isfile(self.path):
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)

    def truncate_after(self, iteration: int) -> None:
        rows = self._rows()
        kept = [r for r in rows if int(float(r.get("iteration", 0) or 0)) <= iteration]
        if len(kept) != len(rows):
            self._rewrite(kept)

    def write(self, row: dict[str, Any]) -> None:
        new = [k for k in row if k not in self.fields]
        if new or not os.path.isfile(self.path):
            self.fields += new
            self._rewrite(self._rows() + [row])
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow(row)


def tensorboard_writer(log_dir: str):
    """A ``SummaryWriter`` when TensorBoard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir)
