"""Evaluation of streamd as users see it: what `streamd bench`, bench/ and the tests share.

- `sounds`: seeded non-speech audio (silence, white / pink noise, murmur);
- `streams`: evaluation streams, real clips joined by those gaps, with their references;
- `scoring`: WER / CER, finalization and first-partial latency, words inside gaps;
- `daemon`: `streamd serve` as a subprocess, its /metrics and its CPU and memory;
- `load`: N real-time websocket clients against one daemon, scored;
- `report`: the terminal table, results.json and the latency plot.

Scoring and plotting need the `bench` extra (`pip install 'streamd[bench]'`: jiwer,
matplotlib); everything else needs only streamd's own dependencies.
"""

# The built-in model each language is evaluated with (English-only tiny.en; base for the rest).
MODEL_FOR_LANGUAGE = {"en": "tiny.en", "ja": "base"}
