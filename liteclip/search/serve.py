"""`liteclip serve`: one local web page over a search index, and the JSON API under it (FastAPI).

    GET  /api/info                  the model and the index: images indexed, embedding size, model name
    GET  /api/search?q=TEXT&k=N     {"results": [{"id", "path", "score"}, ...]}, best first; weighted queries whose
                                    image terms are indexed images, by id: `2:dog + id:3fa9c1d2e4b5a6f7 - grass`
    GET  /api/similar?id=ID&k=N     the indexed images nearest an indexed one
    POST /api/similar               multipart `file`: the indexed images nearest an uploaded image
    POST /api/classify              multipart `file` and `labels` (one per line): zero-shot probabilities
    GET  /thumb/{id}, /image/{id}   an indexed image, as a cached thumbnail or as it is on disk (HEAD too)
    GET  /openapi.json              the API's description (no /docs page: it would load scripts from a CDN)

Search and classification are the library's ImageSearch and ZeroShotPipeline. What a request can reach, and what
another website can do, is written down in docs/guarantees.md ("the web page"); in short:
- no path in a request is ever opened: files are served by id, and only while they are the file that was indexed
  (same size and time, a regular file, reached through no link); a query's image terms are ids;
- only the Host names the server was started for are answered (DNS rebinding), a request another site sends is
  refused (Origin, Sec-Fetch-Site), and beyond this machine an access token is required (as Jupyter does);
- uploads are held to MAX_UPLOAD_BYTES and MAX_UPLOAD_PIXELS, and decoded at the size the model needs.
"""

# no `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run time, and the
# framework's types are imported inside create_app (the web extra is optional)
import hashlib
import io
import ipaddress
import logging
import mimetypes
import os
import re
import secrets
import socket
import stat
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from PIL import Image

from liteclip.files import atomic_write_bytes
from liteclip.data.images import PHOTO_FORMATS, UndecodableImageError, open_rgb
from liteclip.data.transforms import decode_side
from liteclip.errors import InputError, LiteclipError
from liteclip.search.image_search import ImageSearch
from liteclip.search.query import parse_web_query
from liteclip.search.store import make_derived_folder, thumbnails_folder

logger = logging.getLogger(__name__)

WEB = Path(__file__).parent / "web"
MAX_UPLOAD_BYTES = 20 * 2**20
FORM_OVERHEAD = 2**20  # a multipart body is the file plus its boundaries, headers and the other fields
MAX_UPLOAD_PIXELS = 50_000_000  # a 48-megapixel phone photo passes; a 12,000 px square PNG would take gigabytes
# pictures decoded at once: the thread pool runs dozens of requests, and each large picture holds its full-size
# pixels while it decodes, so a burst of uploads waits its turn instead of taking the machine's memory
DECODING = threading.BoundedSemaphore(2)
THUMBNAIL_SIDE = 320
MAX_RESULTS = 500
MAX_LABELS = 200
INDEXING_CHUNK = 256  # images encoded between two updates of what the page can search
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
TOKEN_COOKIE = "liteclip_token"


# ------------------------------------------------------------------------------------------------ who may ask


