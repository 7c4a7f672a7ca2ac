"""The host store: exact sizes by role, parameters as views, tied weights stored once."""

import torch

import horizon
from horizon.models import Decoder, decoder_config, find_units
from horizon.store import HostStore, plan_layouts, store_bytes_by_role
from horizon.store.layout import ALIGN_BYTES


def _aligned(n):
    return -(-n // ALIGN_BYTES) * ALIGN_BYTES


def _layouts(model):
    specs = find_units(model)
    return specs, plan_layouts([s.name for s in specs], [s.module for s in specs])


def test_bytes_by_role_are_exact():
    model = Decoder(decoder_config("tiny", num_layers=3))
    specs, layouts = _layouts(model)
    per_unit = [sum(p.numel() for p in s.module.parameters()) for s in specs]
    assert sum(per_unit) == sum(p.numel() for p in model.parameters())
    fp32 = store_bytes_by_role(layouts, torch.float32)
    assert fp32["master"] == fp32["exp_avg"] == fp32["grad"] == sum(_aligned(4 * n) for n in per_unit)
    assert fp32["compute"] == 0  # in fp32 the compute copy is the master
    bf16 = store_bytes_by_role(layouts, torch.bfloat16)
    assert bf16["compute"] == bf16["grad"] == sum(_aligned(2 * n) for n in per_unit)
    assert sum(bf16.values()) == sum(_aligned(4 * n) * 3 + _aligned(2 * n) * 2 for n in per_unit)


def test_tied_weight_is_stored_once_and_borrowed_by_the_head():
    model = Decoder(decoder_config("tiny", num_layers=2, tie_embeddings=True))
    specs, layouts = _layouts(model)
    assert sum(l.numel for l in layouts) == sum(p.numel() for p in model.parameters())
    head = layouts[-1]
    assert [b.local_name for b in head.borrowed] == ["head.weight"]
    assert head.borrowed[0].owner == 0
    assert head.device_numel == head.numel + model.embed_tokens.weight.numel()


def test_model_parameters_become_views_of_the_master():
    torch.manual_seed(0)
    model = Decoder(decoder_config("tiny", num_layers=2, tie_embeddings=True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with horizon.Trainer(model) as trainer:
        masters = [u.master for u in trainer.store.units]
        for name, p in model.named_parameters():
            assert any(m.untyped_storage().data_ptr() == p.untyped_storage().data_ptr() for m in masters), name
            assert torch.equal(p.detach(), before[name])
        assert model.lm_head.weight is model.embed_tokens.weight


def test_meta_model_is_materialised_in_the_store_and_initialised():
    with torch.device("meta"):
        model = Decoder(decoder_config("tiny", num_layers=2))
    with horizon.Trainer(model) as trainer:
        assert not any(p.is_meta for p in model.parameters())
        w = model.layers[0].attention.wq.weight
        assert abs(float(w.detach().std()) - 0.02) < 0.003  # Decoder.init_weights ran on the store's memory
        assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))
        assert trainer.memory().host_bytes_by_role["master"] == sum(
            _aligned(4 * sum(p.numel() for p in s.module.parameters())) for s in find_units(model))


def test_store_refuses_more_than_the_machine_has(monkeypatch):
    import pytest

    from horizon.store import HostMemoryError, host_store
    from horizon.store.capacity import HostCapacity

    small = HostCapacity(available_bytes=1000, cgroup_limit_bytes=None, cgroup_usage_bytes=None,
                         memlock_limit_bytes=None, can_lock_unlimited=True)
    monkeypatch.setattr(host_store, "probe_host_capacity", lambda: small)
    _, layouts = _layouts(Decoder(decoder_config("tiny", num_layers=2)))
    need = sum(store_bytes_by_role(layouts, torch.float32).values())
    with pytest.raises(HostMemoryError, match=str(need - 1000)):
        HostStore(layouts, compute_dtype=torch.float32, pin=False)
