"""Benchmark: the evaluation harness's throughput.

1. Endpoint: ``harness.run`` with the OpenAI-compatible chat client vs posting the same prompts to the
   same endpoint directly (a thread pool of ``requests`` calls), same concurrency, in one run,
   interleaved. The endpoint is a local chat-completions server answering after a fixed latency (a
   stand-in for a model server; what is measured is the harness's overhead). Goal: >= 0.9x.
2. Local model: prompts/s of the demo model answering a suite one prompt at a time vs batched.

    .venv/bin/python bench/eval.py [--prompts N] [--concurrency N] [--latency-ms MS] [--no-local]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import result  # noqa: E402

GOAL = 0.9


def chat_server(latency: float) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            time.sleep(latency)
            prompt = body["messages"][-1]["content"]
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": f"echo {prompt}"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def direct(url: str, prompts: list[str], concurrency: int) -> list[str]:
    import requests

    def one(session: requests.Session, prompt: str) -> str:
        resp = session.post(f"{url}/chat/completions", json={"model": "m", "messages": [
            {"role": "user", "content": prompt}]}, timeout=60)
        return str(resp.json()["choices"][0]["message"]["content"])

    with requests.Session() as session, ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(lambda p: one(session, p), prompts))


def bench_endpoint(n: int, concurrency: int, latency: float, rounds: int = 5) -> dict[str, list[float]]:
    from airflow_finetune_gov.evaluation.harness import Item, LoadedSuite, OpenAIChatClient, run

    server = chat_server(latency)
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    suite = LoadedSuite("bench", "0" * 64, [Item(f"p{i}", "harmful", f"prompt number {i}", "refuse")
                                             for i in range(n)])
    prompts = [i.prompt for i in suite.items]
    client = OpenAIChatClient(base_url=url, model="m", concurrency=concurrency)
    out: dict[str, list[float]] = {"harness": [], "direct": []}
    for _ in range(rounds):
        t = time.perf_counter()
        rows = run([suite], client, batch=n)
        out["harness"].append(n / (time.perf_counter() - t))
        assert len(rows) == n and rows[0]["response"] == "echo prompt number 0"
        t = time.perf_counter()
        answers = direct(url, prompts, concurrency)
        out["direct"].append(n / (time.perf_counter() - t))
        assert len(answers) == n
    server.shutdown()
    return out


def bench_local(rounds: int = 3) -> tuple[int, dict[str, list[float]]]:
    from airflow_finetune_gov.evaluation import builtin_suites
    from airflow_finetune_gov.tuning import causal_lm, tiny_lm

    prompts = [i.prompt for s in builtin_suites.load() for i in s.items]
    out: dict[str, list[float]] = {"one at a time": [], "batched (64)": []}
    with tempfile.TemporaryDirectory() as tmp:
        tiny_lm.build_base(Path(tmp))
        model = causal_lm.LocalModel(Path(tmp))
        for _ in range(rounds):
            for label, size in (("one at a time", 1), ("batched (64)", 64)):
                t = time.perf_counter()
                model.generate(prompts, batch_size=size)
                out[label].append(len(prompts) / (time.perf_counter() - t))
    return len(prompts), out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--no-local", action="store_true")
    args = parser.parse_args()
    ep = bench_endpoint(args.prompts, args.concurrency, args.latency_ms / 1000)
    harness, plain = statistics.median(ep["harness"]), statistics.median(ep["direct"])
    print(f"endpoint ({args.prompts} prompts, concurrency {args.concurrency}, {args.latency_ms:.0f} ms latency), "
          f"median of {len(ep['harness'])}:")
    print(f"  harness.run + OpenAIChatClient  {harness:8.1f} prompts/s")
    print(f"  direct requests, same pool      {plain:8.1f} prompts/s")
    print(f"  ratio {harness / plain:.2f}; goal >= {GOAL}: {'PASS' if harness / plain >= GOAL else 'MISS'}")
    result(f"eval harness vs direct requests, same endpoint ({args.prompts} prompts, concurrency {args.concurrency})",
           baseline=plain, ours=harness, unit="prompts/s", goal=f"ratio >= {GOAL}", met=harness / plain >= GOAL,
           tag="P2")
    if not args.no_local:
        n, local = bench_local()
        print(f"local demo model ({n} prompts), median of 3:")
        for label, values in local.items():
            print(f"  {label:<30}  {statistics.median(values):8.1f} prompts/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
