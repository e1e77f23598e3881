"""Generated vehicle pictures: a coloured car body on a road, a little different for each seed."""
import numpy as np
from PIL import Image, ImageDraw

COLOURS = {1: (200, 30, 30), 2: (30, 60, 200), 3: (240, 200, 20)}


def draw_vehicle(colour, seed, size=(96, 72)) -> Image.Image:
    """A cartoon car (body, cabin, window, wheels) on a road, jittered by seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(90, 130, 3)))
    d = ImageDraw.Draw(img)
    d.rectangle([0, int(h * 0.75), w, h], fill=(60, 60, 60))
    dx, dy = int(rng.integers(-6, 7)), int(rng.integers(-3, 4))
    d.rounded_rectangle([10 + dx, 30 + dy, w - 10 + dx, 56 + dy], radius=6, fill=colour)
    d.polygon([(26 + dx, 30 + dy), (34 + dx, 14 + dy), (w - 30 + dx, 14 + dy), (w - 20 + dx, 30 + dy)], fill=colour)
    d.polygon([(30 + dx, 29 + dy), (36 + dx, 17 + dy), (w - 32 + dx, 17 + dy), (w - 24 + dx, 29 + dy)],
              fill=(170, 210, 235))
    for cx in (24 + dx, w - 24 + dx):
        d.ellipse([cx - 8, 48 + dy, cx + 8, 64 + dy], fill=(20, 20, 20))
    return img
