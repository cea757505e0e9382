"""Inference: model manifests, ONNX Runtime sessions, and pre/post-processing per task.

``engine.LoadedModel`` is the entry point; ``manifest`` describes a model, ``providers`` picks
execution providers, ``preprocess`` builds input tensors and ``postprocess`` holds one small
unit per task, registered by task name.
"""
