"""Reading a checkpoint and running its blocks: architecture adapters, safetensors index, skeleton, block forward."""
