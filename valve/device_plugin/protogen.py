"""Generate the Python gRPC stubs from the checked-in protos: `python -m valve.device_plugin.protogen`.

The protos are compiled with their path relative to the package root, so the stubs import each other as
`valve.device_plugin.proto.*` and register unique file names in the protobuf descriptor pool.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent / "proto"
PACKAGE_ROOT = PROTO_DIR.parents[2]  # the directory that holds `valve/`
PROTOS = ("deviceplugin.proto", "podresources.proto")


def generated_names(protos: tuple[str, ...] = PROTOS) -> list[str]:
    """The file names protoc writes next to the protos."""
    return [f"{Path(p).stem}{suffix}" for p in protos for suffix in ("_pb2.py", "_pb2_grpc.py")]


def generate(out_root: Path, proto_dir: Path = PROTO_DIR, protos: tuple[str, ...] = PROTOS) -> Path:
    """Run grpcio-tools' protoc; the stubs land in `<out_root>/<proto_dir relative to the package root>/`
    (`valve/device_plugin/proto/` by default; the DRA driver passes its own)."""
    from grpc_tools import protoc

    out_root.mkdir(parents=True, exist_ok=True)
    rel = proto_dir.relative_to(PACKAGE_ROOT)
    args = ["protoc", f"-I{PACKAGE_ROOT}", f"--python_out={out_root}", f"--grpc_python_out={out_root}"]
    args += [str(rel / p) for p in protos]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return out_root / rel


def main() -> None:
    out = generate(PACKAGE_ROOT)
    print(f"wrote {', '.join(generated_names())} to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