@dataclass(frozen=True)
class AccessPolicy:
    """Which Host names are answered (None: any, for a wildcard bind, where the token is the gate), and the token a
    request must carry (None on this machine alone)."""

    hosts: frozenset[str] | None
    token: str | None = None
    port: int = 8765

    @classmethod
    def for_host(cls, host: str, allowed_hosts: tuple[str, ...] = (), token: str | None = None,
                 port: int = 8765) -> "AccessPolicy":
        """The policy of a server bound to `host`: the loopback names, the host itself and `allowed_hosts`; a
        wildcard address (0.0.0.0, ::) answers whatever name the machine is reached by, since each of its
        addresses is one. Anything but loopback needs a token (made here unless given), as Jupyter does: a page
        that rebinds its name to this machine has neither the token nor the cookie."""
        names = None if is_wildcard(host) else frozenset(
            {*LOOPBACK_NAMES, normal_host(host), *(normal_host(name) for name in allowed_hosts)} - {""})
        token = None if is_loopback(host) else (token or secrets.token_urlsafe(24))
        return cls(names, token, port)

    @property
    def cookie(self) -> str:
        return f"{TOKEN_COOKIE}_{self.port}"  # cookies ignore ports: two servers on one machine keep their own

    def refusal(self, method: str, path: str, headers: Any, cookies: dict[str, str],
                query: dict[str, str]) -> tuple[int, str] | None:
        """(status, reason) when the request must be refused, None when it may be answered."""
        name = normal_host(headers.get("host", ""))
        if self.hosts is not None and name not in self.hosts:
            return 403, (f"this server answers only for {', '.join(sorted(self.hosts))}, not the host name "
                         f"{name or '(none)'!r}; open it by one of those (or start it with --allow-host NAME)")
        if not all(same_origin(origin, headers.get("host", "")) for origin in headers.getlist("origin")):
            return 403, "requests from other websites are refused"
        sites = {site.lower() for site in headers.getlist("sec-fetch-site")}
        navigating = method == "GET" and path == "/" and headers.get("sec-fetch-mode", "").lower() == "navigate"
        if sites & {"cross-site", "same-site"} and not navigating:
            return 403, "requests from other websites are refused"
        if self.token is not None:
            given = [query.get("token"), headers.get("x-liteclip-token"), cookies.get(self.cookie)]
            if not any(secrets.compare_digest(candidate.encode(), self.token.encode())
                       for candidate in given if isinstance(candidate, str)):
                return 403, "this page needs its access token: open the address `liteclip serve` printed"
        if method == "POST":
            length = headers.get("content-length")
            if length is None or not length.isdigit() or "transfer-encoding" in headers:  # chunked: no length known
                return 411, "send uploads with a Content-Length (and no Transfer-Encoding)"
            if int(length) > MAX_UPLOAD_BYTES + FORM_OVERHEAD:
                return 413, f"uploads are limited to {MAX_UPLOAD_BYTES // 2**20} MiB"
        return None


HOST_HEADER = re.compile(r"^(\[[0-9a-f:.]+\]|[a-z0-9_.-]+)(:[0-9]{1,5})?$")


def normal_host(header: str) -> str:
    """The host name of a Host header or a --host value, lower case, without port, brackets or one trailing dot;
    "" for anything else (a Host header browsers would never send)."""
    header = header.strip(" \t").lower()  # HTTP's own whitespace only: a no-break space is not stripped
    if header.count(":") > 1 and not header.startswith("["):  # a bare IPv6 address, as --host takes it
        header = f"[{header}]"
    match = HOST_HEADER.match(header)
    if match is None:
        return ""
    name = match[1].strip("[]") if match[1].startswith("[") else match[1]
    return name[:-1] if name.endswith(".") and not name.endswith("..") else name


def same_origin(origin: str, host_header: str) -> bool:
    """Whether an Origin header names this very server (scheme http, host and port as the request reached it)."""
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    return (parts.scheme == "http" and parts.path == "" and not parts.query
            and parts.netloc.lower() == host_header.strip(" \t").lower())


def is_wildcard(host: str) -> bool:
    return host.strip() in ("0.0.0.0", "::", "[::]", "")


