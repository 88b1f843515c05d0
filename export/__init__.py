"""ONNX export of the feature extractor, the correspondence and the U-Net (``python -m export --help``)."""
