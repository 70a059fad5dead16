"""fl-agent: the federated-learning agent that runs on each edge appliance."""


def __getattr__(name: str) -> str:
    """``__version__`` on first use: importlib.metadata costs ~2.5 MB of resident memory, which the trainer's
    child process (it imports this package too) would otherwise carry against its memory budget."""
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("fl-edge")
    except PackageNotFoundError:  # running from a source tree that was never installed
        found = "0+unknown"
    globals()["__version__"] = found
    return found
