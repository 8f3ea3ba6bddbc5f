"""Stopping a decode that is under way, from another thread.

A driver that no longer needs the step it is decoding (its session's final became due,
`Session.superseded`) sets the request's `threading.Event`; the engine looks at it between
pieces of work (encoder layers, decoder passes) and stops with `DecodeCancelled`. Checked
cooperatively because a torch call cannot be interrupted from outside, and a compiled graph
(Neuron) not at all: there the check falls between graph calls.
"""

from __future__ import annotations

import threading

from streamd.errors import DecodeCancelled


def raise_if_cancelled(cancel: threading.Event | None) -> None:
    """DecodeCancelled if `cancel` is set; nothing when it is None (an uncancellable decode)."""
    if cancel is not None and cancel.is_set():
        raise DecodeCancelled("the decode was cancelled: its session no longer needs it")
