"""``nvfp4-prep quantize``: a plain NVFP4 checkpoint (ModelOpt or compressed-tensors) from an unquantized one.

For users who want only the quantization: the experts of BF16_CKPT quantized byte for byte as the recipe's tool
would, every other tensor copied, and the configs an engine loads the result by (``prepared.quantized_writer``).
Thin: exit 0 on success, 2 for a checkpoint or input error, 3 for an operating-system error (one line each, as
``prepare`` prints them), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

from nvfp4_prep.contract.environment import env_value
from nvfp4_prep.contract.layout import QUANTIZE_RECIPES

from .checkpoint_commands import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OS_ERROR, os_error_line


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``quantize`` to the CLI's subcommands."""
    quantize = subparsers.add_parser(
        "quantize", help="quantize an unquantized (BF16) checkpoint's MoE experts to a plain NVFP4 checkpoint",
        description="Quantizes every MoE expert of the unquantized (BF16, FP16 or FP32) checkpoint CKPT by a tool's "
                    "rules, byte for byte what that tool stores (modelopt: ModelOpt 0.47 NVFP4_DEFAULT_CFG; "
                    "llm-compressor: llm-compressor 0.14 with compressed-tensors' NVFP4 scheme), copies every other "
                    "tensor, and writes OUT as that tool's checkpoint format, which engines load as such. The "
                    "activation scales come from calibration, which is not run here: --activation-scales names an "
                    "NVFP4 checkpoint of the same model or a calibration .safetensors file of per-module input "
                    "scales. Every flag --foo-bar may also be set as NVFP4_PREP_FOO_BAR.")
    quantize.add_argument("checkpoint", metavar="CKPT", help="the unquantized checkpoint directory or file")
    quantize.add_argument("--recipe", choices=QUANTIZE_RECIPES, required=env_value("recipe", None) is None,
                          default=env_value("recipe", None), help="whose bytes and checkpoint format "
                                                                  "[env NVFP4_PREP_RECIPE]")
    quantize.add_argument("--activation-scales", required=env_value("activation-scales", None) is None,
                          default=env_value("activation-scales", None), metavar="SRC",
                          help="an NVFP4 checkpoint of the same model, or a calibration .safetensors file "
                               "[env NVFP4_PREP_ACTIVATION_SCALES]")
    quantize.add_argument("--out", required=env_value("out", None) is None, default=env_value("out", None),
                          metavar="DIR", help="output directory (created) [env NVFP4_PREP_OUT]")
    quantize.add_argument("--device", default=env_value("device", None),
                          help="where to quantize, e.g. cuda:0 or cpu (default: the first CUDA device, else cpu) "
                               "[env NVFP4_PREP_DEVICE]")
    quantize.set_defaults(run=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    from nvfp4_prep.checkpoint import CheckpointError
    from nvfp4_prep.contract.errors import PrepError
    from nvfp4_prep.prepared.in_process import default_device
    from nvfp4_prep.prepared.quantized_writer import write_quantized_checkpoint

    try:
        device = args.device or default_device()
        summary = write_quantized_checkpoint(args.checkpoint, args.out, args.recipe, args.activation_scales,
                                             device=device)
    except (CheckpointError, PrepError, ValueError, RuntimeError) as exc:  # RuntimeError: a device torch refuses
        print(f"nvfp4-prep quantize: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(os_error_line("quantize", exc, args.out), file=sys.stderr)
        return EXIT_OS_ERROR
    except KeyboardInterrupt:
        print(f"nvfp4-prep quantize: interrupted; {args.out} may hold some finished files, run it again",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"{summary.out_dir}: {args.recipe} checkpoint, {len(summary.layers)} MoE layers quantized, "
          f"{len(summary.excluded)} modules left unquantized")
    return 0
