"""PyTorch training of the colorization U-Net (``python -m training --help``)."""
