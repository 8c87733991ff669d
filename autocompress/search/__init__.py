"""Layer 9: the search loop and its priors: session, warm starts, sensitivity, guided plans,
learning-rate probe, promotions, refine and ``evaluate_plan``.

May import: layers 1-8 (everything but ``api`` and ``cli``)."""
