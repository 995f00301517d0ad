"""Benchmark: the evaluation harness's throughput.

1. Endpoint: ``harness.run`` with the OpenAI-compatible chat client vs posting the same prompts to the
   same endpoint directly (a thread pool of ``requests`` calls), same concurrency, in one run,
   interleaved. The endpoint is a local chat-completions server answering after a fixed latency (a
   stand-in for a model server; what is measured is the harness's overhead). Goal: >= 0.9x.
2. Local model: the built-in suites' prompts (``builtin_suites.load()``) answered by a local Hugging Face
   model (the Llama demo model by default, ``tiny_lm.build_base``), three ways, same model directory,
   same batches (each suite's prompts, ``--local-batch`` at a time, as ``harness.run`` sends them), same
   ``--max-new-tokens``, greedy, interleaved after one warm-up round:

   - ``harness.run`` + ``CallableClient(LocalModel.generate)``: the whole local evaluation path (chat
     template through ``PromptCodec``, left padding, generation, decoding, refusal detection, result rows);
   - ``LocalModel.generate`` alone;
   - plain transformers, written here: ``AutoTokenizer`` (left padding), ``apply_chat_template``,
     ``tokenizer(..., padding=True)``, ``model.generate(do_sample=False)``, ``batch_decode`` of the new
     tokens without special tokens.

   Checks the answers are the same prompt for prompt and reports prompts/s. Goal: harness / plain >= 0.9.

    .venv/bin/python bench/eval.py [--prompts N] [--concurrency N] [--latency-ms MS] [--no-local]
        [--model-arch gpt2|llama] [--local-rounds N] [--local-batch N] [--max-new-tokens N] [--base-dir DIR]
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
from contextlib import nullcontext
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import result  # noqa: E402

GOAL = 0.9
LOCAL = ("harness.run + LocalModel", "LocalModel.generate", "plain transformers")


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


def plain_generate(tokenizer: Any, model: Any, batches: list[list[str]], max_new_tokens: int) -> list[str]:
    """What a user of transformers would write: no project code."""
    import torch

    answers: list[str] = []
    with torch.no_grad():
        for prompts in batches:
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                   tokenize=False) for p in prompts]
            enc = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
            out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens)
            answers.extend(tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers


def bench_local(arch: str, rounds: int, batch: int, max_new_tokens: int,
                base_dir: Path | None) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from airflow_finetune_gov.evaluation import builtin_suites, harness
    from airflow_finetune_gov.tuning import causal_lm, tiny_lm

    suites = builtin_suites.load()
    batches = [[i.prompt for i in s.items[k:k + batch]] for s in suites for k in range(0, len(s.items), batch)]
    n = sum(len(b) for b in batches)
    with nullcontext(str(base_dir)) if base_dir else tempfile.TemporaryDirectory(prefix="fgov-bench-eval-") as tmp:
        model_dir = Path(tmp)
        build = None
        if not (model_dir / "config.json").exists():
            t = time.perf_counter()
            tiny_lm.build_base(model_dir, architecture=arch)
            build = time.perf_counter() - t
        ours = causal_lm.LocalModel(model_dir, max_new_tokens=max_new_tokens, batch_size=batch)
        if ours.model.config.model_type != arch:
            raise SystemExit(f"{model_dir} holds a {ours.model.config.model_type} model, not {arch}")
        client = harness.CallableClient(ours.generate, name="local")
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
        plain_model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()

        def run_harness() -> list[str]:
            return [r["response"] for r in harness.run(suites, client, batch=batch)]

        def run_generate() -> list[str]:
            return [a for s in suites for a in ours.generate([i.prompt for i in s.items], batch_size=batch)]

        def run_plain() -> list[str]:
            return plain_generate(tokenizer, plain_model, batches, max_new_tokens)

        fns = dict(zip(LOCAL, (run_harness, run_generate, run_plain), strict=True))
        speed: dict[str, list[float]] = {k: [] for k in LOCAL}
        answers: dict[str, list[str]] = {}
        for r in range(rounds + 1):  # round 0 is the warm-up
            for label in LOCAL[r % 3:] + LOCAL[:r % 3]:  # rotate the order, so no side always goes first
                t = time.perf_counter()
                answers[label] = fns[label]()
                if r:
                    speed[label].append(n / (time.perf_counter() - t))
        # The base asked once: harness.run through CachedClient, first with nothing kept, then again
        with tempfile.TemporaryDirectory(prefix="fgov-bench-kept-") as kept_dir:
            kept_times, kept_answers = [], []
            for _ in range(2):
                cached = harness.CachedClient(client, Path(kept_dir))
                t = time.perf_counter()
                kept_answers.append([r["response"] for r in harness.run(suites, cached, batch=batch)])
                kept_times.append(time.perf_counter() - t)
            kept = {"cold": kept_times[0], "warm": kept_times[1], "hits": cached.hits,
                    "same": kept_answers[0] == kept_answers[1]}
    plain = answers[LOCAL[2]]
    mismatches = {label: [(k, a, b) for k, (a, b) in enumerate(zip(answers[label], plain, strict=True)) if a != b]
                  for label in LOCAL[:2]}
    prompts = [p for b in batches for p in b]
    return {"n": n, "batches": len(batches), "build": build, "speed": speed, "mismatches": mismatches,
            "prompts": prompts, "distinct": len(set(plain)), "kept": kept, "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in plain_model.parameters())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--no-local", action="store_true")
    parser.add_argument("--model-arch", choices=("gpt2", "llama"), default="llama", help="the local demo model")
    parser.add_argument("--local-rounds", type=int, default=10, help="measured rounds of each local side")
    parser.add_argument("--local-batch", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--base-dir", type=Path, default=None,
                        help="the local model's directory: built there if empty, reused if built (default: a "
                             "temporary directory, built every run)")
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
        lo = bench_local(args.model_arch, args.local_rounds, args.local_batch, args.max_new_tokens, args.base_dir)
        build = f", built in {lo['build']:.1f} s" if lo["build"] is not None else f" from {args.base_dir}"
        print(f"local {args.model_arch} demo model ({lo['params']:,} parameters{build}), built-in suites: "
              f"{lo['n']} prompts in {lo['batches']} batches of <= {args.local_batch}, max_new_tokens "
              f"{args.max_new_tokens}, torch threads {lo['threads']}, median of {args.local_rounds} (+1 warm-up):")
        med = {k: statistics.median(v) for k, v in lo["speed"].items()}
        for label in LOCAL:
            print(f"  {label:<26}  {med[label]:8.1f} prompts/s")
        print(f"  answers: {lo['distinct']} distinct among {lo['n']}")
        for label, bad in lo["mismatches"].items():
            print(f"  same answers as plain, {label}: {lo['n'] - len(bad)}/{lo['n']}")
            for k, a, b in bad[:3]:
                print(f"    prompt {k} {lo['prompts'][k]!r}:\n      ours  {a!r}\n      plain {b!r}")
        plain = med[LOCAL[2]]
        ratios = {k: med[k] / plain for k in LOCAL[:2]}
        print(f"  ratio harness/plain {ratios[LOCAL[0]]:.2f}, generate/plain {ratios[LOCAL[1]]:.2f}; "
              f"goal harness/plain >= {GOAL}: {'PASS' if ratios[LOCAL[0]] >= GOAL else 'MISS'}")
        result(f"local eval: harness.run + LocalModel vs plain transformers generate ({args.model_arch} demo, "
               f"{lo['n']} prompts, batch {args.local_batch}, {args.max_new_tokens} new tokens)",
               baseline=plain, ours=med[LOCAL[0]], unit="prompts/s", goal=f"ratio >= {GOAL}",
               met=ratios[LOCAL[0]] >= GOAL and not any(lo["mismatches"].values()), tag="P2")
        kept = lo["kept"]
        print(f"  the base's answers kept (CachedClient): first evaluation {kept['cold']:.2f} s, the next "
              f"{kept['warm']:.3f} s ({kept['hits']} of {lo['n']} kept, same answers: {kept['same']})")
        result(f"baseline side of a local evaluation, answers kept from the last one vs asked ({args.model_arch} demo, "
               f"{lo['n']} prompts)", baseline=kept["cold"], ours=kept["warm"], unit="s", goal="ratio <= 0.1",
               met=kept["warm"] <= 0.1 * kept["cold"] and kept["same"] and kept["hits"] == lo["n"], tag="P2")
    return 0


if __name__ == "__main__":
    sys.exit(main())
