"""fedit on Flower: the ServerApp / ClientApp (app.py), the node worker (node.py), and the
loopback launcher behind `fedit federate` (launch.py)."""
