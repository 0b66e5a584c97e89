"""The dashboard: `GET /dashboard` serves a page whose script, stylesheet and charting library (uPlot,
vendored in `static/` with its licence) come from this router, never from a CDN.

The page and its assets hold no data, so they are served to anyone; everything they show comes from
admin endpoints (`/v1/dashboard` here, `/v1/backends`, `/v1/policies/stats`), fetched with the admin key
the page asks for and keeps in the tab's sessionStorage (no key is needed in open loopback mode).
Feedback from the page goes to `POST /v1/rewards`, as any client's.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

from litestar import Request, Response, Router, get
from litestar.datastructures import CacheControlHeader
from litestar.di import NamedDependency
from litestar.enums import MediaType
from litestar.params import Parameter
from litestar.static_files import create_static_files_router
from litestar.types import ControllerRouterHandler, Guard

from router.api.auth import caller_of
from router.api.protocol import DashboardResponse
from router.service import RouterService

STATIC = Path(__file__).parent / "static"
# Only this router's own scripts, styles and connections: a page that tried to load anything else would fail in the browser.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@get("/dashboard", media_type=MediaType.HTML, summary="The dashboard page (its data needs the admin key)")
async def dashboard_page() -> Response[bytes]:
    return Response((STATIC / "dashboard.html").read_bytes(), headers=SECURITY_HEADERS)


@get("/v1/dashboard", summary="The dashboard's series (rewards, off-policy estimates, spend) and the newest decisions (admin)")
async def dashboard_data(
    service: NamedDependency[RouterService],
    request: Request[Any, Any, Any],
    window_s: Annotated[float, Parameter(ge=60, le=90 * 86400, description="How far back, in seconds.")] = 3600,
    buckets: Annotated[int, Parameter(ge=2, le=500, description="Steps the window is cut into.")] = 60,
    decisions: Annotated[int, Parameter(ge=0, le=500, description="How many of the newest decisions to list.")] = 50,
) -> DashboardResponse:
    timeline = await service.timeline(window_s, buckets, decisions)
    return DashboardResponse.model_validate({**asdict(timeline), "caller": caller_of(request).tenant, "active_policy": service.active_policy})


def dashboard_routes(admin_guard: Guard) -> list[ControllerRouterHandler]:
    """The page, its assets, and its data endpoint behind `admin_guard`."""
    return [
        dashboard_page,
        create_static_files_router("/dashboard/static", [STATIC], cache_control=CacheControlHeader(no_cache=True)),
        Router("/", route_handlers=[dashboard_data], guards=[admin_guard]),
    ]
