"""The master tier: the Raft-replicated ledger of jobs, tasks, work units and files, and the API
that clients and the active balancer talk to (doc/masters.md, doc/architecture.md)."""
