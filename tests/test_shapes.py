import numpy as np
import pytest

from erasekit.world.shapes import (
    ARTISTS,
    OBJECTS,
    SYNONYMS,
    UNSAFE_PHRASINGS,
    fix_articles,
    make_dataset,
    make_example,
    render_scene,
    shape_mask,
)


def test_world_is_deterministic_per_seed_and_index():
    a, sa = make_example(3, 17)
    b, sb = make_example(3, 17)
    c, _ = make_example(4, 17)
    assert np.array_equal(a, b) and sa == sb
    assert not np.array_equal(a, c)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8


def test_world_covers_every_concept_in_captions():
    _, scenes = make_dataset(0, 1500)
    text = " ".join(s.caption for s in scenes)
    for o in OBJECTS:
        assert o in text or SYNONYMS[o][0] in text
    for a in ARTISTS:
        assert a in text
    assert sum(p in text for p in UNSAFE_PHRASINGS) >= 6
    assert "fire" not in UNSAFE_PHRASINGS[0]  # some phrasings never say the keyword
    unsafe = [s for s in scenes if s.unsafe]
    assert 0.1 < len(unsafe) / len(scenes) < 0.2
    lengths = [len(s.caption.split()) for s in scenes]
    assert min(lengths) <= 2 and max(lengths) >= 10  # short and long prompts


@pytest.mark.parametrize("obj", OBJECTS)
def test_every_shape_has_a_distinct_silhouette(obj):
    g = np.linspace(-1.2, 1.2, 64)
    x, y = np.meshgrid(g, -g)
    m = shape_mask(obj, x, y)
    assert 0.15 < m.mean() < 0.7
    for other in OBJECTS:
        if other != obj:
            assert (m != shape_mask(other, x, y)).mean() > 0.03, (obj, other)


def test_articles():
    assert fix_articles("a image of a ablaze star") == "an image of an ablaze star"
    assert fix_articles("An red star") == "A red star"


def test_render_scene_styles_differ():
    plain = render_scene("star", style="plain")
    for style in ("stripes", "dots", "outline", "gradient", "shadow"):
        assert np.abs(render_scene("star", style=style).astype(int) - plain).mean() > 2
    assert np.abs(render_scene("star", unsafe=True).astype(int) - plain).mean() > 5
