"""Layer 7: one trial: build, latency pre-check, fine-tune, export, measure, record; and a
trial's model rebuilt from plain data.

May import: layers 1-6."""
