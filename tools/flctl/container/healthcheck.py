#!/opt/fl-edge/bin/python3
"""The images' HEALTHCHECK (installed as /usr/local/bin/fl-healthcheck): the service's own HTTP endpoint
answers 200. The URL is $FL_HEALTH_URL (each image sets its default); https is not verified, because this is
the container asking itself whether it is alive, not a client deciding whom to trust."""

import os
import ssl
import sys
import urllib.request


def main() -> int:
    url = os.environ.get("FL_HEALTH_URL", "http://127.0.0.1:8080/healthz")
    try:
        with urllib.request.urlopen(url, timeout=4, context=ssl._create_unverified_context()) as response:
            return 0 if response.status == 200 else 1
    except (OSError, ValueError) as exc:
        print(f"fl-healthcheck: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
