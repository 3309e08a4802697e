"""The errors of reading and converting checkpoints."""


class CheckpointError(ValueError):
    """A checkpoint that is missing pieces, has unexpected or mis-shaped tensors, or is corrupt."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint that asks to run code other than rebuilding tensors; nothing of it was executed."""
