"""Model files: the registry of packaged graphs, the verified store, and ONNX Runtime sessions."""
