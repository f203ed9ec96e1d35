"""serve.py: a real HTTP server (started here as a subprocess on 127.0.0.1, a free port) answers with the
model's predictions, refuses what it should with a JSON error and stays healthy, batches concurrent
requests, counts everything in /metrics, logs one JSON line per request, and stops gracefully."""
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from finetuned import load_finetuned, predict_proba
from serve import Histogram, Limits, Metrics, MicroBatcher, RequestError, authorized, parse_predict
from test_predict import toy_model

TOKEN = "test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return toy_model(tmp_path_factory.getbasetemp())


class Server:
    """serve.py in a subprocess; its stdout (the JSON log) goes to a file, read back by log()."""

    def __init__(self, tmp_path, *argv, env=None):
        self.log_path = tmp_path / "serve.log"
        self.log_file = open(self.log_path, "w")
        env = {k: v for k, v in os.environ.items() if k != "PLAINBERT_TOKEN"} | {"OMP_NUM_THREADS": "1"} | (env or {})
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), *map(str, argv), "--port", "0"],
                                     stdout=self.log_file, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        for _ in range(1200):                                          # at most ~2 minutes to start
            listening = [r for r in self.log() if r.get("event") == "listening"]
            if listening or self.proc.poll() is not None:
                break
            time.sleep(0.1)
        assert listening, f"serve.py did not start: {self.log_path.read_text()[-2000:]}"
        self.port, self.started = listening[0]["port"], listening[0]

    def log(self) -> list[dict]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]

    def request(self, path, body=None, token=TOKEN, raw=None):
        """(status, parsed JSON or text) of one request on a new connection."""
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                     method="GET" if data is None else "POST")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, text = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        return status, (json.loads(text) if text.startswith("{") else text)

    def metrics(self) -> dict:
        """{'name{labels}': value} from /metrics."""
        _, text = self.request("/metrics")
        return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)
        self.log_file.close()


@pytest.fixture(scope="module")
def server(toy, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "token").write_text(TOKEN + "\n")
    s = Server(tmp, toy["dir"], "--token-file", tmp / "token", "--max-body-bytes", 4096, "--max-texts", 64,
               "--max-chars", 300, "--max-batch", 32, "--max-wait-ms", 5)
    yield s
    s.stop()


def expected_rows(toy, texts):
    model, tok, info = load_finetuned(toy["dir"])
    return predict_proba(model, tok, texts, info=info)


def assert_matches(rows, probs):
    assert [r["label"] for r in rows] == [str(k) for k in probs.argmax(1)]
    np.testing.assert_allclose([[r["probs"]["0"], r["probs"]["1"]] for r in rows], probs, atol=1e-5)


