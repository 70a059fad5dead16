"""fl-agent: the federated-learning agent that runs on each edge appliance."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fl-edge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
