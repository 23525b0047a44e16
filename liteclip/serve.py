"""`liteclip serve`: one local web page over a search index, and the JSON API under it (FastAPI).

    GET  /api/info                  the model and the index: images indexed, embedding size, model name
    GET  /api/search?q=TEXT&k=N     {"results": [{"id", "path", "score"}, ...]}, best first; weighted queries
    GET  /api/similar?id=ID&k=N     the indexed images nearest an indexed one
    POST /api/similar               multipart `file`: the indexed images nearest an uploaded image
    POST /api/classify              multipart `file` and `labels` (one per line): zero-shot probabilities
    GET  /thumb/{id}, /image/{id}   an indexed image, as a cached thumbnail or as it is on disk
    GET  /docs                      the OpenAPI page FastAPI writes

Search and classification are the library's ImageSearch and ZeroShotPipeline. Only files in the index are served,
by id (their row); a path in a request is never opened. Uploads are held to MAX_UPLOAD_BYTES and to the decoders'
pixel limit, and a file that is not an image gets a 400 with the reason. Thumbnails are decoded by the same decoder
as everything else (EXIF orientation applied) and cached beside the index.
"""

# no `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run time, and the
# framework's types are imported inside create_app (the web extra is optional)
import hashlib
import io
import logging
import mimetypes
import threading
from pathlib import Path
from typing import Any

from PIL import Image

from liteclip.checkpoint import atomic_write_bytes
from liteclip.data.images import UndecodableImageError, open_rgb
from liteclip.errors import InputError, LiteclipError
from liteclip.pipeline import ImageSearch
from liteclip.pretrained import CONFIG_NAME, read_model_config

logger = logging.getLogger(__name__)

WEB = Path(__file__).parent / "web"
MAX_UPLOAD_BYTES = 20 * 2**20
THUMBNAIL_SIDE = 320
MAX_RESULTS = 500
INDEXING_CHUNK = 256  # images encoded between two updates of what the page can search


class Thumbnails:
    """Thumbnails of indexed images, made once and kept in a folder beside the index (keyed by the file's path and
    modification time, so an edited photo gets a new one)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.lock = threading.Lock()

    def path_for(self, image: Path) -> Path:
        stat = image.stat()
        key = hashlib.sha256(f"{image.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:24]
        cached = self.directory / f"{key}.jpg"
        if not cached.is_file():
            picture = open_rgb(image)
            picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            buffer = io.BytesIO()
            picture.save(buffer, format="JPEG", quality=85)
            with self.lock:
                self.directory.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(cached, buffer.getvalue())
        return cached


def decode_upload(data: bytes, name: str) -> Image.Image:
    """An uploaded file as an RGB image; too large or not an image is an InputError naming why."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise InputError(f"{name} is {len(data) / 2**20:.1f} MiB; uploads are limited to "
                         f"{MAX_UPLOAD_BYTES // 2**20} MiB")
    if not data:
        raise InputError(f"{name} is empty")
    return open_rgb(io.BytesIO(data), name=name)


def indexed_file(search: ImageSearch, identifier: str) -> Path:
    """The indexed file with this id (its content hash, shortened); anything else (a path, an unknown id, a deleted
    file) is a 404, so no path in a request is ever opened."""
    from fastapi import HTTPException

    view = search.view
    path = view.paths[view.ids.index(identifier)] if identifier in view.ids else None
    if path is None or not path.is_file():
        raise HTTPException(status_code=404, detail=f"no indexed image {identifier!r}")
    return path


def ranked(search: ImageSearch, hits: list[tuple[Path, float]]) -> dict[str, Any]:
    """Search hits as the API returns them: id, path and score, best first."""
    view = search.view
    ids = dict(zip(view.paths, view.ids))
    return {"results": [{"id": ids[path], "path": str(path), "score": score} for path, score in hits if path in ids]}


async def read_upload(file: Any) -> Image.Image:
    """An uploaded image, decoded; 413 past the size limit, 400 naming why for anything that is not an image."""
    from fastapi import HTTPException

    data = await file.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise HTTPException(status_code=413, detail=f"{file.filename}: uploads are limited to "
                                                    f"{MAX_UPLOAD_BYTES // 2**20} MiB")
    try:
        return decode_upload(data, file.filename or "the upload")
    except UndecodableImageError as error:
        raise HTTPException(status_code=400, detail=str(error)) from None


