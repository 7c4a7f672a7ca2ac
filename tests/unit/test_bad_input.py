"""Bad input gets a ValueError that says what is wrong, before any step runs."""

import pytest
import torch
from torch import nn

import horizon
from helpers import tiny_decoder


@pytest.fixture(scope="module")
def trainer():
    with horizon.Trainer(tiny_decoder(num_layers=2)) as t:
        yield t


def _ids(*shape, high=256):
    return torch.randint(0, high, shape)


@pytest.mark.parametrize("batch,match", [
    ([1, 2], "dict"),
    ({"input_ids": _ids(2, 8)}, "no 'labels'"),
    ({"input_ids": _ids(2, 8).tolist(), "labels": _ids(2, 8)}, "torch.Tensor"),
    ({"input_ids": _ids(2, 8).float(), "labels": _ids(2, 8)}, "integer token ids"),
    ({"input_ids": _ids(16), "labels": _ids(16)}, r"\[batch, tokens\]"),
    ({"input_ids": _ids(2, 8), "labels": _ids(2, 7)}, "differ in shape"),
    ({"input_ids": _ids(0, 8), "labels": _ids(0, 8)}, "empty"),
    ({"input_ids": _ids(2, 8) + 256, "labels": _ids(2, 8)}, "embedding has 256 rows"),
    ({"input_ids": _ids(2, 8) - 300, "labels": _ids(2, 8)}, "embedding has 256 rows"),
    ({"input_ids": _ids(2, 8), "labels": torch.full((2, 8), -100)}, "nothing to learn"),
    ({"input_ids": _ids(2, 8), "labels": _ids(2, 8) + 1000}, "head has 256 outputs"),
])
def test_bad_batches_are_refused_and_change_nothing(trainer, batch, match):
    before = {k: v.clone() for k, v in trainer.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        trainer.step(batch)
    assert trainer.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in trainer.state_dict().items())


@pytest.mark.parametrize("kwargs,match", [
    (dict(device="tpu"), "cpu' or 'cuda"),
    (dict(device="not a device"), "not a device"),
    (dict(grad_clip_norm=0.0), "grad_clip_norm"),
    (dict(grad_clip_norm=float("nan")), "grad_clip_norm"),
    (dict(plan="sometimes"), "plan"),
    (dict(plan=3), "plan"),
    (dict(compute_dtype=torch.int8), "compute_dtype"),
    (dict(compute_dtype=torch.float16), "loss scaling"),
    (dict(optimizer="adam"), "horizon.AdamW"),
    (dict(cpu_link_bytes_per_s=-1.0), "positive"),
    (dict(cpu_link_duplex=1), "True or False"),
    (dict(device="cuda", cpu_link_duplex=True), "duplex already"),
    (dict(grad_accum_steps=0), "grad_accum_steps"),
    (dict(grad_accum_steps=2.0), "grad_accum_steps"),
    (dict(on_nonfinite="warn"), "on_nonfinite"),
    (dict(lr_schedule="cosine"), "lr_schedule"),
])
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        horizon.TrainConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "lr"), (dict(lr=float("inf")), "lr"), (dict(betas=(0.9, 1.0)), "betas"),
    (dict(betas=(0.9,)), "betas"), (dict(eps=-1e-8), "eps"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(weight_decay_exclude="norm"), "tuple"), (dict(weight_decay_exclude=("(",)), "regular expression"),
])
def test_bad_optimizer_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        horizon.AdamW(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_slots=1), "num_slots"), (dict(loss_chunk_tokens=0), "loss_chunk_tokens"),
    (dict(default="keep"), "ActivationPolicy"), (dict(per_unit={"layers.0": "keep"}), "ActivationPolicy"),
])
def test_bad_plans(kwargs, match):
    with pytest.raises(ValueError, match=match):
        horizon.Plan(**kwargs)


def test_plan_naming_a_unit_the_model_lacks():
    plan = horizon.Plan(per_unit={"layers.9": horizon.ActivationPolicy.KEEP})
    with pytest.raises(ValueError, match=r"layers\.9"):
        horizon.Trainer(tiny_decoder(num_layers=2), horizon.TrainConfig(plan=plan))


def test_unsupported_models_are_refused_with_what_was_found():
    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(8, 2)

    with pytest.raises(ValueError, match=r"conv: Conv2d.*horizon\.Units"):
        horizon.Trainer(Conv())
    with pytest.raises(ValueError, match="nn.Module"):
        horizon.Trainer("a model")


def test_frozen_and_misplaced_parameters_are_refused():
    model = tiny_decoder(num_layers=2)
    model.layers[0].attention.wq.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        horizon.Trainer(model)


def test_parameters_outside_the_chain_are_refused():
    model = tiny_decoder(num_layers=2)
    model.extra = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="extra.weight"):
        horizon.Trainer(model)


def test_cuda_without_cuda_is_a_value_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="CUDA is not available"):
        horizon.Trainer(tiny_decoder(num_layers=2), horizon.TrainConfig(device="cuda"))


def test_trainer_refuses_a_non_config():
    with pytest.raises(ValueError, match="TrainConfig"):
        horizon.Trainer(tiny_decoder(num_layers=2), {"device": "cpu"})
