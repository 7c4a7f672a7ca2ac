from horizon.engine.engine import Engine
from horizon.engine.plan import ActivationPolicy, Plan

__all__ = ["Engine", "Plan", "ActivationPolicy"]
