"""The device mesh, logical-axis sharding rules and sharded initialisation (sharding.py)."""
