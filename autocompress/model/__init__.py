"""Layer 3: what a model is and what may be done to it, as plain data: the plan, the
inventory of layers and channel groups, FLOPs, the search space, the analysis guard.

May import: ``errors``, ``config``, ``intake``, ``study``."""
