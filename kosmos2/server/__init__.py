"""`kosmos2 serve`: the HTTP server (FastAPI + uvicorn) in front of one `Predictor`.

    app.py       routes: the native grounding API, the OpenAI-compatible chat API, /health, /metrics, the demo
    schemas.py   request and answer bodies (pydantic), the OpenAPI schema
    chat.py      the OpenAI-compatible chat API's prompt rules and content
    engine.py    the batching engine: one worker thread, continuous batching over the static KV cache
    inputs.py    images from base64 / data URLs / uploads, limits, the JSON error every bad input becomes
    metrics.py   Prometheus metrics
    cli.py       `kosmos2 serve` arguments
    static/      the web demo (plain HTML + JavaScript, no build step)

Needs the `serve` extra (fastapi, uvicorn, python-multipart, prometheus-client). docs/SERVING.md: deployment.
"""
