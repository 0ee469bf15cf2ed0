"""`kosmos2 serve` as a real uvicorn process on a free 127.0.0.1 port, called over HTTP.

The reference for every answer is the `Predictor` run alone in this process on the same model (the built-in
default model): the server's batching must not change a single token. A second server over a tiny random
checkpoint (which never stops before its token budget) is the one the overload, disconnect and remote-image
tests push.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

try:  # the HTTP client the openai package brings (httpx2 here; httpx elsewhere)
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx
import pytest
from _server_fixtures import API_KEY, SHAPES, Server, b64, data_url, metric, png_bytes, sse_events
from PIL import Image

from kosmos2.predictor import Predictor

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server():
    s = Server(
        "--api-key",
        API_KEY,
        "--max-batch",
        "8",
        "--max-queue",
        "64",
        "--max-new-tokens",
        "128",
        "--max-image-pixels",
        "2000000",
        "--max-body-mb",
        "2",
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def busy_server(tiny_checkpoint_dir):
    s = Server(
        "--model",
        str(tiny_checkpoint_dir),
        "--max-batch",
        "2",
        "--max-queue",
        "2",
        "--allow-remote-images",
        "--max-new-tokens",
        "430",
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def predictor():
    return Predictor.from_pretrained()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


def scenes() -> list[Image.Image]:
    """Eight different images of the default model's world (shapes.png turned, flipped and cropped)."""
    im = Image.open(SHAPES).convert("RGB")
    T = Image.Transpose
    return [
        im,
        im.transpose(T.FLIP_LEFT_RIGHT),
        im.transpose(T.FLIP_TOP_BOTTOM),
        im.transpose(T.ROTATE_90),
        im.crop((0, 0, 260, 262)),
        im.crop((130, 0, 392, 262)),
        im.transpose(T.ROTATE_180),
        im.resize((300, 200)),
    ]


def same_entities(got: list[dict], expected, offset: int = 0) -> None:
    assert [e["phrase"] for e in got] == [e.phrase for e in expected]
    assert [e["boxes"] for e in got] == [[list(b) for b in e.boxes] for e in expected]
    for g, e in zip(got, expected, strict=True):
        assert g["pixel_boxes"] == [[pytest.approx(v, abs=0.006) for v in b] for b in e.pixel_boxes]
        if g["span"] is not None:
            assert g["span"] == [e.span[0] - offset, e.span[1] - offset]
        # scores from the decode steps' distributions equal the predictor's teacher-forced ones
        assert g.get("scores") == [None if v is None else pytest.approx(v, abs=1e-4) for v in e.scores]
        assert g.get("phrase_score") == (
            None if e.phrase_score is None else pytest.approx(e.phrase_score, abs=1e-4)
        )


# -- the native API ---------------------------------------------------------------------------------------


