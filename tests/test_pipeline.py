import json
import shutil
import socket

import pytest

import erasekit.pipeline
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
    """Offline and not cached: one clear error at once, not huggingface_hub's retry backoff."""
    monkeypatch.setattr(erasekit.pipeline, "hub_reachable", lambda timeout=5.0: False)
    with pytest.raises(OSError, match="not in the local Hugging Face cache and the hub is unreachable"):
        load_pipeline("someone/not-a-real-model-xyz")


def test_hub_id_loads_from_the_cache_offline(tmp_path, monkeypatch, tiny_pipe_dir):
    """A hub id already in the cache loads with the hub unreachable (local_files_only), as itself."""
    import huggingface_hub.constants

    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--tiny"
    shutil.copytree(tiny_pipe_dir, repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(erasekit.pipeline, "hub_reachable", lambda timeout=5.0: False)
    pipe = load_pipeline("someone/tiny")
    assert base_info(pipe)["id"] == "someone/tiny"
    assert fingerprint(pipe) == fingerprint(load_pipeline(tiny_pipe_dir))


def test_hub_reachable_checks_the_endpoint_once(monkeypatch):
    import huggingface_hub.constants

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        assert erasekit.pipeline.hub_reachable(timeout=2)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        assert not erasekit.pipeline.hub_reachable(timeout=2)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert not erasekit.pipeline.hub_reachable(timeout=2)  # the port is closed now
