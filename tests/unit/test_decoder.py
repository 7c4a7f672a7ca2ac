"""The reference decoder: presets have the published parameter counts; bad shapes are refused."""

import pytest
import torch

from horizon.models import Decoder, DecoderConfig, decoder_config


@pytest.mark.parametrize("preset,params", [
    ("7b", 6_738_415_616),    # Llama-2-7B
    ("13b", 13_015_864_320),  # Llama-2-13B
    ("8b", 8_030_261_248),    # Llama-3-8B
    ("70b", 70_553_706_496),  # Llama-3-70B
])
def test_presets_match_published_parameter_counts(preset, params):
    with torch.device("meta"):
        model = Decoder(decoder_config(preset))
    assert sum(p.numel() for p in model.parameters()) == params


def test_tied_preset_counts_the_shared_weight_once():
    with torch.device("meta"):
        model = Decoder(decoder_config("125m"))
    assert model.lm_head.weight is model.embed_tokens.weight


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=63), "divisible"), (dict(num_kv_heads=3), "multiple"), (dict(num_layers=0), "positive"),
    (dict(ffn_dim=-1), "ffn_dim"), (dict(dim=12, num_heads=4), "even"),
])
def test_bad_shapes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        decoder_config("tiny", **kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="tiny"):
        decoder_config("huge")


def test_gqa_equals_explicitly_repeated_heads():
    torch.manual_seed(0)
    cfg = decoder_config("tiny", num_layers=1)
    model = Decoder(cfg)
    attn = model.layers[0].attention
    x = torch.randn(2, 8, cfg.dim)
    mha_cfg = DecoderConfig(**{**cfg.__dict__, "num_kv_heads": cfg.num_heads})
    mha = Decoder(mha_cfg).layers[0].attention
    rep = cfg.num_heads // cfg.kv_heads
    hd = cfg.head_dim
    with torch.no_grad():
        mha.wq.weight.copy_(attn.wq.weight)
        mha.wo.weight.copy_(attn.wo.weight)
        for src, dst in ((attn.wk, mha.wk), (attn.wv, mha.wv)):
            dst.weight.copy_(src.weight.view(cfg.kv_heads, hd, -1).repeat_interleave(rep, 0).reshape(-1, cfg.dim))
    torch.testing.assert_close(attn(x), mha(x))
