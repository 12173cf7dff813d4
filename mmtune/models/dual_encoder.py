"""Dual encoder: a timm image backbone and a transformers text encoder with projection heads."""

DUAL_ENCODER_FILE = "mmtune_dual_encoder.json"
