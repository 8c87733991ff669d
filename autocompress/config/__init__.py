"""Layer 1: every option of a search (``SearchConfig``), its checks, YAML loading, the
command-line flags generated from it, and the narrow settings each stage takes.

May import: ``autocompress.errors`` only."""
