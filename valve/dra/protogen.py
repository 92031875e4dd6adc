"""Generate the DRA driver's Python gRPC stubs from its checked-in protos: `python -m valve.dra.protogen`.

The same generator as the device plugin's (valve.device_plugin.protogen), over this package's proto folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

from valve.device_plugin import protogen as base

PROTO_DIR = Path(__file__).resolve().parent / "proto"
PROTOS = ("dra_v1.proto", "dra_v1beta1.proto", "pluginregistration.proto")


def generated_names() -> list[str]:
    return base.generated_names(PROTOS)


def generate(out_root: Path) -> Path:
    """Run grpcio-tools' protoc; the stubs land in `<out_root>/valve/dra/proto/`."""
    return base.generate(out_root, PROTO_DIR, PROTOS)


def main() -> None:
    out = generate(base.PACKAGE_ROOT)
    print(f"wrote {', '.join(generated_names())} to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
