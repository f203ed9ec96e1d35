"""Serve a fine-tuned model over HTTP: POST /predict, POST /explain, GET /healthz, GET /metrics (FastAPI + uvicorn).

    export PLAINBERT_TOKEN=$(openssl rand -hex 32)
    python serve.py out/sst2-int8 --port 8000
    curl -s localhost:8000/predict -H "Authorization: Bearer $PLAINBERT_TOKEN" -d '{"texts": ["a gripping film"]}'
    -> {"predictions": [{"label": "1", "probs": {"0": 0.03, "1": 0.97}}]}
    NER: -> [{"entities": [{"type", "text", "start", "end", "score"}]}]; QA: {"texts": [questions], "pairs":
    [contexts]} -> [{"answer", "start", "end", "score"}]  (predict.Predictor.describe)

Read beside docs/deployment.md. The path of a request:

    auth (Bearer token) -> body size (before parsing) -> JSON and limits -> MicroBatcher queue
        -> one forward pass for many requests, in a worker thread -> each request gets its rows back

Every error is JSON, {"error": "..."}: 401 no or wrong token, 413 body or text count over the limit, 422
malformed JSON or wrong types or a text too long or not encodable, 500 only for the request whose own
forward pass fails (a failing batch is retried request by request). /healthz answers 503 when the model
fails a probe. One JSON log line per request (no request text unless --log-text; personal data masked with
--redact); writing it never raises. SIGTERM / SIGINT at any moment after the 'listening' line: stop
accepting, finish the requests in flight (their batches run), then exit 0.
"""
import argparse
import asyncio
import contextlib
import hmac
import json
import os
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from predict import InputError, Predictor
from redact import redact_values

PATHS = ("/predict", "/explain", "/healthz", "/metrics")        # metric labels: any other path counts as "other"


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    max_texts: int = 256
    max_chars: int = 10_000


class RequestError(Exception):
    """A client error: answered as {"error": message} with this status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def parse_predict(body: bytes, limits: Limits, needs_pairs: bool) -> tuple[list[str], list[str] | None]:
    """{"texts": [str, ...], "pairs": [str, ...] (optional)} -> (texts, pairs), or RequestError."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(422, f"the body is not valid JSON ({e})") from None
    except RecursionError:                  # [[[[...]]]] thousands deep: the parser runs out of stack
        raise RequestError(422, "the body nests JSON too deeply") from None
    except ValueError as e:                 # an integer of more than 4,300 digits (sys.int_info)
        raise RequestError(422, f"the body holds a number too long to read ({str(e).split(';')[0]})") from None
    if not isinstance(data, dict) or "texts" not in data:
        raise RequestError(422, 'expected a JSON object {"texts": [...]} (optionally with "pairs": [...])')
    unknown = sorted(set(data) - {"texts", "pairs"})
    if unknown:
        raise RequestError(422, f"unknown field {unknown[0]!r}: expected only texts and pairs")
    texts, pairs = data["texts"], data.get("pairs")
    for name, values in (("texts", texts), ("pairs", pairs)):
        if values is None and name == "pairs":
            continue
        if not isinstance(values, list) or not values:
            raise RequestError(422, f"{name} must be a non-empty list of strings")
        if len(values) > limits.max_texts:
            raise RequestError(413, f"{name} has {len(values)} entries; the limit is {limits.max_texts} per request")
        for i, t in enumerate(values):
            if not isinstance(t, str):
                raise RequestError(422, f"{name}[{i}] is {type(t).__name__}, expected a string")
            if len(t) > limits.max_chars:
                raise RequestError(422, f"{name}[{i}] has {len(t)} characters; the limit is {limits.max_chars}")
            try:        # JSON may spell a lone surrogate ("\ud800"); no tokenizer, log or file can encode it
                t.encode("utf-8")
            except UnicodeEncodeError as e:
                raise RequestError(422, f"{name}[{i}] holds a lone surrogate U+{ord(t[e.start]):04X} at character "
                                        f"{e.start}: not valid Unicode text") from None
    if pairs is not None and len(pairs) != len(texts):
        raise RequestError(422, f"got {len(texts)} texts but {len(pairs)} pairs")
    if needs_pairs and pairs is None:
        raise RequestError(422, 'this model reads text pairs: give "pairs" beside "texts"')
    return texts, pairs


