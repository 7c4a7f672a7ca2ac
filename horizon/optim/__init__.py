from horizon.optim.adamw import AdamW, adamw_unit_step
from horizon.optim.clip import clip_scale, global_grad_norm

__all__ = ["AdamW", "adamw_unit_step", "clip_scale", "global_grad_norm"]
