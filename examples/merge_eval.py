"""An eval function for ``trainkit merge sweep``: held-out next-token loss of a tiny causal LM.

    TRAINKIT_EVAL_TOKENS=heldout.safetensors \\
    trainkit merge sweep ties --base base --models a b --density 0.1 0.2 --lam 0.8 1.0 \\
        --eval examples.merge_eval:evaluate --out best

The model is deliberately tiny and needs only torch and safetensors (no transformers):
``logits = lm_head(tanh(up_proj(embed_tokens[x])))`` with the weights

    model.embed_tokens.weight            (V, D)
    model.layers.0.mlp.up_proj.weight    (D, D)
    lm_head.weight                       (V, D)

read from the merged directory's ``*.safetensors`` (shards included). The token data is
a safetensors file with one int64 tensor ``tokens`` of shape (N, T) -- sequences of T
tokens -- named by the ``TRAINKIT_EVAL_TOKENS`` environment variable. ``evaluate`` returns
the negative mean cross-entropy, so higher is better, as the sweep expects. For a real
model, replace :func:`loss_of` with e.g. ``AutoModelForCausalLM.from_pretrained(path)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

TOKENS_ENV = "TRAINKIT_EVAL_TOKENS"
EMBED, HIDDEN, HEAD = "model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a model directory's safetensors shards (or of one .safetensors file)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors file")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(f))
    return weights


def load_tokens(path: str | Path | None = None) -> torch.Tensor:
    """The held-out (N, T) int64 token tensor, from ``path`` or ``$TRAINKIT_EVAL_TOKENS``."""
    path = path or os.environ.get(TOKENS_ENV)
    if not path:
        raise RuntimeError(f"set {TOKENS_ENV} to a safetensors file with a 'tokens' tensor")
    return load_file(path)["tokens"].long()


def loss_of(weights: Mapping[str, torch.Tensor], tokens: torch.Tensor) -> float:
    """Mean next-token cross-entropy of the tiny LM over ``tokens`` (N, T), in float32."""
    emb, hid, head = (weights[k].float() for k in (EMBED, HIDDEN, HEAD))
    x, y = tokens[:, :-1], tokens[:, 1:]
    h = torch.tanh(emb[x] @ hid.T)
    logits = h @ head.T
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))


def evaluate(path: str) -> float:
    """``trainkit merge sweep --eval`` entry point: merged model path -> negative held-out loss."""
    with torch.no_grad():
        return -loss_of(load_weights(path), load_tokens())
