"""The training engine: metric sinks and checkpoints now; the host loop and trainers build on them."""
