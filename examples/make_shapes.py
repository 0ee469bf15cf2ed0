"""Draw examples/shapes.png, the README's main example: a scene of the synthetic world the built-in default
model was trained on (kosmos2/data/synthetic.py), with three shapes of different colours.

The scene is the first of the world's "example" scenes (seeded 0, 1, 2, …, test split) that has exactly three
objects of three different colours and shapes with boxes that do not touch: a fixed rule, not a pick among
the model's outputs. Deterministic: `python examples/make_shapes.py [OUT.png]` regenerates it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kosmos2.data import synthetic


def _apart(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def example_scene() -> synthetic.Scene:
    """The example's scene (see the module docstring for the rule that picks it)."""
    for i in range(10_000):
        scene = synthetic.make_scene(synthetic.scene_seed("test", 0, "example", i), "test")
        objects = scene.objects
        if len(objects) != 3:
            continue
        if len({o.colour for o in objects}) < 3 or len({o.shape for o in objects}) < 3:
            continue
        if all(_apart(a.box, b.box) for k, a in enumerate(objects) for b in objects[k + 1 :]):
            return scene
    raise RuntimeError("no example scene found")  # not reached: about one scene in ten qualifies


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else Path(__file__).with_name("shapes.png")
    scene = example_scene()
    synthetic.render(scene).save(out, format="PNG", optimize=True)
    words = ", ".join(o.words for o in scene.objects)
    print(f"wrote {out} ({out.stat().st_size:,} bytes): {scene.width}x{scene.height}, {words}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
