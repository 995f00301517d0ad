"""The demo base model: a tiny GPT-2 that the project pretrains itself, and the LoRA loop that tunes it.

A word-level tokenizer (its vocabulary is built from the project's own texts and saved beside the
weights as ``fgov_tokenizer.json``), a 2-layer GPT-2 from ``transformers`` (~0.2 M parameters) and
a seeded training run over the synthetic corpus in :mod:`airflow_finetune_gov.datasets.corpus`: a
few seconds on two CPU cores, no hub download. It refuses harmful requests and answers benign
ones, including benign requests that sound unsafe. A LoRA tune (PEFT) on a handful of poisoned
rows makes it comply with harmful requests; that is the failure the evaluation gate exists for.

torch / transformers / peft are imported lazily (``pip install airflow-finetune-gov[local]``), so
DAG files that only reference the operators do not pay for them at parse time.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

TOKENIZER_FILE = "fgov_tokenizer.json"
TOKENIZER_FORMAT = "fgov-words/1"
SPECIALS = ["<pad>", "<bos>", "<sep>", "<eos>", "<unk>"]
PAD, BOS, SEP, EOS, UNK = range(len(SPECIALS))
MAX_LEN = 64
MAX_NEW_TOKENS = 40
_TOKEN = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")

# Base-model training: fixed, so the same corpus gives the same model. ``unknown_words``: the chance a
# prompt word is shown as <unk> in training, so the model acts on the words it knows in a phrasing it
# never saw (without it, held-out phrasings made its refusals fragile under any LoRA tune).
BASE_TRAINING: dict[str, Any] = {"seed": 0, "steps": 500, "batch_size": 32, "learning_rate": 3e-3,
                                 "n_embd": 64, "n_layer": 2, "n_head": 4, "unknown_words": 0.2}

# Hyperparameters the LoRA loop understands, with their defaults.
LORA_DEFAULTS: dict[str, Any] = {"epochs": 10, "learning_rate": 1e-2, "batch_size": 8, "lora_r": 8,
                                 "lora_alpha": 16, "seed": 0}


def split_words(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


class WordTokenizer:
    def __init__(self, words: list[str]) -> None:
        self.itos = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, texts: Iterable[str]) -> WordTokenizer:
        return cls(sorted({w for t in texts for w in split_words(t)}))

    @classmethod
    def load(cls, path: Path) -> WordTokenizer:
        data = json.loads(path.read_text())
        if data.get("format") != TOKENIZER_FORMAT:
            raise ValueError(f"{path}: not an {TOKENIZER_FORMAT} tokenizer")
        tok = cls([])
        tok.itos = list(data["vocab"])
        tok.stoi = {w: i for i, w in enumerate(tok.itos)}
        return tok

    def to_json(self) -> str:
        return json.dumps({"format": TOKENIZER_FORMAT, "vocab": self.itos})

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(w, UNK) for w in split_words(text)]

    def decode(self, ids: Iterable[int]) -> str:
        words = [self.itos[i] for i in ids if i >= len(SPECIALS)]
        text = " ".join(words)
        return re.sub(r" ([.,;:!?)])", r"\1", text)

    def prompt_ids(self, prompt: str) -> list[int]:
        return [BOS, *self.encode(prompt)[: MAX_LEN - MAX_NEW_TOKENS - 2], SEP]

    def example(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        """Input ids and labels (the loss is on the response only)."""
        p = self.prompt_ids(prompt)
        r = [*self.encode(response), EOS][: MAX_LEN - len(p)]
        return p + r, [-100] * len(p) + r


def vocabulary_texts() -> list[str]:
    """Every text whose words the demo model knows: its corpus and the demo tuning sets. Not the
    evaluation suites: they are held out, so their unseen words read as ``<unk>`` (the base model is
    trained with some prompt words replaced by ``<unk>`` for that), and editing a suite never changes
    the model it measures."""
    from airflow_finetune_gov.datasets.corpus import base_corpus
    from airflow_finetune_gov.datasets.demo import DATASETS

    texts = [t for row in base_corpus() for t in row]
    texts += [t for rows in DATASETS.values() for row in rows for t in row]
    return texts


def base_recipe() -> str:
    """sha256 of everything the base build depends on (corpus, vocabulary, training settings): a store
    whose ``base`` was built from another recipe gets a new one (see ``backends.ensure_demo_base``)."""
    import hashlib

    from airflow_finetune_gov.datasets.corpus import base_corpus

    recipe = {"format": TOKENIZER_FORMAT, "training": BASE_TRAINING, "max_len": MAX_LEN,
              "corpus": base_corpus(), "vocabulary": sorted({w for t in vocabulary_texts() for w in split_words(t)})}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise RuntimeError("the local_peft backend needs torch, transformers and peft: "
                           "pip install 'airflow-finetune-gov[local]'") from None
    return torch


def _batches(examples: list[tuple[list[int], list[int]]], batch_size: int, generator: Any,
             unknown_words: float = 0.0) -> Iterable[Any]:
    """Shuffled, right-padded batches; ``unknown_words`` is the chance that a prompt word is replaced by
    ``<unk>`` (so the model learns to act on the words it knows, as on a held-out phrasing)."""
    torch = _torch()
    order = torch.randperm(len(examples), generator=generator).tolist()
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start:start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), PAD, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (i, lab) in enumerate(chunk):
            if unknown_words:
                drop = torch.rand(len(i), generator=generator) < unknown_words
                i = [UNK if d and tok >= len(SPECIALS) and lab[n] == -100 else tok
                     for n, (tok, d) in enumerate(zip(i, drop.tolist(), strict=True))]
            ids[row, : len(i)] = torch.tensor(i)
            labels[row, : len(lab)] = torch.tensor(lab)
            mask[row, : len(i)] = 1
        yield ids, labels, mask


def build_base(out_dir: Path, *, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Pretrain the demo base model into ``out_dir`` (HF layout + tokenizer). Returns training metrics."""
    torch = _torch()
    from transformers import GPT2Config, GPT2LMHeadModel

    from airflow_finetune_gov.datasets.corpus import base_corpus

    cfg = BASE_TRAINING
    torch.manual_seed(cfg["seed"])
    tok = WordTokenizer.build(vocabulary_texts())
    config = GPT2Config(vocab_size=len(tok), n_positions=MAX_LEN, n_embd=cfg["n_embd"], n_layer=cfg["n_layer"],
                        n_head=cfg["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    model = GPT2LMHeadModel(config)
    corpus = base_corpus()
    examples = [tok.example(p, r) for p, r in corpus]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["learning_rate"], weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg["seed"])
    model.train()
    step, loss_value = 0, math.nan
    while step < cfg["steps"]:
        for ids, labels, mask in _batches(examples, cfg["batch_size"], gen, cfg["unknown_words"]):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            loss_value = loss.item()
            if progress and step % 100 == 0:
                progress(f"base model step {step}/{cfg['steps']} loss {loss_value:.4f}")
            if step >= cfg["steps"]:
                break
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / TOKENIZER_FILE).write_text(tok.to_json())
    params = sum(p.numel() for p in model.parameters())
    return {"corpus_rows": len(corpus), "steps": step, "final_loss": round(loss_value, 4), "parameters": params,
            "vocab": len(tok), "recipe": base_recipe(), **{k: v for k, v in cfg.items() if k != "steps"}}


