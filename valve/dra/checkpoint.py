"""The driver's record of prepared claims, so a restarted driver neither loses nor prepares a claim twice.

`<state dir>/checkpoint.json`: {"version": 1, "claims": {uid: {"namespace", "name", "devices": [...],
"edits": {...}}}}, written atomically after every change.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from valve.dra.cdi import write_atomic

log = logging.getLogger(__name__)
VERSION = 1


class Checkpoint:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.claims: dict[str, dict[str, Any]] = self._load()

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            # Refuse to start on a record that cannot be read: starting empty would forget prepared claims.
            raise RuntimeError(f"checkpoint {self.path} is unreadable ({e}); move it away to start empty") from None
        if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("claims"), dict):
            raise RuntimeError(f"checkpoint {self.path}: not a version {VERSION} checkpoint")
        return dict(data["claims"])

    def get(self, uid: str) -> dict[str, Any] | None:
        with self._lock:
            return self.claims.get(uid)

    def put(self, uid: str, entry: dict[str, Any]) -> None:
        with self._lock:
            self.claims[uid] = entry
            self._save()

    def remove(self, uid: str) -> bool:
        with self._lock:
            if self.claims.pop(uid, None) is None:
                return False
            self._save()
            return True

    def _save(self) -> None:
        write_atomic(self.path, {"version": VERSION, "claims": self.claims}, mode=0o600)
