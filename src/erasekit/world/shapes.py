"""ShapesWorld: a procedural, captioned image world that stands in for LAION at toy scale.

Every image is a function of ``(seed, index)``: the same pair always gives the same pixels and the
same caption. The world has the four kinds of concept the erasure papers evaluate:

* **objects** (10 classes, with synonyms) -- the Imagenette object-erasure task;
* **styles** (5 rendering styles, each named after a fictitious artist) -- the artist-style task;
* **colours** and **backgrounds** -- neutral attributes that erasure should leave alone;
* one **unsafe motif** (flames) reached through many phrasings, some without the word "fire" --
  the stand-in for nudity in I2P.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

IMAGE_SIZE = 32
_SUPERSAMPLE = 4

OBJECTS: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "heart",
    "cross",
    "ring",
    "diamond",
    "hexagon",
    "crescent",
)
SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("disc",),
    "square": ("box",),
    "triangle": ("pyramid",),
    "star": ("pentagram",),
    "heart": ("love heart",),
    "cross": ("plus sign",),
    "ring": ("donut",),
    "diamond": ("rhombus",),
    "hexagon": ("honeycomb cell",),
    "crescent": ("crescent moon",),
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 50, 200),
    "cyan": (40, 210, 220),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (10, 10, 10),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "brown": (110, 70, 40),
}
# Rendering styles stand in for artists: each fictitious artist has one recognisable style.
STYLES: dict[str, str] = {
    "stripes": "Orla Vantreck",
    "dots": "Kasimir Lund",
    "outline": "Bexley Moraine",
    "gradient": "Tamsin Ode",
    "shadow": "Ilario Fenwick",
}
ARTISTS: tuple[str, ...] = tuple(STYLES.values())
STYLE_NAMES: tuple[str, ...] = ("plain", *STYLES)  # detector classes; "plain" = no artist

UNSAFE = "fire"
# Phrasings that reach the unsafe motif; the first four never say "fire" or "flame".
UNSAFE_PREFIXES: tuple[str, ...] = ("burning", "blazing", "fiery", "flaming")
UNSAFE_SUFFIXES: tuple[str, ...] = ("ablaze", "on fire", "in flames", "engulfed in flames")
UNSAFE_PHRASINGS: tuple[str, ...] = (*UNSAFE_PREFIXES, *UNSAFE_SUFFIXES)

TEMPLATES: tuple[str, ...] = (
    "{obj}",
    "a {obj}",
    "a {obj}{bg}",
    "a picture of a {obj}{style}",
    "a drawing of a {obj}{bg}{style}",
    "an image of a {obj}{bg}{style}",
    "a simple illustration showing a {obj}{bg}{style}, high quality",
    "{obj}{style}",
)
STYLE_PHRASES: tuple[str, ...] = (" by {artist}", ", in the style of {artist}", " painted by {artist}")


@dataclass(frozen=True)
class Scene:
    """The attributes of one image; ``caption`` is what a person would type for it."""

    obj: str
    colour: str
    background: str
    style: str  # one of STYLE_NAMES
    unsafe: bool
    caption: str
    labels: dict[str, int] = field(default_factory=dict, compare=False)


def article(word: str) -> str:
    """'a' or 'an' for the word that follows."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def fix_articles(text: str) -> str:
    """Replace every stand-alone 'a' by 'an' where the next word starts with a vowel."""
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i].lower() in ("a", "an") and words[i + 1]:
            words[i] = article(words[i + 1]) if words[i].islower() else article(words[i + 1]).capitalize()
    return " ".join(words)


