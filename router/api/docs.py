"""The API's own documentation: `/schema` is a page rendered here from the OpenAPI schema, with no script,
font or stylesheet from a CDN (litestar's UI plugins load theirs from one, so their pages are blank
offline); `/schema/openapi.json` is the schema itself."""

from __future__ import annotations

import html
from typing import Any

from litestar import Request
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, OpenAPIRenderPlugin

METHODS = ("get", "post", "put", "patch", "delete")
STYLE = """<style>
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; padding: 0 1rem; color: #1b1b1b }
table { border-collapse: collapse; width: 100% } td, th { border-bottom: 1px solid #ddd; padding: .4rem; text-align: left }
code { background: #f3f3f3; padding: 0 .2rem } .method { font-weight: 600; text-transform: uppercase }
</style>"""


class OfflineDocsPlugin(OpenAPIRenderPlugin):
    """A static HTML page listing every operation (method, path, summary) with a link to the JSON schema."""

    def __init__(self, path: str | list[str] = "/") -> None:
        super().__init__(path=path, favicon="", style=STYLE)

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        info = openapi_schema.get("info", {})
        title = html.escape(f"{info.get('title', 'API')} {info.get('version', '')}".strip())
        rows = []
        for path, item in sorted(openapi_schema.get("paths", {}).items()):
            for method in METHODS:
                operation = item.get(method)
                if operation is None:
                    continue
                summary = html.escape(operation.get("summary") or operation.get("description") or "")
                rows.append(f"<tr><td class='method'>{method}</td><td><code>{html.escape(path)}</code></td><td>{summary}</td></tr>")
        schema_url = html.escape(self.get_openapi_json_route(request))
        page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>{self.favicon}{self.style}</head>
<body><h1>{title}</h1>
<p>The OpenAPI schema: <a href="{schema_url}">{schema_url}</a> (load it into any OpenAPI viewer).</p>
<table><thead><tr><th>method</th><th>path</th><th>what</th></tr></thead><tbody>
{''.join(rows)}
</tbody></table></body></html>"""
        return page.encode()


def openapi_config() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="llm-router", version="0.1.0", render_plugins=[OfflineDocsPlugin(), JsonRenderPlugin()],
    )
