"""/docs (Swagger UI) and /redoc with their JavaScript and CSS served by imsrc itself, from the installed
fastapi-offline package: FastAPI's own pages load them from a CDN, and are blank without internet."""
from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs-assets"  # where the pages' scripts, styles and icon are served
DOCS, REDOC, OAUTH2_REDIRECT = "/docs", "/redoc", "/docs/oauth2-redirect"


def add_docs_pages(app: FastAPI) -> None:
    """Serve /docs and /redoc on `app` (created with docs_url and redoc_url None) from local assets."""
    app.mount(ASSETS, StaticFiles(directory=str(files("fastapi_offline") / "static")), name="docs-assets")

    def asset(request: Request, name: str) -> str:
        return f"{request.scope.get('root_path', '')}{ASSETS}/{name}"

    @app.get(DOCS, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=request.scope.get("root_path", "") + app.openapi_url,
                                   title=f"{app.title} - Swagger UI", oauth2_redirect_url=OAUTH2_REDIRECT,
                                   swagger_js_url=asset(request, "swagger-ui-bundle.js"),
                                   swagger_css_url=asset(request, "swagger-ui.css"),
                                   swagger_favicon_url=asset(request, "favicon.png"))

    @app.get(OAUTH2_REDIRECT, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(openapi_url=request.scope.get("root_path", "") + app.openapi_url,
                              title=f"{app.title} - ReDoc", redoc_js_url=asset(request, "redoc.standalone.js"),
                              redoc_favicon_url=asset(request, "favicon.png"), with_google_fonts=False)
