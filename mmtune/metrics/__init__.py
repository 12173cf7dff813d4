"""Task metrics built on torchmetrics."""
