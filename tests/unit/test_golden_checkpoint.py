"""Checkpoints of format_version 1 written by an earlier horizon (tests/fixtures/ckpt-v1) still load,
byte for byte, with every train-state field; see tests/fixtures/golden_ckpt.py for how they were made."""

from __future__ import annotations

import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

import horizon
from horizon.checkpoint import read_manifest, verify

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import golden_ckpt  # noqa: E402

STEP_DIR = golden_ckpt.DIR / "step-000000003"


class Cursor:
    def __init__(self) -> None:
        self.state = None

    def state_dict(self):
        return {"index": 0, "epoch": 0}

    def load_state_dict(self, state):
        self.state = state


def test_golden_v1_manifest_and_crcs_validate():
    manifest = verify(str(STEP_DIR))
    assert manifest["format_version"] == 1 and manifest["step"] == golden_ckpt.STEP
    assert [u["name"] for u in manifest["layout"]] == ["embed_tokens", "layers.0", "lm_head"]
    assert manifest["train_state"]["adam_steps"] == [golden_ckpt.STEP] * 3


def test_golden_v1_resumes_into_a_trainer_byte_for_byte(tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(golden_ckpt.DIR, root)  # resume may clean or quarantine: never touch the checked-in copy
    golden_ckpt.seed_rng()
    expected_rng = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    ckpt = horizon.CheckpointConfig(dir=root, final_save=False)
    cursor = Cursor()
    with horizon.Trainer(golden_ckpt.model(), horizon.TrainConfig(checkpoint=ckpt, resume=True)) as trainer:
        trainer.register_data(cursor)
        assert trainer.global_step == golden_ckpt.STEP and trainer.tokens_seen == golden_ckpt.TOKENS_SEEN
        assert [int(s) for s in trainer.updater.steps] == [golden_ckpt.STEP] * len(trainer.store.units)
        for index, unit in enumerate(trainer.store.units):
            for role in golden_ckpt.ROLES:
                expected = golden_ckpt.values(index, role, unit.layout.numel)
                assert torch.equal(getattr(unit, role).view(torch.int32), expected.view(torch.int32)), (index, role)
        assert random.getstate() == expected_rng[0]
        assert np.array_equal(np.random.get_state()[1], expected_rng[1])
        assert torch.equal(torch.get_rng_state(), expected_rng[2])
    assert cursor.state == golden_ckpt.DATA_CURSOR
    assert read_manifest(str(STEP_DIR))["train_state"]["data"] == golden_ckpt.DATA_CURSOR
