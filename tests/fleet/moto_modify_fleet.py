"""A moto server that also answers EC2 ``ModifyFleet``, which stock moto 5 lacks.

Run as ``python tests/fleet/moto_modify_fleet.py -H 127.0.0.1 -p PORT`` (moto.server's flags).
The node's job-end calls ModifyFleet to set its fleet's target capacity to 0; this fills the
gap the way AWS behaves for a ``maintain`` fleet: the total target capacity changes and, with
the ``termination`` policy, instances above it are terminated. Everything else is moto's own.
"""

from __future__ import annotations

import sys
from typing import Any

from moto.core.responses import ActionResult
from moto.ec2.exceptions import InvalidParameterValueError
from moto.ec2.responses.fleets import Fleets
from moto.server import main


def modify_fleet(self: Any) -> ActionResult:
    fleet_id = self._get_param("FleetId")
    spec = self._get_param("TargetCapacitySpecification", {})
    fleet = self.ec2_backend.get_fleet(fleet_id)
    if fleet is None or fleet.fleet_type != "maintain":
        raise InvalidParameterValueError(f"FleetId {fleet_id}")
    total = int(spec["TotalTargetCapacity"])
    fleet.target_capacity = total
    fleet.target_capacity_specification["TotalTargetCapacity"] = total
    for part in ("OnDemandTargetCapacity", "SpotTargetCapacity"):
        if part in spec:
            fleet.target_capacity_specification[part] = int(spec[part])
    policy = self._get_param("ExcessCapacityTerminationPolicy")
    if (policy or fleet.excess_capacity_termination_policy) == "termination":
        fleet.terminate_instances()
    print(f"ModifyFleet {fleet_id} TotalTargetCapacity={total}", file=sys.stderr, flush=True)
    return ActionResult({"Return": True})


Fleets.modify_fleet = modify_fleet  # type: ignore[attr-defined]

if __name__ == "__main__":
    main(sys.argv[1:])
