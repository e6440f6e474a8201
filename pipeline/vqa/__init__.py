"""VQA library: QA rows joined with cached embeddings, the head's training pass, the
frequency baselines, zero-shot CLIP prompts, ranking and accuracy."""
