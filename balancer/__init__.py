"""The balancer tier: the Binary Star pair, the worker registry, and credit-, capability- and
locality-aware dispatch between the master leader and the workers (doc/dispatch.md,
doc/architecture.md)."""
