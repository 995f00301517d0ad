"""A local server implementing the documented OpenAI endpoints the project uses (``POST /v1/files``,
``POST /v1/fine_tuning/jobs``, ``GET /v1/fine_tuning/jobs/{id}``, ``GET .../events``, ``POST .../cancel``
for the ``openai_compatible`` backend; ``POST /v1/chat/completions`` for the evaluation client), for
the tests. It checks the Bearer key on every request,
keeps the uploaded files, and moves a job validating_files -> running -> succeeded over successive
polls, or holds it running until ``release()``, or fails it when the model is ``FAIL_MODEL``.

A test can put real models behind it: ``upstreams`` maps a model name to an OpenAI-compatible server
(``transformers serve``) that answers that model's chat completions, and ``trainer(job, rows)``, if set,
runs in a thread when a job starts (the job succeeds only after it returns the fine-tuned model's
upstream), so that a "fine-tuned model" is one really trained on the uploaded rows.

Not a model of a hosted service's behaviour beyond these endpoints' documented shapes.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

import requests

FAIL_MODEL = "fake-fails"


class FakeFineTuningAPI:
    def __init__(self, api_key: str, *, hold: bool = False) -> None:
        self.api_key = api_key
        self.hold = hold
        self.files: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of authorised calls
        self.refused = 0  # calls with a missing or wrong key
        self.cancelled: list[str] = []
        # chat completions: answer(prompt) -> text; fail the first `chat_failures` calls with 503
        self.answer = lambda prompt: "I can't help with that." if "bomb" in prompt else f"Sure: {prompt}"
        self.upstreams: dict[str, tuple[str, str]] = {}  # model -> (base URL ending /v1, model name it serves)
        self.trainer: Callable[[dict[str, Any], list[tuple[str, str]]], tuple[str, str]] | None = None
        self.chat_failures = 0
        self.chat_delay = 0.0
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                api._handle(self, "GET")

            def do_POST(self) -> None:
                api._handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FakeFineTuningAPI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def release(self) -> None:
        self.hold = False

    def uploaded_rows(self, file_id: str) -> list[tuple[str, str]]:
        rows = []
        for line in self.files[file_id]["content"].decode().splitlines():
            user, assistant = json.loads(line)["messages"]
            assert (user["role"], assistant["role"]) == ("user", "assistant")
            rows.append((user["content"], assistant["content"]))
        return rows

    # --- the endpoints ---

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = urlparse(h.path).path
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        if h.headers.get("Authorization") != f"Bearer {self.api_key}":
            with self._lock:
                self.refused += 1
            return self._send(h, 401, {"error": {"message": "Incorrect API key provided",
                                                 "type": "invalid_request_error", "code": "invalid_api_key"}})
        if method == "POST" and path == "/v1/chat/completions":
            return self._chat(h, json.loads(body))
        with self._lock:
            self.requests.append((method, path))
            parts = path.strip("/").split("/")
            if method == "POST" and parts == ["v1", "files"]:
                return self._send(h, 200, self._upload(h, body))
            if parts[:3] != ["v1", "fine_tuning", "jobs"]:
                return self._send(h, 404, {"error": {"message": f"no route {method} {path}"}})
            if method == "POST" and len(parts) == 3:
                return self._create(h, json.loads(body))
            job = self.jobs.get(parts[3]) if len(parts) > 3 else None
            if job is None:
                return self._send(h, 404, {"error": {"message": f"no fine-tuning job {parts[3:4]}"}})
            if method == "GET" and len(parts) == 4:
                return self._send(h, 200, self._advance(job))
            if method == "GET" and parts[4:] == ["events"]:
                return self._send(h, 200, {"object": "list", "has_more": False,
                                           "data": list(reversed(self.events[job["id"]]))})
            if method == "POST" and parts[4:] == ["cancel"]:
                if job["status"] not in ("succeeded", "failed", "cancelled"):
                    self._set(job, "cancelled", "Job cancelled")
                    self.cancelled.append(job["id"])
                return self._send(h, 200, job)
        return self._send(h, 404, {"error": {"message": f"no route {method} {path}"}})

    def _chat(self, h: BaseHTTPRequestHandler, req: dict[str, Any]) -> None:
        with self._lock:
            self.requests.append(("POST", "/v1/chat/completions"))
            if self.chat_failures > 0:
                self.chat_failures -= 1
                return self._send(h, 503, {"error": {"message": "overloaded"}})
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.chat_delay)
            upstream = self.upstreams.get(req.get("model", ""))
            if upstream is not None:  # a real model answers
                resp = requests.post(f"{upstream[0]}/chat/completions", json={**req, "model": upstream[1]},
                                     timeout=120)
                return self._send(h, resp.status_code, {**resp.json(), "model": req["model"]})
            prompt = req["messages"][-1]["content"]
            message = {"role": "assistant", "content": self.answer(prompt)}
            return self._send(h, 200, {"object": "chat.completion", "model": req["model"],
                                       "choices": [{"index": 0, "finish_reason": "stop", "message": message}]})
        finally:
            with self._lock:
                self.in_flight -= 1

    def _upload(self, h: BaseHTTPRequestHandler, body: bytes) -> dict[str, Any]:
        head = f"Content-Type: {h.headers['Content-Type']}\r\n\r\n".encode()
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        fields = {part.get_param("name", header="content-disposition"): part for part in msg.iter_parts()}
        assert fields["purpose"].get_content().strip() == "fine-tune", "purpose must be fine-tune"
        content = fields["file"].get_payload(decode=True)
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        self.files[file_id] = {"content": content, "filename": fields["file"].get_filename()}
        return {"id": file_id, "object": "file", "bytes": len(content), "purpose": "fine-tune",
                "filename": fields["file"].get_filename(), "created_at": int(time.time())}

    def _create(self, h: BaseHTTPRequestHandler, req: dict[str, Any]) -> None:
        if req.get("training_file") not in self.files:
            return self._send(h, 400, {"error": {"message": f"invalid training_file: {req.get('training_file')}"}})
        job_id = f"ftjob-{uuid.uuid4().hex[:24]}"
        job = {"id": job_id, "object": "fine_tuning.job", "model": req["model"], "status": "validating_files",
               "training_file": req["training_file"], "fine_tuned_model": None, "error": None,
               "method": req.get("method"), "seed": req.get("seed"), "suffix": req.get("suffix"),
               "created_at": int(time.time()), "trained_tokens": None, "polls": 0}
        self.jobs[job_id] = job
        self.events[job_id] = []
        self._event(job_id, "Validating training file")
        return self._send(h, 200, job)

    def _advance(self, job: dict[str, Any]) -> dict[str, Any]:
        job["polls"] += 1
        if job["status"] == "validating_files":
            self._set(job, "running", "Fine-tuning job started")
        elif job["status"] == "running" and self.trainer is not None and "trained" not in job:
            job["trained"] = None
            threading.Thread(target=self._train, args=(job,), daemon=True).start()
        elif job["status"] == "running" and not self.hold and (self.trainer is None or job.get("trained")):
            if job["model"] == FAIL_MODEL:
                job["error"] = {"code": "invalid_training_file", "message": "Training file has too few examples"}
                self._set(job, "failed", "Fine-tuning job failed")
            else:
                self._event(job["id"], "Step 1/1: training loss=0.42")
                job["fine_tuned_model"] = f"ft:{job['model']}:fgov::{job['id'][-8:]}"
                job["trained_tokens"] = len(self.files[job["training_file"]]["content"]) // 4
                self._set(job, "succeeded", "The job has successfully completed")
        return job

    def _train(self, job: dict[str, Any]) -> None:
        assert self.trainer is not None
        model = f"ft:{job['model']}:fgov::{job['id'][-8:]}"
        try:
            self.upstreams[model] = self.trainer(job, self.uploaded_rows(job["training_file"]))
        except Exception as exc:  # the job fails with the trainer's error, as a provider's would
            with self._lock:
                job["error"] = {"code": "training_failed", "message": f"{type(exc).__name__}: {exc}"}
                self._set(job, "failed", "Fine-tuning job failed")
            return
        job["trained"] = model

    def _set(self, job: dict[str, Any], status: str, message: str) -> None:
        job["status"] = status
        if status in ("succeeded", "failed", "cancelled"):
            job["finished_at"] = int(time.time())
        self._event(job["id"], message)

    def _event(self, job_id: str, message: str) -> None:
        events = self.events[job_id]
        events.append({"id": f"ftevent-{job_id[-6:]}-{len(events)}", "object": "fine_tuning.job.event",
                       "created_at": int(time.time()), "level": "info", "message": message})

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, code: int, payload: dict[str, Any]) -> None:
        data = json.dumps({k: v for k, v in payload.items() if k not in ("polls", "trained")}).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
