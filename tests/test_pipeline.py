import json

import pytest

from erasekit.pipeline import base_info, encode_prompts, fingerprint, last_token_index, load_pipeline


def test_load_local_folder_records_base(tiny_pipe_dir):
    pipe = load_pipeline(tiny_pipe_dir)
    info = base_info(pipe)
    assert info["fingerprint"] == fingerprint(pipe) and info["path"]
    assert encode_prompts(pipe, ["a star", ""]).shape == (2, 77, 32)
    assert last_token_index(pipe, ["", "a red star", "hexagon"]) == [0, 3, 2]  # hexagon is two tokens


def test_unknown_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pipeline(tmp_path / "nope")


def test_folder_that_is_not_a_pipeline(tmp_path):
    with pytest.raises(ValueError, match="model_index.json"):
        load_pipeline(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "unet": ["x", "y"]}))
    with pytest.raises(ValueError, match="not a Stable Diffusion pipeline"):
        load_pipeline(tmp_path)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="Offline"):
        load_pipeline("someone/not-a-real-model-xyz")
