"""Model loaders: inference-only VQGAN and frozen CLIP."""
