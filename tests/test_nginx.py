"""The shipped nginx config in front of a real Prefect server: TLS, the redirect, basic
auth on the UI and the API, Prefect's own auth string behind it, every websocket route,
a flow run whose events and logs come back through the proxy, and the UI in Chromium."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.fixtures.browser import Chromium
from tests.fixtures.proxy import REPO, TEMPLATE, require_program

ARTIFACTS = REPO / "test-artifacts"
CLIENT = Path(__file__).parent / "fixtures" / "proxy_client.py"


def websocket_routes() -> list[str]:
    """Every websocket route of the installed Prefect's API, as clients reach it (/api/...)."""
    from fastapi.routing import APIWebSocketRoute
    from prefect.server.api.server import API_ROUTERS
    from starlette.routing import WebSocketRoute

    return sorted(f"/api{route.path}" for router in API_ROUTERS for route in router.routes
                  if isinstance(route, (APIWebSocketRoute, WebSocketRoute)))


def concrete(route: str) -> str:
    return re.sub(r"\{[^}]+\}", "some-pool", route)


def test_every_prefect_websocket_route_is_proxied_as_websocket():
    pattern = re.search(r"location ~ (\^/api/\S+\$) \{", TEMPLATE.read_text()).group(1)
    routes = websocket_routes()
    assert len(routes) >= 5, routes
    assert [r for r in routes if not re.fullmatch(pattern, concrete(r))] == []
    assert not re.fullmatch(pattern, "/api/flow_runs/filter")


def test_http_redirects_to_https(proxied):
    with proxied.client() as http:
        answer = http.get(f"{proxied.http_url}/runs?x=1")
    assert answer.status_code == 301
    assert answer.headers["location"] == f"{proxied.https_url}/runs?x=1"


@pytest.mark.parametrize("method, path", [("GET", "/"), ("GET", "/runs"), ("GET", "/ui-settings"),
                                          ("GET", "/api/health"), ("POST", "/api/flow_runs/filter")])
def test_no_or_wrong_credentials_get_401(proxied, method, path):
    with proxied.client() as http:
        anonymous = http.request(method, f"{proxied.https_url}{path}", json={} if method == "POST" else None)
        wrong = http.request(method, f"{proxied.https_url}{path}", auth=(proxied.auth[0], "wrong"),
                             json={} if method == "POST" else None)
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == 'Basic realm="Prefect"'
    assert wrong.status_code == 401


def test_credentials_open_the_ui_and_the_api(proxied):
    with proxied.client(auth=proxied.auth) as http:
        # As a browser navigates (the UI's routes are answered with its index.html then).
        page = http.get(f"{proxied.https_url}/runs", headers={"accept": "text/html"})
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert http.post(f"{proxied.https_url}/api/flow_runs/filter", json={"limit": 1}).status_code == 200
        settings = http.get(f"{proxied.https_url}/ui-settings").json()
    assert settings["auth"] == "BASIC"
    assert settings["api_url"] == f"{proxied.https_url}/api"


def test_the_api_itself_requires_the_auth_string(proxied):
    """Behind nginx, inside the network: Prefect's own check, so nothing there is open either."""
    with proxied.client() as http:
        assert http.post(f"{proxied.prefect_url}/api/flow_runs/filter", json={}).status_code == 401
        assert http.post(f"{proxied.prefect_url}/api/flow_runs/filter", json={},
                         auth=proxied.auth).status_code == 200
        # Container health checks stay possible without the secret.
        assert http.get(f"{proxied.prefect_url}/api/health").status_code == 200


def test_security_headers_and_request_size_limit(proxied):
    with proxied.client() as http:
        for answer in (http.get(f"{proxied.https_url}/"), http.get(f"{proxied.https_url}/", auth=proxied.auth)):
            assert answer.headers["strict-transport-security"].startswith("max-age=")
            assert answer.headers["x-content-type-options"] == "nosniff"
            assert answer.headers["x-frame-options"] == "DENY"
            assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
            assert "nginx/" not in answer.headers.get("server", "")
        too_big = http.post(f"{proxied.https_url}/api/logs/", content=b"x" * (11 * 1024 * 1024),
                            auth=proxied.auth, headers={"content-type": "application/json"})
    assert too_big.status_code == 413


