"""Images of a RECE edit's derived embeddings (Gong et al., ECCV 2024, Fig. 5).

RECE (:mod:`erasekit.methods.rece`) derives, at every epoch, the embedding that still regenerates an
erased concept inside the edited model (eq. 8), and erases it too. Rendering those embeddings shows
whether an epoch's edit still reads them as the concept (the paper's Fig. 5: images from epochs 0-2
still contain nudity, from epoch 3 on they do not). This is a reading of a finished edit, not part
of erasing: it samples images with :mod:`erasekit.eval.generate`, so it lives here, above both
methods and eval, and the method stays free of evaluation. The report (``report/run_report.py``) and
``bench/rece_epochs.py`` draw it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from erasekit.edit import Edit, get_parameter
from erasekit.eval.generate import SamplingConfig, generate_images
from erasekit.methods.rece import derived_epochs, derived_prompt_embeds, rece_checkpoint


@torch.no_grad()
def derived_embedding_images(
    pipe,
    edit: Edit,
    seeds: Sequence[int],
    sampling: SamplingConfig | None = None,
    *,
    concept: int | str = 0,
    model: Literal["epoch", "final"] = "epoch",
) -> np.ndarray:
    """Images of every epoch's derived embedding (the paper's Fig. 5): uint8 (epochs + 1, len(seeds), H, W, 3).

    ``model="epoch"``: embedding ``t`` is rendered by the model it was derived from, after ``t``
    rounds (what the paper shows: images from epochs 0-2 still contain nudity, from epoch 3 on they
    do not, so it keeps the checkpoint after epoch 2). ``model="final"``: every embedding is
    rendered by the final edited model (does the finished edit resist all of them?).

    ``pipe`` must be the unedited base model. Its cross-attention weights are swapped for each
    checkpoint while rendering and restored afterwards, even on error.
    """
    if model not in ("epoch", "final"):
        raise ValueError(f"`model` must be 'epoch' or 'final', got {model!r}.")
    n_embeddings = derived_epochs(edit)
    edit.check_base(pipe)
    saved = {n: get_parameter(pipe, n).detach().clone() for n in edit.tensors}

    def restore() -> None:
        for n, v in saved.items():
            get_parameter(pipe, n).copy_(v)

    out = []
    try:
        for t in range(n_embeddings):
            emb = derived_prompt_embeds(pipe, edit, t, concept)
            restore()
            (edit if model == "final" else rece_checkpoint(pipe, edit, t)).apply_(pipe)
            out.append(generate_images(pipe, None, list(seeds), sampling, prompt_embeds=emb.expand(len(seeds), -1, -1)))
    finally:
        restore()
    return np.stack(out)
