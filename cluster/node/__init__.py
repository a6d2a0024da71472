"""The node runtime: what every node and every client of a cluster stands on.

``loop`` and ``events`` (the sans-I/O contract of a node and the loop that owns its sockets,
clocks and signals), ``logs``, ``config`` (the cluster's TOML file), ``status`` (the status
query any node answers), and the links that nodes and clients share: ``masterlink`` (requests
to the masters' leader) and ``storagelink`` (uploads and reads from storage nodes). It imports
only ``proto``; the tiers, the client API and the CLI import it (doc/architecture.md).
"""