def is_loopback(host: str) -> bool:
    name = normal_host(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def reachable_address() -> str:
    """An address others on the network can use for this machine (the one its default route leaves from; no packet
    is sent), or its host name."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # a documentation address: only the route is looked up
            return probe.getsockname()[0]
    except OSError:
        return socket.gethostname()


# ------------------------------------------------------------------------------------------- files and uploads


def open_indexed(search: ImageSearch, identifier: str) -> tuple[Path, list[int], bytes]:
    """The bytes of the indexed image with this id, if its file is still the one indexed: reached through no link,
    a regular file, with the size and time it was indexed with. Anything else is a 404, so no request can make the
    server read a file it was not given (a photo replaced by a link to a secret is not served)."""
    from fastapi import HTTPException

    found = search.indexed_file(identifier)
    if found is None:
        raise HTTPException(status_code=404, detail=f"no indexed image {identifier[:64]!r}")
    path, stamp = found
    # a folder on the way swapped for a link counts as gone: only the indexed path itself is read
    data = read_regular_file(path, stamp) if os.path.realpath(path) == str(path) else None
    # the id is the content's hash: bytes that are not that content (swapped in with the old size and time kept)
    # are not the indexed photo, whatever the file system says
    if data is None or (is_content_id(identifier) and hashlib.sha256(data).hexdigest()[:16] != identifier.lower()):
        what = "changed since it was indexed" if os.path.lexists(path) else "no longer there"
        raise HTTPException(status_code=404, detail=f"indexed image {identifier} {what}; index the folder again")
    return path, stamp, data


def is_content_id(identifier: str) -> bool:
    """Ids of indexes with content hashes are 16 hex digits; older indexes number their rows."""
    return len(identifier) == 16 and all(c in "0123456789abcdef" for c in identifier.lower())


class Thumbnails:
    """Thumbnails of indexed images, made once from the verified bytes and kept in a folder beside the index
    (keyed by content id and file stamp)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.lock = threading.Lock()

    def jpeg(self, identifier: str, path: Path, data: bytes, stamp: list[int]) -> bytes:
        cached = self.directory / f"{identifier}-{stamp[0]}-{stamp[1]}.jpg"
        kept = read_regular_file(cached)
        if kept is not None:
            return kept
        with DECODING:
            picture = open_rgb(io.BytesIO(data), min_size=THUMBNAIL_SIDE, name=path, shrink_to=THUMBNAIL_SIDE,
                               formats=PHOTO_FORMATS)
        picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=85)
        with self.lock:
            if make_derived_folder(self.directory):  # a link in the folder's place: served, never cached
                atomic_write_bytes(cached, buffer.getvalue())
        return buffer.getvalue()


def read_regular_file(path: Path, stamp: list[int] | None = None) -> bytes | None:
    """A file's bytes if it is a regular file reached without following a link (and, given a stamp, still of that
    [size, mtime_ns]), else None; a pipe under its name is never waited on."""
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(handle, "rb") as file:
        status = os.fstat(file.fileno())
        if not stat.S_ISREG(status.st_mode) or (stamp is not None and [status.st_size, status.st_mtime_ns] != stamp):
            return None
        return file.read()


def decode_upload(data: bytes, name: str, min_size: int | None = None) -> Image.Image:
    """An uploaded file as an RGB image; too large (bytes or pixels) or not an image is an InputError naming why.
    A JPEG is decoded at reduced scale where `min_size` allows."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise InputError(f"{name} is {len(data) / 2**20:.1f} MiB; uploads are limited to "
                         f"{MAX_UPLOAD_BYTES // 2**20} MiB")
    if not data:
        raise InputError(f"{name} is empty")
    try:
        with warnings.catch_warnings():  # PIL warns of a large image; the limit below is this page's own
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=PHOTO_FORMATS) as header:  # reads the size only
                width, height = header.size
    except Exception:  # not an image (or a bomb past PIL's own limit): open_rgb below says so, in its words
        width = height = 0
    if width * height > MAX_UPLOAD_PIXELS:
        raise InputError(f"{name} is {width} x {height} pixels; uploads are limited to "
                         f"{MAX_UPLOAD_PIXELS / 1e6:.0f} megapixels: send a smaller copy")
    with DECODING:
        return open_rgb(io.BytesIO(data), min_size=min_size, name=name, shrink_to=min_size, formats=PHOTO_FORMATS)


def read_upload(file: Any, min_size: int | None) -> Image.Image:
    """An uploaded image, decoded; 413 past the size limits, 400 naming why for anything that is not an image.
    The endpoints that call this are plain functions, run in FastAPI's thread pool, so decoding a large picture
    never stalls the server's other requests."""
    from fastapi import HTTPException

    name = (file.filename or "the upload")[:200]
    data = file.file.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise HTTPException(status_code=413, detail=f"{name}: uploads are limited to {MAX_UPLOAD_BYTES // 2**20} MiB")
    if not data:
        raise HTTPException(status_code=400, detail=f"{name} is empty; choose an image file")
    try:
        return decode_upload(data, name, min_size)
    except UndecodableImageError as error:
        raise HTTPException(status_code=400, detail=f"{name}: {error.reason}; upload a JPEG, PNG or WebP image") \
            from None
    except InputError as error:
        raise HTTPException(status_code=413, detail=str(error)) from None


