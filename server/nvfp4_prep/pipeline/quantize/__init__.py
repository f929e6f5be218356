"""High-precision (BF16, FP16, FP32) MoE experts to NVFP4, byte for byte as ModelOpt 0.47 or llm-compressor 0.14.

Pure functions over tensors: ``quantize_layer`` gives the stacked layer ``prepare`` takes,
``quantized_expert_tensors`` the tensors a tool's checkpoint holds, ``quantize_weights`` one stacked
weight. ``recipes`` states each tool's formulas and where they differ.
"""

from .layer import TOOL_NAMES, QuantizedWeights, dequantize, quantize_layer, quantize_weights, quantized_expert_tensors
from .recipes import LLM_COMPRESSOR, MODELOPT, RECIPES

__all__ = [
    "LLM_COMPRESSOR",
    "MODELOPT",
    "RECIPES",
    "TOOL_NAMES",
    "QuantizedWeights",
    "dequantize",
    "quantize_layer",
    "quantize_weights",
    "quantized_expert_tensors",
]
