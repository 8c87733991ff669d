"""Layer 9: the search loop and its priors: session, warm starts, sensitivity, guided plans,
learning-rate probe, promotions, what a run counts (``counter``), refine and
``evaluate_plan``. The search's entry builds the narrow settings each stage takes
(``config.settings``) once and passes them down.

May import: layers 1-8 (everything but ``api`` and ``cli``)."""
