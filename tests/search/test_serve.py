"""`liteclip serve`: the JSON API in process (FastAPI's test client) over a drawn folder and a tiny model, every bad
input answered with a status and a reason, and only indexed files ever served."""

from __future__ import annotations

import io
import logging
import time

from urllib.parse import quote

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from liteclip import ImageSearch, ZeroShotPipeline
from liteclip import pipeline as pipeline_module
from liteclip.search import image_search as image_search_module
from liteclip.search import serve as serve_module
from tests.conftest import draw_image

LOCAL = "http://127.0.0.1:8765"  # the Host the page is opened by (TestClient's default, "testserver", is refused)
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
    return TestClient(serve_module.create_app(search, index_path), base_url=LOCAL), search, photos


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
    query = f"3:id:{search.ids[search.paths.index(photos[4].resolve())]} + a photo of a dog - a red square"
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
    assert client.head(f"/thumb/{row}").status_code == 200
    assert len(cached) == 1
    client.get(f"/thumb/{row}")
    assert list((tmp_path / ".photos.index.thumbs").glob("*.jpg")) == cached
    assert client.get(f"/image/{row}").content == photos[1].read_bytes()
    head = client.head(f"/image/{row}")  # HEAD as GET, without the body
    assert head.status_code == 200 and int(head.headers["content-length"]) == photos[1].stat().st_size
    assert not head.content


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
    assert "never opens files" in missing.json()["detail"]


def test_the_page_and_its_script_are_served_with_no_outside_resources(served):
    client, _, _ = served
    page = client.get("/")
    assert page.status_code == 200 and 'id="query"' in page.text and "/static/app.js" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: it works offline
    assert client.get("/static/app.js").status_code == 200 and client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404  # they load CDNs


def test_serving_beyond_localhost_says_so(served, monkeypatch, caplog, capsys):
    _, search, _ = served
    started = {}
    monkeypatch.setattr("uvicorn.run", lambda app, host, port, log_level: started.update(host=host, port=port))
    with caplog.at_level(logging.WARNING, logger="liteclip.search.serve"):
        serve_module.serve(search, search.pipeline.model_dir, host="127.0.0.1", port=8766)
    assert started == {"host": "127.0.0.1", "port": 8766} and not caplog.records
    with caplog.at_level(logging.WARNING, logger="liteclip.search.serve"):
        serve_module.serve(search, search.pipeline.model_dir, host="0.0.0.0", port=8766)
    assert "anyone who can reach this machine" in caplog.text and "token" in caplog.text
    assert "?token=" in capsys.readouterr().out


def test_a_folder_indexed_while_serving_is_searchable_as_it_goes_and_every_answer_is_consistent(
        model_dir, tmp_path, monkeypatch):
    import hashlib

    from fastapi.testclient import TestClient

    rng = np.random.default_rng(0)
    for i in range(24):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw_image(tmp_path / "photos" / f"{i:02d}.png", colour, size=40 + i)
    monkeypatch.setattr(serve_module, "INDEXING_CHUNK", 4)
    encode = image_search_module.encode_decodable_image_files

    def slowly(*args, **kwargs):  # a chunk takes a while, as on a real photo library, so queries land between
        time.sleep(0.3)
        return encode(*args, **kwargs)

    monkeypatch.setattr(image_search_module, "encode_decodable_image_files", slowly)
    search = ImageSearch(ZeroShotPipeline(model_dir, device="cpu"))
    client = TestClient(serve_module.create_app(search, tmp_path / "photos.index"), base_url=LOCAL)
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


# ------------------------------------------------------------------- what a web page cannot reach (issue 38)


