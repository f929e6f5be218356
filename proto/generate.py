"""Regenerates the committed Python stubs of the nvfp4_prep.v1 contract.

Run it after editing a .proto file (``.ci/env python proto/generate.py``);
tests call ``generate(tmpdir)`` and diff the result against the committed
stubs, so stale stubs fail CI. Needs grpcio-tools 1.84 (the stubs' version).
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = ("nvfp4_prep/v1/prep.proto",)
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generated_files(proto_file: str) -> list[str]:
    """Paths, relative to the output root, of the stubs generated for ``proto_file``."""
    stem = proto_file.removesuffix(".proto")
    return [stem + suffix for suffix in GENERATED_SUFFIXES]


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc for every contract file into ``out_dir``; returns the files written."""
    from grpc_tools import protoc

    well_known = resources.files("grpc_tools") / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for proto_file in PROTO_FILES:
        (out_dir / proto_file).parent.mkdir(parents=True, exist_ok=True)
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(PROTO_ROOT / proto_file),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto_file}")
        written += [out_dir / name for name in generated_files(proto_file)]
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT,
                        help="output root (default: next to the .proto files, i.e. the committed stubs)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
