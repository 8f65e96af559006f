"""Equilibrate RLHF on PyTorch Lightning: FDC data mixing and AMA gradient masks."""

__version__ = "0.1.0"
