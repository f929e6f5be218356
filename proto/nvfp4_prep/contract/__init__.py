"""The layout contract (SPEC.md) as names every room shares.

``layout`` (backends, activations, tensor names, versions, the layout id), ``expert_keys`` (the per-expert
name grammar), ``dtypes``, ``tensor_bytes``, ``mma_view``, ``errors`` (``PrepError``) and ``environment``
(the ``NVFP4_PREP_*`` variables). It sits at the bottom of the dependency graph and imports none of the
project; the package itself imports nothing, so that ``layout`` and ``environment`` load without torch
(the CLI builds its parser from them).
"""
