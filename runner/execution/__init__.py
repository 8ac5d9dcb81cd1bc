"""Running the blocks: the executor protocol, the local executor, the worker, the block loop, activations."""
