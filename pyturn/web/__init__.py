"""The pages on the ops port: a status page at / and a browser test page at /test.

The HTML, scripts and style sheet are files beside this module, read once and served
from memory, so the pages work offline and nothing is fetched from elsewhere. The
scripts fill the pages from JSON (`/status.json`, `/test/ice.json`) with `textContent`
only: no server-built HTML carries client input, and the Content-Security-Policy the
ops endpoint sends forbids inline script.
"""

from __future__ import annotations

from importlib.resources import files

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

# URL path -> file; a fixed table, so no request path is ever joined to a file name.
_ROUTES = {
    "/": "status.html",
    "/test": "test.html",
    "/assets/status.js": "status.js",
    "/assets/test.js": "test.js",
    "/assets/pages.css": "pages.css",
    "/assets/favicon.svg": "favicon.svg",
    # Browsers ask for it whatever the page says.
    "/favicon.ico": "favicon.svg",
}


def load_assets() -> dict[str, tuple[str, bytes]]:
    """URL path -> (content type, body) for every page and asset."""
    here = files(__package__)
    assets: dict[str, tuple[str, bytes]] = {}
    for path, name in _ROUTES.items():
        suffix = name[name.rfind(".") :]
        assets[path] = (_TYPES[suffix], here.joinpath(name).read_bytes())
    return assets
