import json

import numpy as np

from erasekit.eval.generate import PromptItem, SamplingConfig, generate, generate_images, read_index

CFG = SamplingConfig(steps=2, guidance_scale=4.0, batch_size=2)


def test_image_depends_only_on_prompt_and_seed(tiny_pipe):
    a = generate_images(tiny_pipe, ["a red star", "a blue ring", "a cat"], [0, 1, 2], CFG)
    b = generate_images(
        tiny_pipe, ["a cat", "a red star"], [2, 0], SamplingConfig(steps=2, guidance_scale=4.0, batch_size=1)
    )
    assert a.shape == (3, 32, 32, 3) and a.dtype == np.uint8
    assert np.abs(a[2].astype(int) - b[0]).max() <= 1  # batching may move a value by one level at most
    assert np.abs(a[0].astype(int) - b[1]).max() <= 1
    c = generate_images(tiny_pipe, ["a red star"], [5], CFG)
    assert np.abs(a[0].astype(int) - c[0]).mean() > 1  # another seed, another image


def test_generate_writes_index_and_resumes(tiny_pipe, tmp_path):
    items = [PromptItem(p, s, {"concept": p}) for p in ("a star", "a ring") for s in (0, 1)]
    recs = generate(tiny_pipe, items[:3], tmp_path, CFG, progress=False)
    assert len(recs) == 3 and all((tmp_path / r["path"]).exists() for r in recs)
    mtimes = {r["path"]: (tmp_path / r["path"]).stat().st_mtime_ns for r in recs}
    recs2 = generate(tiny_pipe, items, tmp_path, CFG, progress=False)
    assert [r["prompt"] for r in recs2] == [i.prompt for i in items]
    for r in recs:  # the first three were skipped, not rewritten
        assert (tmp_path / r["path"]).stat().st_mtime_ns == mtimes[r["path"]]
    index = [json.loads(x) for x in (tmp_path / "index.jsonl").read_text().splitlines()]
    assert len(index) == 4 and {r["concept"] for r in index} == {"a star", "a ring"}
    assert len(read_index(tmp_path)) == 4


def test_prompt_embeds_path_matches_prompts(tiny_pipe):
    from erasekit.pipeline import encode_prompts

    emb = encode_prompts(tiny_pipe, ["a star"])
    a = generate_images(tiny_pipe, ["a star"], [0], CFG)
    b = generate_images(tiny_pipe, None, [0], CFG, prompt_embeds=emb)
    assert np.abs(a.astype(int) - b).max() <= 1


def test_resuming_with_other_weights_is_refused(tiny_pipe, tmp_path):
    import pytest
    import torch

    generate(tiny_pipe, [PromptItem("a star", 0)], tmp_path, CFG, progress=False)
    with torch.no_grad():
        next(tiny_pipe.unet.parameters()).add_(1.0)
    with pytest.raises(ValueError, match="other weights"):
        generate(tiny_pipe, [PromptItem("a star", 1)], tmp_path, CFG, progress=False)
