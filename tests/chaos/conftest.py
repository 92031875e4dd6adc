"""The chaos suite's fixture: ``figures`` (tests/support/chaos.py)."""

from chaos import figures  # noqa: F401 - a fixture, found by pytest through this import