def raw_request(port, head: bytes, body_chunks=()) -> bytes:
    """Send raw HTTP, then read the answer's status line: for bodies that urllib would not send."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(head)
        for chunk in body_chunks:
            s.sendall(chunk)
        return s.recv(65536)


# -----------------------------------------------------------------------------------------------------
# the server, over HTTP


def test_predictions_are_predict_proba_of_the_model(server, toy):
    texts = toy["texts"][:10]
    status, body = server.request("/predict", {"texts": texts})
    assert status == 200
    assert_matches(body["predictions"], expected_rows(toy, texts))


def test_an_onnx_server_answers_pytorchs_probabilities_and_refuses_explain(toy, tmp_path):
    pytest.importorskip("onnxruntime")
    folder = tmp_path / "onnx"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), str(toy["dir"]), "--out", str(folder),
                           "--onnx"], capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0 and (folder / "model.onnx").is_file(), done.stderr[-2000:]
    s = Server(tmp_path, folder, "--runtime", "onnx", "--insecure", "--threads", 1)
    try:
        assert s.started["runtime"] == "onnx"
        texts = toy["texts"][:10]
        status, body = s.request("/predict", {"texts": texts}, token=None)
        assert status == 200
        rows, probs = body["predictions"], expected_rows(toy, texts)
        assert [r["label"] for r in rows] == [str(k) for k in probs.argmax(1)]
        np.testing.assert_allclose([[r["probs"]["0"], r["probs"]["1"]] for r in rows], probs, atol=1e-4)
        status, body = s.request("/explain", {"text": texts[0]}, token=None)
        assert status == 422 and "--runtime torch" in body["error"]
    finally:
        s.stop()


@pytest.mark.parametrize("token", [None, "wrong-token-0123456789abcdef", ""])
def test_a_missing_or_wrong_token_is_401(server, token):
    status, body = server.request("/predict", {"texts": ["a film"]}, token=token)
    assert status == 401 and "bearer token" in body["error"]


def test_oversized_or_malformed_input_is_refused_and_the_server_stays_healthy(server, toy):
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    cases = [
        (server.request("/predict", raw=b'{"texts": ["' + b"a" * 5000 + b'"]}'), 413, "limit is 4096"),
        (server.request("/predict", {"texts": ["a film"] * 65}), 413, "limit is 64"),
        (server.request("/predict", {"texts": ["a" * 301]}), 422, "limit is 300"),
        (server.request("/predict", raw=b'{"texts": ["a film"'), 422, "not valid JSON"),
        (server.request("/predict", raw=b"\xff\xfe"), 422, "not valid JSON"),
        (server.request("/predict", {"texts": "a film"}), 422, "non-empty list of strings"),
        (server.request("/predict", {"texts": []}), 422, "non-empty list of strings"),
        (server.request("/predict", {"texts": ["a", 3]}), 422, "texts[1] is int"),
        (server.request("/predict", {"texts": ["a"], "pairs": ["b", "c"]}), 422, "1 texts but 2 pairs"),
        (server.request("/predict", {"text": ["a"]}), 422, "expected a JSON object"),
        (server.request("/predict", [1, 2]), 422, "expected a JSON object"),
        (server.request("/nowhere"), 404, "Not Found"),
    ]
    for (status, body), want_status, want_text in cases:
        assert status == want_status and want_text in body["error"], (status, body)
    # a declared length over the limit is refused before a byte of the body is read
    answer = raw_request(server.port, b"POST /predict HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 10000000\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413")
    # a chunked body (no length) is refused as soon as it passes the limit while streaming in
    chunk = b"400\r\n" + b"a" * 1024 + b"\r\n"
    answer = raw_request(server.port, b"POST /predict HTTP/1.1\r\nHost: x\r\n" + auth + b"Transfer-Encoding: chunked\r\n\r\n",
                         [chunk] * 5)
    assert answer.startswith(b"HTTP/1.1 413")
    assert server.request("/healthz") == (200, {"status": "ok", "task": "binary", "labels": ["0", "1"]})
    test_predictions_are_predict_proba_of_the_model(server, toy)


def test_a_burst_of_200_concurrent_requests_is_answered_correctly(server, toy):
    texts = toy["texts"][:40]
    probs = dict(zip(texts, expected_rows(toy, texts)))
    before = server.metrics()
    jobs = [[texts[(i + k) % len(texts)] for k in range(1 + i % 3)] for i in range(200)]   # 1 to 3 texts each

    def client(worker):                        # 16 connections, each sending its share one after another
        import http.client
        conn, answers = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120), []
        for job in jobs[worker::16]:
            conn.request("POST", "/predict", json.dumps({"texts": job}), {"Authorization": f"Bearer {TOKEN}"})
            r = conn.getresponse()
            answers.append((job, r.status, json.loads(r.read())))
        conn.close()
        return answers

    with ThreadPoolExecutor(16) as pool:
        answers = [a for part in pool.map(client, range(16)) for a in part]
    assert len(answers) == 200
    for job, status, body in answers:
        assert status == 200, body
        assert_matches(body["predictions"], np.array([probs[t] for t in job]))
    after = server.metrics()
    n_texts = sum(map(len, jobs))
    assert after['plainbert_requests_total{path="/predict",status="200"}'] - \
        before['plainbert_requests_total{path="/predict",status="200"}'] == 200
    assert after["plainbert_errors_total"] == before["plainbert_errors_total"]
    assert after["plainbert_texts_total"] - before["plainbert_texts_total"] == n_texts
    assert after["plainbert_batch_size_sum"] - before["plainbert_batch_size_sum"] == n_texts   # each text: one pass


def test_metrics_count_what_happened(server):
    before = server.metrics()
    server.request("/predict", {"texts": ["a film", "another film"]})
    server.request("/predict", {"texts": ["a film"]}, token=None)
    server.request("/predict", raw=b"{oops")
    server.request("/healthz")
    after = server.metrics()
    delta = lambda key: after.get(key, 0) - before.get(key, 0)
    assert delta('plainbert_requests_total{path="/predict",status="200"}') == 1
    assert delta('plainbert_requests_total{path="/predict",status="401"}') == 1
    assert delta('plainbert_requests_total{path="/predict",status="422"}') == 1
    assert delta('plainbert_requests_total{path="/healthz",status="200"}') == 1
    assert delta('plainbert_requests_total{path="/metrics",status="200"}') == 1   # the first scrape
    assert delta("plainbert_errors_total") == 2 and delta("plainbert_texts_total") == 2
    assert delta("plainbert_request_latency_seconds_count") == 3
    assert delta('plainbert_request_latency_seconds_bucket{le="+Inf"}') == 3
    assert after["plainbert_requests_in_flight"] == 0
    _, text = server.request("/metrics")
    assert "# TYPE plainbert_request_latency_seconds histogram" in text and "# TYPE plainbert_requests_total counter" in text


def test_each_request_is_one_json_log_line_without_its_text(server):
    secret = "my private review, never to be logged"
    server.request("/predict", {"texts": [secret]})
    for _ in range(100):                                               # the line is written after the answer
        records = [r for r in server.log() if r.get("path") == "/predict" and r.get("status") == 200]
        if records and "time" in records[-1]:
            break
        time.sleep(0.05)
    assert {"time", "path", "status", "latency_ms", "n_texts"} <= set(records[-1])
    assert secret not in server.log_path.read_text()


def test_explain_answers_what_explain_computes_and_refuses_bad_fields(server, toy):
    from explain import explain
    text = toy["texts"][0]
    status, body = server.request("/explain", {"text": text, "steps": 8, "baseline": "mask", "layer": 1, "head": 3})
    model, tok, info = load_finetuned(toy["dir"])
    local = explain(model, tok, info, text, steps=8, baseline="mask", layer=1, head=3)
    assert status == 200 and body["words"] == local.words and body["label"] == local.label
    np.testing.assert_allclose(body["word_scores"], local.word_scores, atol=1e-5)
    np.testing.assert_allclose(body["attention"], local.attention, atol=1e-6)
    for bad, message in (({"text": text, "steps": 10_000}, "steps must be between"), ({"texts": [text]}, '{"text"'),
                         ({"text": text, "layer": 7}, "--layer 7"), ({"text": text, "head": "2"}, "expected int")):
        status, body = server.request("/explain", bad)
        assert status == 422 and message in body["error"]
    assert server.request("/explain", {"text": text}, token=None)[0] == 401


def test_serving_refuses_to_start_without_a_token(toy):
    env = {k: v for k, v in os.environ.items() if k != "PLAINBERT_TOKEN"}
    for extra_env, message in (({}, "no token: set PLAINBERT_TOKEN"), ({"PLAINBERT_TOKEN": "short"}, "at least 16")):
        done = subprocess.run([sys.executable, os.path.join(ROOT, "serve.py"), toy["dir"]], env=env | extra_env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and done.stderr.startswith("error: ") and message in done.stderr
        assert "Traceback" not in done.stderr


def test_insecure_server_finishes_the_request_in_flight_on_sigterm(toy, tmp_path):
    s = Server(tmp_path, toy["dir"], "--insecure", "--max-wait-ms", 3000)   # a lone request waits 3 s in its batch
    assert s.started["auth"] is False
    result = {}
    client = threading.Thread(target=lambda: result.update(answer=s.request("/predict", {"texts": ["a film"]}, token=None)))
    client.start()
    for _ in range(600):
        if s.metrics()["plainbert_requests_in_flight"] == 1:
            break
        time.sleep(0.02)
    s.proc.send_signal(signal.SIGTERM)                                 # while the request waits for its batch
    client.join(timeout=120)
    assert result["answer"][0] == 200 and len(result["answer"][1]["predictions"]) == 1
    assert s.proc.wait(timeout=60) == 0
    assert s.log()[-1]["event"] == "stopped"
    s.stop()


# -----------------------------------------------------------------------------------------------------
# the parts, without a server


def test_parse_predict_accepts_texts_and_pairs():
    limits = Limits(max_texts=3, max_chars=5)
    assert parse_predict(b'{"texts": ["a", "b"]}', limits, False) == (["a", "b"], None)
    assert parse_predict(b'{"texts": ["a"], "pairs": ["b"]}', limits, True) == (["a"], ["b"])
    with pytest.raises(RequestError, match="reads text pairs"):
        parse_predict(b'{"texts": ["a"]}', limits, True)
    with pytest.raises(RequestError) as e:
        parse_predict(b'{"texts": ["a", "b", "c", "d"]}', limits, False)
    assert e.value.status == 413


def test_authorized_needs_the_bearer_scheme_and_the_exact_token():
    assert authorized(f"Bearer {TOKEN}", TOKEN) and authorized(f"bearer {TOKEN}", TOKEN)
    assert not authorized(TOKEN, TOKEN) and not authorized(f"Bearer {TOKEN}x", TOKEN) and not authorized(None, TOKEN)


def test_histogram_buckets_are_cumulative():
    h = Histogram((1, 2, 4))
    for v in (0.5, 1, 3, 3, 9):
        h.observe(v)
    assert h.lines("x") == ['x_bucket{le="1"} 2', 'x_bucket{le="2"} 2', 'x_bucket{le="4"} 4',
                            'x_bucket{le="+Inf"} 5', "x_sum 16.500000", "x_count 5"]


class CountingPredictor:
    """Stands in for predict.Predictor: records each forward pass; 'probability' = len(text)."""
    needs_pairs = False

    def __init__(self):
        self.calls = []

    def __call__(self, texts, pairs=None):
        self.calls.append((list(texts), pairs))
        return np.array([[len(t)] for t in texts])

    def describe(self, out):
        return [{"n": int(row[0])} for row in out]


def test_concurrent_requests_share_forward_passes_and_get_their_own_rows():
    async def scenario():
        fake = CountingPredictor()
        batcher = MicroBatcher(fake, max_batch=5, max_wait_s=0.5, metrics=Metrics())
        requests = [["a"], ["bb", "ccc"], ["dddd"], ["e", "ff", "ggg"], ["h"]]
        pending = [asyncio.ensure_future(batcher.predict(r, None)) for r in requests]
        pairs = asyncio.ensure_future(batcher.predict(["x"], ["y"]))     # never mixed with single texts
        await asyncio.sleep(0)                                         # all queued before the batcher starts
        batcher.start()
        answers = await asyncio.gather(*pending, pairs)
        await batcher.stop()
        return fake.calls, answers, requests, batcher.metrics

    calls, answers, requests, metrics = asyncio.run(scenario())
    for req, rows in zip(requests, answers):
        assert rows == [{"n": len(t)} for t in req]
    assert [c[0] for c in calls] == [["a", "bb", "ccc", "dddd"], ["e", "ff", "ggg", "h"], ["x"]]   # 4 + 4 + 1 texts
    assert calls[2][1] == ["y"] and metrics.batch.count == 3 and metrics.batch.sum == 9


# -----------------------------------------------------------------------------------------------------
# reliability: no request can fail another's, every bad input a clear error, stopping at any moment


@pytest.fixture(scope="module")
def private_server(toy, tmp_path_factory):
    """Logs the texts, but masked; /metrics and the details of /healthz need the token."""
    tmp = tmp_path_factory.mktemp("private")
    (tmp / "token").write_text(TOKEN + "\n")
    s = Server(tmp, toy["dir"], "--token-file", tmp / "token", "--log-text", "--redact", "--protect-metrics",
               "--max-wait-ms", 20)
    yield s
    s.stop()


def wait_for_log(server, predicate, tries=100):
    """The log records once one satisfies `predicate` (a line is written just after its answer)."""
    for _ in range(tries):
        records = server.log()
        if any(map(predicate, records)):
            return records
        time.sleep(0.05)
    raise AssertionError(f"no such log line in {server.log_path}")


def test_texts_that_cannot_be_encoded_and_hostile_json_are_a_422_and_fail_no_one_else(private_server, toy):
    s, texts = private_server, toy["texts"][:10]
    probs = dict(zip(texts, expected_rows(toy, texts)))
    bad = [(b'{"texts": ["a film \\ud800"]}', "texts[0] holds a lone surrogate U+D800 at character 7"),
           (b'{"texts": ["a"], "pairs": ["\\udfff"]}', "pairs[0] holds a lone surrogate U+DFFF"),
           (b'{"texts": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nests JSON too deeply"),
           (b'{"texts": [' + b"7" * 5000 + b"]}", "number too long to read")]

    def normal(i):                             # 10 clients, 3 requests each, in flight with the bad ones
        return [(texts[i], s.request("/predict", {"texts": [texts[i]]})) for _ in range(3)]

    with ThreadPoolExecutor(14) as pool:
        good = pool.map(normal, range(10))
        answers = list(pool.map(lambda b: s.request("/predict", raw=b[0]), bad))
    for (_, message), (status, body) in zip(bad, answers):
        assert status == 422 and message in body["error"], (status, body)
    good = [a for part in good for a in part]
    assert len(good) == 30 and all(status == 200 for _, (status, _) in good)
    for text, (_, body) in good:
        assert_matches(body["predictions"], probs[text][None])
    records = wait_for_log(s, lambda r: r.get("status") == 422)
    assert sum(r.get("status") == 422 for r in records) == 4 and s.proc.poll() is None


def test_log_text_with_redact_masks_personal_data_in_the_log(private_server):
    s = private_server
    text = "write to jo.doe@example.com or +1 (555) 123-4567; card 4111 1111 1111 1111, see https://x.org/me"
    assert s.request("/predict", {"texts": [text, "naïve — ünïcode ✓"]})[0] == 200
    records = wait_for_log(s, lambda r: r.get("texts", [])[1:] == ["naïve — ünïcode ✓"])
    assert [r["texts"] for r in records if r.get("n_texts") == 2][-1] == \
        ["write to [EMAIL] or [PHONE]; card [CARD], see [URL]", "naïve — ünïcode ✓"]
    for line in s.log_path.read_text().splitlines():
        record = json.loads(line)
        for clock in ("time", "latency_ms"):   # readings whose digits may hold "555" by chance, never the text
            record.pop(clock, None)
        for secret in ("jo.doe", "555", "4111", "x.org"):
            assert secret not in json.dumps(record, ensure_ascii=False), record


def test_protect_metrics_needs_the_token_for_metrics_and_for_the_details_of_healthz(private_server):
    s = private_server
    status, body = s.request("/metrics", token=None)
    assert status == 401 and "--protect-metrics" in body["error"]
    status, text = s.request("/metrics")
    assert status == 200 and "plainbert_model_loaded 1" in text
    assert s.request("/healthz", token=None) == (200, {"status": "ok"})             # enough for a probe
    assert s.request("/healthz") == (200, {"status": "ok", "task": "binary", "labels": ["0", "1"]})


def test_protect_metrics_without_a_token_refuses_to_start(toy):
    env = {k: v for k, v in os.environ.items() if k != "PLAINBERT_TOKEN"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "serve.py"), toy["dir"], "--insecure", "--protect-metrics"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr == "error: --protect-metrics needs a token (PLAINBERT_TOKEN or " \
        "--token-file), not --insecure\n"


def test_sigterm_right_after_the_listening_line_stops_the_server(toy, tmp_path):
    """The window between the 'listening' line and uvicorn's own handlers: a signal there must stop it too."""
    for attempt in range(3):
        log_path = tmp_path / f"serve{attempt}.log"
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), toy["dir"], "--insecure",
                                     "--port", "0"], stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env=os.environ | {"OMP_NUM_THREADS": "1"})
            for _ in range(60_000):                                    # at most ~2 minutes to start
                if '"listening"' in log_path.read_text() or proc.poll() is not None:
                    break
                time.sleep(0.002)
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise AssertionError(f"attempt {attempt}: SIGTERM just after 'listening' did not stop the server")
        assert code == 0 and json.loads(log_path.read_text().splitlines()[-1])["event"] == "stopped"


