"""clipda: adapt CLIP to captioning and VQA as a reproducible DVC pipeline."""

__version__ = "0.1.0"
