"""The compiler room: policies (the IR of remedy.policy) become the sensor plan.

``compile_plan`` is consumed by the kernel sensor, the /proc sampler, record/replay,
``--print-bpf`` and the engine's routing; nothing else derives sensor settings from policies.
"""

from remedy.compiler.compile import PlanProblem, compile_plan, plan_problems
from remedy.compiler.plan import (
    MAX_CGROUP_RULES,
    MAX_CLASSES,
    MAX_TIERS,
    FastPathRule,
    SensorPlan,
    SignalPlan,
    Tier,
    WindowClass,
)

__all__ = [
    "MAX_CGROUP_RULES",
    "MAX_CLASSES",
    "MAX_TIERS",
    "FastPathRule",
    "PlanProblem",
    "SensorPlan",
    "SignalPlan",
    "Tier",
    "WindowClass",
    "compile_plan",
    "plan_problems",
]
