"""Reference code that runs inside other environments (``.venv-vllm``), never imported by the main suite."""
