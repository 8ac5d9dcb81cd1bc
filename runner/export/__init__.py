"""Writing checkpoints: the exporter base, the format registry, one module per format, shards, manifest, inspect."""