def test_a_path_in_a_query_is_never_opened_and_the_reply_does_not_tell_whether_it_exists(served, tmp_path,
                                                                                          monkeypatch):
    """Issue 38: `?q=./x.jpg` (or an absolute path) made the server read and rank a file outside the folder."""
    client, search, photos = served
    secret = draw_image(tmp_path / "private" / "secret.jpg", (200, 30, 30))
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda file, *a, **k: opened.append(str(file)) or real_open(file, *a, **k))
    replies = {}
    absent = secret.with_name("absent.jpg")  # a name as long as the secret's: the replies differ in it alone
    for query in (str(secret), str(absent), f"2:dog + {secret}", "./secret.jpg", "~/secret.jpg", "secret.jpg",
                  "file:///etc/passwd"):
        answer = client.get("/api/search", params={"q": query})
        assert answer.status_code == 400 and "never opens files" in answer.json()["detail"]
        replies[query] = answer.json()["detail"].replace("secret", "X").replace("absent", "X")
    assert replies[str(secret)] == replies[str(absent)]  # there or not: the same reply
    assert not [name for name in opened if "secret" in name or "absent" in name]


def test_an_indexed_id_in_a_query_is_that_image_and_an_unknown_id_is_a_400(served):
    client, search, photos = served
    row = search.ids[search.paths.index(photos[2].resolve())]
    best = client.get("/api/search", params={"q": f"id:{row}", "k": 1}).json()["results"][0]
    assert best["id"] == row and best["score"] == pytest.approx(1.0, abs=1e-4)
    unknown = client.get("/api/search", params={"q": "id:0123456789abcdef"})
    assert unknown.status_code == 400 and "no indexed image" in unknown.json()["detail"]


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8765", "127.0.0.1.evil.example", "localhost.evil",
                                  "[::2]:8765", "", "192.168.1.5"])
def test_a_foreign_host_name_is_refused_on_every_route_so_dns_rebinding_reads_nothing(served, host):
    client, search, _ = served
    for url in ("/", "/api/info", "/api/search?q=dog", f"/image/{search.ids[0]}", f"/thumb/{search.ids[0]}",
                "/static/app.js", "/openapi.json"):
        answer = client.get(url, headers={"host": host})
        assert answer.status_code == 403 and "answers only for" in answer.json()["detail"], url


@pytest.mark.parametrize("host", ["127.0.0.1:8765", "localhost:8765", "LOCALHOST", "[::1]:8765", "localhost."])
def test_this_machines_own_names_are_answered(served, host):
    client, _, _ = served
    assert client.get("/api/info", headers={"host": host}).status_code == 200


def test_another_website_cannot_post_uploads_or_embed_the_images_but_a_link_to_the_page_opens_it(served):
    client, search, photos = served
    upload = {"file": ("q.png", png_bytes(), "image/png")}
    for origin in ("http://evil.example", "http://localhost:3000", "null", "https://127.0.0.1:8765"):
        answer = client.post("/api/similar", files=upload, headers={"origin": origin})
        assert answer.status_code == 403 and "other websites" in answer.json()["detail"], origin
    assert client.post("/api/similar", files=upload, headers={"origin": LOCAL}).status_code == 200
    embedded = client.get(f"/image/{search.ids[0]}", headers={"sec-fetch-site": "cross-site",
                                                              "sec-fetch-mode": "no-cors"})
    assert embedded.status_code == 403
    linked = client.get("/", headers={"sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate"})
    assert linked.status_code == 200
    own = client.get(f"/thumb/{search.ids[0]}", headers={"sec-fetch-site": "same-origin", "sec-fetch-mode": "no-cors"})
    assert own.status_code == 200


def test_beyond_this_machine_every_request_needs_the_access_token(served):
    from fastapi.testclient import TestClient

    _, search, _ = served
    access = serve_module.AccessPolicy.for_host("0.0.0.0", port=8765)
    assert access.token and len(access.token) >= 24
    app = serve_module.create_app(search, search.pipeline.model_dir, access)
    client = TestClient(app, base_url="http://192.168.1.5:8765")  # any address of the machine, token or nothing
    for url in ("/", "/api/info", f"/image/{search.ids[0]}", "/static/app.js"):
        answer = client.get(url)
        assert answer.status_code == 403 and "access token" in answer.json()["detail"], url
    assert client.get("/", params={"token": access.token[:-1] + "x"}).status_code == 403
    assert client.get("/", params={"token": access.token}).status_code == 200  # sets the cookie the page then uses
    assert client.cookies.get("liteclip_token_8765") == access.token  # named by port: two servers keep theirs
    assert client.get("/api/info").status_code == 200
    rebound = TestClient(app, base_url="http://evil.example:8765")  # a rebinding page has neither token nor cookie
    assert rebound.get("/api/info").status_code == 403
    stale = TestClient(app, base_url="http://192.168.1.5:8765", cookies={"liteclip_token_8765": "from-last-run"})
    assert stale.get("/", params={"token": access.token}).status_code == 200  # the fresh address wins over it
    assert serve_module.AccessPolicy.for_host("127.0.0.1").token is None
    assert serve_module.AccessPolicy.for_host("::1").token is None


