"""Layer 4: fronts, hypervolume, the selection rule, comparisons with fp32 and the
terminal tables; pure functions over plain records (torch only inside ``metrics``'s layer
counters, which the dashboard never calls).

May import: ``errors``, ``config``, ``intake``, ``study``, ``model``."""
