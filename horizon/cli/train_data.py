"""What ``horizon train`` trains on and what it trains: the token stream and the model.

Why apart from the loop: naming a model (a decoder preset or a Hugging Face config folder, with or
without safetensors) and a tokenizer (bytes, or a local tokenizer) are checked against each other
before anything is allocated: every token id the tokenizer can produce must be a row of the
model's embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from horizon.cli.run_config import DataSection, ModelSection
from horizon.data.text import load_corpus
from horizon.data.tokenized import encode, load_tokenizer, tokenizer_vocab_size
from horizon.models import Decoder, decoder_config

__all__ = ["load_tokens", "build_model"]


def _tokenizer(data: DataSection):
    return load_tokenizer(data.tokenizer) if data.tokenizer else None


def load_tokens(data: DataSection) -> tuple[torch.Tensor, str]:
    """(the text as one int64 token stream, a description): bytes, or the tokenizer's ids of the UTF-8 text."""
    raw, what = load_corpus(data.text, data.max_bytes)
    tokenizer = _tokenizer(data)
    if tokenizer is None:
        return raw.long(), f"{what}, byte tokens"
    ids = encode(tokenizer, bytes(raw.numpy()).decode("utf-8", errors="replace"))
    return torch.tensor(ids, dtype=torch.int64), f"{what}, tokenizer {data.tokenizer}"


def build_model(model: ModelSection, data: DataSection) -> tuple[nn.Module, str]:
    """(the model, a description): a Hugging Face model on the meta device (the trainer initialises it
    or streams ``hf_weights`` into the host store), or the decoder preset sized to the tokenizer."""
    vocab_size = tokenizer_vocab_size(_tokenizer(data))
    if not model.hf_config:
        return Decoder(decoder_config(model.preset, vocab_size=vocab_size)), f"decoder '{model.preset}'"
    from horizon.models.hf_weights import empty_hf_model

    try:
        hf = empty_hf_model(model.hf_config)
    except ImportError as e:
        raise ValueError("model.hf_config needs transformers: pip install 'horizon[hf]'") from e
    rows = hf.get_input_embeddings().num_embeddings
    if vocab_size > rows:
        raise ValueError(f"the tokenizer ({data.tokenizer or 'bytes'}) has {vocab_size} token ids but the model in "
                         f"{model.hf_config} embeds {rows}: use the model's own tokenizer (data.tokenizer)")
    weights = f", weights from {model.hf_weights}" if model.hf_weights else ", initialised"
    return hf, f"{hf.config.model_type} from {model.hf_config}{weights}"