def ranked(search: ImageSearch, hits: list[tuple[Path, float]]) -> dict[str, Any]:
    """Search hits as the API returns them: id, path and score, best first."""
    return {"results": [{"id": identifier, "path": str(path), "score": score}
                        for (path, score), identifier in zip(hits, search.ids_of([path for path, _ in hits]))
                        if identifier is not None]}


# ------------------------------------------------------------------------------------------------- the app


def create_app(search: ImageSearch, index_path: Path, access: AccessPolicy | None = None) -> Any:
    """The FastAPI application over a loaded ImageSearch (its pipeline classifies uploads); `access` says who may
    ask (default: this machine only)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles

    access = access or AccessPolicy.for_host("127.0.0.1")
    app = FastAPI(title="liteclip", description="Search, find similar and label your photos with a CLIP model.",
                  docs_url=None, redoc_url=None)  # their pages load scripts and styles from a CDN

    @app.middleware("http")
    async def only_for_this_page(request: Request, call_next: Any) -> Any:
        refusal = access.refusal(request.method, request.url.path, request.headers, dict(request.cookies),
                                 dict(request.query_params))
        if refusal is not None:
            return JSONResponse(status_code=refusal[0], content={"detail": refusal[1]})
        response = await call_next(request)
        if access.token is not None and request.cookies.get(access.cookie) != access.token:
            response.set_cookie(access.cookie, access.token, httponly=True, samesite="strict")
        return response

    @app.exception_handler(LiteclipError)
    async def bad_input(request: Request, error: LiteclipError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": str(error)})

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(WEB / "index.html", media_type="text/html")

    add_api(app, search, index_path)
    add_files(app, search, Thumbnails(thumbnails_folder(index_path)))
    app.mount("/static", StaticFiles(directory=WEB / "static"), name="static")
    return app


def add_api(app: Any, search: ImageSearch, index_path: Path) -> None:
    """/api/info, /api/search, /api/similar (by id or upload), /api/classify."""
    from fastapi import File, Form, HTTPException, Query, UploadFile

    pipeline = search.pipeline
    towers = pipeline.towers_as_trained()
    upload_side = decode_side(pipeline.model.data_config)

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {"model": str(pipeline.model_dir), **towers, "embedding_size": pipeline.model.config.projection.dim,
                "images": len(search), "index": str(index_path), "probabilities": pipeline.probabilities,
                "indexing": search.progress}

    @app.get("/api/search")
    def search_text(q: str = Query(..., max_length=2000,
                                   description="text, or weighted terms with indexed images: 2:dog + id:ID - grass"),
                    k: int = Query(24, ge=1, le=MAX_RESULTS)) -> dict[str, Any]:
        return ranked(search, search.query(parse_web_query(q), k))

    @app.get("/api/similar")
    def similar(id: str = Query(..., max_length=64), k: int = Query(24, ge=1, le=MAX_RESULTS)) -> dict[str, Any]:
        if search.indexed_file(id) is None:
            raise HTTPException(status_code=404, detail=f"no indexed image {id!r}")
        return ranked(search, search.similar_to_indexed(id, k))

    @app.post("/api/similar")
    def similar_upload(file: UploadFile = File(...), k: int = Form(24)) -> dict[str, Any]:
        if not 1 <= k <= MAX_RESULTS:
            raise HTTPException(status_code=400, detail=f"k={k} must be between 1 and {MAX_RESULTS}")
        return ranked(search, search.similar(read_upload(file, upload_side), k))

    @app.post("/api/classify")
    def classify(file: UploadFile = File(...), labels: str = Form(..., max_length=100_000)) -> dict[str, Any]:
        names = [line.strip() for line in labels.splitlines() if line.strip()]
        if len(names) > MAX_LABELS:
            raise HTTPException(status_code=400, detail=f"{len(names)} labels; the page takes up to {MAX_LABELS}")
        predictions = pipeline.predict(read_upload(file, upload_side), names)
        return {"probabilities": pipeline.probabilities,
                "predictions": [{"label": label, "probability": probability} for label, probability in predictions]}


def add_files(app: Any, search: ImageSearch, thumbnails: Thumbnails) -> None:
    """/thumb/{id} and /image/{id}: indexed files only, while they are what was indexed."""
    from fastapi import HTTPException
    from fastapi.responses import Response

    @app.get("/thumb/{identifier}")
    @app.head("/thumb/{identifier}", include_in_schema=False)
    def thumbnail(identifier: str) -> Response:
        path, stamp, data = open_indexed(search, identifier)
        try:
            jpeg = thumbnails.jpeg(identifier, path, data, stamp)
        except UndecodableImageError as error:
            raise HTTPException(status_code=404, detail=str(error)) from None
        return Response(jpeg, media_type="image/jpeg")

    @app.get("/image/{identifier}")
    @app.head("/image/{identifier}", include_in_schema=False)
    def image(identifier: str) -> Response:
        path, _, data = open_indexed(search, identifier)
        return Response(data, media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream")


# ------------------------------------------------------------------------------------------------- running


def index_in_background(search: ImageSearch, folder: Path, index_path: Path) -> threading.Thread:
    """Indexes new and changed files of `folder` into `index_path` while the page serves: each chunk of images
    becomes searchable as it is encoded, and /api/info reports the progress."""
    def run() -> None:
        try:
            search.index(folder, index_path, show_progress=False, chunk_size=INDEXING_CHUNK)
            logger.info("indexing %s done: %d images (%d skipped)", folder, len(search), len(search.skipped))
        except (LiteclipError, OSError) as error:
            logger.error("indexing %s stopped: %s", folder, error)

    thread = threading.Thread(target=run, name="liteclip-index", daemon=True)
    thread.start()
    return thread


def serve(search: ImageSearch, index_path: Path, host: str = "127.0.0.1", port: int = 8765,
          folder: Path | None = None, allowed_hosts: tuple[str, ...] = ()) -> None:
    """Runs the page until Ctrl-C (indexing `folder` meanwhile, when given); anything but this machine is said out
    loud first and needs the access token printed with the address."""
    import uvicorn

    access = AccessPolicy.for_host(host, allowed_hosts, port=port)
    if access.token is not None:
        logger.warning("serving on %s: anyone who can reach this machine on port %d and has the address with its "
                       "token can see every indexed photo", host, port)
    if folder is not None:
        index_in_background(search, folder, index_path)
    shown = reachable_address() if is_wildcard(host) else f"[{host}]" if ":" in host else host
    address = f"http://{shown}:{port}/" + (f"?token={access.token}" if access.token else "")
    print(f"liteclip: {len(search)} images from {index_path}{f', indexing {folder}' if folder else ''} on "
          f"{address}  (Ctrl-C stops)")
    uvicorn.run(create_app(search, index_path, access), host=host, port=port, log_level="warning")
