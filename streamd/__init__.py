"""streamd: real-time streaming speech-to-text on Whisper."""

__version__ = "0.1.0"
