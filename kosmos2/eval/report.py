"""Evaluation output: metrics as JSON, a Markdown table, plots, and a sample sheet of images with boxes.

    out_dir/
      metrics.json       summary numbers, settings, run statistics (what a script reads)
      records.jsonl      one line per query: prompt, generated text, true and predicted boxes, IoUs
      report.md          the tables (with the paper's numbers beside ours) and links to the pictures
      iou_hist_<split>.png   distribution of the first-box IoU, one plot per split (matplotlib)
      by_*_<split>.png       accuracy or recall by expression length / phrase type, one per split
      samples.png            a grid of images: true boxes green, predicted boxes red (first box thick),
                             each labelled with the metric that judged it ("R@5 hit", "first box IoU 0.62")

Plots use matplotlib's object API (no global pyplot state, Agg canvas); without matplotlib they are skipped
and report.md says so. The sample sheet is drawn with Pillow.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from kosmos2.fileio import atomic_write, atomic_write_text

Box = tuple[float, float, float, float]

TRUTH_COLOUR = (0, 170, 0)
PREDICTED_COLOUR = (220, 0, 0)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_jsonable) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    return repr(value)


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: floats with `digits` decimals, None as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; cells go through `fmt`."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# Plots (matplotlib)


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float = 6.0, height: float = 3.6) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def iou_histogram(ious: Sequence[float], path: str | os.PathLike, title: str) -> Path | None:
    """Histogram of IoUs in 20 bins over [0, 1] with the 0.5 threshold marked; None without matplotlib."""
    if not have_matplotlib():
        return None
    fig = _figure()
    ax = fig.add_subplot()
    ax.hist(list(ious), bins=[i / 20 for i in range(21)], color="#4878b0", edgecolor="white")
    ax.axvline(0.5, color="#c03030", linestyle="--", linewidth=1.2, label="IoU = 0.5")
    ax.set_xlim(0, 1)
    ax.set_xlabel("IoU with the ground truth")
    ax.set_ylabel("queries")
    ax.set_title(title)
    ax.legend(loc="upper center")
    fig.tight_layout()
    return atomic_write(path, lambda f: fig.savefig(f, format="png"))


def bar_chart(
    labels: Sequence[str],
    series: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    title: str,
    xlabel: str,
    ylabel: str = "percent",
    counts: Sequence[int] | None = None,
) -> Path | None:
    """Grouped bars (one group per label, one bar per series), optional n= under each label."""
    if not have_matplotlib():
        return None
    fig = _figure(max(6.0, 0.9 * len(labels) + 2), 3.8)
    ax = fig.add_subplot()
    n = max(1, len(series))
    width = 0.8 / n
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, list(values), width=width, label=name)
    ticks = [f"{lab}\nn={c}" for lab, c in zip(labels, counts, strict=True)] if counts else list(labels)
    ax.set_xticks(range(len(labels)), ticks, fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return atomic_write(path, lambda f: fig.savefig(f, format="png"))


# ------------------------------------------------------------------------------------------------------------
# Sample sheet (Pillow)


@dataclass(frozen=True)
class Sample:
    """One tile of the sample sheet: the image, a caption, true and predicted pixel boxes.

    correct: the hit or miss that `pick_samples` balances. verdict: the tile's first line, naming the metric
    that judged it ("first box IoU 0.62: miss", "R@1 miss, R@5 hit"); empty: plain "hit" / "miss".
    """

    image: Any  # path or PIL image
    title: str
    truth: Sequence[Box]
    predicted: Sequence[Box]
    correct: bool
    verdict: str = ""


def slug(*parts: str) -> str:
    """A file-name part from dataset / split names ("refcoco+", "val" -> "refcoco+_val")."""
    return "_".join("".join(c if c.isalnum() or c in "+-" else "-" for c in str(p)) for p in parts)


def pick_samples(samples: Sequence[Sample], count: int) -> list[Sample]:
    """Up to `count` samples, half misses and half hits where both exist, in their original order."""
    misses = [s for s in samples if not s.correct]
    hits = [s for s in samples if s.correct]
    take_miss = min(len(misses), max(count - len(hits), count // 2))
    chosen = {id(s) for s in misses[:take_miss]} | {id(s) for s in hits[: count - take_miss]}
    return [s for s in samples if id(s) in chosen]


def sample_sheet(
    samples: Sequence[Sample],
    path: str | os.PathLike,
    columns: int = 4,
    tile: int = 256,
    load: Callable[[Any], Image.Image] | None = None,
) -> Path | None:
    """Grid of tiles, each the image fitted into tile×tile with true (green) and predicted (red) boxes.

    load: turns Sample.image into a PIL image (default: the stored frame, no EXIF rotation, as evaluation
    reads images and as the datasets' boxes are given).
    """
    if not samples:
        return None
    if load is None:
        from kosmos2.eval.runner import load_stored_frame as load
    font = ImageFont.load_default(size=12)
    caption_h = 48
    rows = math.ceil(len(samples) / columns)
    legend_h = 22
    sheet = Image.new("RGB", (columns * tile, legend_h + rows * (tile + caption_h)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 4), "ground truth", fill=TRUTH_COLOUR, font=font)
    draw.text((110, 4), "prediction (first box thick)", fill=PREDICTED_COLOUR, font=font)
    for i, s in enumerate(samples):
        x0 = (i % columns) * tile
        y0 = legend_h + (i // columns) * (tile + caption_h)
        image = load(s.image)
        w, h = image.size
        scale = min(tile / w, tile / h)
        thumb = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
        ox, oy = x0 + (tile - thumb.width) // 2, y0 + (tile - thumb.height) // 2
        sheet.paste(thumb, (ox, oy))

        def rect(
            box: Sequence[float], colour: tuple[int, int, int], width: int, ox=ox, oy=oy, scale=scale
        ) -> None:
            x1, y1, x2, y2 = (float(v) * scale for v in box)
            draw.rectangle(
                (ox + x1, oy + y1, ox + max(x1, x2), oy + max(y1, y2)), outline=colour, width=width
            )

        for box in s.truth:
            rect(box, TRUTH_COLOUR, 2)
        for j, box in enumerate(s.predicted):
            rect(box, PREDICTED_COLOUR, 3 if j == 0 else 1)
        width = tile // 7
        verdict = textwrap.wrap(s.verdict or ("hit" if s.correct else "miss"), width=width)
        lines = (verdict + textwrap.wrap(s.title, width=width))[:3]
        draw.multiline_text((x0 + 4, y0 + tile + 2), "\n".join(lines), fill=(0, 0, 0), font=font, spacing=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda f: sheet.save(f, format="PNG"))


def image_link(path: Path | None, out_dir: Path, alt: str) -> str:
    if path is None:
        return f"*{alt}: not drawn (matplotlib is not installed; `pip install 'kosmos2[eval]'`)*"
    return f"![{alt}]({path.relative_to(out_dir).as_posix()})"


# ------------------------------------------------------------------------------------------------------------
# Past one threshold: accuracy against the IoU threshold, AP, the pointing game, calibration


def accuracy_vs_iou_plot(
    by_iou: Mapping[str, float],
    path: str | os.PathLike,
    title: str,
    ap_by_iou: Mapping[str, float] | None = None,
) -> Path | None:
    """Accuracy (and AP, when given) against the IoU threshold; the dicts of metrics.accuracy_over_thresholds
    / ap_over_thresholds. None without matplotlib."""
    if not have_matplotlib():
        return None
    thresholds = [k for k in by_iou if k != "mean"]
    xs = [float(k) for k in thresholds]
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(
        xs,
        [100 * by_iou[k] for k in thresholds],
        marker="o",
        label=f"accuracy (mean {100 * by_iou['mean']:.1f})",
    )
    if ap_by_iou:
        ax.plot(
            xs,
            [100 * ap_by_iou[k] for k in thresholds],
            marker="s",
            label=f"AP (mean {100 * ap_by_iou['mean']:.1f})",
        )
    ax.set_xlim(min(xs) - 0.02, max(xs) + 0.02)
    ax.set_ylim(0, 100)
    ax.set_xlabel("IoU threshold")
    ax.set_ylabel("percent")
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return atomic_write(path, lambda f: fig.savefig(f, format="png"))


def reliability_plot(
    bins: Sequence[Mapping[str, float]], path: str | os.PathLike, title: str, ece: float
) -> Path | None:
    """The reliability diagram of metrics.reliability's bins: accuracy per confidence bin against the
    diagonal, bar widths the bins, counts on top. None without matplotlib."""
    if not have_matplotlib():
        return None
    fig = _figure(4.8, 4.2)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#888888", linestyle="--", linewidth=1, label="perfect calibration")
    for b in bins:
        if b["n"]:
            ax.bar(
                b["low"],
                b["accuracy"],
                width=b["high"] - b["low"],
                align="edge",
                color="#4878b0",
                edgecolor="white",
            )
            ax.text((b["low"] + b["high"]) / 2, b["accuracy"] + 0.01, str(b["n"]), ha="center", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("score (confidence)")
    ax.set_ylabel("accuracy (IoU ≥ 0.5)")
    ax.set_title(f"{title}\nECE {ece:.3f}", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return atomic_write(path, lambda f: fig.savefig(f, format="png"))


def threshold_section(summary: Mapping[str, Any], out_dir: Path, stem: str, title: str) -> list[str]:
    """Markdown lines (and plots OUT/<stem>_iou.png, OUT/<stem>_reliability.png) for the metrics of
    kosmos2.eval.synthetic.rec_trust_metrics: accuracy and AP per IoU threshold, pointing game, ECE."""
    by_iou, ap = summary["accuracy_by_iou"], summary.get("ap_by_iou")
    thresholds = [k for k in by_iou if k != "mean"]
    rows = [["accuracy", *(f"{100 * by_iou[k]:.1f}" for k in thresholds), f"{100 * by_iou['mean']:.1f}"]]
    if ap:
        rows.append(["AP (by score)", *(f"{100 * ap[k]:.1f}" for k in thresholds), f"{100 * ap['mean']:.1f}"])
    md = [
        f"### {title}: past one IoU threshold",
        "",
        markdown_table(["IoU ≥", *thresholds, "0.5:0.95"], rows),
        "",
        f"Pointing game (the answer box's centre inside a true box): {100 * summary['pointing']:.1f} % of "
        f"{summary['n']}. ",
    ]
    plot = accuracy_vs_iou_plot(
        by_iou, out_dir / f"{stem}_iou.png", f"{title}: accuracy vs IoU threshold", ap
    )
    md += ["", image_link(plot, out_dir, f"{title}, accuracy against the IoU threshold"), ""]
    if ap:
        md += [
            f"Calibration of the answer's score against IoU ≥ 0.5 ({summary['scored']} scored answers, "
            f"{len(summary['reliability'])} equal bins): ECE {summary['ece']:.3f}.",
            "",
        ]
        rel = reliability_plot(
            summary["reliability"], out_dir / f"{stem}_reliability.png", title, summary["ece"]
        )
        md += [image_link(rel, out_dir, f"{title}, reliability diagram"), ""]
    else:
        md += [
            "No scores in these predictions (a cache written before scores existed): no AP and no ECE.",
            "",
        ]
    return md