def test_a_server_bound_to_one_address_answers_only_that_name_and_needs_its_token(served):
    from fastapi.testclient import TestClient

    _, search, _ = served
    access = serve_module.AccessPolicy.for_host("192.168.1.5", allowed_hosts=("photos.lan",))
    app = serve_module.create_app(search, search.pipeline.model_dir, access)
    for base, status in (("http://photos.lan:8765", 200), ("http://192.168.1.5:8765", 200),
                         ("http://evil.example:8765", 403)):
        client = TestClient(app, base_url=base)
        assert client.get("/api/info", params={"token": access.token}).status_code == status, base


@pytest.mark.parametrize("host", ["[::1].evil.com", "[::1]evil.com:80", "localhost:evil", "[localhost]",
                                  "localhost....", "localhost:80:80", "local host"])
def test_host_headers_no_browser_sends_are_refused(served, host):
    client, _, _ = served
    assert client.get("/api/info", headers={"host": host}).status_code == 403


def test_a_photo_replaced_by_a_link_or_changed_after_indexing_is_not_served(served, tmp_path):
    """Issue 38: /image/{id} served whatever the indexed path pointed to now (a link to a secret, say)."""
    client, search, photos = served
    secret = tmp_path / "secret.txt"
    secret.write_text("my bank password")
    linked, edited = search.ids[search.paths.index(photos[0].resolve())], search.ids[search.paths.index(
        photos[1].resolve())]
    photos[0].unlink()
    photos[0].symlink_to(secret)
    draw_image(photos[1], (1, 2, 3))  # rewritten in place: no longer the indexed content
    for identifier in (linked, edited):
        for kind in ("image", "thumb"):
            answer = client.get(f"/{kind}/{identifier}")
            assert answer.status_code == 404 and b"password" not in answer.content


def indexed_inside_with_thumbnails(model_dir, folder, index_name: str) -> ImageSearch:
    """The drawn photos in `folder`, indexed into `folder / index_name` (the index inside its own folder), with every
    thumbnail served once, so the thumbnail folder is full beside the photos."""
    from fastapi.testclient import TestClient

    for i, colour in enumerate(COLOURS):
        draw_image(folder / f"{i}.png", colour)
    search = ImageSearch(ZeroShotPipeline(model_dir, device="cpu"))
    search.index(folder, folder / index_name, show_progress=False)
    client = TestClient(serve_module.create_app(search, folder / index_name), base_url=LOCAL)
    for identifier in search.ids:
        assert client.get(f"/thumb/{identifier}").status_code == 200
    return search


def test_an_index_inside_its_own_folder_never_indexes_its_thumbnails(model_dir, tmp_path):
    """Issue 38: with the index inside the folder, the next run indexed the server's thumbnails (10 -> 20)."""
    folder = tmp_path / "photos"
    search = indexed_inside_with_thumbnails(model_dir, folder, "photos.index")
    assert len(list((folder / ".photos.index.thumbs").glob("*.jpg"))) == len(COLOURS)
    assert search.index(folder, folder / "photos.index", show_progress=False) == 0
    assert len(search.paths) == len(COLOURS)