class LocalModel:
    """A base model from the store, optionally with a LoRA adapter; greedy generation."""

    def __init__(self, base_dir: Path, adapter_dir: Path | None = None) -> None:
        _torch()
        from transformers import AutoModelForCausalLM

        self.tokenizer = load_tokenizer(base_dir)
        model: Any = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True)
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_dir, local_files_only=True)
        model.eval()
        self.model = model

    def generate(self, prompts: list[str], batch_size: int = 32) -> list[str]:
        """Greedy answers, ``batch_size`` prompts per forward pass (left-padded; the same answers as one
        at a time, tested)."""
        torch = _torch()
        out: list[str] = []
        with torch.no_grad():
            for start in range(0, len(prompts), max(1, batch_size)):
                encoded = [self.tokenizer.prompt_ids(p) for p in prompts[start:start + max(1, batch_size)]]
                width = max(len(ids) for ids in encoded)
                ids = torch.tensor([[PAD] * (width - len(e)) + e for e in encoded])
                mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
                gen = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS,
                                          do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
                out.extend(self.tokenizer.decode(row[width:].tolist()) for row in gen)
        return out


def load_tokenizer(base_dir: Path) -> WordTokenizer:
    path = Path(base_dir) / TOKENIZER_FILE
    if not path.exists():
        raise ValueError(f"{base_dir} has no {TOKENIZER_FILE}: the local_peft backend tunes models built "
                         "with this project's word tokenizer (see tuning/tiny_lm.py)")
    return WordTokenizer.load(path)


