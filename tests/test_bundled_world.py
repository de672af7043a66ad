"""The bundled miniature: it loads offline with diffusers, and its detector is accurate on real images."""

import numpy as np
import pytest

from erasekit.pipeline import bundled_path, load_pipeline

pytestmark = pytest.mark.skipif(
    not (bundled_path() / "model_index.json").exists(), reason="bundled miniature not built in this checkout"
)


@pytest.fixture(scope="module")
def shapes_pipe():
    return load_pipeline("shapes")


def test_loads_with_plain_diffusers_offline():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(bundled_path(), local_files_only=True)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert pipe.tokenizer("a red triangle").input_ids == [49406, 320, 736, 14615, 49407]
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(pipe.tokenizer) == 49408


def test_bundle_is_small():
    size = sum(p.stat().st_size for p in bundled_path().rglob("*") if p.is_file())
    assert size < 60e6


def test_detector_is_accurate_on_heldout_real_images():
    from erasekit.eval.detectors import load_detector
    from erasekit.world.shapes import make_example

    det = load_detector("shapes")
    ex = [make_example(777_777, i) for i in range(400)]
    imgs = np.stack([e[0] for e in ex])
    p = det.predict(imgs)
    for head in ("object", "colour", "style", "unsafe"):
        labels = np.array([e[1].labels[head] for e in ex])
        acc = (p[head].argmax(1) == labels).mean()
        assert acc >= (0.97 if head == "object" else 0.9), (head, acc)


def test_generation_is_deterministic_and_recognisable(shapes_pipe):
    from erasekit.eval.detectors import load_detector
    from erasekit.eval.generate import generate_images

    a = generate_images(shapes_pipe, ["a red circle", "a blue cross"], [0, 1])
    b = generate_images(shapes_pipe, ["a red circle", "a blue cross"], [0, 1])
    assert np.array_equal(a, b) and a.shape == (2, 32, 32, 3)
    p = load_detector("shapes").predict(a)["object"].argmax(1)
    assert list(p) == [0, 5]  # circle, cross
