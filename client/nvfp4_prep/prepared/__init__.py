"""Prepared checkpoints, made and checked where the job runs (the client side): the offline ``prepare`` job,
the writer of sharded safetensors with their manifest, and ``verify``."""
