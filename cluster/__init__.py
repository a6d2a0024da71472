"""What users touch: the submit API, the ``cluster`` CLI, config, local launcher, node runtime."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cluster")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
