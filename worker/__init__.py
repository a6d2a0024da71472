"""The worker tier: task slots that run callables, commands and alignment tiles, the block
cache and read-only FUSE view of storage, and the Smith-Waterman kernels in ``worker.sw``
(doc/dispatch.md, doc/kernels.md, doc/architecture.md)."""
