"""CLIP library: any Hugging Face checkpoint behind one interface (backbone), tokenizer
training, small checkpoints (checkpoint), image-caption pairs (pairs), contrastive
training (contrastive) and held-out retrieval (retrieval). The stage is
`pipeline.stages.clip_bootstrap`."""
