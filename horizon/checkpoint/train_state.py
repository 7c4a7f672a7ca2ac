"""The small state captured synchronously at a checkpoint request: counters, RNG, data cursor.

Why synchronously: it is tiny and changes every step, so it is read on the training thread at
the step boundary (before the next step can move it) and stored as JSON in the manifest.
"""

from __future__ import annotations

import base64
import json
import random

import numpy as np
import torch

__all__ = ["capture_rng", "restore_rng", "check_json"]


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def capture_rng() -> dict:
    """Python, NumPy, torch CPU and every CUDA device's generator, as JSON-ready values."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": {"key": [int(k) for k in np_state["state"]["key"]], "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_initialized() else [],
    }


def restore_rng(state: dict) -> None:
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": np.array(np_state["key"], dtype=np.uint32), "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    torch.set_rng_state(_unb64(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        saved = [_unb64(s) for s in state["cuda"]]
        if len(saved) != torch.cuda.device_count():
            raise ValueError(f"the checkpoint holds RNG states of {len(saved)} CUDA devices but "
                             f"{torch.cuda.device_count()} are visible: resume with the same devices")
        torch.cuda.set_rng_state_all(saved)


def check_json(value, what: str) -> None:
    """ValueError unless ``value`` survives a JSON round trip unchanged."""
    try:
        same = json.loads(json.dumps(value)) == value
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serialisable (dicts, lists, str, int, float, bool): {e}") from e
    if not same:
        raise ValueError(f"{what} changes in a JSON round trip (tuples or non-string keys?); use lists and str keys")
