"""The probe node: heartbeats between machines of a rack, with round-trip times.

The smallest real node of the cluster, and the one that proves the runtime: it answers
STATUS_QUERY like every node, echoes HEARTBEAT, and pings its peers. Operators run it between
two machines to check that ZeroMQ traffic flows (``cluster probe --bind … --peer …``).
"""
