"""The .mbz container codec (numpy and bitarray only; never imports torch)."""
