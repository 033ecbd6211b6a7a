"""Typed errors. Every message says what to do next."""


class OmniforgeError(Exception):
    """Base class: the CLI prints the message on one line and exits non-zero."""


class ConfigError(OmniforgeError, ValueError):
    """A flag, option or config value is wrong."""


class StorageError(OmniforgeError):
    """A URI cannot be read or written."""


class WeightsError(OmniforgeError):
    """Teacher weights cannot be found or loaded."""


class NoDecoderError(ConfigError):
    """A tokenizer can tokenize but not decode here (e.g. a released tokenizer whose only decoder is a diffusion
    model): callers that decode for drawing say so in one line and keep the tokens."""


class NothingToTrain(ConfigError):
    """A modality's labels hold nothing its tokenizer can train on (every label empty, e.g. nobody in any image):
    a caller that trains every tokenizer of a corpus (the demo) says so and goes on without that tokenizer."""


class CorpusError(OmniforgeError):
    """The input corpus cannot be read or planned."""


class CorruptShardError(CorpusError):
    """A committed shard tar cannot be read to its end (truncated, or overwritten after its commit)."""


class SampleError(Exception):
    """One sample cannot be labeled; the job records it as failed with this type and message.

    `error_type` is a short snake_case reason used to count failures (e.g. "decode_error",
    "too_many_pixels", "missing_caption", "teacher_error").
    """

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type
        self.message = message
