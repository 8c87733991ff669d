"""Helpers of ``benchmarks/cifar10.py``: data, teacher, trials measured like search trials,
and the report. Not part of the autocompress package."""
