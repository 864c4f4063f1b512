"""Evaluation on lm-eval: ``lm`` (FlareLM, the model lm-eval calls), ``task_specs`` (which task definition runs,
offline or online), ``runner`` (``flarectl eval``: tasks x modes -> rows, JSON, samples), ``humaneval`` and
``sandbox`` (code execution in separate, limited processes), ``tasks/`` (shipped lm-eval task twins)."""
