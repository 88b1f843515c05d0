"""PyTorch definitions of the networks; imported by training, export and the LPIPS metric only.

Inference never imports this package: it runs the ONNX graphs exported from these modules.
"""
