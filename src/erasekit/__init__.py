"""EraseKit: erase, hide, recover and audit concepts in text-to-image diffusion models."""

__version__ = "0.1.0"

from erasekit.edit import Edit, EraseRequest  # noqa: E402
from erasekit.methods.base import available_methods, erase, get_method, make_config  # noqa: E402
from erasekit.pipeline import encode_prompts, eps, load_pipeline  # noqa: E402
from erasekit.targets import select_parameters  # noqa: E402

__all__ = [
    "Edit",
    "EraseRequest",
    "__version__",
    "available_methods",
    "encode_prompts",
    "eps",
    "erase",
    "get_method",
    "load_pipeline",
    "make_config",
    "select_parameters",
]
