"""Draw the bundled sample dataset: lora_pipeline/sample_data/sample_style/.

A tiny, recognisable "style" (flat Bauhaus-like geometry in a fixed palette on a
cream ground, with a thick dark frame) so the demo, the worker tests and the
Dagster assets have real images with captions to train on, without shipping
anyone's artwork. Deterministic: a seeded RNG and Pillow drawing only, so
running it again rewrites byte-identical files (and the same dataset hash).

    python scripts/make_sample_data.py [--out DIR]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw

from lora_pipeline.dataset.ingest import SAMPLE_TRIGGER_WORD as TRIGGER_WORD
from lora_pipeline.dataset.ingest import sample_dataset_path

PALETTE = {
    "red": (214, 40, 40),
    "blue": (0, 84, 159),
    "yellow": (247, 193, 36),
    "black": (25, 25, 25),
    "teal": (42, 157, 143),
}
GROUND = (243, 233, 210)
SHAPES = ("circle", "square", "triangle", "half-disc")

# (file stem, side, format, seed): a mix of sizes and both common formats.
IMAGES = (
    ("geo_01", 96, "PNG", 1),
    ("geo_02", 96, "PNG", 2),
    ("geo_03", 80, "PNG", 3),
    ("geo_04", 96, "JPEG", 4),
    ("geo_05", 64, "PNG", 5),
    ("geo_06", 96, "PNG", 6),
    ("geo_07", 80, "JPEG", 7),
    ("geo_08", 96, "PNG", 8),
)

DEFAULT_OUT = sample_dataset_path()


def draw(side: int, seed: int) -> tuple[Image.Image, str]:
    """One picture and its caption; the caption names what was drawn."""
    rng = random.Random(seed)
    image = Image.new("RGB", (side, side), GROUND)
    pen = ImageDraw.Draw(image)
    described: list[str] = []
    for _ in range(rng.randint(2, 4)):
        shape = rng.choice(SHAPES)
        colour_name = rng.choice(sorted(PALETTE))
        colour = PALETTE[colour_name]
        size = rng.randint(side // 4, side // 2)
        x = rng.randint(4, side - size - 4)
        y = rng.randint(4, side - size - 4)
        box = (x, y, x + size, y + size)
        if shape == "circle":
            pen.ellipse(box, fill=colour)
        elif shape == "square":
            pen.rectangle(box, fill=colour)
        elif shape == "triangle":
            pen.polygon([(x, y + size), (x + size // 2, y), (x + size, y + size)], fill=colour)
        else:
            pen.pieslice(box, 180, 360, fill=colour)
        described.append(f"a {colour_name} {shape}")
    pen.rectangle((0, 0, side - 1, side - 1), outline=PALETTE["black"], width=3)
    caption = f"{TRIGGER_WORD}, " + ", ".join(described) + " on a cream background, thick black frame"
    return image, caption


def write_sample(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, side, fmt, seed in IMAGES:
        image, caption = draw(side, seed)
        suffix = ".png" if fmt == "PNG" else ".jpg"
        path = out / f"{stem}{suffix}"
        if fmt == "PNG":
            image.save(path, "PNG", optimize=True)
        else:
            image.save(path, "JPEG", quality=90)
        (out / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    for path in write_sample(args.out):
        print(path)


if __name__ == "__main__":
    main()
