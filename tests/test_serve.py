"""`liteclip serve`: the JSON API in process (FastAPI's test client) over a drawn folder and a tiny model, every bad
input answered with a status and a reason, and only indexed files ever served."""

from __future__ import annotations

import io
import logging
import time

import numpy as np
import pytest
import torch
from PIL import Image

from liteclip import ImageSearch, ZeroShotPipeline
from liteclip import pipeline as pipeline_module
from liteclip import serve as serve_module
from tests.conftest import draw_image

COLOURS = [(200, 30, 30), (30, 160, 60), (40, 70, 210), (230, 200, 40), (140, 40, 170), (240, 130, 30)]


def indexed_photos(model_dir, folder, size: int = 48):
    """Six drawn photos in `folder`, indexed beside it and loaded: (search, photo paths, index path)."""
    photos = [draw_image(folder / f"{i}.png", colour, size=size) for i, colour in enumerate(COLOURS)]
    search = ImageSearch(ZeroShotPipeline(model_dir, device="cpu"))
    index_path = folder.with_name(f"{folder.name}.index")
    search.index(folder, index_path, show_progress=False)
    search.load(index_path)
    return search, photos, index_path


@pytest.fixture
def served(model_dir, tmp_path):
    from fastapi.testclient import TestClient

    search, photos, index_path = indexed_photos(model_dir, tmp_path / "photos")
    return TestClient(serve_module.create_app(search, index_path)), search, photos


def png_bytes(colour=(10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), colour, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_info_search_and_similar_answer_as_the_library_does(served):
    client, search, photos = served
    info = client.get("/api/info").json()
    assert info["images"] == len(photos) and info["embedding_size"] == 32 and info["probabilities"] == "softmax"
    results = client.get("/api/search", params={"q": "a photo of a dog", "k": 4}).json()["results"]
    expected = search.query("a photo of a dog", 4)
    assert [(r["path"], r["score"]) for r in results] == [(str(p), pytest.approx(s)) for p, s in expected]
    assert all(str(search.paths[search.ids.index(r["id"])]) == r["path"] for r in results)
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    third = search.ids[2]
    nearest = client.get("/api/similar", params={"id": third, "k": 3}).json()["results"]
    assert nearest[0]["id"] == third and nearest[0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_a_weighted_query_with_an_image_term_is_the_weighted_sum_of_the_terms(served):
    client, search, photos = served
    query = f"3:{photos[4]} + a photo of a dog - a red square"
    results = client.get("/api/search", params={"q": query, "k": 6}).json()["results"]
    pipeline = search.pipeline
    texts = pipeline.encode_labels(["a photo of a dog", "a red square"])
    combined = 3 * pipeline.encode_images([photos[4]])[0] + texts[0] - texts[1]
    indexed = pipeline.encode_images(search.paths)  # (N, D), in the index's row order
    expected = indexed @ torch.nn.functional.normalize(combined, dim=-1)
    assert [r["id"] for r in results] == [search.ids[row] for row in expected.argsort(descending=True).tolist()]


def test_an_uploaded_image_finds_itself_and_is_classified_as_the_pipeline_does(served):
    client, search, photos = served
    upload = {"file": ("query.png", photos[3].read_bytes(), "image/png")}
    found = client.post("/api/similar", files=upload).json()["results"][0]
    assert found["path"] == str(photos[3].resolve())
    assert found["id"] == search.ids[search.paths.index(photos[3].resolve())]
    labels = ["a photo of a dog", "a red square", "a boy jumping with skateboard"]
    answer = client.post("/api/classify", files=upload, data={"labels": "\n".join(labels) + "\n\n"}).json()
    expected = dict(search.pipeline.predict(photos[3], labels))
    assert {p["label"]: p["probability"] for p in answer["predictions"]} == pytest.approx(expected, abs=1e-6)
    assert answer["probabilities"] == "softmax"


def test_thumbnails_are_made_once_beside_the_index_and_images_are_served_as_they_are(served, tmp_path):
    client, search, photos = served
    row = search.ids[search.paths.index(photos[1].resolve())]
    thumbnail = client.get(f"/thumb/{row}")
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumbnail.content)).size == (48, 48)
    cached = list((tmp_path / ".photos.index.thumbs").glob("*.jpg"))
    assert len(cached) == 1
    client.get(f"/thumb/{row}")
    assert list((tmp_path / ".photos.index.thumbs").glob("*.jpg")) == cached
    assert client.get(f"/image/{row}").content == photos[1].read_bytes()


