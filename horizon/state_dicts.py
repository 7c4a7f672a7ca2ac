"""``Trainer.state_dict`` and ``Trainer.optimizer_state_dict``: the state in the user's names.

Why apart from the trainer: where a unit's master, m and v live depends on the store (RAM, SSD, or
this rank's shard), and each reader has to find them there, in the model's parameter names, after
the updates still running. The trainer only waits for those updates and calls these.
"""

from __future__ import annotations

import torch

from horizon.distributed.data_parallel import ShardedDataParallel

__all__ = ["master_state_dict", "optimizer_state_dict"]


def master_state_dict(trainer) -> dict[str, torch.Tensor]:
    """fp32 masters with the keys of ``model.state_dict()`` (see ``Trainer.state_dict``)."""
    state = trainer.model.state_dict()
    if trainer.ssd is not None:
        keys: dict[int, list[str]] = {}
        for name, p in trainer.model.named_parameters(remove_duplicate=False):
            keys.setdefault(id(p), []).append(name)
        by_unit = [{local: keys.get(id(p), []) for local, p in params.items()} for params in trainer.store.parameters]
        trainer.ssd.put_masters(state, trainer.store, by_unit)
    if isinstance(trainer.data_parallel, ShardedDataParallel):
        trainer.data_parallel.put_masters(state, trainer.store, trainer.model)
    return state


def optimizer_state_dict(trainer) -> dict:
    """AdamW state per parameter name (see ``Trainer.optimizer_state_dict``)."""
    store, dp = trainer.store, trainer.data_parallel
    whole = dp.whole if dp else lambda unit, flat: flat
    state = {}
    for index, (unit, step, names) in enumerate(zip(store.units, trainer.updater.steps, trainer.param_names())):
        if index in store.ssd_units:
            state_of = trainer.ssd.read_state(index)
            m, v = unit.views(state_of["exp_avg"]), unit.views(state_of["exp_avg_sq"])
        else:
            m, v = unit.views(whole(unit, unit.exp_avg)), unit.views(whole(unit, unit.exp_avg_sq))
        for slot, name in zip(unit.layout.own, names, strict=True):
            state[name] = {"step": step.clone(), "exp_avg": m[slot.local_name], "exp_avg_sq": v[slot.local_name]}
    opt = trainer.config.optimizer
    return {"state": state, "param_groups": [{"lr": opt.lr, "betas": opt.betas, "eps": opt.eps,
                                              "weight_decay": opt.weight_decay}]}
