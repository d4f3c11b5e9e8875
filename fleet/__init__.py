"""The fleet side of spotguard: Terraform in ``modules/`` and ``examples/``, and the
``spotguard fleet render`` command (:mod:`spotguard.fleet.render`), installed as
``spotguard.fleet``. See ``fleet/README.md``.
"""
