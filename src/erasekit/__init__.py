"""EraseKit: erase, hide, recover and audit concepts in text-to-image diffusion models."""

from erasekit._version import __version__
from erasekit.edit import Edit, EraseRequest
from erasekit.export import ExportResult  # also registers the exporter behind Edit.export
from erasekit.methods.base import available_methods, erase, get_method, make_config
from erasekit.pipeline import encode_prompts, eps, load_pipeline
from erasekit.targets import select_parameters

__all__ = [
    "Edit",
    "EraseRequest",
    "ExportResult",
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
