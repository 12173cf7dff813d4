"""Data: readers -> standard samples -> transforms -> collated batches, one data module per task."""
