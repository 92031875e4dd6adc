"""Which engine and architecture a command runs (``--engine``, ``--arch``). Plain Python: a bad choice is told
in one line before torch is imported or a model built."""

from __future__ import annotations

import sys

from valve.engine.config import ModelConfig

ENGINES = ("ours", "transformers")
ARCHS = ("llama", "qwen")
MIN_TRANSFORMERS = 5  # major version: model configs take ``rope_parameters`` (4.x would drop our rope theta)


def check_engine(engine: str, arch: str) -> None:
    """Raise ValueError with a one-line message naming the fix for an engine/arch choice that cannot run."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: use --engine {' or --engine '.join(ENGINES)}")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: use --arch {' or --arch '.join(ARCHS)}")
    if engine == "ours" and arch != "llama":
        raise ValueError(f"--arch {arch} needs --engine transformers (our own model is Llama only)")
    if engine == "transformers":
        try:
            import transformers
        except ImportError:
            raise ValueError("transformers is not installed: pip install transformers") from None
        version = transformers.__version__
        if int(version.split(".")[0]) < MIN_TRANSFORMERS:
            raise ValueError(f"transformers {version} is too old: pip install 'transformers>={MIN_TRANSFORMERS}'")


def require_engine(engine: str, arch: str, prog: str) -> None:
    """``check_engine`` for a command line: a bad choice ends the process with one line on stderr (exit 2)."""
    try:
        check_engine(engine, arch)
    except ValueError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def build_engine_model(engine: str, arch: str, cfg: ModelConfig, device: str | None = None, seed: int = 0):
    """The model behind ``--engine``/``--arch``: ours (``valve.engine.model``) or transformers' (``valve.engine.hf``)."""
    check_engine(engine, arch)
    if engine == "ours":
        from valve.engine.model import build_model

        return build_model(cfg, device=device, seed=seed)
    from valve.engine.hf import build_hf_model

    return build_hf_model(cfg, arch, device=device, seed=seed)