def test_a_huge_upload_is_refused_by_its_size_before_it_is_decoded(served, monkeypatch):
    """Issue 38: a 140 KB 12000x12000 PNG took the server from 1.0 to 2.9 GB and 5.8 s."""
    client, _, _ = served
    buffer = io.BytesIO()
    Image.new("L", (12000, 12000)).save(buffer, format="PNG")  # small on disk, 144 megapixels decoded
    assert len(buffer.getvalue()) < 1_000_000
    decoded = []
    monkeypatch.setattr(serve_module, "open_rgb", lambda *a, **k: decoded.append(1))
    started = time.perf_counter()
    answer = client.post("/api/similar", files={"file": ("wide.png", buffer.getvalue(), "image/png")})
    assert answer.status_code == 413 and "12000 x 12000 pixels" in answer.json()["detail"] and not decoded
    assert time.perf_counter() - started < 2


def test_the_label_cache_keeps_a_bounded_number_of_label_sets(served):
    _, search, _ = served
    pipeline = search.pipeline
    for i in range(pipeline_module.LABEL_CACHE_SIZE + 10):
        pipeline.encode_labels([f"label {i}", "other"])
    assert len(pipeline._label_cache) == pipeline_module.LABEL_CACHE_SIZE
    torch.testing.assert_close(pipeline.encode_labels(["label 70", "other"]),
                               pipeline.encode_labels(["label 70", "other"]))


API_TEXT = (st.lists(st.sampled_from(list("ab .:/+-~%\\0é\n") + ["id:", ".jpg", " + ", " - ", "9" * 400, "../",
                                                                  "x" * 300, "0123abcd"]), max_size=25).map("".join)
            | st.text(max_size=300))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(q=API_TEXT, k=st.one_of(st.integers(-5, 10**12), st.text(max_size=8)), identifier=API_TEXT,
       labels=st.text(max_size=200))
def test_no_request_parameter_gives_a_500_or_a_traceback(served, q, k, identifier, labels):
    from fastapi.testclient import TestClient

    client, search, _ = served
    client = TestClient(client.app, base_url=LOCAL, raise_server_exceptions=False)
    answers = [client.get("/api/search", params={"q": q, "k": k}),
               client.get("/api/similar", params={"id": identifier, "k": k}),
               client.get(f"/image/{quote(identifier, safe='')}"), client.get(f"/thumb/{quote(identifier, safe='')}"),
               client.post("/api/classify", files={"file": ("a.png", png_bytes(), "image/png")},
                           data={"labels": labels}),
               client.post("/api/similar", files={"file": ("a.png", png_bytes(), "image/png")}, data={"k": str(k)})]
    for answer in answers:
        assert answer.status_code in (200, 400, 404, 405, 413, 422), (answer.request.url, answer.text[:300])
        assert "Traceback" not in answer.text


def test_a_second_index_of_the_same_folder_leaves_out_the_first_ones_thumbnails(model_dir, tmp_path):
    """Review of issue 38: only an index's own thumbnail folder was left out, so a second index listed every photo
    twice."""
    folder = tmp_path / "photos"
    indexed_inside_with_thumbnails(model_dir, folder, "first.index")
    assert len(list((folder / ".first.index.thumbs").glob("*.jpg"))) == len(COLOURS)
    second = ImageSearch(ZeroShotPipeline(model_dir, device="cpu"))
    second.index(folder, tmp_path / "second.index", show_progress=False)
    assert len(second.paths) == len(COLOURS)


def test_a_photo_swapped_for_other_bytes_with_its_size_and_time_kept_is_not_served(served, tmp_path):
    """Review of issue 38: the check was size and time only, which `touch -r` and padding restore."""
    import os

    client, search, photos = served
    identifier = search.ids[search.paths.index(photos[0].resolve())]
    original = photos[0].stat()
    secret = b"TOP SECRET " + b"x" * (original.st_size - 11)
    photos[0].write_bytes(secret)
    os.utime(photos[0], ns=(original.st_atime_ns, original.st_mtime_ns))
    assert photos[0].stat().st_size == original.st_size
    for kind in ("image", "thumb"):
        answer = client.get(f"/{kind}/{identifier}")
        assert answer.status_code == 404 and b"SECRET" not in answer.content


