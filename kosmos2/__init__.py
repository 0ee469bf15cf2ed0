"""kosmos2: Kosmos-2, the multimodal language model that can point (Peng et al. 2023, arXiv:2306.14824).

`import kosmos2` stays light: torch-heavy parts are imported when first used (`kosmos2.Predictor`).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Predictor", "GroundingResult", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Predictor", "GroundingResult"):
        from kosmos2 import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'kosmos2' has no attribute {name!r}")
