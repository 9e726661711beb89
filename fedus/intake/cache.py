"""Per-file outcomes keyed by (path, size, mtime, settings), so unchanged files are never decoded twice.

SQLite rather than JSON: a 100k-file archive's cache is read and updated in one
transaction without rewriting everything.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict
from pathlib import Path

from fedus.intake.readers import FileOutcome

CACHE_FILE = ".fedus-intake-cache.sqlite"


class OutcomeCache:
    def __init__(self, folder: Path):
        self.db = sqlite3.connect(folder / CACHE_FILE)
        self.db.execute("CREATE TABLE IF NOT EXISTS outcomes (path TEXT PRIMARY KEY, size INTEGER, "
                        "mtime_ns INTEGER, settings TEXT, outcome TEXT)")

    def load(self) -> dict[str, tuple[int, int, str, FileOutcome]]:
        """path -> (size, mtime_ns, settings, outcome)."""
        rows = self.db.execute("SELECT path, size, mtime_ns, settings, outcome FROM outcomes")
        return {p: (s, m, k, FileOutcome(**json.loads(o))) for p, s, m, k, o in rows}

    def store(self, entries: list[tuple[str, int, int, FileOutcome]], settings: str) -> None:
        self.db.executemany("INSERT OR REPLACE INTO outcomes VALUES (?, ?, ?, ?, ?)",
                            [(p, s, m, settings, json.dumps(asdict(o))) for p, s, m, o in entries])
        self.db.commit()

    def forget(self, paths: list[str]) -> None:
        self.db.executemany("DELETE FROM outcomes WHERE path = ?", [(p,) for p in paths])
        self.db.commit()

    def close(self) -> None:
        self.db.close()
