"""Everything about the EC2 instance metadata service, shared by the agent and the hooks::

client.py       ImdsClient: IMDSv2 only, token lifetime on a monotonic clock, a transport
                seam so unit tests answer requests without a server
parsers.py      pure functions from an IMDS answer to a Notice (or "none", or ImdsBadAnswer)
simulator.py    ImdsSimulator: real paths and formats, IMDSv2 rules, fixed notice times,
                a control API to schedule notices and inject faults
sim_control.py  SimControl: a client for that control API
"""
