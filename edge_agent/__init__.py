"""Edge inference agent: cameras → ONNX Runtime → results over MQTT, with hot-swapped models."""

__version__ = "0.1.0"
