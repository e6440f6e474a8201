"""Captioning library: caption data, the decoder trainer, decoding, evaluation."""
