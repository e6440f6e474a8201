"""Cached CLIP embeddings of a dataset as Arrow shards (what the `embed` stage runs).

    items (pipeline.formats.*) -> shards of `shard_size` images -> part-NNNNN.arrow

- `dataset`: one dataset folder into one embeddings folder (`embed_dataset`), the whole
  flow the stage runs.
- `shards`: part files, their fingerprints, finished-shard detection (resume), `--shard
  i/n`, and the decode + embed loop over shards (`ShardEmbedder`, `ShardBuilder`).
- `encoders`: image decoding workers, pixel normalisation, image and text encoding.
- `tables`: the Arrow row layouts (caption rows, image rows, texts).
- `texts`: texts.arrow (VG questions and answers).
- `precomputed`: the LAION / clip-retrieval precomputed-embedding layout, taken as is.
- `manifest`: manifest.json + report.json once every shard is finished; the manifest
  names the CLIP and fingerprints its token table, which lives in the CLIP folder
  (`pipeline.clip.token_table`), not here.

Row order is the order of the format's listing; output bytes depend only on the inputs,
the model and the settings (not on worker count, resumes or process splits).
"""
