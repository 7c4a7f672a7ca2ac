from horizon.optim.adamw import AdamW, adamw_unit_step
from horizon.optim.clip import clip_scale
from horizon.optim.updater import Updater

__all__ = ["AdamW", "adamw_unit_step", "clip_scale", "Updater"]
