"""What do a training run's image slots know? The auxiliary slot read-out scored on fresh held-out scenes.

Loads RUN/checkpoint.pt (a `kosmos2 train --out RUN` folder: last-step weights and the training-only slot
read-out), shows it `--scenes` scenes of a held-out split as training does, and prints `kosmos2.train.
slot_report`: objectness, colour, shape and size accuracy, the box error, and for the "groups" read-out the
group-size confusion (how many objects are identical to each slot's: what a caption's count word and plain
VQA's "how many" need) and the place accuracy, and for "counts" how often each pattern's count is read
right. docs/DEFAULT_MODEL.md records what it measured.

    python tools/slot_probe.py runs/default
    python tools/slot_probe.py runs/a runs/b --scenes 200 --split compositional --json
"""

from __future__ import annotations

import argparse
import json
import sys

from kosmos2.train.recipes import slots


def format_report(name: str, report: dict) -> str:
    lines = [f"{name}: {report['slots']} covered slots, objectness {report['objectness']:.3f}"]
    if "colour" in report:
        lines.append(
            f"  colour {report['colour']:.3f}  shape {report['shape']:.3f}  size {report['size']:.3f}  "
            f"box L1 {report['box_l1']:.3f} patches"
        )
    if "group" in report:
        lines.append(f"  place {report['place']:.3f}  group size (rows true, columns read: 1 2 3 4+)")
        for label, row, recall in zip(
            ("1", "2", "3", "4+"), report["group"], report["group_recall"], strict=True
        ):
            shown = "-" if recall is None else f"{recall:.3f}"
            lines.append(f"    {label:>2}: {' '.join(f'{n:6d}' for n in row)}   recall {shown}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="training run folders (kosmos2 train --out)")
    parser.add_argument("--scenes", type=int, default=400, help="held-out scenes to read (default 400)")
    parser.add_argument("--split", default="test", choices=("test", "compositional"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    parser.add_argument("--json", action="store_true", help="one JSON object per run instead of tables")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    for run in args.runs:
        try:
            report = slots.probe_slots(run, args.scenes, args.split)
        except ValueError as e:
            print(f"slot_probe: {e}", file=sys.stderr)
            return 2
        print(json.dumps({"run": run, **report}) if args.json else format_report(run, report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
