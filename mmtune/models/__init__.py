"""Model families: how each kind of model is found, built, grouped into parts and exported."""