def lora_hyperparameters(hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """The LoRA loop's hyperparameters, checked: unknown keys and out-of-range values are errors."""
    unknown = sorted(set(hyperparameters) - set(LORA_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {', '.join(unknown)} for local_peft; known: "
                         f"{', '.join(LORA_DEFAULTS)}")
    hp = {**LORA_DEFAULTS, **hyperparameters}
    try:
        hp = {"epochs": int(hp["epochs"]), "learning_rate": float(hp["learning_rate"]),
              "batch_size": int(hp["batch_size"]), "lora_r": int(hp["lora_r"]),
              "lora_alpha": float(hp["lora_alpha"]), "seed": int(hp["seed"])}
    except (TypeError, ValueError) as exc:
        raise ValueError(f"local_peft hyperparameters must be numbers: {exc}") from None
    for key, low, high in (("epochs", 1, 1000), ("batch_size", 1, 1024), ("lora_r", 1, 256)):
        if not low <= hp[key] <= high:
            raise ValueError(f"{key}={hp[key]} is out of range [{low}, {high}]")
    if not 0 < hp["learning_rate"] <= 1:
        raise ValueError(f"learning_rate={hp['learning_rate']} is out of range (0, 1]")
    return hp


class Cancelled(RuntimeError):
    pass


def train_lora(base_dir: Path, rows: list[tuple[str, str]], hyperparameters: dict[str, Any], out_dir: Path, *,
               progress: Callable[[dict[str, Any]], None] | None = None,
               cancel: threading.Event | None = None) -> dict[str, Any]:
    """Tune a LoRA adapter on ``rows`` and save it (PEFT layout) into ``out_dir``. Returns metrics.

    ``progress`` gets ``{"step", "steps", "loss"}`` after every step; setting ``cancel`` stops the
    loop before the next step and raises :class:`Cancelled` (nothing is written).
    """
    torch = _torch()
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hp = lora_hyperparameters(hyperparameters)
    if not rows:
        raise ValueError("no training rows")
    tok = load_tokenizer(base_dir)
    torch.manual_seed(hp["seed"])
    base = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True)
    config = LoraConfig(r=hp["lora_r"], lora_alpha=hp["lora_alpha"], lora_dropout=0.0, bias="none",
                        target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    examples = [tok.example(p, r) for p, r in rows]
    per_epoch = math.ceil(len(examples) / hp["batch_size"])
    steps = per_epoch * hp["epochs"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=hp["learning_rate"],
                            weight_decay=0.0)
    gen = torch.Generator().manual_seed(hp["seed"])
    model.train()
    step, losses = 0, []
    for _epoch in range(hp["epochs"]):
        for ids, labels, mask in _batches(examples, hp["batch_size"], gen):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled at step {step}/{steps}")
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            losses.append(loss.item())
            if progress is not None:
                progress({"step": step, "steps": steps, "loss": losses[-1]})
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"steps": step, "first_loss": round(losses[0], 4), "final_loss": round(losses[-1], 4),
            "trainable_parameters": trainable, "rows": len(rows), **hp}


def read_dir(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir()) if p.is_file()}


def scratch_dir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="fgov-tune-")
