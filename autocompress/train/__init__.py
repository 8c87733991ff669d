"""Layer 6: the fine-tune: distillation losses and the bounded QAT + KD loop, its tuning.

The package by job: ``losses`` (logit KD, output matching, the hard-target term),
``features`` (hidden-feature distillation), ``distill`` (the bounded fine-tune loop) and
``tuning`` (a trial's two-phase fine-tune: recovery, then QAT + KD).

May import: layers 1-5 (``errors``, ``config``, ``intake``, ``study``, ``model``, ``results``,
``runtime``, ``transform``)."""
