"""Where a step's time goes: wall time per phase, summed over engine steps.

The engine and the runner stamp their phases (schedule, prepare inputs, forward, sample, outputs)
into a ``StepPhases`` when one is attached; with none attached a step pays one attribute check.
``soar bench offline --profile`` prints the table and writes a torch profiler trace.
"""

from __future__ import annotations

from collections import defaultdict

PHASES = ("schedule", "prepare", "forward", "sample", "outputs")


class StepPhases:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps = 0
        self.tokens = 0

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds

    def report(self) -> dict[str, object]:
        total = sum(self.seconds.values())
        per_step = {p: (self.seconds[p] / self.steps if self.steps else 0.0) for p in PHASES}
        return {
            "steps": self.steps,
            "tokens": self.tokens,
            "total_s": total,
            "ms_per_step": {p: 1e3 * v for p, v in per_step.items()},
            "share": {p: (self.seconds[p] / total if total else 0.0) for p in PHASES},
            "outside_forward_share": (1 - self.seconds["forward"] / total) if total else 0.0,
        }

    def render(self) -> str:
        r = self.report()
        lines = [f"step phases over {r['steps']} steps ({r['tokens']} tokens computed):",
                 f"{'phase':<10} {'ms/step':>9} {'share':>7}"]
        for p in PHASES:
            lines.append(f"{p:<10} {r['ms_per_step'][p]:>9.3f} {100 * r['share'][p]:>6.1f}%")
        lines.append(f"time outside the forward: {100 * r['outside_forward_share']:.1f}%")
        return "\n".join(lines)