EXPLAIN_FIELDS = {"text": str, "pair": str, "target": str, "steps": int, "baseline": str, "layer": int, "head": int}
MAX_EXPLAIN_STEPS = 256                  # each step is a forward and a backward pass: bound the work


def parse_explain(body: bytes, limits: Limits) -> dict:
    """{"text": str, optionally "pair", "target", "steps", "baseline", "layer", "head"} -> explain.explain's
    keyword arguments, or RequestError."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(422, f"the body is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("text"), str):
        raise RequestError(422, 'expected a JSON object {"text": "..."} (optionally steps, baseline, layer, head, target)')
    for name, value in data.items():
        kind = EXPLAIN_FIELDS.get(name)
        if kind is None:
            raise RequestError(422, f"unknown field {name!r}: expected {', '.join(EXPLAIN_FIELDS)}")
        if not isinstance(value, kind) or isinstance(value, bool):
            raise RequestError(422, f"{name} is {type(value).__name__}, expected {kind.__name__}")
        if kind is str and len(value) > limits.max_chars:
            raise RequestError(422, f"{name} has {len(value)} characters; the limit is {limits.max_chars}")
    if not 1 <= data.get("steps", 50) <= MAX_EXPLAIN_STEPS:
        raise RequestError(422, f"steps must be between 1 and {MAX_EXPLAIN_STEPS}")
    return data


def authorized(header: str | None, token: str) -> bool:
    scheme, _, value = (header or "").partition(" ")
    # compare_digest takes the same time wherever the first difference is: no timing hints to the token
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


# -----------------------------------------------------------------------------------------------------
# metrics, in the Prometheus text format


class Histogram:
    def __init__(self, bounds):
        self.bounds, self.counts, self.sum, self.count = tuple(bounds), [0] * len(bounds), 0.0, 0

    def observe(self, v: float):
        for i, b in enumerate(self.bounds):
            if v <= b:
                self.counts[i] += 1
                break
        self.sum, self.count = self.sum + v, self.count + 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for b, c in zip(self.bounds, self.counts):      # Prometheus buckets are cumulative: count of v <= le
            running += c
            out.append(f'{name}_bucket{{le="{b:g}"}} {running}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        return out + [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]


class Metrics:
    """Counters and histograms, updated on the event loop only (so no locks)."""

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}
        self.errors = self.texts = self.in_flight = 0
        self.queue_depth = 0            # set when scraped: requests waiting in the batcher's queue
        self.model_loaded = 0           # set by the batcher: 1 while the model answers a probe with finite numbers
        self.latency = Histogram((0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.batch = Histogram((1, 2, 4, 8, 16, 32, 64, 128, 256))

    def request(self, path: str, status: int, seconds: float, n_texts: int):
        key = (path if path in PATHS else "other", status)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.errors += status >= 400
        if path == "/predict":
            self.latency.observe(seconds)
            self.texts += n_texts if status == 200 else 0

    def exposition(self) -> str:
        def head(name, kind, text):
            return [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        lines = head("plainbert_requests_total", "counter", "HTTP requests answered, by path and status code.")
        lines += [f'plainbert_requests_total{{path="{p}",status="{s}"}} {n}'
                  for (p, s), n in sorted(self.requests.items())]
        lines += head("plainbert_errors_total", "counter", "Requests answered with a status of 400 or more.")
        lines += [f"plainbert_errors_total {self.errors}"]
        lines += head("plainbert_texts_total", "counter", "Texts labelled by successful POST /predict requests.")
        lines += [f"plainbert_texts_total {self.texts}"]
        lines += head("plainbert_requests_in_flight", "gauge", "POST /predict requests received and not yet answered.")
        lines += [f"plainbert_requests_in_flight {self.in_flight}"]
        lines += head("plainbert_queue_depth", "gauge", "POST /predict requests waiting for a forward pass.")
        lines += [f"plainbert_queue_depth {self.queue_depth}"]
        lines += head("plainbert_model_loaded", "gauge", "1 if the model is loaded and gives finite outputs, else 0.")
        lines += [f"plainbert_model_loaded {self.model_loaded}"]
        lines += head("plainbert_request_latency_seconds", "histogram", "POST /predict latency, arrival to response.")
        lines += self.latency.lines("plainbert_request_latency_seconds")
        lines += head("plainbert_batch_size", "histogram", "Texts per forward pass (micro-batches of requests).")
        lines += self.batch.lines("plainbert_batch_size")
        return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------------------------------
# micro-batching


class MicroBatcher:
    """Concurrent requests wait in a queue; the first one opens a batch, which takes more until it holds
    max_batch texts or max_wait has passed; then one forward pass runs in a worker thread (the event loop
    keeps accepting meanwhile) and each request gets its own rows back. A request is never split, and a
    batch never mixes requests with and without pairs: one that does not fit opens the next batch.

    One request cannot fail another's: when a batch fails, each of its requests is run again alone, so
    only the one that fails alone gets the error. A failure alone probes the model with a known text;
    `problem` (None when healthy) is what /healthz and plainbert_model_loaded report."""

    PROBE = "health check"

    def __init__(self, predictor: Predictor, max_batch: int, max_wait_s: float, metrics: Metrics):
        self.predictor, self.max_batch, self.max_wait, self.metrics = predictor, max_batch, max_wait_s, metrics
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")   # one forward at a time
        self.task = None
        self.problem: str | None = "not probed yet"

    async def predict(self, texts: list[str], pairs: list[str] | None) -> list[dict]:
        done = asyncio.get_running_loop().create_future()
        await self.queue.put((texts, pairs, done))
        return await done

    def _rows(self, texts, pairs) -> list[dict]:
        """In the worker thread: the forward pass, refused (ValueError) if it gives NaN or infinity."""
        out = self.predictor(texts, pairs)
        if not np.isfinite(out).all():
            raise ValueError("the model gave non-finite outputs (NaN or infinity)")
        return self.predictor.describe(out)

    async def probe(self):
        """Run the model on one known text; set `problem` and the plainbert_model_loaded gauge."""
        try:
            pair = [self.PROBE] if self.predictor.needs_pairs else None
            await asyncio.get_running_loop().run_in_executor(self.pool, self._rows, [self.PROBE], pair)
            self.problem = None
        except Exception as e:
            self.problem = f"the model fails on a probe text: {type(e).__name__}: {e}"
        self.metrics.model_loaded = int(self.problem is None)

    def start(self):
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self):
        """After the server has finished its requests in flight: end the loop, then the worker thread."""
        await self.queue.put(None)
        await self.task
        self.pool.shutdown(wait=True)

    async def _run(self):
        loop, carry = asyncio.get_running_loop(), None
        while True:
            first = carry if carry is not None else await self.queue.get()
            carry = None
            if first is None:                                    # stop() was called
                return
            batch, n, deadline = [first], len(first[0]), loop.time() + self.max_wait
            while n < self.max_batch:
                try:
                    item = self.queue.get_nowait() if self.queue.qsize() else \
                        await asyncio.wait_for(self.queue.get(), max(deadline - loop.time(), 0))
                except asyncio.TimeoutError:
                    break
                if item is None or n + len(item[0]) > self.max_batch or (item[1] is None) != (first[1] is None):
                    carry = item
                    break
                batch.append(item)
                n += len(item[0])
            try:
                await self._forward(batch)
            except Exception as e:          # a bug here must not end the loop: later requests would wait forever
                log({"event": "error", "where": "batcher", "error": f"{type(e).__name__}: {e}"})
                for _, _, done in batch:
                    if not done.done():
                        done.set_exception(e)

    async def _forward(self, batch):
        texts = [t for item in batch for t in item[0]]
        pairs = None if batch[0][1] is None else [p for item in batch for p in item[1]]
        self.metrics.batch.observe(len(texts))
        try:
            rows = await asyncio.get_running_loop().run_in_executor(self.pool, self._rows, texts, pairs)
        except Exception as e:
            if len(batch) > 1:                                  # find the culprit: each request alone
                for item in batch:
                    if not item[2].done():                      # (a client that left is not retried)
                        await self._forward([item])
                return
            if not batch[0][2].done():
                batch[0][2].set_exception(e)
            await self.probe()                                  # its input, or the model?
            return
        self.problem, self.metrics.model_loaded = None, 1
        start = 0
        for item_texts, _, done in batch:
            if not done.done():                                 # a client that left has a cancelled future
                done.set_result(rows[start:start + len(item_texts)])
            start += len(item_texts)


# -----------------------------------------------------------------------------------------------------
# the app


def log(record: dict, redact: bool = False):
    """One JSON line on stdout. Never raises: a log line must not fail the request it describes."""
    record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds")} | record
    try:
        if redact:
            record = redact_values(record)
        try:
            print(json.dumps(record, ensure_ascii=False, default=repr), flush=True)
        except UnicodeEncodeError:          # a character stdout's encoding lacks: \uXXXX escapes are ASCII
            print(json.dumps(record, ensure_ascii=True, default=repr), flush=True)
    except Exception as e:                  # stdout closed, a full disk, ...: say so on stderr if it can
        with contextlib.suppress(Exception):
            print(f"serve.py: cannot write a log line ({type(e).__name__}: {e})", file=sys.stderr, flush=True)


class Observe:
    """ASGI middleware around the whole app: for every HTTP request, its metrics and one JSON log line.
    The /predict handler leaves n_texts (and the texts, for --log-text) in scope["plainbert"]."""

    def __init__(self, app, metrics: Metrics, log_text: bool, redact: bool = False):
        self.app, self.metrics, self.log_text, self.redact = app, metrics, log_text, redact

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, seen = time.perf_counter(), 500, scope.setdefault("plainbert", {})
        predict = scope["path"] == "/predict"
        self.metrics.in_flight += predict

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            seconds = time.perf_counter() - start
            self.metrics.in_flight -= predict
            self.metrics.request(scope["path"], status, seconds, seen.get("n_texts", 0))
            record = {"method": scope["method"], "path": scope["path"], "status": status,
                      "latency_ms": round(seconds * 1000, 3), "n_texts": seen.get("n_texts", 0)}
            if self.log_text and "texts" in seen:
                record["texts"] = seen["texts"]
            log(record, self.redact)


def create_app(predictor: Predictor, token: str | None, limits: Limits, max_batch: int = 32,
               max_wait_ms: float = 5.0, log_text: bool = False, protect_metrics: bool = False,
               redact: bool = False, redact_inputs: bool = False):
    """The ASGI app (FastAPI inside Observe). token None: no auth (--insecure). protect_metrics: /metrics
    needs the token, and /healthz without it says only its status. redact: mask personal data in the log
    lines; redact_inputs: in the texts before the model too (and so in the log)."""
    from redact import redact as mask
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.exceptions import HTTPException

    metrics = Metrics()
    state = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["batcher"] = MicroBatcher(predictor, max_batch, max_wait_ms / 1000, metrics)
        state["batcher"].start()
        await state["batcher"].probe()     # before the first request: /healthz tells the truth from the start
        if state["batcher"].problem:
            log({"event": "unhealthy", "error": state["batcher"].problem}, redact)
        yield
        await state["batcher"].stop()      # uvicorn has already waited for the requests in flight

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def request_error(request, e: RequestError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse({"error": e.message}, status_code=e.status, headers=headers)

    @app.exception_handler(HTTPException)                     # 404, 405, ... in the same shape
    async def http_error(request, e: HTTPException):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        log({"event": "error", "path": request.url.path, "error": f"{type(e).__name__}: {e}"}, redact)
        return JSONResponse({"error": "internal error while predicting"}, status_code=500)

    def has_token(request) -> bool:
        return token is None or authorized(request.headers.get("authorization"), token)

    @app.post("/predict")
    async def predict(request: Request):
        if not has_token(request):
            raise RequestError(401, "missing or invalid bearer token (Authorization: Bearer <token>)")
        texts, pairs = parse_predict(await read_body(request, limits.max_body_bytes), limits, predictor.needs_pairs)
        if redact_inputs:
            texts = [mask(t) for t in texts]
            pairs = None if pairs is None else [mask(p) for p in pairs]
        request.scope["plainbert"].update(n_texts=len(texts), texts=texts)
        return {"predictions": await state["batcher"].predict(texts, pairs)}

    @app.post("/explain")
    async def explain_endpoint(request: Request):
        from explain import ExplainError, explain
        if token is not None and not authorized(request.headers.get("authorization"), token):
            raise RequestError(401, "missing or invalid bearer token (Authorization: Bearer <token>)")
        if predictor.runtime != "torch":
            raise RequestError(422, f"/explain needs gradients, which --runtime {predictor.runtime} has not: "
                                    "serve the folder with --runtime torch")
        opts = parse_explain(await read_body(request, limits.max_body_bytes), limits)
        request.scope["plainbert"].update(n_texts=1, texts=[opts["text"]])
        model, tokenizer, info = predictor.members[0]            # an ensemble: its first member
        work = lambda: explain(model, tokenizer, info, **opts).to_dict()
        try:           # on the batcher's one model thread: IG's embedding hook must not meet a /predict batch
            return await asyncio.get_running_loop().run_in_executor(state["batcher"].pool, work)
        except ExplainError as e:
            raise RequestError(422, str(e)) from None

    @app.get("/healthz")
    async def healthz(request: Request):
        """200 while the model answers, 503 (load balancers and Kubernetes take the replica out) if not."""
        problem = state["batcher"].problem
        body = {"status": "ok"} if problem is None else {"status": "unavailable", "error": problem}
        if not protect_metrics or has_token(request):   # the task and labels only to those who may know
            body |= {"task": predictor.task, "labels": predictor.labels}
        return JSONResponse(body, status_code=200 if problem is None else 503)

    @app.get("/metrics")
    async def metrics_endpoint(request: Request):
        if protect_metrics and not has_token(request):
            raise RequestError(401, "--protect-metrics: /metrics needs the bearer token (Authorization: Bearer <token>)")
        metrics.queue_depth = state["batcher"].queue.qsize()
        return PlainTextResponse(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return Observe(app, metrics, log_text, redact or redact_inputs)


async def read_body(request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed `limit`: from Content-Length before reading
    anything, else while it streams in (chunked uploads), so an oversized body is never held or parsed."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise RequestError(413, f"the body has {length} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# -----------------------------------------------------------------------------------------------------
# the command line


def read_token(args) -> str | None:
    """--token-file, else $PLAINBERT_TOKEN; None only with --insecure."""
    if args.token_file:
        try:
            with open(args.token_file) as f:
                token, source = f.read().strip(), f"--token-file {args.token_file}"
        except OSError as e:
            raise InputError(f"--token-file {args.token_file}: cannot read ({e.strerror})") from None
    else:
        token, source = os.environ.get("PLAINBERT_TOKEN", "").strip(), "PLAINBERT_TOKEN"
    if not token:
        if args.insecure:
            return None
        raise InputError("no token: set PLAINBERT_TOKEN or pass --token-file FILE (or --insecure to serve "
                         "without authentication, on a trusted network only)")
    if len(token) < 16:
        raise InputError(f"{source}: the token is {len(token)} characters; use at least 16 (openssl rand -hex 32)")
    return token


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Serve a fine-tuned model over HTTP.", allow_abbrev=False)
    p.add_argument("model", help="fine-tuned (or exported) model folder; several, comma-separated, are averaged")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (the 'listening' log line says which)")
    p.add_argument("--token-file", help="a file holding the bearer token (default: $PLAINBERT_TOKEN)")
    p.add_argument("--insecure", action="store_true", help="allow starting without a token: no authentication")
    p.add_argument("--max-batch", type=int, default=32, help="texts per forward pass, at most")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    p.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes)
    p.add_argument("--max-texts", type=int, default=Limits.max_texts, help="texts per request, at most")
    p.add_argument("--max-chars", type=int, default=Limits.max_chars, help="characters per text, at most")
    p.add_argument("--threads", type=int, help="CPU threads for the forward pass (default: torch's / onnxruntime's)")
    p.add_argument("--runtime", choices=("torch", "onnx", "onnx-int8"), default="torch",
                   help="onnx / onnx-int8: run model.onnx / model.int8.onnx (export.py --onnx) in onnxruntime; "
                        "/explain needs torch (gradients)")
    p.add_argument("--graceful-timeout", type=float, default=30.0, help="seconds to finish requests on shutdown")
    p.add_argument("--log-text", action="store_true", help="also log each request's texts (off: they may be private)")
    p.add_argument("--redact", action="store_true",
                   help="mask e-mail addresses, phone and card numbers and URLs in every log line (redact.py)")
    p.add_argument("--redact-inputs", action="store_true",
                   help="mask them in the texts before the model too (implies --redact)")
    p.add_argument("--protect-metrics", action="store_true",
                   help="/metrics needs the token; /healthz without it gives only its status (for probes)")
    return p


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InputError(f"--host/--port: cannot listen on {host}:{port} ({e.strerror})") from None
    sock.listen(2048)        # listening before the 'listening' line: a client reading it may connect at once
    return sock


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        token = read_token(args)
        if args.protect_metrics and token is None:
            raise InputError("--protect-metrics needs a token (PLAINBERT_TOKEN or --token-file), not --insecure")
        for flag in ("max_batch", "max_body_bytes", "max_texts", "max_chars"):
            if getattr(args, flag) < 1:
                raise InputError(f"--{flag.replace('_', '-')}: expected a positive integer, got {getattr(args, flag)}")
        try:
            import fastapi  # noqa: F401
            import uvicorn
        except ImportError:
            raise InputError("serve.py needs fastapi and uvicorn (pip install fastapi uvicorn)") from None
        if args.threads and args.runtime == "torch":
            import torch
            torch.set_num_threads(args.threads)
        predictor = Predictor([p for p in args.model.split(",") if p], batch_size=args.max_batch, runtime=args.runtime,
                              threads=args.threads)
        sock = listen(args.host, args.port)
    except (ValueError, OSError) as e:          # one line, exit 2 (not trainer.fail: no torch import before the checks)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    limits = Limits(args.max_body_bytes, args.max_texts, args.max_chars)
    app = create_app(predictor, token, limits, args.max_batch, args.max_wait_ms, args.log_text,
                     args.protect_metrics, args.redact, args.redact_inputs)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=args.graceful_timeout))
    # uvicorn takes SIGTERM/SIGINT for its graceful shutdown, but only once server.run has installed its
    # handlers. A signal before that (just after the 'listening' line) reaches these: they ask uvicorn to
    # stop, which it does right after starting up. When done, uvicorn puts these back and re-raises the
    # signal it caught; here that is harmless, so a graceful stop exits with status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
    host, port = sock.getsockname()[:2]
    log({"event": "listening", "host": host, "port": port, "model": args.model, "runtime": args.runtime, "auth": token is not None,
         "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms})
    server.run(sockets=[sock])
    log({"event": "stopped"})


if __name__ == "__main__":
    main()
