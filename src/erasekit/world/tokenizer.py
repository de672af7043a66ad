"""The real CLIP BPE tokenizer, built without a hub.

OpenAI's CLIP vocabulary (``bpe_simple_vocab_16e6.txt.gz``) is public and ships inside the
``open-clip-torch`` wheel. :func:`write_clip_tokenizer_files` turns it into the ``vocab.json`` +
``merges.txt`` pair that :class:`transformers.CLIPTokenizer` loads, so that the miniature world
tokenizes exactly as Stable Diffusion's text encoder does (49,408 entries; "a red triangle" ->
[49406, 320, 736, 14615, 49407]).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

N_MERGES = 49152 - 256 - 2  # lines 1..48,894 of the BPE file, as in CLIP
TOKENIZER_DIR = Path(__file__).parent / "assets" / "clip-tokenizer"  # the bundled one (Stable Diffusion's)


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_clip_tokenizer_files(bpe_gz: str | Path, out_dir: str | Path) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer configs of CLIP into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : N_MERGES + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != 49408:
        raise ValueError(f"Expected 49408 CLIP vocabulary entries from {bpe_gz}, got {len(vocab)}.")
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
            },
            indent=2,
        )
    )
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "do_lower_case": True,
            },
            indent=2,
        )
    )
    return out


def load_clip_tokenizer(directory: str | Path):
    """Load a CLIPTokenizer from a folder with vocab.json/merges.txt (works with transformers 4 and 5)."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(directory), local_files_only=True)
    tok.model_max_length = 77
    return tok
