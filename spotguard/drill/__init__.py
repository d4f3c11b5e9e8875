"""``spotguard drill``: the whole interruption loop rehearsed on one machine, and a budget check.

The drill starts an IMDS simulator and the real agent per simulated node, runs a reference
training to completion, runs it again and serves a spot interruption at a random step, lets
the real path happen (agent detects, notice file and signal, emergency checkpoint committed,
exit 75), starts a replacement that resumes from the store by itself, and compares the final
weights with the reference. :func:`run_drill` returns a :class:`DrillReport` whose timeline
says what happened when; :func:`check_budget` says whether an emergency save of a given size
fits in the two-minute notice.

The modules: ``options`` (what to rehearse, with its command-line flags), ``runner`` (the
steps), ``_node`` (simulator + agent of one instance), ``_launch`` (a training process and what
it reports), ``workload`` (the built-in Lightning training), ``report`` (text, JSON, HTML),
``budget``; ``elastic`` with ``elastic_workload`` and ``elastic_report`` (``--nodes``: a
torchrun elastic job over several rehearsed nodes loses one); a failed step is
:class:`~spotguard.errors.DrillFailed`. The drill uses only the parts' public APIs; the
``spotguard drill`` command is :mod:`spotguard.cli.drill`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spotguard.drill.options import DrillOptions, from_args, parse_flag
from spotguard.errors import DrillFailed
from spotguard.lazy import lazy_exports

if TYPE_CHECKING:  # these load torch and the trainer hooks: imported on first use
    from spotguard.drill.budget import Budget, check_budget
    from spotguard.drill.elastic import run_elastic_drill
    from spotguard.drill.elastic_report import ElasticReport
    from spotguard.drill.report import DrillReport, Interruption
    from spotguard.drill.runner import run_drill

__all__ = [
    "Budget",
    "DrillFailed",
    "DrillOptions",
    "DrillReport",
    "ElasticReport",
    "Interruption",
    "check_budget",
    "from_args",
    "parse_flag",
    "run_drill",
    "run_elastic_drill",
]

_LAZY = {
    "Budget": "spotguard.drill.budget",
    "check_budget": "spotguard.drill.budget",
    "DrillReport": "spotguard.drill.report",
    "Interruption": "spotguard.drill.report",
    "run_drill": "spotguard.drill.runner",
    "run_elastic_drill": "spotguard.drill.elastic",
    "ElasticReport": "spotguard.drill.elastic_report",
}


__getattr__ = lazy_exports(__name__, _LAZY)
