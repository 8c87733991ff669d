"""Layer 6: the fine-tune: distillation losses and the bounded QAT + KD loop, its tuning.

May import: layers 1-5 (``errors``, ``config``, ``intake``, ``study``, ``model``, ``results``,
``runtime``, ``transform``)."""
