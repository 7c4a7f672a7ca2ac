"""The trainer's side of checkpointing: when to take one, the train state that goes with it, resume.

Why apart from the trainer: the trainer runs steps; a checkpoint also needs the writer (on the rank
that writes), the data loader the user registered and the position a resume restored into it, and
which committed step the ``on_checkpoint`` callbacks have already heard of. This object holds those
and reads (at a request) or restores (at a resume) the trainer's counters: step, skipped steps,
tokens seen, the Adam step counts and the RNG states.
"""

from __future__ import annotations

import os

from horizon.checkpoint.commit import step_dir_name
from horizon.checkpoint.load import find_valid, load_into
from horizon.checkpoint.manager import CheckpointError, Checkpointer
from horizon.checkpoint.manifest import layout_hash, layout_of
from horizon.checkpoint.train_state import capture_rng, check_json, restore_rng

__all__ = ["CheckpointSession"]


class CheckpointSession:
    def __init__(self, trainer, checkpointer: Checkpointer | None) -> None:
        self.trainer = trainer
        self.checkpointer = checkpointer
        """The writer; None without TrainConfig(checkpoint=...) or on a rank that does not write."""
        self.data = None
        self.resumed_data_state = None
        self.num_announced = 0
        """How many of ``checkpointer.committed_steps`` the on_checkpoint callbacks have heard of."""

    def request(self) -> bool:
        """Capture the train state now and start copying and writing version ``global_step``."""
        t = self.trainer
        data = self.data.state_dict() if self.data is not None else None
        if data is not None:
            check_json(data, "the registered data loader's state_dict()")
        state = {"step": t.global_step, "skipped_steps": t.skipped_steps, "tokens_seen": t.tokens_seen,
                 "rng": capture_rng(), "data": data}
        num_units = len(t.store.units)
        order = list(range(num_units))[::-1] if t.config.eager_updates else list(range(num_units))
        after = {unit: t.updater.pending(unit) for unit in range(num_units)}
        return self.checkpointer.request(step=t.global_step, train_state=state, order=order, after=after,
                                         adam_steps=t.updater.steps)

    def after_step(self, *, updated: bool) -> tuple[str, ...]:
        """Take the periodic checkpoint due after this update; the errors of failed ones since the last call."""
        if self.checkpointer is None:
            return ()
        every = self.trainer.config.checkpoint.every_steps
        if updated and every and self.trainer.global_step % every == 0:
            self.request()
        return tuple(self.checkpointer.take_errors())

    def announce(self) -> None:
        """Run the on_checkpoint callbacks once for each checkpoint committed since the last call, in order."""
        if self.checkpointer is None:
            return
        committed = self.checkpointer.committed_steps
        while self.num_announced < len(committed):
            step = committed[self.num_announced]
            self.num_announced += 1
            path = os.path.join(self.checkpointer.root, step_dir_name(step))
            for callback in self.trainer.callbacks:
                if hasattr(callback, "on_checkpoint"):
                    callback.on_checkpoint(self.trainer, step, path)

    def save(self, *, wait: bool) -> str | None:
        t = self.trainer
        if t.config.checkpoint is None:
            raise ValueError("Trainer.save() needs TrainConfig(checkpoint=horizon.CheckpointConfig(dir=...))")
        if self.checkpointer is None:
            return None  # another rank (rank 0) writes
        if t.micro_batches_pending:
            raise ValueError("Trainer.save() in the middle of gradient accumulation: call it after the "
                             f"{t.config.grad_accum_steps}-th micro-batch of an update")
        if self.checkpointer.last_requested_step != t.global_step:
            self.request()
        if not wait:
            return None
        flight = self.checkpointer.wait()
        if flight is None or flight.path is None:
            raise CheckpointError(flight.error if flight else "no checkpoint was taken")
        return flight.path

    def resume(self, dir) -> int | None:
        t = self.trainer
        ckpt = t.config.checkpoint
        if dir is None and ckpt is None:
            raise ValueError("Trainer.resume() needs a directory, or TrainConfig(checkpoint=CheckpointConfig(dir=...))")
        t.updater.wait_all()
        if self.checkpointer is not None:
            self.checkpointer.wait()
        expected = self.checkpointer.layout_hash if self.checkpointer else layout_hash(
            layout_of(t.store, t.param_names()))
        def find():
            return find_valid(str(dir if dir is not None else ckpt.dir), layout_hash=expected,
                              allow_fresh_start=ckpt.allow_fresh_start if ckpt else False)

        # Data parallel: rank 0 alone validates every CRC (and quarantines); every rank then loads what it
        # holds of the checkpoint rank 0 chose (CRCs checked again as it reads).
        found = t.data_parallel.from_rank_zero(find) if t.data_parallel else find()
        if found is None:
            return None
        directory, manifest = found
        load_into(t.store, directory, manifest, ssd=t.ssd)
        state = manifest["train_state"]
        for step, saved in zip(t.updater.steps, state["adam_steps"]):
            step.fill_(saved)
        t.restore_counters(step=state["step"], skipped_steps=state["skipped_steps"], tokens_seen=state["tokens_seen"])
        restore_rng(state["rng"])
        self.resumed_data_state = state["data"]
        if self.data is not None and state["data"] is not None:
            self.data.load_state_dict(state["data"])
        if self.checkpointer is not None:
            self.checkpointer.last_requested_step = self.checkpointer.last_committed_step = t.global_step
        return t.global_step

    def register_data(self, loader) -> None:
        if not (callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))):
            raise ValueError(f"register_data needs an object with state_dict() and load_state_dict(state), "
                             f"got {type(loader).__name__}")
        check_json(loader.state_dict(), f"{type(loader).__name__}.state_dict()")
        self.data = loader
        if self.resumed_data_state is not None:
            loader.load_state_dict(self.resumed_data_state)

    def finish(self) -> str | None:
        """At close: wait for the checkpoint in flight and take the final one; its error, if it failed."""
        t, error = self.trainer, None
        if self.checkpointer is None:
            return None
        self.checkpointer.wait()
        if t.config.checkpoint.final_save and not t.micro_batches_pending \
                and self.checkpointer.last_committed_step != t.global_step:
            self.checkpointer.last_requested_step = None  # a failed one at this step is taken again
            self.request()
            error = self.checkpointer.wait().error
        self.announce()
        return error

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()  # its writer threads
