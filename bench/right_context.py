"""How much a Japanese final would gain from hearing what the talker says next.

    .venv/bin/python -m bench.right_context [--seed 0] [--encoder-precision auto]

Decodes the first three utterances the VAD finds in the Japanese evaluation stream (ja_1's
three near-identical phrases) alone and together, joined abruptly as a streaming window joins
them, or with the real pause between them, and prints each window's text and avg_logprob as
a markdown table. docs/streaming.md ("Where the Japanese gap is") explains what it shows: the
first two phrases come out right only when the third is in the window.
"""

from __future__ import annotations

import argparse

import numpy as np

from streamd.audio import SAMPLE_RATE
from streamd.engine.precision import ENCODER_PRECISIONS, resolve_encoder_precision
from streamd.evaluation.streams import evaluation_stream
from streamd.models.loader import load_model
from streamd.streaming.window import WindowRequest
from streamd.streaming.window_decoder import WindowDecoder
from streamd.vad import SpeechEnded, SpeechStarted, VadGate

Span = tuple[int, int]  # [start, end) stream samples of one utterance, pre-roll to hangover


def utterance_spans(audio: np.ndarray) -> list[Span]:
    """Every utterance the default VAD finds in `audio`."""
    gate = VadGate()
    spans: list[Span] = []
    start = 0
    for event in [*gate.feed(audio), *gate.flush()]:
        if isinstance(event, SpeechStarted):
            start = event.sample
        elif isinstance(event, SpeechEnded):
            spans.append((start, event.sample))
    return spans


def window(audio: np.ndarray, spans: list[Span], abrupt: bool, request_id: int) -> WindowRequest:
    """A final request over `spans`: their audio joined end to end, or everything between the
    first start and the last end (the pauses kept)."""
    if not abrupt:
        spans = [(spans[0][0], spans[-1][1])]
    pieces, parts, at = [], [], 0
    for start, end in spans:
        pieces.append((at, start))
        parts.append(audio[start:end])
        at += end - start
    return WindowRequest(
        session_id="right-context",
        request_id=request_id,
        pieces=tuple(pieces),
        audio=np.concatenate(parts).astype(np.float32),
        prompt=(),
        forced=(),
        draft=(),
        language="ja",
        task="transcribe",
        final=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoder-precision", choices=ENCODER_PRECISIONS, default="auto")
    args = parser.parse_args()
    audio = evaluation_stream("ja", args.seed).audio
    spans = utterance_spans(audio)
    if len(spans) < 3:
        parser.error(f"the VAD found {len(spans)} utterance(s) in the Japanese stream, need 3")
    p1, p2, p3 = spans[:3]
    precision = resolve_encoder_precision(args.encoder_precision, "cpu")
    decoder = WindowDecoder(load_model("base"), encoder_precision=precision)
    cases = [
        ("p1 alone", [p1], True),
        ("p2 alone", [p2], True),
        ("p1 + p2, abrupt", [p1, p2], True),
        ("p1 + p2, the real pause", [p1, p2], False),
        ("p1 + p2 + p3, abrupt", [p1, p2, p3], True),
        ("p1 + p2 + p3, the real pauses", [p1, p2, p3], False),
    ]
    names = ", ".join(
        f"p{i} = {s / SAMPLE_RATE:.2f}-{e / SAMPLE_RATE:.2f} s"
        for i, (s, e) in enumerate((p1, p2, p3), 1)
    )
    print(f"Japanese stream seed {args.seed}, base, {precision} encoder; {names}\n")
    print("| window | text | avg_logprob |\n|---|---|---|")
    for request_id, (name, spans, abrupt) in enumerate(cases):
        result = decoder.decode([window(audio, spans, abrupt, request_id)])[0]
        text = "".join(w.word for w in result.words)
        print(f"| {name} | {text} | {result.avg_logprob:.2f} |")


if __name__ == "__main__":
    main()
