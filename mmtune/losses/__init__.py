"""Losses that return named terms; the task sums them and logs each (open_clip's style)."""
