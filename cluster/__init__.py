"""What users touch, and what every node stands on (doc/architecture.md).

``cluster.node`` is the node runtime, the layer under every tier; the client API
(``cluster.client`` and its companions) and the CLI, local launcher and demo (``cluster.cli*``,
``cluster.up``, ``cluster.local``, ``cluster.demo``) are the layers above the tiers.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cluster")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
