"""Fixtures shared by several test files."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def short_dir(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, unless it is too long for unix socket paths (108 bytes) under CI's temp root."""
    if len(str(tmp_path)) <= 70:
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="vdp", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)
