"""Caption metrics (CIDEr, METEOR, BLEU-4, ROUGE-L) through the COCO caption toolkit, `pycocoevalcap`.

Used for referring expression generation (RefCOCOg: the paper reports METEOR and CIDEr) and for captions
(Flickr30k: CIDEr). The toolkit is the one the captioning literature reports with, so numbers are comparable:

- Tokenisation: the toolkit's Stanford PTB tokenizer (lower-cases, splits punctuation, drops it). It runs on
  Java. Without Java a plain fallback is used (lower-case, split on whitespace and punctuation, drop
  punctuation) and the result says so: numbers then differ slightly from the published ones.
- CIDEr: the toolkit's `Cider` (CIDEr-D: document frequencies from the references being evaluated, σ = 6,
  clipped counts, ×10). Pure Python.
- METEOR: the toolkit's `Meteor` runs meteor-1.5.jar (shipped inside the package) on Java with 2 GB of heap.
  Without Java it is left out and the result says so.
- BLEU-4 and ROUGE-L: the toolkit's `Bleu(4)` and `Rouge`, pure Python.
- SPICE is not offered: it downloads Stanford CoreNLP models on first use, which cannot work offline.

Scores are reported ×100, as in papers (CIDEr 0.603 → 60.3).

Install: `pip install 'kosmos2[eval]'` (pycocoevalcap; Java 8+ on PATH for PTB tokenisation and METEOR).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

METRICS = ("CIDEr", "METEOR", "BLEU-4", "ROUGE-L")

# The punctuation tokens the toolkit's tokenizer drops after PTB tokenisation.
_PUNCTUATION = {
    "''",
    "'",
    "``",
    "`",
    "-LRB-",
    "-RRB-",
    "-LCB-",
    "-RCB-",
    ".",
    "?",
    "!",
    ",",
    ":",
    "-",
    "--",
    "...",
    ";",
}


def require() -> None:
    """Fail early (before any inference) when pycocoevalcap is missing."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "caption metrics need pycocoevalcap: pip install 'kosmos2[eval]' (or pycocoevalcap==1.2)"
        ) from e


def java_available() -> bool:
    return shutil.which("java") is not None


def simple_tokenize(text: str) -> str:
    """Fallback tokenisation: lower-case, split off punctuation, drop it (close to the toolkit's PTB pass)."""
    tokens = re.findall(r"[\w]+(?:'[\w]+)?|[^\w\s]", text.lower())
    return " ".join(t for t in tokens if t not in _PUNCTUATION and re.search(r"\w", t))


def caption_metrics(
    candidates: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    metrics: Sequence[str] = ("CIDEr", "METEOR"),
    tokenizer: str = "auto",
) -> dict[str, Any]:
    """Corpus-level caption metrics.

    candidates: id → the generated text; references: id → the reference texts (≥ 1 each, same ids).
    metrics: names from METRICS. tokenizer: "ptb" (Java), "simple", or "auto" (ptb when Java is found).
    Returns {"scores": {name: value ×100}, "per_item": {name: {id: value ×100}}, "tokenizer": str,
    "notes": [what was skipped and why]}.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown caption metric(s) {unknown}; choose from {', '.join(METRICS)}")
    if set(candidates) != set(references):
        missing = sorted(set(references) ^ set(candidates))[:5]
        raise ValueError(f"candidates and references must have the same ids; these differ: {missing}")
    for key, refs in references.items():
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{key!r}] must be a non-empty list of texts, got {refs!r}")
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as e:
        raise ImportError(
            "caption metrics need pycocoevalcap: pip install 'kosmos2[eval]' (or pycocoevalcap==1.2)"
        ) from e

    notes: list[str] = []
    has_java = java_available()
    if tokenizer == "auto":
        tokenizer = "ptb" if has_java else "simple"
        if not has_java:
            notes.append(
                "Java not found: simple tokenisation instead of the PTB tokenizer (numbers differ "
                "slightly from the COCO toolkit's)"
            )
    if tokenizer not in ("ptb", "simple"):
        raise ValueError(f"tokenizer must be 'ptb', 'simple' or 'auto', got {tokenizer!r}")
    if tokenizer == "ptb" and not has_java:
        raise RuntimeError(
            "the PTB tokenizer runs on Java, which is not on PATH; install Java 8+ or pass tokenizer='simple'"
        )

    ids = list(candidates)
    res, gts = _tokenize({i: [candidates[i]] for i in ids}, {i: list(references[i]) for i in ids}, tokenizer)
    if not ids:
        return {"scores": {}, "per_item": {}, "tokenizer": tokenizer, "notes": notes + ["nothing to score"]}

    scores: dict[str, float] = {}
    per_item: dict[str, dict[str, float]] = {}
    for name in metrics:
        if name == "CIDEr":
            total, each = Cider().compute_score(gts, res)
        elif name == "BLEU-4":
            totals, eaches = Bleu(4).compute_score(gts, res, verbose=0)
            total, each = totals[3], eaches[3]
        elif name == "ROUGE-L":
            total, each = Rouge().compute_score(gts, res)
        else:  # METEOR
            if not has_java:
                notes.append("METEOR skipped: it runs meteor-1.5.jar on Java, which is not on PATH")
                continue
            from pycocoevalcap.meteor.meteor import Meteor

            scorer = Meteor()
            try:
                total, each = scorer.compute_score(gts, res)
            finally:
                del scorer  # its __del__ ends the Java process
        scores[name] = 100.0 * float(total)
        per_item[name] = {i: 100.0 * float(v) for i, v in zip(ids, each, strict=True)}
    notes.append("SPICE not offered: it downloads Stanford CoreNLP models at first use (no network here)")
    return {"scores": scores, "per_item": per_item, "tokenizer": tokenizer, "notes": notes}


def _tokenize(
    res: dict[str, list[str]], gts: dict[str, list[str]], tokenizer: str
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    # Newlines would split one caption into two lines of the tokenizer's (and METEOR's) line protocol.
    res = {k: [" ".join(c.split()) for c in v] for k, v in res.items()}
    gts = {k: [" ".join(c.split()) for c in v] for k, v in gts.items()}
    if tokenizer == "simple":
        return (
            {k: [simple_tokenize(c) for c in v] for k, v in res.items()},
            {k: [simple_tokenize(c) for c in v] for k, v in gts.items()},
        )
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # One PTB pass over candidates and references together (one Java start); keys kept apart by a prefix.
    both = {
        **{("r", k): [{"caption": c} for c in v] for k, v in res.items()},
        **{("g", k): [{"caption": c} for c in v] for k, v in gts.items()},
    }
    out = PTBTokenizer().tokenize(both)
    return ({k: out[("r", k)] for k in res}, {k: out[("g", k)] for k in gts})