class InProcessServer(Server):
    """create_app served by uvicorn in a thread of this process, on 127.0.0.1: for predictors that fail
    on purpose, which a model folder cannot do."""

    def __init__(self, predictor, **options):
        import uvicorn
        from serve import create_app, listen
        sock = listen("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        app = create_app(predictor, TOKEN, Limits(), **options)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        for _ in range(600):
            if self.server.started:
                break
            time.sleep(0.05)
        assert self.server.started

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()


class Sabotaged:
    """A real Predictor that raises on texts holding `poison`, or gives NaN everywhere; records each pass."""

    def __init__(self, inner, poison=None, nan=False):
        self.inner, self.poison, self.nan, self.calls = inner, poison, nan, []

    def __call__(self, texts, pairs=None):
        self.calls.append(list(texts))
        if self.poison and any(self.poison in t for t in texts):
            raise RuntimeError("the tokenizer failed")
        out = self.inner(texts, pairs)
        return np.full_like(out, np.nan) if self.nan else out

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def predictor(toy):
    from predict import Predictor
    return Predictor([toy["dir"]])


def test_a_request_that_fails_in_the_model_fails_alone(predictor, toy):
    sabotaged = Sabotaged(predictor, poison="POISON")
    s = InProcessServer(sabotaged, max_wait_ms=100)                  # long enough for batches to mix
    texts = toy["texts"][:10]
    probs = dict(zip(texts, expected_rows(toy, texts)))
    try:
        with ThreadPoolExecutor(11) as pool:
            poisoned = pool.submit(lambda: [s.request("/predict", {"texts": ["POISON pill"]}) for _ in range(3)])
            good = [a for part in pool.map(lambda i: [s.request("/predict", {"texts": [texts[i]]}) for _ in range(3)],
                                           range(10)) for a in part]
            poisoned = poisoned.result()
        assert [status for status, _ in poisoned] == [500] * 3
        assert all(body == {"error": "internal error while predicting"} for _, body in poisoned)
        assert len(good) == 30 and all(status == 200 for status, _ in good)
        for i, (_, body) in enumerate(good):
            assert_matches(body["predictions"], probs[texts[i // 3]][None])
        assert any(len(c) > 1 and "POISON pill" in c for c in sabotaged.calls)    # it did share a batch
        assert s.request("/healthz")[0] == 200 and s.metrics()["plainbert_model_loaded"] == 1
    finally:
        s.stop()


def test_healthz_says_unavailable_when_the_model_gives_nan(predictor):
    s = InProcessServer(Sabotaged(predictor, nan=True))
    try:
        status, body = s.request("/healthz")
        assert status == 503 and body["status"] == "unavailable" and "non-finite outputs" in body["error"]
        assert s.metrics()["plainbert_model_loaded"] == 0
        assert s.request("/predict", {"texts": ["a film"]})[0] == 500
    finally:
        s.stop()


def test_redact_inputs_masks_the_texts_before_the_model(predictor):
    seen = Sabotaged(predictor)
    s = InProcessServer(seen, redact_inputs=True)
    try:
        assert s.request("/predict", {"texts": ["mail jo@example.com now"]})[0] == 200
        assert ["mail [EMAIL] now"] in seen.calls and not any("jo@" in t for c in seen.calls for t in c)
    finally:
        s.stop()


def test_a_log_line_never_raises(monkeypatch, capsys):
    import io
    from serve import log
    ascii_out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")          # strict: no surrogate, no é
    monkeypatch.setattr(sys, "stdout", ascii_out)
    log({"texts": ["caf\u00e9 \ud800"], "n": 1})
    ascii_out.seek(0)
    assert json.loads(ascii_out.read())["texts"] == ["caf\u00e9 \ud800"]
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stdout", closed)
    log({"event": "x"})                                                 # a closed stdout: a note on stderr
    assert "cannot write a log line" in capsys.readouterr().err


def test_a_failing_batch_is_retried_request_by_request():
    class FailsOn(CountingPredictor):
        def __call__(self, texts, pairs=None):
            if "bad" in texts:
                self.calls.append((list(texts), pairs))
                raise ValueError("cannot encode")
            return super().__call__(texts, pairs)

    async def scenario():
        fake = FailsOn()
        batcher = MicroBatcher(fake, max_batch=8, max_wait_s=0.5, metrics=Metrics())
        pending = [asyncio.ensure_future(batcher.predict(r, None)) for r in (["a"], ["bad"], ["cc", "d"])]
        await asyncio.sleep(0)
        batcher.start()
        answers = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 60)
        await batcher.stop()
        return fake.calls, answers, batcher

    calls, answers, batcher = asyncio.run(scenario())
    assert answers[0] == [{"n": 1}] and answers[2] == [{"n": 2}, {"n": 1}]
    assert isinstance(answers[1], ValueError) and str(answers[1]) == "cannot encode"
    # one shared pass, then each request alone, then a probe (which passes: the model is fine)
    assert [texts for texts, _ in calls] == [["a", "bad", "cc", "d"], ["a"], ["bad"], ["health check"], ["cc", "d"]]
    assert batcher.problem is None and batcher.metrics.model_loaded == 1