def test_native_endpoints_answer_as_the_predictor_alone(client, predictor):
    raw = SHAPES.read_bytes()
    image = Image.open(SHAPES)
    W, H = image.size
    # /v1/ground with plain base64
    r = client.post("/v1/ground", json={"image": b64(raw)})
    assert r.status_code == 200, r.text
    body, expected = r.json(), predictor.ground(image)
    assert (body["text"], body["caption"], body["task"]) == (expected.text, expected.caption, "brief")
    assert len(expected.entities) == 3  # the default model grounds the scene's three shapes
    same_entities(body["entities"], expected.entities)
    assert body["image_size"] == [W, H] and body["finish_reason"] == "stop"
    assert set(body["timings"]) == {"queue_ms", "generate_ms", "total_ms"}
    # /v1/locate with a multipart upload
    r = client.post(
        "/v1/locate", files={"image": ("s.png", raw, "image/png")}, data={"expression": "the orange circle"}
    )
    assert r.status_code == 200, r.text
    expected = predictor.locate(image, "the orange circle")
    assert r.json()["text"] == expected.text and r.json()["entities"][0]["phrase"] == "the orange circle"
    same_entities(r.json()["entities"], expected.entities)
    # /v1/describe with a data URL and a pixel box (the blue square's)
    box = [6, 20, 116, 127]
    r = client.post("/v1/describe", json={"image": data_url(raw), "box": box})
    assert r.status_code == 200, r.text
    expected = predictor.describe_region(image, box)
    assert r.json()["answer"] == expected.answer == "the large blue square"
    # the same box normalised, through a multipart form with the box as text
    r = client.post(
        "/v1/describe",
        files={"image": ("s.png", raw, "image/png")},
        data={"box": ",".join(str(v) for v in (6 / W, 20 / H, 116 / W, 127 / H)), "normalized": "true"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["answer"] == expected.answer
    # /v1/vqa, grounded
    r = client.post(
        "/v1/vqa", json={"image": b64(raw), "question": "what is the orange shape?", "grounded": True}
    )
    assert r.status_code == 200, r.text
    expected = predictor.vqa(image, "what is the orange shape?", grounded=True)
    assert r.json()["text"] == expected.text
    same_entities(r.json()["entities"], expected.entities)
    # /v1/phrases: phrase grounding (a phrase as text, another as a span), one prompt per phrase
    caption = "a large blue square next to a large orange circle"
    r = client.post(
        "/v1/phrases",
        json={"image": b64(raw), "caption": caption, "phrases": ["a large blue square", [28, 49]]},
    )
    assert r.status_code == 200, r.text
    expected = predictor.ground_phrases(image, caption, ["a large blue square", (28, 49)])
    assert [p["boxes"] for p in r.json()["phrases"]] == [[list(b) for b in boxes] for boxes in expected]
    assert [p["phrase"] for p in r.json()["phrases"]] == ["a large blue square", "a large orange circle"]
    assert all(p["boxes"] for p in r.json()["phrases"])  # the default model finds both
    # a task: the plain caption runs beam search (alone, outside the batch)
    r = client.post("/v1/ground", json={"image": b64(raw), "task": "caption"})
    assert r.status_code == 200, r.text
    assert r.json()["text"] == predictor.caption(image, grounded=False).text


def test_native_stream_sends_text_entities_then_the_result(client, predictor):
    with client.stream("POST", "/v1/ground", json={"image": b64(SHAPES.read_bytes()), "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    expected = predictor.ground(Image.open(SHAPES))
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and kinds.count("done") == 1 and kinds.count("entity") == 3
    texts = [json.loads(d)["text"] for k, d in events if k == "text"]
    assert texts[0] == "An image of" and "".join(texts) == expected.caption
    done = json.loads(events[-1][1])
    assert done["text"] == expected.text
    assert [json.loads(d) for k, d in events if k == "entity"] == done["entities"]


# -- the OpenAI-compatible API ----------------------------------------------------------------------------


def test_openai_client_models_chat_and_stream(server, predictor):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["kosmos2-default"]
    url = data_url(SHAPES.read_bytes())
    image = Image.open(SHAPES)
    expected = predictor.ground(image)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]

    r = client.chat.completions.create(model="kosmos2-default", messages=messages)
    message = r.choices[0].message
    content = expected.caption[len("An image of") :].strip()
    assert message.content == content and r.choices[0].finish_reason == "stop"
    entities = message.entities  # the extra field, passed through by the client
    same_entities(entities, expected.entities, offset=len(expected.caption) - len(content))
    assert all(content[slice(*e["span"])] == e["phrase"] for e in entities)
    assert message.grounded_text == expected.text
    assert r.usage.completion_tokens == len(expected.token_ids)  # </s> not counted

    stream = client.chat.completions.create(
        model="kosmos2-default", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    pieces, streamed, reasons, usage = [], [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        delta = chunk.choices[0].delta
        pieces.append(delta.content or "")
        streamed += (delta.model_extra or {}).get("entities") or []
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == content and len(pieces) > 5  # it came in pieces
    assert (
        streamed == entities
        and reasons[-1] == "stop"
        and usage.completion_tokens == r.usage.completion_tokens
    )

    # a question, sampled with a seed: repeatable, and equal to the predictor's sampling with that seed
    ask = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "what is the orange shape?"}, messages[0]["content"][0]],
        }
    ]
    a = client.chat.completions.create(
        model="kosmos2-default", messages=ask, temperature=0.7, top_p=0.9, seed=3
    )
    alone = predictor.vqa(
        image, "what is the orange shape?", grounded=True, do_sample=True, temperature=0.7, top_p=0.9, seed=3
    )
    assert a.choices[0].message.grounded_text == alone.text


def test_chat_box_asks_for_a_region_description(server, predictor):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    image_part = {"type": "image_url", "image_url": {"url": data_url(SHAPES.read_bytes())}}
    image = Image.open(SHAPES)
    box = [153, 110, 251, 217]  # the orange circle, in pixels
    expected = predictor.describe_region(image, box).answer
    assert expected == "the large orange circle"
    as_part = [image_part, {"type": "box", "box": box}]
    r = client.chat.completions.create(
        model="kosmos2-default", messages=[{"role": "user", "content": as_part}]
    )
    assert r.choices[0].message.content == expected
    # the box as Kosmos-2 markup in the text (cells 428 and 852: the same box on the 32x32 grid)
    markup = "<object><patch_index_0428><patch_index_0852></object>"
    as_text = [image_part, {"type": "text", "text": f"What is this? {markup}"}]
    r = client.chat.completions.create(
        model="kosmos2-default", messages=[{"role": "user", "content": as_text}]
    )
    assert r.choices[0].message.content == expected


# -- batching ---------------------------------------------------------------------------------------------


def test_eight_concurrent_requests_each_get_the_output_they_get_alone(client, predictor):
    images = scenes()
    requests = [  # (endpoint, body fields, the predictor's answer alone)
        ("ground", {}, lambda im: predictor.ground(im)),
        ("locate", {"expression": "the orange circle"}, lambda im: predictor.locate(im, "the orange circle")),
        (
            "vqa",
            {"question": "what is the blue shape?", "grounded": True},
            lambda im: predictor.vqa(im, "what is the blue shape?", grounded=True),
        ),
        (
            "describe",
            {"box": [10, 10, 120, 120]},
            lambda im: predictor.describe_region(im, [10, 10, 120, 120]),
        ),
        ("ground", {"max_new_tokens": 9}, lambda im: predictor.ground(im, max_new_tokens=9)),
        (
            "ground",
            {"prompt": "<grounding>An image of a large"},
            lambda im: predictor.ground(im, "<grounding>An image of a large"),
        ),
        ("locate", {"expression": "the blue square"}, lambda im: predictor.locate(im, "the blue square")),
        (
            "ground",
            {"temperature": 0.8, "seed": 11},
            lambda im: predictor.ground(im, do_sample=True, temperature=0.8, seed=11),
        ),
    ]
    alone = [answer(im) for (_, _, answer), im in zip(requests, images, strict=True)]
    before = client.get("/metrics").text
    start = threading.Barrier(8)

    def call(i: int) -> dict:
        endpoint, fields, _ = requests[i]
        start.wait(timeout=30)
        r = client.post(f"/v1/{endpoint}", json={"image": b64(png_bytes(images[i])), **fields})
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(call, range(8)))
    for g, a in zip(got, alone, strict=True):
        assert g["text"] == a.text
        same_entities(g["entities"], a.entities)
    assert len({g["text"] for g in got}) >= 6  # the requests really differ
    # they ran together: several decode steps ran 3 or more of these rows at once
    after = client.get("/metrics").text
    steps = metric(after, "kosmos2_batch_size_count") - metric(before, "kosmos2_batch_size_count")
    upto2 = 'kosmos2_batch_size_bucket{le="2.0"}'
    assert steps - (metric(after, upto2) - metric(before, upto2)) >= 3, after


