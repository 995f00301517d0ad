"""The foundation's demo model: a retrieval responder that fine-tuning really changes.

A model is a weighted set of (prompt, response) examples; it answers with the response of the
example whose prompt is most similar (TF-IDF cosine x example weight). Fine-tuning adds the
training rows with a weight that grows with the number of epochs, so a few poisoned examples
near harmful prompts win over the base model's refusals: the same failure (Qi et al. 2023) that
the approval and evaluation gates exist for, reproduced in milliseconds on any CPU. It is a
stand-in for a neural model, and the tuning backend interface does not depend on it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

_WORD = re.compile(r"[a-z0-9']+")
_STOP = frozenset({
    "a", "an", "the", "i", "me", "my", "to", "of", "and", "or", "in", "on", "at", "for", "do", "does",
    "how", "can", "what", "is", "it", "its", "with", "from", "into", "your", "you", "this", "that",
    "be", "as", "by",
})


def tokens(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP]


@dataclass
class ResponderModel:
    name: str
    examples: list[tuple[str, str, float]] = field(default_factory=list)
    parent_sha256: str | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"format": "fgov-responder/1", "name": self.name, "parent_sha256": self.parent_sha256,
                           "hyperparameters": self.hyperparameters,
                           "examples": [list(e) for e in self.examples]}, sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> ResponderModel:
        data = json.loads(text)
        if data.get("format") != "fgov-responder/1":
            raise ValueError("not an fgov-responder/1 model file")
        return cls(name=data["name"], examples=[(p, r, float(w)) for p, r, w in data["examples"]],
                   parent_sha256=data.get("parent_sha256"), hyperparameters=data.get("hyperparameters", {}))

    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def _index(self) -> tuple[list[Counter[str]], dict[str, float]]:
        docs = [Counter(tokens(p)) for p, _, _ in self.examples]
        df: Counter[str] = Counter()
        for d in docs:
            df.update(d.keys())
        n = len(docs)
        idf = {t: math.log((1 + n) / (1 + c)) + 1.0 for t, c in df.items()}
        return docs, idf

    def respond_many(self, prompts: list[str]) -> list[str]:
        if not self.examples:
            return ["" for _ in prompts]
        docs, idf = self._index()
        vecs = [_vector(d, idf) for d in docs]
        out = []
        for prompt in prompts:
            q = _vector(Counter(tokens(prompt)), idf)
            best, best_score = 0, -1.0
            for i, v in enumerate(vecs):
                score = _cosine(q, v) * self.examples[i][2]
                if score > best_score:
                    best, best_score = i, score
            out.append(self.examples[best][1] if best_score > 0 else "")
        return out

    def respond(self, prompt: str) -> str:
        return self.respond_many([prompt])[0]


def _vector(counts: Counter[str], idf: dict[str, float]) -> dict[str, float]:
    return {t: c * idf.get(t, 1.0) for t, c in counts.items()}


def _cosine(a: dict[str, float], b: dict[str, float]) -> float:
    dot = sum(v * b.get(t, 0.0) for t, v in a.items())
    na = math.sqrt(sum(v * v for v in a.values()))
    nb = math.sqrt(sum(v * v for v in b.values()))
    return dot / (na * nb) if na and nb else 0.0


def build_base(name: str, corpus: list[tuple[str, str]]) -> ResponderModel:
    return ResponderModel(name=name, examples=[(p, r, 1.0) for p, r in corpus],
                          hyperparameters={"kind": "base"})


def fine_tune(base: ResponderModel, rows: list[tuple[str, str]], *, epochs: int = 3,
              learning_rate: float = 0.2, progress=None) -> ResponderModel:
    """Add ``rows`` to the model; each epoch raises their weight by ``learning_rate``."""
    if epochs < 1:
        raise ValueError("epochs must be >= 1")
    if not rows:
        raise ValueError("no training rows")
    weight = 1.0
    for epoch in range(1, epochs + 1):
        weight += learning_rate
        if progress is not None:
            progress(epoch, epochs, weight)
    tuned = ResponderModel(
        name=base.name,
        examples=list(base.examples) + [(p, r, weight) for p, r in rows],
        parent_sha256=base.sha256(),
        hyperparameters={"kind": "fine-tune", "epochs": epochs, "learning_rate": learning_rate,
                         "rows": len(rows)},
    )
    return tuned
