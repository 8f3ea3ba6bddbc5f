"""Text scoring shared by the benchmarks: WER for English, CER for Japanese (DESIGN.md §7).

Lives in streamd.evaluation.scoring (`streamd bench` needs it installed); re-exported here.
"""

from __future__ import annotations

from streamd.evaluation.scoring import error_rate, normalize

__all__ = ["error_rate", "normalize"]
