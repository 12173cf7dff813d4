"""Continual fine-tuning: stages trained one after another from the previous stage's model, with
seeded replay of earlier samples (kept as manifests, not copied), class-incremental heads (old
classes kept, new ones appended), optional LwF distillation, and the accuracy matrix, average
forgetting and backward transfer after every stage."""
