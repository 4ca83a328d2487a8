"""The server side: what runs on the aggregating host.

`server.py` (selection, screening, the strategy, the privacy accountant, byte accounting, one
round from tasks to the next global adapter), `strategies/` (pure aggregation math and the
strategies built on it), `privacy.py` (DP-FedAvg as a strategy wrapper), `screening.py`,
`selection.py`.
"""