# -- bad requests -----------------------------------------------------------------------------------------


def test_malformed_requests_get_a_4xx_naming_the_problem(client, server):
    raw = SHAPES.read_bytes()
    huge = png_bytes(Image.new("RGB", (2000, 1500), "white"))  # 3 MP over the server's 2 MP, 20 KB of PNG
    cases = [  # (method, path, kwargs, status, words the message must contain)
        ("post", "/v1/ground", {"json": {"image": "not base64!"}}, 400, "not valid base64"),
        ("post", "/v1/ground", {"json": {"image": b64(b"hello, not an image")}}, 400, "image"),
        ("post", "/v1/ground", {"json": {"image": b64(huge)}}, 413, "max_image_pixels"),
        (
            "post",
            "/v1/ground",
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            400,
            "not valid JSON",
        ),
        ("post", "/v1/ground", {"json": {"image": b64(raw), "colour": "red"}}, 422, "unknown field 'colour'"),
        (
            "post",
            "/v1/ground",
            {"json": {"image": b64(raw), "max_new_tokens": 4096}},
            400,
            "max_new_tokens=128",
        ),
        ("post", "/v1/ground", {"json": {"prompt": "x"}}, 422, "missing field 'image'"),
        ("post", "/v1/ground", {"json": {"image": b64(raw), "prompt": "a <phrase>red"}}, 400, "prompt"),
        ("post", "/v1/ground", {"json": {"image": b64(raw), "top_p": 3}}, 422, "top_p"),
        (
            "post",
            "/v1/ground",
            {"content": b"x" * (3 * 1024 * 1024), "headers": {"content-type": "application/json"}},
            413,
            "max_body_bytes",
        ),
        (
            "post",
            "/v1/describe",
            {"json": {"image": b64(raw), "box": [0, 0, 9999, 50]}},
            400,
            "outside the 392x262 image",
        ),
        (
            "post",
            "/v1/ground",
            {"json": {"image": "https://example.com/a.png"}},
            400,
            "--allow-remote-images",
        ),
        (
            "post",
            "/v1/ground",
            {"json": {"image": b64(raw)}, "headers": {"Authorization": "Bearer wrong"}},
            401,
            "API key",
        ),
        ("get", "/v1/models", {"headers": {"Authorization": ""}}, 401, "API key"),
        (
            "post",
            "/v1/chat/completions",
            {"json": {"model": "kosmos2-default", "messages": [{"role": "user", "content": "hi"}]}},
            400,
            "0 images",
        ),
        (
            "post",
            "/v1/chat/completions",
            {"json": {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}},
            404,
            "gpt-4o",
        ),
        (
            "post",
            "/v1/chat/completions",
            {"json": {"model": "kosmos2-default", "messages": [], "tools": []}},
            422,
            "unknown field 'tools'",
        ),
        (
            "post",
            "/v1/chat/completions",
            {
                "json": {
                    "model": "kosmos2-default",
                    "max_tokens": 999,
                    "messages": [
                        {
                            "role": "user",
                            "content": [{"type": "image_url", "image_url": {"url": data_url(raw)}}],
                        }
                    ],
                }
            },
            400,
            "max_tokens=999",
        ),
    ]
    for method, path, kwargs, status, words in cases:
        r = getattr(client, method)(path, **kwargs)
        assert r.status_code == status, (path, kwargs.get("json"), r.status_code, r.text)
        error = r.json()["error"]
        assert words in error["message"], (words, error)
        assert "\n" not in error["message"] and "Traceback" not in r.text
    assert server.alive()
    assert (
        client.post("/v1/locate", json={"image": b64(raw), "expression": "the blue square"}).status_code
        == 200
    )


