"""``nvfp4-prep inspect DIR``: what a prepared folder holds, read from its manifest, before anything loads it.

Prints the layout record's shared fields, the engine versions it was made for, its tensor/expert-parallel
shard, each layer with its sizes and shard file, the shard files, the source it was made from (path, format
and the identity of its files) and the folder's file sizes (decimal kB/MB/GB; ``--json`` gives exact bytes
as numbers). A set of rank folders (``nvfp4_prep_ranks.json`` at its top) is shown rank by rank. No tensor
byte is read: ``nvfp4-prep verify DIR`` checks them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .checkpoint_commands import EXIT_ERROR
from .units import human_bytes as human


def folder_record(directory: Path) -> dict:
    """Everything ``inspect`` shows about one prepared folder (or rank set), as JSON-ready values."""
    from nvfp4_prep.checkpoint.errors import CheckpointError, CheckpointNotFound
    from nvfp4_prep.prepared.manifest import MANIFEST_NAME, Manifest
    from nvfp4_prep.prepared.prepared_config import engine_versions
    from nvfp4_prep.prepared.rank_set import RANKS_NAME
    from nvfp4_prep.prepared.reader import rank_folders

    manifest = Manifest.load(directory)
    if manifest is None:
        ranks = rank_folders(directory)
        if not ranks:
            raise CheckpointNotFound(f"{directory}: no {MANIFEST_NAME} (nor {RANKS_NAME}); expected a folder "
                                     "written by nvfp4-prep prepare")
        records = []
        for folder in ranks:
            try:
                records.append(folder_record(folder))
            except CheckpointError as exc:  # a rank not (yet) written: shown, the others still are
                records.append({"path": str(folder), "error": str(exc), "total_bytes": 0})
        return {"path": str(directory), "ranks_file": RANKS_NAME, "ranks": records,
                "total_bytes": sum(record["total_bytes"] for record in records)}
    shards = [{"file": filename, "layer": entry.get("layer"), "tensors": len(entry["tensors"]),
               "bytes": entry.get("size")} for filename, entry in sorted(manifest.shards.items())]
    layers = [{"prefix": shard["layer"], **manifest.layers.get(shard["layer"], {}), "shard": shard["file"],
               "bytes": shard["bytes"]} for shard in shards if shard["layer"] is not None]
    files = [{"name": path.name, "bytes": path.stat().st_size} for path in sorted(directory.iterdir())
             if path.is_file()]
    layout = manifest.layout
    return {
        "path": str(directory), "complete": manifest.complete, "source": manifest.source,
        "request": manifest.request, "layout": layout, "engine_versions": engine_versions(layout),
        "shard": {key: layout.get(key) for key in ("tp_rank", "tp_size", "ep_rank", "ep_size", "expert_placement")},
        "layers": layers, "shards": shards, "shard_bytes": sum(shard["bytes"] or 0 for shard in shards),
        "files": files, "total_bytes": sum(file["bytes"] for file in files),
    }


def _print_folder(record: dict, indent: str = "") -> None:
    def line(label: str, value: object, width: int = 12) -> None:
        print(f"{indent}{label:<{width}}{value}")

    line("folder", f"{record['path']} ({'complete' if record['complete'] else 'INCOMPLETE: prepare did not finish'})")
    source = record["source"]
    line("source", f"{source.get('path')} ({source.get('format')})")
    line("  identity", source.get("identity"))
    layout = record["layout"]
    line("layout", layout.get("layout_id"))
    for key, value in layout.items():
        if key != "layout_id":
            line(f"  {key}", json.dumps(value) if not isinstance(value, str) else value, width=28)
    line("engines", ", ".join(f"{name} {version}" for name, version in record["engine_versions"].items()))
    shard = record["shard"]
    line("shard", f"tp {shard['tp_rank']} of {shard['tp_size']}, ep {shard['ep_rank']} of {shard['ep_size']} "
                  f"({shard['expert_placement']} placement)")
    line("layers", len(record["layers"]))
    for layer in record["layers"]:
        print(f"{indent}  {layer['prefix']}: {layer.get('num_experts')} of {layer.get('global_num_experts')} experts, "
              f"hidden {layer.get('hidden_dim')} ({layer.get('hidden_dim_unpadded')} unpadded), intermediate "
              f"{layer.get('intermediate_dim')} ({layer.get('intermediate_dim_unpadded')} unpadded), "
              f"in {layer['shard']} ({human(layer['bytes'] or 0)})")
    line("shards", f"{len(record['shards'])}, {human(record['shard_bytes'])}")
    for entry in record["shards"]:
        print(f"{indent}  {entry['file']}: {human(entry['bytes'] or 0)}, {entry['tensors']} tensors, "
              f"{'layer ' + entry['layer'] if entry['layer'] else 'no MoE layer'}")
    line("files", f"{len(record['files'])}, {human(record['total_bytes'])} in all")


def run_inspect(args: argparse.Namespace) -> int:
    from nvfp4_prep.checkpoint.errors import CheckpointError

    try:
        record = folder_record(Path(args.out))
    except (CheckpointError, OSError) as err:
        print(f"nvfp4-prep inspect: {err}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    if "ranks" not in record:
        _print_folder(record)
        return 0
    print(f"{'rank set':<12}{record['path']}: {len(record['ranks'])} rank folders ({record['ranks_file']}), "
          f"{human(record['total_bytes'])} in all")
    for rank in record["ranks"]:
        print()
        if "error" in rank:
            print(f"  {'folder':<12}{rank['path']}: {rank['error']}")
        else:
            _print_folder(rank, indent="  ")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``inspect`` to the CLI's subcommands."""
    inspect = subparsers.add_parser(
        "inspect", help="show a prepared folder's layout, layers, shards, source and sizes",
        description="Prints what the manifest of prepared folder DIR records: the layout record, the engine "
                    "versions it was made for, its tensor/expert-parallel shard, each layer's sizes and shard "
                    "file, the source it was prepared from and the file sizes; each rank of a rank set. Reads "
                    "no tensor bytes (nvfp4-prep verify DIR checks those). Exits 2 when DIR is not a prepared "
                    "folder.")
    inspect.add_argument("out", metavar="DIR", help="prepared checkpoint directory (or set of rank folders)")
    inspect.add_argument("--json", action="store_true", help="print JSON, sizes as exact byte counts")
    inspect.set_defaults(run=run_inspect)
