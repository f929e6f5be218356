"""Engine integrations: each engine's loader of prepared MoE layers lives in its own package (``vllm``), so that
another engine (SGLang) fits beside it without touching the rest."""
