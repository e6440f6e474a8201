"""CLIP backbone (any Hugging Face checkpoint), tokenizer training and the contrastive bootstrap."""
