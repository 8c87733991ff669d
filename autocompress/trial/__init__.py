"""Layer 7: one trial: build, latency pre-check, fine-tune, export, measure, record; and a
trial's model rebuilt from plain data. A module per step (``build``, ``precheck``,
``constraints``, ``finetune``, ``measurement``), run in order by ``runner.TrialRunner``
over the ``context.SearchContext`` every trial of a search shares.

May import: layers 1-6."""
