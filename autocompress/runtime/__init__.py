"""Layer 4: run and time a file on a target: ONNX Runtime, OpenVINO and TensorRT sessions,
timing, per-node and per-layer profiles, the study's fp32 latency reference and latency model.

The package by job: ``sessions`` (open a file on a target, the settings record), ``scoring``
(outputs and accuracy of a file), ``timing`` (latency, interleaved timing, session-option
choice), ``node_times`` and ``onnx_profile`` (the runtime's per-node profile), ``cpu`` (CPU
facts), ``openvino`` and ``tensorrt`` (those targets), ``measure`` (sizes and statistics),
``torch_profile`` (per-layer PyTorch profile), ``latency_reference`` and ``latency_model``.

May import: ``errors``, ``config``, ``intake``, ``study``, ``model``."""
