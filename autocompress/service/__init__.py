"""The compression service: jobs submitted over HTTP (``autocompress serve``), a queue kept in
the study database, workers that claim jobs and run their searches (``autocompress worker``),
projects and their tokens (``autocompress admin``), and a command-line client (``submit``,
``jobs``, ``watch``, ``cancel``, ``fetch``). The contract between these parts:
docs/service.md.

Layer 10. May import every layer below (``search`` runs a job; ``export`` writes its files;
``dashboard`` renders its pages). Importing this package does not import torch.
"""
