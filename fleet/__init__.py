"""The fleet side of spotguard, installed as ``spotguard.fleet``: Terraform in ``modules/`` and
``examples/`` (see ``fleet/README.md``), and the ``spotguard fleet`` commands that the module's
nodes and its operator run:

* :mod:`~spotguard.fleet.render` (``render``): a model/infrastructure YAML as the module's variables
  (JSON);
* :mod:`~spotguard.fleet.package` (``package``): the wheel of this spotguard, for the nodes;
* :mod:`~spotguard.fleet.resume_gate` (``wait-clear``): a node's job waits while a notice that
  stops training is active;
* :mod:`~spotguard.fleet.job_end` (``job-end``): what a node does each time its job ends.
"""
