"""Whether a URL can be an aggregator's base URL: the agent's ``[aggregator] url``, ``flctl provision
--aggregator-url`` and a site's ``serve --upstream`` each append ``/v1/...`` paths to it, so it must be http(s)
with a host and a port that can be connected to, and carry no query or fragment for those paths to land in.
A path is kept (an aggregator behind a reverse proxy's prefix)."""

from __future__ import annotations

from urllib.parse import urlsplit


def base_url_problem(url: str) -> str:
    """Why ``url`` cannot be an aggregator's base URL, or "" when it can."""
    try:
        parsed = urlsplit(url)
        port = parsed.port  # out of range or not a number: ValueError
    except ValueError as exc:  # and a bracket left open, as in http://[::1
        return str(exc)
    if parsed.scheme not in ("http", "https"):
        return f"scheme {parsed.scheme!r}" if parsed.scheme else "no scheme"
    if not parsed.hostname:
        return "no host"
    if port == 0:
        return "port 0"
    if "?" in url or "#" in url:
        return "a query or fragment"
    return ""
