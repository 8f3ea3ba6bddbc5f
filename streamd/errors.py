"""Errors grouped by who is at fault, so each boundary knows what to do with them.

- `ClientError`: the caller sent something we cannot use (bad file, bad message). Report, carry on.
- `ConfigError`: the operator asked for something unavailable (unknown model, bad flag).
- `EngineError`: the inference backend failed. Our fault or the hardware's.
"""


class StreamdError(Exception):
    """Base of every error streamd raises on purpose."""


class ClientError(StreamdError):
    """The input is unusable; the message says what is wrong with it."""


class AudioError(ClientError):
    """An audio file or buffer could not be decoded into 16 kHz mono samples."""


class ConfigError(StreamdError):
    """The configuration asks for something that is not available."""


class ModelError(ConfigError):
    """A model name or path cannot be resolved or its weights cannot be read."""


class EngineError(StreamdError):
    """The inference engine failed (shape mismatch, backend error, out of memory)."""


class SessionStateError(StreamdError):
    """A session was driven out of order (a result for a request it did not issue, audio after
    the end of the stream). A bug in the driver, not in the audio."""


class DecodeCancelled(StreamdError):
    """A decode was stopped on purpose before it finished (its session no longer wanted it:
    a final became due while a partial step was being decoded). Not a failure: nothing is
    retried, and the session is told (`Session.decode_cancelled`)."""
