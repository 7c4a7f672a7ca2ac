"""The activation planner: measure costs, model a step, choose per-block policies, execute.

``measure_profile`` (measure.py) → ``Profile`` (profile.py) → ``solve_mip`` / ``solve_greedy``
(mip.py, greedy.py) over the engine's event list (schedule.py) → ``simulate`` (simulate.py) →
``to_plan`` / ``save_plan`` / ``load_plan`` (apply.py). See docs/planner.md.
"""

from horizon.planner.greedy import solve_greedy
from horizon.planner.mip import PlanInfeasible, Solution, solve_mip
from horizon.planner.profile import Profile, UnitCost, UnitRole
from horizon.planner.simulate import Prediction, model_step_s, peak_bytes, simulate

__all__ = ["Profile", "UnitCost", "UnitRole", "solve_mip", "solve_greedy", "Solution", "PlanInfeasible",
           "simulate", "Prediction", "model_step_s", "peak_bytes"]
