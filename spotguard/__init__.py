"""spotguard: train on EC2 Spot GPUs without losing work.

This package is the shared core; the parts sit beside it and import it, never each other::

    spotguard                  errors (the one exception tree), protocol (the agent <-> trainer
                               contract), imds (IMDSv2 client, answer parsers, simulator)
    spotguard.agent            the on-node daemon (no torch, no boto3)
    spotguard.trainer_hooks    what training code imports: checkpoints, emergency save, resume
    spotguard.fleet            Terraform helpers; spotguard.units: the systemd unit files
    spotguard.drill            the whole loop rehearsed on one machine (uses the parts above)
    spotguard.cli              the ``spotguard`` command (on top of everything)

``tests/test_layout.py`` holds the parts to these rules.
"""
