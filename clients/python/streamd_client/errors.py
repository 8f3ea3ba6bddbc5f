"""Errors the SDK raises, grouped by what the caller can do about them.

StreamdClientError
├── ServerError            the daemon refused or ended the stream (`code`, `message`)
│   ├── UnauthorizedError  wrong or missing token: fix the token, retrying will not help
│   └── BusyError          the daemon is at capacity: retry later
├── ConnectError           could not reach the daemon (refused, DNS, timeout, HTTP error)
├── ConnectionLostError    the connection dropped and reconnecting was off or gave up
├── ProtocolError          the daemon sent something protocol v1 does not allow (a bug)
├── BufferOverflowError    too much audio piled up while disconnected; it was not accepted
├── StreamClosedError      the stream was used after it ended
├── AudioError             an audio file or device could not be read
└── MissingExtraError      an optional extra (`files`, `mic`) is not installed
"""

from __future__ import annotations


class StreamdClientError(Exception):
    """Base of every error the SDK raises on purpose."""


class ServerError(StreamdClientError):
    """The daemon sent a fatal `error` message (or refused the connection) with this `code`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class UnauthorizedError(ServerError):
    """The daemon wants a token (`token=` / `--token` / STREAMD_TOKEN) and this one is wrong."""


class BusyError(ServerError):
    """The daemon holds its maximum number of streams; try again later (with backoff)."""


class ConnectError(StreamdClientError):
    """No websocket connection could be opened (refused, unreachable, timed out, HTTP error)."""


class ConnectionLostError(StreamdClientError):
    """The connection ended without `closed`, and reconnecting was disabled or gave up."""


class ProtocolError(StreamdClientError):
    """A message from the daemon does not fit protocol v1 (malformed JSON, missing field)."""


class BufferOverflowError(StreamdClientError):
    """Audio sent while disconnected would exceed `max_buffer_s`; that chunk was not accepted.

    Everything accepted before it is still buffered and is sent after the reconnect.
    """


class StreamClosedError(StreamdClientError):
    """`send`/`finalize`/`end` after the stream ended or was closed."""


class AudioError(StreamdClientError):
    """An audio file or input device could not be read; the message names it and says why."""


class MissingExtraError(StreamdClientError, ImportError):
    """A feature needs an optional extra; the message gives the pip command that installs it."""

    def __init__(self, extra: str, feature: str) -> None:
        super().__init__(
            f"{feature} needs the {extra!r} extra: pip install 'streamd-client[{extra}]'"
        )
        self.extra = extra


def server_error(code: str, message: str) -> ServerError:
    """The most specific ServerError subclass for an error `code` from the daemon."""
    match code:
        case "unauthorized":
            return UnauthorizedError(code, message)
        case "busy":
            return BusyError(code, message)
        case _:
            return ServerError(code, message)