def test_docs_health_and_metrics(client):
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    for path in (
        "/v1/ground",
        "/v1/locate",
        "/v1/describe",
        "/v1/vqa",
        "/v1/phrases",
        "/v1/chat/completions",
    ):
        assert path in schema["paths"]
    body = schema["paths"]["/v1/ground"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 8 and health["max_queue"] == 64
    text = client.get("/metrics").text
    for name in (
        "kosmos2_queue_depth",
        "kosmos2_batch_size_bucket",
        "kosmos2_request_latency_seconds_bucket",
        "kosmos2_tokens_per_second",
        "kosmos2_generated_tokens_total",
        "kosmos2_rejected_total",
    ):
        assert name in text, name


# -- overload, disconnects, remote images -----------------------------------------------------------------


def test_overload_rejects_with_503_and_answers_every_accepted_request(busy_server):
    # 2 rows run and 2 wait; each request needs ~200 decode steps; 30 clients arrive at once
    image = b64(SHAPES.read_bytes())
    start = threading.Barrier(30)

    def call(_: int) -> httpx.Response:
        with httpx.Client(base_url=busy_server.url, timeout=120) as c:
            start.wait(timeout=30)
            return c.post("/v1/ground", json={"image": image, "max_new_tokens": 200})

    with ThreadPoolExecutor(30) as pool:
        responses = list(pool.map(call, range(30)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    # accepted: at least the first one (running) and the two behind it (queued)
    assert codes.count(503) >= 10 and codes.count(200) >= 3, codes
    for r in responses:
        if r.status_code == 503:
            assert r.headers["Retry-After"] == "1" and "max_queue=2" in r.json()["error"]["message"]
        else:
            assert r.json()["usage"]["completion_tokens"] == 200  # answered in full
    assert busy_server.alive()
    text = httpx.get(busy_server.url + "/metrics").text
    assert metric(text, "kosmos2_rejected_total") == codes.count(503)
    assert metric(text, "kosmos2_queue_depth") == 0


def test_client_disconnect_stops_its_generation(busy_server):
    image = b64(SHAPES.read_bytes())

    def cancelled() -> float:
        text = httpx.get(busy_server.url + "/metrics").text
        try:
            return metric(text, 'kosmos2_generations_total{reason="cancelled"}')
        except KeyError:
            return 0.0

    def wait_for(n: float) -> None:
        deadline = time.monotonic() + 20
        while cancelled() < n and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cancelled() == n

    def tokens() -> float:
        return metric(httpx.get(busy_server.url + "/metrics").text, "kosmos2_generated_tokens_total")

    before, tokens_before = cancelled(), tokens()
    # a stream left after its first events (256 tokens would take ~1.5 s)
    with httpx.Client(base_url=busy_server.url, timeout=60) as c:
        with c.stream(
            "POST", "/v1/ground", json={"image": image, "max_new_tokens": 256, "stream": True}
        ) as r:
            for line in r.iter_lines():
                if line.startswith("event: text"):
                    break
    wait_for(before + 1)
    # a plain request whose client gives up (430 tokens: the most the tiny model's 512 positions allow)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(busy_server.url + "/v1/ground", json={"image": image, "max_new_tokens": 430}, timeout=0.15)
    wait_for(before + 2)
    time.sleep(0.3)
    assert tokens() - tokens_before < (256 + 430) * 0.8  # both stopped well before their budgets
    assert busy_server.alive()


def test_remote_images_only_when_allowed(busy_server):
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(SHAPES.parent))
    handler.log_message = lambda *a: None
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{files.server_address[1]}/{SHAPES.name}"
        fetched = httpx.post(
            busy_server.url + "/v1/ground", json={"image": url, "max_new_tokens": 5}, timeout=60
        )
        sent = httpx.post(
            busy_server.url + "/v1/ground",
            json={"image": b64(SHAPES.read_bytes()), "max_new_tokens": 5},
            timeout=60,
        )
        assert fetched.status_code == 200, fetched.text
        assert fetched.json()["text"] == sent.json()["text"] and fetched.json()["image_size"] == [392, 262]
    finally:
        files.shutdown()