def test_an_id_in_capitals_is_the_same_image_everywhere(served):
    client, search, _ = served
    upper = search.ids[1].upper()
    assert client.get(f"/image/{upper}").status_code == 200
    assert client.get("/api/similar", params={"id": upper, "k": 1}).json()["results"][0]["id"] == search.ids[1]
    assert client.get("/api/search", params={"q": f"id:{upper}", "k": 1}).json()["results"][0]["id"] == search.ids[1]


def test_an_upload_is_refused_by_its_declared_length_before_its_body_is_read(served):
    """Review of issue 38: the 20 MiB limit applied only after the whole body (1000 MiB) had been spooled to disk."""
    import socket
    import threading

    import uvicorn

    from tests.search.test_serve_browser import free_port

    _, search, _ = served
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(serve_module.create_app(search, search.pipeline.model_dir), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        for length, status in ((str(1000 * 2**20), b"413"), (None, b"411")):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
                framing = f"Content-Length: {length}" if length else "Transfer-Encoding: chunked"
                connection.sendall(f"POST /api/classify HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{framing}\r\n"
                                   f"Content-Type: multipart/form-data; boundary=x\r\n\r\n".encode())
                reply = connection.recv(4096)  # answered at once: not a byte of the body was sent
            assert reply.split(b" ")[1] == status, reply[:200]
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_big_upload_decodes_small_and_never_stalls_the_other_requests(served, monkeypatch):
    """Review of issue 38: a 297 KB 7000 x 7000 float TIFF took the server from 1.2 to 2.5 GB and stalled every
    other request for 4 s while it decoded on the event loop."""
    import threading
    import tracemalloc

    client, _, _ = served
    buffer = io.BytesIO()
    deep = np.full((4000, 4000), 0.25, dtype=np.float32)
    deep[1000:3000, 1000:3000] = 0.75
    Image.fromarray(deep, mode="F").save(buffer, format="TIFF", compression="tiff_deflate")
    tracemalloc.start()
    picture = serve_module.decode_upload(buffer.getvalue(), "deep.tif", min_size=48)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert min(picture.size) >= 48 and max(picture.size) <= 4 * 48
    assert peak < 4000 * 4000 * 2  # its float conversion ran on the shrunk picture, not on 16 million pixels

    real_decode = serve_module.decode_upload

    def slow_decode(*args, **kwargs):
        time.sleep(3)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(serve_module, "decode_upload", slow_decode)
    upload = threading.Thread(target=client.post, args=("/api/similar",),
                              kwargs={"files": {"file": ("q.png", png_bytes(), "image/png")}})
    upload.start()
    time.sleep(0.5)
    started = time.perf_counter()
    assert client.get("/api/info").status_code == 200
    waited = time.perf_counter() - started
    upload.join()
    assert waited < 1.5, f"/api/info waited {waited:.1f} s behind an upload being decoded"


# ------------------------------------------------------------------------------- the second review (issue 38)


def test_a_link_planted_in_the_thumbnail_cache_is_never_followed(served, tmp_path):
    """Second review of issue 38: /thumb/{id} read a cached thumbnail through a link planted in the cache folder,
    and a dangling link under the marker's name made the server create its target."""
    client, search, photos = served
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    identifier = search.ids[0]
    path, stamp = search.indexed_file(identifier)
    cache = tmp_path / ".photos.index.thumbs"
    cache.mkdir()
    (cache / f"{identifier}-{stamp[0]}-{stamp[1]}.jpg").symlink_to(secret)
    (cache / ".liteclip-derived").symlink_to(tmp_path / "created_by_the_server")
    answer = client.get(f"/thumb/{identifier}")
    assert answer.status_code == 200 and b"SECRET" not in answer.content
    assert Image.open(io.BytesIO(answer.content)).format == "JPEG"
    assert not (tmp_path / "created_by_the_server").exists() and secret.read_text() == "TOP SECRET"


def test_a_thumbnail_folder_that_is_a_link_is_neither_written_through_nor_read(served, tmp_path):
    client, search, _ = served
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / ".photos.index.thumbs").symlink_to(elsewhere)
    assert client.get(f"/thumb/{search.ids[0]}").status_code == 200
    assert list(elsewhere.iterdir()) == []


