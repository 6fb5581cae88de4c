"""The toy world: procedurally drawn scenes of one coloured shape on a plain background, with their captions.

Every scene is a combination of shape, colour, background, size and position (2,240 in all). A fixed, hash-based
split holds out a fifth of the (shape, colour, background) triples, with all their sizes and positions: prompts
for those never appear in training (the "unseen prompts", as in the paper's large-scale setting).
Rendering is deterministic per (scene, seed): the seed only jitters position and size a little.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (235, 205, 40),
    "purple": (135, 60, 175), "orange": (240, 135, 30), "white": (240, 240, 240), "black": (25, 25, 25),
}
SIZES = {"small": 0.32, "large": 0.56}  # shape extent as a fraction of the image side
POSITIONS = {  # centre (x, y) as fractions of the side, and the caption phrase
    "center": ((0.5, 0.5), "in the center"),
    "left": ((0.3, 0.5), "on the left"),
    "right": ((0.7, 0.5), "on the right"),
    "top": ((0.5, 0.3), "at the top"),
    "bottom": ((0.5, 0.7), "at the bottom"),
}
UNSEEN_FRACTION = 0.2


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str
    position: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {POSITIONS[self.position][1]}, {self.background} background"

    @property
    def unseen(self) -> bool:
        """Held out of training: decided by a fixed hash of (shape, colour, background), never by a seed."""
        key = f"{self.shape}|{self.colour}|{self.background}".encode()
        return int(hashlib.sha256(key).hexdigest()[:8], 16) / 0xFFFFFFFF < UNSEEN_FRACTION


@lru_cache(maxsize=1)
def all_scenes() -> tuple[Scene, ...]:
    return tuple(Scene(shape, colour, background, size, position)
                 for shape in SHAPES for colour in COLOURS for background in COLOURS if background != colour
                 for size in SIZES for position in POSITIONS)


def scenes(split: str) -> list[Scene]:
    """`train` or `unseen` scenes, in a fixed order."""
    if split not in ("train", "unseen"):
        raise ValueError(f"split must be 'train' or 'unseen', got {split!r}")
    return [s for s in all_scenes() if s.unseen == (split == "unseen")]


def parse_caption(caption: str) -> Scene | None:
    """The scene a toy caption describes, or None for any other text."""
    return _captions().get(caption.strip().lower())


@lru_cache(maxsize=1)
def _captions() -> dict[str, Scene]:
    return {scene.caption: scene for scene in all_scenes()}


def render(scene: Scene, size: int = 64, seed: int = 0) -> Image.Image:
    """Draw `scene` at `size` x `size` pixels (4x supersampled, then downsampled, for smooth edges)."""
    rng = np.random.default_rng([seed, _scene_index(scene)])
    scale = 4
    side = size * scale
    image = Image.new("RGB", (side, side), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    (cx, cy), _ = POSITIONS[scene.position]
    cx, cy = (cx + rng.uniform(-0.04, 0.04)) * side, (cy + rng.uniform(-0.04, 0.04)) * side
    radius = SIZES[scene.size] * rng.uniform(0.92, 1.08) * side / 2
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif scene.shape == "square":
        half = radius * 0.9
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif scene.shape == "triangle":
        draw.polygon(_regular_polygon(cx, cy + radius * 0.2, radius * 1.1, 3), fill=fill)
    else:
        draw.polygon(_star(cx, cy, radius), fill=fill)
    return image.resize((size, size), Image.LANCZOS)


def dataset(split: str, count: int, seed: int, size: int = 64) -> list[tuple[Image.Image, str, Scene]]:
    """`count` (image, caption, scene) triples drawn uniformly from a split, reproducible from `seed`."""
    pool = scenes(split)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(pool), size=count)
    render_seeds = rng.integers(0, 2**31 - 1, size=count)
    return [(render(pool[i], size, int(s)), pool[i].caption, pool[i]) for i, s in zip(picks, render_seeds)]


def _scene_index(scene: Scene) -> int:
    return _indices()[scene]


@lru_cache(maxsize=1)
def _indices() -> dict[Scene, int]:  # render() needs it per image: a dict, not a scan of 2,240 scenes
    return {scene: i for i, scene in enumerate(all_scenes())}


def _regular_polygon(cx: float, cy: float, radius: float, sides: int) -> list[tuple[float, float]]:
    return [(cx + radius * math.sin(2 * math.pi * k / sides), cy - radius * math.cos(2 * math.pi * k / sides))
            for k in range(sides)]


def _star(cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * 0.45
        angle = math.pi * k / 5
        points.append((cx + r * math.sin(angle), cy - r * math.cos(angle)))
    return points