@pytest.mark.parametrize("url", ["/thumb/../../etc/passwd", "/image/%2e%2e%2fetc%2fpasswd", "/image/0",
                                 "/thumb/abc", "/image/-1", "/thumb/0123456789abcdef"])
def test_only_indexed_files_are_served_and_a_path_is_never_opened(served, url):
    client, _, _ = served
    assert client.get(url).status_code == 404


def test_bad_uploads_and_queries_get_a_status_and_a_reason(served, monkeypatch):
    client, _, _ = served
    not_an_image = {"file": ("notes.png", b"this is text, not a picture", "image/png")}
    answer = client.post("/api/classify", files=not_an_image, data={"labels": "a\nb"})
    assert answer.status_code == 400 and "notes.png" in answer.json()["detail"]
    one_label = client.post("/api/classify", files={"file": ("a.png", png_bytes(), "image/png")},
                            data={"labels": "only one"})
    assert one_label.status_code == 400 and "at least 2 labels" in one_label.json()["detail"]
    monkeypatch.setattr(serve_module, "MAX_UPLOAD_BYTES", 100)
    too_big = client.post("/api/similar", files={"file": ("big.png", png_bytes(), "image/png")})
    assert too_big.status_code == 413 and "limited" in too_big.json()["detail"]
    assert client.get("/api/search", params={"q": "  "}).status_code == 400
    assert client.get("/api/search", params={"q": "dog", "k": 0}).status_code == 422
    missing = client.get("/api/search", params={"q": "2:dog + ./nowhere.png"})
    assert missing.status_code == 400 and "nowhere.png" in missing.json()["detail"]


def test_the_page_and_its_script_are_served_with_no_outside_resources(served):
    client, _, _ = served
    page = client.get("/")
    assert page.status_code == 200 and 'id="query"' in page.text and "/static/app.js" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: it works offline
    assert client.get("/static/app.js").status_code == 200 and client.get("/openapi.json").status_code == 200


def test_serving_beyond_localhost_says_so(served, monkeypatch, caplog, capsys):
    _, search, _ = served
    started = {}
    monkeypatch.setattr("uvicorn.run", lambda app, host, port, log_level: started.update(host=host, port=port))
    with caplog.at_level(logging.WARNING, logger="liteclip.serve"):
        serve_module.serve(search, search.pipeline.model_dir, host="127.0.0.1", port=8766)
    assert started == {"host": "127.0.0.1", "port": 8766} and not caplog.records
    with caplog.at_level(logging.WARNING, logger="liteclip.serve"):
        serve_module.serve(search, search.pipeline.model_dir, host="0.0.0.0", port=8766)
    assert "anyone who can reach this machine" in caplog.text


def test_a_folder_indexed_while_serving_is_searchable_as_it_goes_and_every_answer_is_consistent(
        model_dir, tmp_path, monkeypatch):
    import hashlib

    from fastapi.testclient import TestClient

    rng = np.random.default_rng(0)
    for i in range(24):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw_image(tmp_path / "photos" / f"{i:02d}.png", colour, size=40 + i)
    monkeypatch.setattr(serve_module, "INDEXING_CHUNK", 4)
    encode = pipeline_module.encode_decodable_image_files

    def slowly(*args, **kwargs):  # a chunk takes a while, as on a real photo library, so queries land between
        time.sleep(0.3)
        return encode(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "encode_decodable_image_files", slowly)
    search = ImageSearch(ZeroShotPipeline(model_dir, device="cpu"))
    client = TestClient(serve_module.create_app(search, tmp_path / "photos.index"))
    thread = serve_module.index_in_background(search, tmp_path / "photos", tmp_path / "photos.index")
    seen_counts = set()
    while thread.is_alive() or not seen_counts:
        answer = client.get("/api/search", params={"q": "a photo of a dog", "k": 50})
        if answer.status_code == 400:  # nothing indexed yet: the index is empty, said as such
            assert "empty" in answer.json()["detail"]
            continue
        results = answer.json()["results"]
        seen_counts.add(len(results))
        for hit in results:  # each answer is one consistent state: an id is its file's content
            digest = hashlib.sha256(open(hit["path"], "rb").read()).hexdigest()
            assert hit["id"] == digest[:16]
    thread.join()
    assert any(0 < count < 24 for count in seen_counts)  # searched while the rest was still being indexed
    info = client.get("/api/info").json()
    assert info["images"] == 24 and info["indexing"] == {"done": 24, "total": 24}
    assert len(client.get("/api/search", params={"q": "a photo of a dog", "k": 50}).json()["results"]) == 24
    assert (tmp_path / "photos.index").is_file()
