"""Draw examples/scene.png, the README's example image: a sky, a sun, grass, a red ball and a blue box.

Deterministic (no randomness, fixed sizes): run `python examples/make_example.py [OUT.png]` to regenerate it.
The scene is drawn at twice the size and downsampled, which smooths the edges the way a photo's are.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

WIDTH, HEIGHT = 480, 320  # non-square, so boxes in pixels differ from boxes on the 224x224 model input
SCALE = 2  # drawn at 2x, then downsampled


def _geometry() -> dict[str, int]:
    """Positions and sizes of the ball and the box on the 2x canvas."""
    w, h = WIDTH * SCALE, HEIGHT * SCALE
    return {
        "ball_x": int(w * 0.27), "ball_y": int(h * 0.66), "ball_r": int(h * 0.13),
        "box_x": int(w * 0.52), "box_y": int(h * 0.50), "box_size": int(h * 0.30), "box_depth": int(h * 0.09),
    }  # fmt: skip


def object_boxes() -> dict[str, tuple[float, float, float, float]]:
    """Pixel boxes (x1, y1, x2, y2) of the red ball and the blue box in the WIDTH x HEIGHT image."""
    g = _geometry()
    cx, cy, r = g["ball_x"], g["ball_y"], g["ball_r"]
    x0, y0, size, depth = g["box_x"], g["box_y"], g["box_size"], g["box_depth"]
    ball = (cx - r, cy - r, cx + r, cy + r)
    box = (x0, y0 - depth, x0 + size + depth, y0 + size)
    return {"red ball": tuple(v / SCALE for v in ball), "blue box": tuple(v / SCALE for v in box)}


def make_scene() -> Image.Image:
    """The example scene as an RGB image of WIDTH x HEIGHT pixels."""
    w, h = WIDTH * SCALE, HEIGHT * SCALE
    g = _geometry()
    horizon = int(h * 0.62)
    image = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(image)

    # Sky: a vertical gradient from deep to pale blue, in bands of 4 rows (compresses well).
    for y in range(0, horizon, 4):
        t = y / horizon
        colour = (int(70 + 120 * t), int(130 + 90 * t), int(220 + 30 * t))
        draw.rectangle((0, y, w, y + 3), fill=colour)
    # Sun, top right, with a soft halo.
    sx, sy, r = int(w * 0.84), int(h * 0.16), int(h * 0.08)
    draw.ellipse((sx - 1.6 * r, sy - 1.6 * r, sx + 1.6 * r, sy + 1.6 * r), fill=(236, 236, 210))
    draw.ellipse((sx - r, sy - r, sx + r, sy + r), fill=(255, 222, 90))
    # Grass: a gradient from light to darker green towards the viewer.
    for y in range(horizon, h, 4):
        t = (y - horizon) / (h - horizon)
        draw.rectangle((0, y, w, y + 3), fill=(int(110 - 40 * t), int(180 - 50 * t), int(70 - 30 * t)))

    # Blue box (a cube seen slightly from above): front face, top face, right side face.
    x0, y0, size, depth = g["box_x"], g["box_y"], g["box_size"], g["box_depth"]
    front = (x0, y0, x0 + size, y0 + size)
    top = [(x0, y0), (x0 + depth, y0 - depth), (x0 + size + depth, y0 - depth), (x0 + size, y0)]
    side = [
        (x0 + size, y0),
        (x0 + size + depth, y0 - depth),
        (x0 + size + depth, y0 + size - depth),
        (x0 + size, y0 + size),
    ]
    shadow_box = (x0 - depth // 2, y0 + size - depth // 3, x0 + size + depth * 2, y0 + size + depth // 2)
    # Red ball, left of the box, with its shadow on the grass.
    cx, cy, br = g["ball_x"], g["ball_y"], g["ball_r"]
    shadow_ball = (cx - br, cy + br - br // 4, cx + int(br * 1.4), cy + br + br // 3)

    # Shadows first (blurred), then the objects on top.
    shadows = Image.new("L", (w, h), 0)
    sd = ImageDraw.Draw(shadows)
    sd.ellipse(shadow_box, fill=120)
    sd.ellipse(shadow_ball, fill=120)
    shadows = shadows.filter(ImageFilter.GaussianBlur(radius=6 * SCALE))
    image = Image.composite(Image.new("RGB", (w, h), (40, 70, 30)), image, shadows)
    draw = ImageDraw.Draw(image)

    draw.polygon(side, fill=(20, 50, 140))
    draw.polygon(top, fill=(90, 140, 230))
    draw.rectangle(front, fill=(35, 85, 200))

    # The ball: concentric discs from the dark rim to a highlight up and to the left (simple shading).
    steps = 12
    for i in range(steps):
        t = i / (steps - 1)
        rr = br * (1 - 0.85 * t)
        ox, oy = -0.35 * br * t, -0.35 * br * t
        colour = (int(150 + 100 * t), int(10 + 60 * t**2), int(15 + 60 * t**2))
        draw.ellipse((cx + ox - rr, cy + oy - rr, cx + ox + rr, cy + oy + rr), fill=colour)

    return image.resize((WIDTH, HEIGHT), resample=Image.Resampling.LANCZOS)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else Path(__file__).with_name("scene.png")
    make_scene().save(out, format="PNG", optimize=True)
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