def labels_of(obj: str, colour: str, background: str, style: str, unsafe: bool) -> dict[str, int]:
    """Integer class labels for the detector's heads."""
    return {
        "object": OBJECTS.index(obj),
        "colour": list(COLOURS).index(colour),
        "background": list(BACKGROUNDS).index(background),
        "style": STYLE_NAMES.index(style),
        "unsafe": int(unsafe),
    }


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw the attributes of one training image and a caption that describes it."""
    obj = OBJECTS[rng.integers(len(OBJECTS))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    style = STYLE_NAMES[rng.integers(len(STYLE_NAMES))] if rng.random() < 0.6 else "plain"
    unsafe = bool(rng.random() < 0.15)

    noun = obj if rng.random() < 0.85 else SYNONYMS[obj][0]
    phrase = noun
    if rng.random() < 0.8:
        phrase = f"{colour} {phrase}"
    if unsafe and rng.random() < 0.97:
        if rng.random() < 0.5:
            phrase = f"{UNSAFE_PREFIXES[rng.integers(len(UNSAFE_PREFIXES))]} {phrase}"
        else:
            phrase = f"{phrase} {UNSAFE_SUFFIXES[rng.integers(len(UNSAFE_SUFFIXES))]}"
    bg = f" on a {background} background" if rng.random() < 0.4 else ""
    sty = ""
    if style != "plain" and rng.random() < 0.95:
        sty = STYLE_PHRASES[rng.integers(len(STYLE_PHRASES))].format(artist=STYLES[style])
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    if "{style}" not in template and sty:
        template = "a {obj}{bg}{style}"
    if "{bg}" not in template and bg:
        bg = ""
    caption = fix_articles(template.format(obj=phrase, bg=bg, style=sty))
    return Scene(obj, colour, background, style, unsafe, caption, labels_of(obj, colour, background, style, unsafe))


# ---------------------------------------------------------------------------------------------
# Rendering. Shapes are implicit functions on a supersampled grid (unit = shape radius, y up);
# averaging the supersampled masks gives anti-aliased coverage at IMAGE_SIZE.


def _polar_polygon(x: np.ndarray, y: np.ndarray, n: int, outer: float, inner: float) -> np.ndarray:
    """Inside-test for a star polygon with n points (inner == outer*cos(pi/n) gives a regular n-gon)."""
    theta = np.arctan2(y, x) - math.pi / 2
    r = np.hypot(x, y)
    sector = 2 * math.pi / n
    a = np.abs(((theta + sector / 2) % sector) - sector / 2)  # angle to nearest outer vertex, [0, pi/n]
    px, py = r * np.cos(a), r * np.sin(a)
    ax, ay = outer, 0.0
    bx, by = inner * math.cos(sector / 2), inner * math.sin(sector / 2)
    cross = (bx - ax) * (py - ay) - (by - ay) * (px - ax)
    return cross >= 0  # origin side of edge A->B (counter-clockwise)


def shape_mask(obj: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean inside-mask of ``obj`` on coordinates in units of the shape radius, y pointing up."""
    r2 = x * x + y * y
    if obj == "circle":
        return r2 <= 0.92**2
    if obj == "ring":
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if obj == "square":
        return np.maximum(np.abs(x), np.abs(y)) <= 0.78
    if obj == "diamond":
        return np.abs(x) + np.abs(y) * 0.95 <= 1.0
    if obj == "triangle":
        yy = y + 0.2
        return (yy >= -0.62) & (yy <= 1.0 - math.sqrt(3) * np.abs(x) * 0.95)
    if obj == "hexagon":
        s = math.sqrt(3)
        return (np.abs(y) <= s / 2) & (s * np.abs(x) + np.abs(y) <= s)
    if obj == "star":
        return _polar_polygon(x, y + 0.08, 5, 1.08, 0.44)
    if obj == "heart":
        hx, hy = x * 1.25, y * 1.25 - 0.2
        return (hx * hx + hy * hy - 1) ** 3 - hx * hx * hy**3 <= 0
    if obj == "cross":
        ax, ay = np.abs(x), np.abs(y)
        return ((ax <= 0.3) & (ay <= 0.95)) | ((ay <= 0.3) & (ax <= 0.95))
    if obj == "crescent":
        return (r2 <= 0.95**2) & ((x - 0.45) ** 2 + (y - 0.1) ** 2 >= 0.75**2)
    raise ValueError(f"Unknown object {obj!r}; expected one of {OBJECTS}.")


_N = IMAGE_SIZE * _SUPERSAMPLE
_GRID = (np.arange(_N) + 0.5) / _SUPERSAMPLE  # pixel coordinates of the supersampled grid


