"""mbz: prune and quantize a MobileNet-v2 into a .mbz file that runs without torch."""

__version__ = "0.1.0"
