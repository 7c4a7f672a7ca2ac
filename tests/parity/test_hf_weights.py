"""HF safetensors in and out: loading into the host store equals from_pretrained; export_hf loads back."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import horizon  # noqa: E402
from horizon.models.hf_weights import INDEX_FILE, empty_hf_model  # noqa: E402
from helpers import forbid_host_store  # noqa: E402
from test_hf import VOCAB, tiny_hf  # noqa: E402

CASES = [("llama", False, "100KB"), ("gpt2", True, "5GB"), ("qwen2", True, "100KB"), ("mistral", False, "5GB")]


def ids(seed=3):
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family,tie,shard", CASES)
def test_load_equals_from_pretrained(tmp_path, family, tie, shard):
    tiny_hf(family, tie=tie).save_pretrained(tmp_path, max_shard_size=shard)
    assert (tmp_path / INDEX_FILE).is_file() == (shard == "100KB")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    model = empty_hf_model(tmp_path)
    assert all(p.is_meta for p in model.parameters())  # nothing held outside the store
    with horizon.Trainer(model, horizon.TrainConfig(hf_weights=str(tmp_path))) as trainer:
        got, want = trainer.state_dict(), reference.state_dict()
        assert set(got) == set(want)
        for key in want:
            assert torch.equal(got[key], want[key]), key
        assert torch.equal(model(ids()).logits, reference(ids()).logits)


@pytest.mark.parametrize("family,tie,shard", CASES)
def test_export_hf_round_trip(tmp_path, family, tie, shard):
    model = tiny_hf(family, tie=tie)
    opt = horizon.AdamW(lr=1e-2)
    with horizon.Trainer(model, horizon.TrainConfig(optimizer=opt, grad_clip_norm=1.0)) as trainer:
        for seed in range(3):
            trainer.step({"input_ids": ids(seed), "labels": ids(seed + 10)})
        written = horizon.export_hf(trainer, str(tmp_path), max_shard_bytes=60_000 if shard == "100KB" else 5 << 30)
        assert "config.json" in written and (INDEX_FILE in written) == (shard == "100KB")
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
        assert torch.equal(loaded(ids()).logits, model(ids()).logits)
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, trainer.state_dict()[key]), key


def test_export_then_load_resumes_the_weights(tmp_path):
    """export_hf → empty_hf_model + hf_weights: the same weights, bf16 export rounds as .to(bfloat16)."""
    model = tiny_hf("llama")
    with horizon.Trainer(model, horizon.TrainConfig(optimizer=horizon.AdamW(lr=1e-2))) as trainer:
        trainer.step({"input_ids": ids(), "labels": ids(1)})
        trainer.export_hf(str(tmp_path), dtype=torch.bfloat16)
        want = {k: v.to(torch.bfloat16).float() for k, v in trainer.state_dict().items()}
    with horizon.Trainer(empty_hf_model(tmp_path), horizon.TrainConfig(hf_weights=str(tmp_path))) as trainer:
        got = trainer.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_mismatched_checkpoint_is_refused_before_allocating(tmp_path, monkeypatch):
    tiny_hf("llama", layers=2).save_pretrained(tmp_path)
    forbid_host_store(monkeypatch, "the host store was built before the checkpoint was checked")
    with pytest.raises(ValueError, match=r"model\.layers\.2\..* is missing.*empty_hf_model"):
        horizon.Trainer(empty_hf_model(tiny_hf("llama", layers=3).config),
                        horizon.TrainConfig(hf_weights=str(tmp_path)))
    wider = tiny_hf("llama", layers=2, intermediate_size=96).config
    with pytest.raises(ValueError, match=r"gate_proj\.weight is F32\[128, 64\], the model wants a float \[96, 64\]"):
        horizon.Trainer(empty_hf_model(wider), horizon.TrainConfig(hf_weights=str(tmp_path)))


def test_bad_directories(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        horizon.TrainConfig(hf_weights=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="neither model.safetensors nor"):
        horizon.Trainer(tiny_hf("llama"), horizon.TrainConfig(hf_weights=str(tmp_path)))
    with pytest.raises(ValueError, match="has no config.json"):
        empty_hf_model(tmp_path)
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"lm_head.weight": "gone.safetensors"}}))
    with pytest.raises(ValueError, match="gone.safetensors is listed in .* but missing"):
        horizon.Trainer(tiny_hf("llama"), horizon.TrainConfig(hf_weights=str(tmp_path)))


def test_checkpoint_export_loads_with_from_pretrained(tmp_path):
    """``horizon checkpoint export`` of an HF model's checkpoint: config.json and weights from_pretrained reads."""
    from horizon.checkpoint.export import export, resolve

    model = tiny_hf("gpt2", tie=True)
    ckpt = horizon.CheckpointConfig(dir=str(tmp_path / "ckpt"), every_steps=2)
    with horizon.Trainer(model, horizon.TrainConfig(optimizer=horizon.AdamW(lr=1e-2), checkpoint=ckpt)) as trainer:
        for seed in range(2):
            trainer.step({"input_ids": ids(seed), "labels": ids(seed + 10)})
        trainer.save(wait=True)
        want = model(ids()).logits
    assert "config.json" in export(resolve(str(tmp_path / "ckpt")), str(tmp_path / "out"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(loaded(ids()).logits, want)


def test_gpt2_keys_without_the_transformer_prefix(tmp_path):
    """The original GPT-2 checkpoints name ``h.0.attn...``, not ``transformer.h.0.attn...``."""
    from safetensors.torch import save_file

    model = tiny_hf("gpt2", tie=True)
    model.config.save_pretrained(tmp_path)
    state = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    with horizon.Trainer(empty_hf_model(tmp_path), horizon.TrainConfig(hf_weights=str(tmp_path))) as trainer:
        got = trainer.state_dict()
        assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
