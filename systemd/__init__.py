"""The systemd unit files and the agent's example configuration, shipped in the package.

This folder is installed as ``spotguard.units`` so that a node that installed spotguard from
the package index has the unit files too: ``spotguard install-units`` copies them into
``/etc/systemd/system`` (see :mod:`spotguard.cli.units`).
"""