def test_a_chunked_upload_is_refused_for_its_missing_length_before_its_body_is_read(served):
    """Second review of issue 38: `Transfer-Encoding: chunked` with a small Content-Length passed the length check,
    and 400 MiB were spooled to disk before the 413."""
    access = serve_module.AccessPolicy.for_host("127.0.0.1")
    headers = _Headers({"host": "127.0.0.1:8765", "content-length": "10", "transfer-encoding": "chunked"})
    assert access.refusal("POST", "/api/similar", headers, {}, {})[0] == 411
    headers = _Headers({"host": "127.0.0.1:8765", "content-length": "10"})
    assert access.refusal("POST", "/api/similar", headers, {}, {}) is None


class _Headers(dict):
    """A request's headers as Starlette gives them: get, getlist (repeated headers), in."""

    def getlist(self, key):
        value = dict.get(self, key)
        return [] if value is None else value if isinstance(value, list) else [value]

    def get(self, key, default=None):
        value = super().get(key, default)
        return value[0] if isinstance(value, list) else value


@pytest.mark.parametrize("headers", [
    {"host": "localhost\xa0:8765"}, {"host": "127.0.0.1:8765", "origin": "http://127.0.0.1:8765/x"},
    {"host": "127.0.0.1:8765", "origin": ["http://127.0.0.1:8765", "http://evil.example"]},
    {"host": "127.0.0.1:8765", "sec-fetch-site": ["same-origin", "cross-site"]},
    {"host": "127.0.0.1:8765", "sec-fetch-site": "Cross-Site"},
])
def test_headers_browsers_would_not_send_are_refused_too(headers):
    access = serve_module.AccessPolicy.for_host("127.0.0.1")
    assert access.refusal("GET", "/api/info", _Headers(headers), {}, {})[0] == 403


def test_an_empty_upload_or_one_in_an_exotic_format_is_a_400_and_a_damaged_decoder_is_never_a_500(served,
                                                                                                 monkeypatch):
    client, _, _ = served
    empty = client.post("/api/similar", files={"file": ("empty.png", b"", "image/png")})
    assert empty.status_code == 400 and "empty" in empty.json()["detail"]
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 99, 199)).save(buffer, format="DDS")  # a real image, in a format photos never use
    exotic = client.post("/api/similar", files={"file": ("x.png", buffer.getvalue(), "image/png")})
    assert exotic.status_code == 400 and "dataset" not in exotic.json()["detail"]

    def broken_decoder(*args, **kwargs):  # what Pillow's AVIF, BLP, DDS and SPIDER decoders raised on damaged bytes
        raise RuntimeError("decoder gave up")

    upload = png_bytes()
    monkeypatch.setattr(Image.Image, "load", broken_decoder)
    broken = client.post("/api/similar", files={"file": ("x.png", upload, "image/png")})
    assert broken.status_code == 400 and "RuntimeError: decoder gave up" in broken.json()["detail"]


def test_a_16_bit_upload_is_shrunk_before_it_is_converted(served):
    import tracemalloc

    from liteclip.data.images import open_rgb

    buffer = io.BytesIO()
    Image.fromarray(np.full((3000, 3000), 40000, dtype=np.uint16)).save(buffer, format="PNG")
    peaks = {}
    for shrink in (48, None):  # shrunk first, as an upload is, and converted whole, as before
        tracemalloc.start()
        picture = open_rgb(io.BytesIO(buffer.getvalue()), min_size=48, name="deep.png", shrink_to=shrink)
        peaks[shrink] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert np.asarray(picture)[0, 0, 0] == round(40000 / 257)  # the tone to_rgb gives a 16-bit pixel, both ways
    assert max(serve_module.decode_upload(buffer.getvalue(), "deep.png", min_size=48).size) <= 4 * 48
    assert peaks[48] < peaks[None] / 3