def create_app(search: ImageSearch, index_path: Path) -> Any:
    """The FastAPI application over a loaded ImageSearch (its pipeline classifies uploads)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles

    app = FastAPI(title="liteclip", description="Search, find similar and label your photos with a CLIP model.")

    @app.exception_handler(LiteclipError)
    async def bad_input(request: Request, error: LiteclipError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": str(error)})

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(WEB / "index.html", media_type="text/html")

    add_api(app, search, index_path)
    add_files(app, search, Thumbnails(index_path.with_name(f".{index_path.name}.thumbs")))
    app.mount("/static", StaticFiles(directory=WEB / "static"), name="static")
    return app


def add_api(app: Any, search: ImageSearch, index_path: Path) -> None:
    """/api/info, /api/search, /api/similar (by id or upload), /api/classify."""
    from fastapi import File, Form, HTTPException, Query, UploadFile

    pipeline = search.pipeline

    # the towers' names as trained (a loaded model's config points its text tower at the model folder)
    config = pipeline.model.config
    if (Path(pipeline.model_dir) / CONFIG_NAME).is_file():
        config = read_model_config(pipeline.model_dir).model

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {"model": str(pipeline.model_dir), "image_tower": config.image.name, "text_tower": config.text.name,
                "embedding_size": config.projection.dim, "images": len(search.paths), "index": str(index_path),
                "probabilities": pipeline.probabilities, "indexing": search.progress}

    @app.get("/api/search")
    def search_text(q: str = Query(..., description="text, image paths, or weighted terms: 2:dog + ./a.jpg - grass"),
                    k: int = Query(24, ge=1, le=MAX_RESULTS)) -> dict[str, Any]:
        return ranked(search, search.query(q, k))

    @app.get("/api/similar")
    def similar(id: str, k: int = Query(24, ge=1, le=MAX_RESULTS)) -> dict[str, Any]:
        indexed_file(search, id)
        return ranked(search, search.similar_to_indexed(id, k))

    @app.post("/api/similar")
    async def similar_upload(file: UploadFile = File(...), k: int = Form(24)) -> dict[str, Any]:
        if not 1 <= k <= MAX_RESULTS:
            raise HTTPException(status_code=400, detail=f"k={k} must be between 1 and {MAX_RESULTS}")
        return ranked(search, search.similar(await read_upload(file), k))

    @app.post("/api/classify")
    async def classify(file: UploadFile = File(...), labels: str = Form(...)) -> dict[str, Any]:
        names = [line.strip() for line in labels.splitlines() if line.strip()]
        predictions = pipeline.predict(await read_upload(file), names)
        return {"probabilities": pipeline.probabilities,
                "predictions": [{"label": label, "probability": probability} for label, probability in predictions]}


def add_files(app: Any, search: ImageSearch, thumbnails: Thumbnails) -> None:
    """/thumb/{id} and /image/{id}: indexed files only."""
    from fastapi import HTTPException
    from fastapi.responses import FileResponse

    @app.get("/thumb/{identifier}")
    def thumbnail(identifier: str) -> FileResponse:
        path = indexed_file(search, identifier)
        try:
            return FileResponse(thumbnails.path_for(path), media_type="image/jpeg")
        except UndecodableImageError as error:
            raise HTTPException(status_code=404, detail=str(error)) from None

    @app.get("/image/{identifier}")
    def image(identifier: str) -> FileResponse:
        path = indexed_file(search, identifier)
        return FileResponse(path, media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream")


def index_in_background(search: ImageSearch, folder: Path, index_path: Path) -> threading.Thread:
    """Indexes new and changed files of `folder` into `index_path` while the page serves: each chunk of images
    becomes searchable as it is encoded, and /api/info reports the progress."""
    def run() -> None:
        try:
            search.index(folder, index_path, show_progress=False, chunk_size=INDEXING_CHUNK)
            logger.info("indexing %s done: %d images", folder, len(search.paths))
        except (LiteclipError, OSError) as error:
            logger.error("indexing %s stopped: %s", folder, error)

    thread = threading.Thread(target=run, name="liteclip-index", daemon=True)
    thread.start()
    return thread


def serve(search: ImageSearch, index_path: Path, host: str = "127.0.0.1", port: int = 8765,
          folder: Path | None = None) -> None:
    """Runs the page until Ctrl-C (indexing `folder` meanwhile, when given); anything but localhost is said out
    loud first."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s: anyone who can reach this machine on port %d can see every indexed photo",
                       host, port)
    if folder is not None:
        index_in_background(search, folder, index_path)
    print(f"liteclip: {len(search.paths)} images from {index_path}{f', indexing {folder}' if folder else ''} on "
          f"http://{host}:{port}/  (Ctrl-C stops)")
    uvicorn.run(create_app(search, index_path), host=host, port=port, log_level="warning")
