"""Regenerate the gRPC stubs from fermi.proto: `python -m fermi.server.rpc.codegen`
(needs grpcio-tools, a test dependency). The proto is compiled as
fermi/server/rpc/fermi.proto, so the stubs import each other by the installed
package's name."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
PACKAGE = Path("fermi/server/rpc")
STUBS = ("fermi_pb2.py", "fermi_pb2.pyi", "fermi_pb2_grpc.py")


def generate(out: Path) -> list[Path]:
    """The stubs, written into `out`; their paths."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / PACKAGE
        src.mkdir(parents=True)
        shutil.copy(HERE / "fermi.proto", src / "fermi.proto")
        args = ["protoc", f"-I{tmp}", f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}",
                str(PACKAGE / "fermi.proto")]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on fermi.proto")
        out.mkdir(parents=True, exist_ok=True)
        return [Path(shutil.copy(src / name, out / name)) for name in STUBS]


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(path)
