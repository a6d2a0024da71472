"""The master tier (see ../shared/design.md); built by its own issue."""
