"""Layer 4: fronts, dominance, hypervolume, the selection rule, every comparison with fp32
("x smaller", "x faster", the guide's rates) and the terminal tables; pure functions over
plain records and plain rows, the one place export, the search's promotions, ``show`` and
the dashboard take them from (torch only inside ``metrics``'s layer counters, which the
dashboard never calls).

May import: ``errors``, ``config``, ``intake``, ``study``, ``model``."""
