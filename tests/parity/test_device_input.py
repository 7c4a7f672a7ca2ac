"""RECOMPUTE with the block input left on the device (RowSplit(input_on_device=True)): bitwise the input
sent to the host, no host bytes for it and no copies across the link, its bytes held on the device."""

import random

import torch

import horizon
from helpers import batches, horizon_run, tiny_decoder
from horizon.engine.transfer import CpuTransfer

OPT = horizon.AdamW(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
DEVICE_INPUT = horizon.RowSplit(input_on_device=True)
NAMES = [f"layers.{i}" for i in range(4)]


def _run(model, data, plan, **kwargs):
    return horizon_run(model, data, config=horizon.TrainConfig(optimizer=OPT, grad_clip_norm=1.0, plan=plan), **kwargs)


def _equal(a, b) -> bool:
    return a[0] == b[0] and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def _on_device(*names, **split):
    return horizon.Plan(splits={n: horizon.RowSplit(**split, input_on_device=True) for n in names})


def test_device_input_is_bitwise_host_input_and_keep():
    model = tiny_decoder(num_layers=4, tie_embeddings=True)
    data = batches(3)
    on_device = _run(model, data, _on_device(*NAMES))
    assert _equal(on_device, _run(model, data, "recompute")) and _equal(on_device, _run(model, data, "keep"))


def test_a_split_with_its_recomputed_rows_input_on_the_device_is_bitwise_the_host_one():
    """Half the rows kept, the other half recomputed from an input on the device or on the host; a slow,
    randomly delayed duplex link reorders the host copies against compute and each other."""
    rng = random.Random(0)
    model = tiny_decoder(num_layers=4)
    data = batches(2, batch=2)
    slow = CpuTransfer(bandwidth_bytes_per_s=50e6, delay_s=lambda: rng.uniform(0, 0.002), duplex=True)
    host = horizon.Plan(splits={n: horizon.RowSplit(keep=0.5) for n in NAMES})
    mixed = horizon.Plan(splits={"layers.0": horizon.RowSplit(keep=0.5, input_on_device=True),
                                 "layers.1": DEVICE_INPUT, "layers.3": horizon.RowSplit(keep=0.5)})
    reference = _run(model, data, host)
    assert _equal(_run(model, data, _on_device(*NAMES, keep=0.5), transfer=slow), reference)
    assert _equal(_run(model, data, mixed), _run(model, data, horizon.Plan(splits={
        "layers.0": horizon.RowSplit(keep=0.5), "layers.3": horizon.RowSplit(keep=0.5)})))


class _CountingTransfer(CpuTransfer):
    def __init__(self) -> None:
        super().__init__()
        self.d2h_bytes = 0

    def d2h(self, dsts, srcs):
        self.d2h_bytes += sum(s.numel() * s.element_size() for s in srcs)
        return super().d2h(dsts, srcs)


def test_the_input_holds_device_bytes_instead_of_host_bytes_and_link_time():
    """The exact device peak is the simulator's (tests/unit/test_planner_engine.py); here, that it moved."""
    num_layers, batch, seq, dim = 4, 2, 256, 64
    model = tiny_decoder(num_layers=num_layers, dim=dim)
    data = batches(1, batch=batch, seq=seq)
    hidden_bytes = batch * seq * dim * 4
    runs = {}
    for name, plan in (("host", "recompute"), ("device", _on_device(*NAMES[:num_layers]))):
        transfer = _CountingTransfer()
        runs[name] = (_run(model, data, plan, transfer=transfer)[2], transfer.d2h_bytes)
    (host, host_d2h), (device, device_d2h) = runs["host"], runs["device"]
    assert host.host_bytes_by_role["activations"] == num_layers * hidden_bytes
    assert device.host_bytes_by_role["activations"] == 0
    assert host_d2h - device_d2h == num_layers * hidden_bytes  # the inputs' trips to the host, and only those
    # Every block's input is alive at the turn from forward to backward, not only those restored ahead.
    assert device.device_peak_bytes > host.device_peak_bytes
