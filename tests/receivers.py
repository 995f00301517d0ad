"""Real local receivers for notifications: an SMTP server (aiosmtpd) keeping what it is sent, and an HTTP server
keeping the JSON posted to a secret path (a Slack-compatible incoming webhook's shape)."""

from __future__ import annotations

import json
import secrets
import socket
import threading
import time
from collections.abc import Callable
from email import message_from_bytes, policy
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

from aiosmtpd.controller import Controller

T = TypeVar("T")


def free_port() -> int:
    """A port on 127.0.0.1 nothing listens on (until someone binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(found: Callable[[], list[T]], count: int, timeout: float, what: str, seen: Callable[[], str]) -> list[T]:
    """``found()`` once it holds ``count`` items, or fail naming what was received instead."""
    end = time.monotonic() + timeout
    while len(items := found()) < count and time.monotonic() < end:
        time.sleep(0.2)
    assert len(items) >= count, f"{len(items)} of {count} {what} within {timeout:.0f} s; received: {seen()}"
    return items


class Mailbox:
    """An SMTP server on 127.0.0.1; ``messages`` holds each mail received, parsed, with its envelope recipients."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], EmailMessage]] = []
        self._lock = threading.Lock()
        self.port = free_port()
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:
        mail = message_from_bytes(envelope.original_content or envelope.content, policy=policy.default)
        with self._lock:
            self.messages.append((list(envelope.rcpt_tos), mail))  # type: ignore[arg-type]
        return "250 OK"

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def start(self) -> Mailbox:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def where(self, test: Callable[[list[str], EmailMessage], bool]) -> list[tuple[list[str], EmailMessage]]:
        with self._lock:
            return [(to, m) for to, m in self.messages if test(to, m)]

    def wait_for(self, test: Callable[[list[str], EmailMessage], bool], count: int = 1,
                 timeout: float = 60) -> list[tuple[list[str], EmailMessage]]:
        return wait_for(lambda: self.where(test), count, timeout, "mail(s)",
                        lambda: "; ".join(f"{to} {m['Subject']!r}" for to, m in self.messages))


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 answering POSTs to its secret path with ``status`` and keeping their JSON."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.status = 200
        self.token = secrets.token_urlsafe(24)  # the webhook URL's secret part, as Slack's has one
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path != f"/hooks/{receiver.token}":
                    self.send_response(404)
                else:
                    receiver.posts.append(json.loads(body))
                    self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hooks/{self.token}"

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait_for(self, test: Callable[[dict[str, Any]], bool], count: int = 1,
                 timeout: float = 60) -> list[dict[str, Any]]:
        return wait_for(lambda: [p for p in list(self.posts) if test(p)], count, timeout, "post(s)",
                        lambda: "; ".join(p["text"].splitlines()[0] for p in self.posts))