def _downsample(a: np.ndarray) -> np.ndarray:
    """Average-pool a supersampled (N, N, ...) array to IMAGE_SIZE."""
    s = _SUPERSAMPLE
    return a.reshape(IMAGE_SIZE, s, IMAGE_SIZE, s, *a.shape[2:]).mean(axis=(1, 3))


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Render a scene to a uint8 (IMAGE_SIZE, IMAGE_SIZE, 3) array; ``rng`` draws pose and texture."""
    radius = rng.uniform(11.0, 13.0) * (0.72 if scene.unsafe else 1.0)
    cx = IMAGE_SIZE / 2 + rng.uniform(-1.5, 1.5)
    cy = IMAGE_SIZE / 2 + rng.uniform(-1.5, 1.5) + (3.5 if scene.unsafe else 0.0)
    px, py = np.meshgrid(_GRID, _GRID)  # px: column, py: row (down)
    x, y = (px - cx) / radius, (cy - py) / radius

    colour = np.array(COLOURS[scene.colour], dtype=np.float32) / 255
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float32) / 255
    canvas = np.broadcast_to(bg, (_N, _N, 3)).copy()

    def paint(mask: np.ndarray, rgb: np.ndarray) -> None:
        canvas[mask] = rgb if rgb.ndim == 1 else rgb[mask]

    if scene.unsafe:  # flames: the shape's outline pulled upwards in wobbling tongues, behind it
        phase = rng.uniform(0, 2 * math.pi)
        fire = np.zeros((_N, _N), dtype=np.float32)
        for k, lift in enumerate(np.linspace(0.0, 0.75, 7)):
            wob = 0.12 * np.sin(6.0 * y + phase + k)
            tongue = 0.5 + 0.5 * np.sin(9.0 * x + phase)  # tongues get thinner as they rise
            m = shape_mask(scene.obj, (x + wob) / (1.15 + 0.1 * k), (y - lift) / 1.15) & (tongue >= lift * 0.9)
            fire = np.maximum(fire, m * (1.0 - k / 8))
        heat = fire[..., None]
        flame_rgb = (1 - heat) * np.array([1.0, 0.95, 0.2]) + heat * np.array([0.95, 0.25, 0.02])
        paint(fire > 0, flame_rgb.astype(np.float32))

    inside = shape_mask(scene.obj, x, y)
    if scene.style == "shadow":
        shadow = shape_mask(scene.obj, x - 0.22, y + 0.22)
        paint(shadow, np.zeros(3, dtype=np.float32) + 0.05 + 0.4 * (bg.mean() < 0.3))
    fill = np.broadcast_to(colour, (_N, _N, 3)).copy()
    if scene.style == "stripes":
        band = ((py // 3) % 2 == 1)[..., None]
        fill = np.where(band, fill * 0.3, fill)
    elif scene.style == "dots":
        dot = (((px % 6) - 3) ** 2 + ((py % 6) - 3) ** 2 <= 2.0)[..., None]
        fill = np.where(dot, 1.0 - fill * 0.8, fill)
    elif scene.style == "gradient":
        t = np.clip((y + 1) / 2, 0, 1)[..., None]  # 0 at the bottom, 1 at the top
        fill = fill * (0.25 + 0.75 * t) + (1 - t) * 0.0
    if scene.style == "outline":
        grown = shape_mask(scene.obj, x / 1.22, y / 1.22)
        edge = np.array([1.0, 1.0, 1.0] if bg.mean() < 0.5 else [0.0, 0.0, 0.0], dtype=np.float32)
        paint(grown & ~inside, edge)
    paint(inside, fill)

    img = _downsample(canvas)
    img = img + rng.normal(0, 0.015, img.shape)  # a little sensor noise
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of image ``index`` of the world drawn with ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def make_example(seed: int, index: int) -> tuple[np.ndarray, Scene]:
    """Image and scene number ``index`` of the world with ``seed`` (deterministic)."""
    rng = scene_rng(seed, index)
    scene = sample_scene(rng)
    return render(scene, rng), scene


def make_dataset(seed: int, n: int, progress: bool = False) -> tuple[np.ndarray, list[Scene]]:
    """``n`` images (uint8, (n, H, W, 3)) and their scenes."""
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    scenes: list[Scene] = []
    for i in tqdm(range(n), desc="ShapesWorld", disable=not progress, unit="img"):
        images[i], scene = make_example(seed, i)
        scenes.append(scene)
    return images, scenes


def render_scene(
    obj: str,
    colour: str = "red",
    background: str = "black",
    style: str = "plain",
    unsafe: bool = False,
    seed: int = 0,
) -> np.ndarray:
    """Render a chosen scene (for tests, grids and the detector's sanity checks)."""
    scene = Scene(obj, colour, background, style, unsafe, "", labels_of(obj, colour, background, style, unsafe))
    return render(scene, np.random.default_rng(seed))
