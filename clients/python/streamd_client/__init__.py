"""Client SDK for streamd, the real-time Whisper speech-to-text daemon (protocol v1).

    import streamd_client

    async with streamd_client.connect(url, language="en") as stream:
        await stream.send(pcm)
        await stream.end()
        async for event in stream:
            match event:
                case streamd_client.Final(text=text):
                    print(text)

`streamd_client.sync.connect` is the blocking equivalent; `streamd-client` is the CLI.
"""

from streamd_client.errors import (
    AudioError,
    BufferOverflowError,
    BusyError,
    ConnectError,
    ConnectionLostError,
    MissingExtraError,
    ProtocolError,
    ServerError,
    StreamClosedError,
    StreamdClientError,
    UnauthorizedError,
)
from streamd_client.events import (
    PROTOCOL_VERSION,
    Closed,
    Error,
    Event,
    Final,
    Partial,
    Ready,
    SpeechEnded,
    SpeechStarted,
    Unknown,
    Word,
    event_to_dict,
    parse_event,
    parse_message,
)
from streamd_client.reconnect import ReconnectPolicy
from streamd_client.stream import DEFAULT_URL, Stream, StreamOptions, connect
from streamd_client.sync import SyncStream
from streamd_client.sync import connect as connect_sync

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_URL",
    "PROTOCOL_VERSION",
    "AudioError",
    "BufferOverflowError",
    "BusyError",
    "Closed",
    "ConnectError",
    "ConnectionLostError",
    "Error",
    "Event",
    "Final",
    "MissingExtraError",
    "Partial",
    "ProtocolError",
    "Ready",
    "ReconnectPolicy",
    "ServerError",
    "SpeechEnded",
    "SpeechStarted",
    "Stream",
    "StreamClosedError",
    "StreamOptions",
    "StreamdClientError",
    "SyncStream",
    "UnauthorizedError",
    "Unknown",
    "Word",
    "connect",
    "connect_sync",
    "event_to_dict",
    "parse_event",
    "parse_message",
]