def connect_twice(url: str, ssl, **options):
    """`connect`, tried a second time if the first handshake gets no answer. Now and then (about
    one full run in six on a busy machine) an upgrade through nginx got no answer within 30 s,
    with nothing in either log, the unauthenticated one too; a route that does not work still
    fails, as the second attempt must succeed."""
    for attempt in (1, 2):
        try:
            return connect(url, ssl=ssl, subprotocols=["prefect"], open_timeout=30, **options)
        except TimeoutError:
            if attempt == 2:
                raise


@pytest.mark.parametrize("route", websocket_routes())
def test_websocket_route_through_nginx(proxied, route):
    url = f"wss://127.0.0.1:{proxied.https_url.rsplit(':', 1)[1]}{concrete(route)}"
    # Without credentials nginx refuses the handshake itself.
    with pytest.raises(InvalidStatus) as refused:
        connect_twice(url, proxied.ssl_context())
    assert refused.value.response.status_code == 401
    # With them, the upgrade reaches Prefect, which runs its own auth handshake.
    ws = connect_twice(url, proxied.ssl_context(), additional_headers={"Authorization": proxied.authorization})
    with ws:
        assert ws.subprotocol == "prefect"
        ws.send(json.dumps({"type": "auth", "token": proxied.auth_string}))
        assert json.loads(ws.recv(timeout=30)) == {"type": "auth_success"}


def test_ci_creates_the_deployments_through_nginx(proxied):
    """What the deploy job runs: only the Prefect API, reached through the proxy, twice (idempotent)."""
    from tests.fixtures.stack import INGEST

    for _ in range(2):
        result = subprocess.run([INGEST, "bootstrap", "--prefect-only", "--wait", "120"], env=proxied.client_env(),
                                capture_output=True, text=True, timeout=600, cwd=proxied.home)
        assert result.returncode == 0, f"{result.stderr[-4000:]}\n{proxied.logs()}"
    with proxied.client(auth=proxied.auth) as http:
        deployments = http.post(f"{proxied.https_url}/api/deployments/filter", json={}).json()
    assert {"records"} <= {d["name"] for d in deployments}
    assert {d["work_pool_name"] for d in deployments} == {"ingest"}


@pytest.fixture(scope="module")
def flow_run_through_proxy(proxied) -> dict:
    marker = f"marker-{uuid.uuid4().hex[:10]}"
    result = subprocess.run([sys.executable, str(CLIENT), marker], env=proxied.client_env(),
                            capture_output=True, text=True, timeout=600, cwd=proxied.home)
    assert result.returncode == 0, f"{result.stderr[-4000:]}\n{proxied.logs()}"
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    outcome["marker"] = marker
    return outcome


def test_flow_run_through_nginx_with_events_and_logs(flow_run_through_proxy):
    outcome = flow_run_through_proxy
    assert outcome["state"] == "COMPLETED"
    # Emitted by the task engine over events/in, received over events/out: both sockets work.
    assert {"prefect.task-run.Completed", "prefect.flow-run.Completed"} <= set(outcome["events"]), outcome
    # Sent over HTTP, received over logs/out.
    assert outcome["logs"] == sorted([f"flow saw {outcome['marker']}", f"task saw {outcome['marker']}"]), outcome


def test_ui_renders_the_flow_runs_page_in_chromium(proxied, flow_run_through_proxy, tmp_path):
    chromium = require_program("chromium", "/usr/bin/chromium")
    browser = Chromium(chromium, tmp_path, *proxied.auth)
    try:
        browser.open(f"{proxied.https_url}/runs")
        text = browser.wait_for_text([flow_run_through_proxy["flow_run_name"], "through-nginx"], timeout=180)
        browser.screenshot(ARTIFACTS / "nginx-ui-flow-runs.png")
    finally:
        browser.close()
    # The browser met nginx's challenge, and the UI then never showed Prefect's login page:
    # its own API calls carried the same credential.
    assert browser.auth_challenges >= 1
    assert "Authentication failed" not in text
