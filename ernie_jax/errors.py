"""User-facing error types: one per layer, each message names the key/file/tensor and the fix."""


class ErnieJaxError(Exception):
    """Base class for errors a user can cause (bad config, data or checkpoint)."""


class ConfigError(ErnieJaxError, ValueError):
    """A config file, override or value is invalid."""


class DataError(ErnieJaxError, ValueError):
    """A data source or tokenizer is missing or unusable."""


class CheckpointError(ErnieJaxError, ValueError):
    """A checkpoint (orbax or Hugging Face) is missing, corrupt or of another model."""


class TrainingError(ErnieJaxError, RuntimeError):
    """Training cannot go on (e.g. the loss stays non-finite); the checkpoints written so far are kept."""


class ResourceError(ErnieJaxError, RuntimeError):
    """The run does not fit the device memory (found at compile time or when a step allocates)."""


def is_out_of_memory(error: BaseException) -> bool:
    """True for XLA's allocation failures (RESOURCE_EXHAUSTED / Out of memory)."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text
