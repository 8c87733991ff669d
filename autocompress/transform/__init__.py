"""Layer 5: apply a plan to a model: structured and unstructured pruning, attention heads,
the student structure, quantization (fake-quant, QDQ export, ONNX Runtime's tools), graph
compaction, and the survey that lists what a model offers.

May import: ``errors``, ``config``, ``intake``, ``study``, ``model``, ``results``, ``runtime``."""
