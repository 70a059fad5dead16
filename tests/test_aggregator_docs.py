"""docs/openapi.yaml describes the routes the app serves and every reason it can answer with."""

from __future__ import annotations

from pathlib import Path

import yaml
from nacl.signing import SigningKey

from aggregator.app import STATUS_FOR_REASON, AggregatorConfig, make_app
from aggregator.metrics import UPDATE_REJECT_REASONS
from aggregator.simulate import synthetic_package

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_openapi_lists_exactly_the_served_routes(tmp_path: Path) -> None:
    spec = yaml.safe_load((DOCS / "openapi.yaml").read_text())
    assert spec["openapi"].startswith("3.")
    app = make_app(AggregatorConfig(state_dir=tmp_path, package=synthetic_package(10), key=SigningKey.generate()))
    routes = [r for r in app.router.routes() if r.method != "HEAD"]
    served = {(route.method.lower(), route.resource.canonical) for route in routes}
    documented = {(method, path) for path, item in spec["paths"].items() for method in item}
    assert served == documented


def test_openapi_and_api_md_name_every_reason() -> None:
    spec = yaml.safe_load((DOCS / "openapi.yaml").read_text())
    enum = set(spec["components"]["schemas"]["Problem"]["properties"]["reason"]["enum"])
    reasons = set(UPDATE_REJECT_REASONS) | set(STATUS_FOR_REASON)
    assert reasons <= enum
    api = (DOCS / "api.md").read_text()
    assert not [r for r in sorted(enum) if f"`{r}`" not in api]
