"""The storage tier: immutable, content-addressed blobs on disk, the transfer protocol's serving
side, replication, scrub and repair, collection of unreferenced files (doc/storage.md,
doc/architecture.md)."""
