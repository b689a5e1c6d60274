"""Server overhead on the null device: what one request costs the HTTP layer and the engine
when the device takes no time. Reports the server-side time (request received to response
headers, the ``x-weft-server-ms`` header) and the client's round trip over loopback."""

from __future__ import annotations

import statistics
import time

__all__ = ["server_overhead"]


def server_overhead(n: int = 300, endpoint: str = "embeddings") -> dict:
    import httpx

    from weft.sw.devices import ModelSet, NullDevice

    from .app import ServerSettings, create_app
    from .run import ServerThread

    tok = ModelSet.load(["smollm2"], tiny=True).smollm2_tokenizer
    app = create_app(lambda: [NullDevice("null", tokenizer=tok)], settings=ServerSettings())
    body = {"embeddings": ("/v1/embeddings", {"model": "minilm", "input": "hello world"}),
            "chat": ("/v1/chat/completions", {"model": "smollm2", "max_tokens": 1,
                                              "messages": [{"role": "user", "content": "hi"}]})}[endpoint]
    server, client = [], []
    with ServerThread(app) as url, httpx.Client(base_url=url) as c:
        for i in range(n + 20):
            t = time.perf_counter()
            r = c.post(body[0], json=body[1])
            dt = time.perf_counter() - t
            r.raise_for_status()
            if i >= 20:  # warm-up
                server.append(float(r.headers["x-weft-server-ms"]))
                client.append(dt * 1e3)
    q = lambda a, p: statistics.quantiles(a, n=100)[p - 1]  # noqa: E731
    return {"endpoint": endpoint, "n": n, "server_p50_ms": statistics.median(server), "server_p99_ms": q(server, 99),
            "client_p50_ms": statistics.median(client), "client_p99_ms": q(client, 99)}
