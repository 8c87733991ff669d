"""Layer 4: run and time a file on a target: ONNX Runtime, OpenVINO and TensorRT sessions,
timing, per-node and per-layer profiles, the study's fp32 latency reference and latency model.

May import: ``errors``, ``config``, ``intake``, ``study``, ``model``."""
