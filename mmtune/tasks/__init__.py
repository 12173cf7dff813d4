"""Tasks: one LightningModule per task family, sharing free functions from `common`."""
