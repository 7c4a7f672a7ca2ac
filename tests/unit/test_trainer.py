"""The trainer's reports: step metrics and the memory report add up."""

import time

import torch
import torch.nn.functional as F

import horizon
from helpers import batches, tiny_decoder


def test_step_metrics_count_labels_and_time():
    data = batches(2, ignore_frac=0.25)
    model = tiny_decoder(num_layers=2)
    with horizon.Trainer(model, horizon.TrainConfig(grad_clip_norm=1.0)) as trainer:
        with torch.no_grad():
            expected_loss = F.cross_entropy(model(data[0]["input_ids"]).view(-1, 256), data[0]["labels"].view(-1))
        start = time.perf_counter()
        m = trainer.step(data[0])
        elapsed = time.perf_counter() - start
        assert m.step == trainer.global_step == 1
        assert m.tokens == int((data[0]["labels"] != -100).sum())
        assert abs(m.loss - float(expected_loss)) <= 1e-6 * float(expected_loss)
        assert 0 < m.seconds <= elapsed and m.tokens_per_s == m.tokens / m.seconds
        assert m.grad_norm is not None and m.grad_norm > 0


def test_memory_report_adds_up():
    with horizon.Trainer(tiny_decoder(num_layers=3), horizon.TrainConfig(plan="recompute")) as trainer:
        trainer.step(batches(1, batch=3, seq=8)[0])
        r = trainer.memory()
        assert r.host_bytes == sum(r.host_bytes_by_role.values())
        assert r.host_bytes_by_role["activations"] == 3 * 3 * 8 * 64 * 4  # 3 blocks' inputs, [3, 8, 64] fp32
        assert r.host_bytes_by_role["master"] == trainer.store.bytes_by_role["master"]
        assert r.device_peak_bytes >= r.num_slots * r.slot_bytes


def test_cpu_link_throttle_slows_the_step_and_changes_no_number():
    model, data = tiny_decoder(num_layers=2), batches(2)
    results = []
    for link in (None, 20e6):
        with horizon.Trainer(tiny_decoder(num_layers=2), horizon.TrainConfig(cpu_link_bytes_per_s=link)) as t:
            ms = [t.step(b) for b in data]
            results.append(([m.loss for m in ms], sum(m.seconds for m in ms), dict(t.state_dict())))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(results[0][2][k], results[1][2][k]) for k in results[0][2])
    # every unit crosses twice per step: at 20 MB/s the weights alone take this long
    weight_bytes = 4 * sum(p.numel() for p in model.parameters())
    assert results[1][1] >= 2 * (2 * weight_bytes / 20e6) * 0.9
