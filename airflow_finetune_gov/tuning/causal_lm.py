"""Any Hugging Face causal LM, tuned with LoRA and asked greedily: the code behind ``local_peft``, the
``command`` backend's bundled trainer and the evaluation's local client.

Nothing here knows the demo model. A model directory is what ``save_pretrained`` writes: a config
``AutoModelForCausalLM`` loads and a tokenizer ``AutoTokenizer`` loads. Prompts are rendered with the
tokenizer's chat template (one user message, ``add_generation_prompt=True``); a tokenizer without one
gets the plain format ``{prompt}\\n`` followed by the answer and the end-of-sequence token. Training
uses the same rendering as generation, and the loss is on the answer only.

torch / transformers / peft are imported lazily (``pip install airflow-finetune-gov[local]``), so DAG
files that only reference the operators do not pay for them at parse time.
"""

from __future__ import annotations

import logging
import math
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PLAIN_FORMAT = "{prompt}\n"
MAX_NEW_TOKENS = 64
DTYPES = ("auto", "float32", "bfloat16", "float16")

# Hyperparameters the LoRA loop understands, with their defaults. ``target_modules`` None is PEFT's
# choice for the architecture (GPT-2: c_attn; Llama, Qwen, Mistral: q_proj, v_proj); a list of module
# names or "all-linear" overrides it. ``max_seq_length`` 0 is the model's own limit.
LORA_DEFAULTS: dict[str, Any] = {"epochs": 10, "learning_rate": 1e-2, "batch_size": 8,
                                 "gradient_accumulation_steps": 1, "lora_r": 8, "lora_alpha": 16,
                                 "lora_dropout": 0.0, "target_modules": None, "max_seq_length": 0, "seed": 0,
                                 "dtype": "auto", "device": "auto"}


def torch_module() -> Any:
    try:
        import torch
    except ImportError:
        raise RuntimeError("the local_peft backend and local evaluation need torch, transformers and peft: "
                           "pip install 'airflow-finetune-gov[local]'") from None
    return torch


class Cancelled(RuntimeError):
    pass


def lora_hyperparameters(hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """The LoRA loop's hyperparameters, checked: unknown keys and out-of-range values are errors."""
    unknown = sorted(set(hyperparameters) - set(LORA_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {', '.join(unknown)} for local_peft; known: "
                         f"{', '.join(LORA_DEFAULTS)}")
    hp = {**LORA_DEFAULTS, **hyperparameters}
    try:
        out: dict[str, Any] = {
            "epochs": int(hp["epochs"]), "learning_rate": float(hp["learning_rate"]),
            "batch_size": int(hp["batch_size"]), "gradient_accumulation_steps": int(hp["gradient_accumulation_steps"]),
            "lora_r": int(hp["lora_r"]), "lora_alpha": float(hp["lora_alpha"]),
            "lora_dropout": float(hp["lora_dropout"]), "max_seq_length": int(hp["max_seq_length"]),
            "seed": int(hp["seed"])}
    except (TypeError, ValueError) as exc:
        raise ValueError(f"local_peft hyperparameters must be numbers: {exc}") from None
    for key, low, high in (("epochs", 1, 1000), ("batch_size", 1, 1024), ("gradient_accumulation_steps", 1, 1024),
                           ("lora_r", 1, 256), ("max_seq_length", 0, 1_048_576)):
        if not low <= out[key] <= high:
            raise ValueError(f"{key}={out[key]} is out of range [{low}, {high}]")
    if not 0 < out["learning_rate"] <= 1:
        raise ValueError(f"learning_rate={out['learning_rate']} is out of range (0, 1]")
    if not 0 <= out["lora_dropout"] < 1:
        raise ValueError(f"lora_dropout={out['lora_dropout']} is out of range [0, 1)")
    targets = hp["target_modules"]
    if not (targets is None or targets == "all-linear"
            or (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets))):
        raise ValueError(f"target_modules={targets!r}: give a list of module names, \"all-linear\", or leave it "
                         "unset for PEFT's default for the architecture")
    out["target_modules"] = targets
    for key, allowed in (("dtype", DTYPES), ("device", None)):
        value = hp[key]
        if not isinstance(value, str) or (allowed and value not in allowed):
            raise ValueError(f"{key}={value!r}: expected one of {', '.join(allowed)}" if allowed else
                             f"{key}={value!r}: expected \"auto\", \"cpu\", \"cuda\" or \"cuda:N\"")
        out[key] = value
    if not (out["device"] in ("auto", "cpu", "cuda") or out["device"].startswith("cuda:")):
        raise ValueError(f"device={out['device']!r}: expected \"auto\", \"cpu\", \"cuda\" or \"cuda:N\"")
    return out


def pick_device(device: str = "auto") -> str:
    torch = torch_module()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch sees no CUDA device: use \"auto\" or \"cpu\"")
    return device


def pick_dtype(dtype: str, device: str) -> Any:
    torch = torch_module()
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


class PromptCodec:
    """A model directory's tokenizer and how it renders a prompt and an answer as token ids."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        try:
            self.tokenizer: Any = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{model_dir}: no tokenizer AutoTokenizer can load ({exc}): save the model with its "
                             "tokenizer (tokenizer.save_pretrained)") from None
        tok = self.tokenizer
        self.chat = bool(getattr(tok, "chat_template", None))
        eos = tok.eos_token_id
        self.eos_ids: list[int] = [] if eos is None else [int(eos)]
        self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else (eos if eos is not None else 0))

    @property
    def format(self) -> str:
        return "chat_template" if self.chat else "plain"

    def _ids(self, text: str, special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _render(self, prompt: str) -> str:
        return str(self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True))

    def prompt_ids(self, prompt: str) -> list[int]:
        if self.chat:
            return self._ids(self._render(prompt))
        return self._ids(PLAIN_FORMAT.format(prompt=prompt), special=True)

    def example(self, prompt: str, response: str, max_len: int) -> tuple[list[int], list[int]]:
        """Input ids and labels for one training row (labels -100 on the prompt), at most ``max_len`` ids:
        a long prompt keeps its end, a long answer its start."""
        p = self.prompt_ids(prompt)
        if self.chat:
            rendered = self._render(prompt)
            full = str(self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False))
            if not full.startswith(rendered):
                raise ValueError("the chat template renders a conversation that does not start with its own "
                                 "generation prompt; the answer's tokens cannot be told from the prompt's")
            r = self._ids(full[len(rendered):])
        else:
            r = self._ids(response) + self.eos_ids
        r = r[: max(1, max_len // 2)] if len(p) + len(r) > max_len else r
        p = p[-(max_len - len(r)):]
        return p + r, [-100] * len(p) + r


def model_limit(model: Any) -> int:
    """The longest sequence the model's position embeddings take (a large number when unlimited)."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 20


def batches(examples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, generator: Any,
            transform: Callable[[list[int], list[int]], list[int]] | None = None) -> Iterable[Any]:
    """Shuffled, right-padded batches (``transform`` may rewrite a row's input ids, e.g. token dropout)."""
    torch = torch_module()
    order = torch.randperm(len(examples), generator=generator).tolist()
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start:start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (i, lab) in enumerate(chunk):
            if transform is not None:
                i = transform(i, lab)
            ids[row, : len(i)] = torch.tensor(i)
            labels[row, : len(lab)] = torch.tensor(lab)
            mask[row, : len(i)] = 1
        yield ids, labels, mask


def load_model(model_dir: Path, dtype: Any = None, device: str = "cpu") -> Any:
    from transformers import AutoModelForCausalLM

    try:
        model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True,
                                                          **({"dtype": dtype} if dtype is not None else {}))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{model_dir}: not a causal LM AutoModelForCausalLM can load ({exc})") from None
    return model.to(device)


def train_lora(base_dir: Path, rows: list[tuple[str, str]], hyperparameters: dict[str, Any], out_dir: Path, *,
               progress: Callable[[dict[str, Any]], None] | None = None,
               cancel: threading.Event | None = None) -> dict[str, Any]:
    """Tune a LoRA adapter on ``rows`` and save it (PEFT layout) into ``out_dir``. Returns metrics.

    One optimiser step per ``gradient_accumulation_steps`` batches; ``progress`` gets ``{"step",
    "steps", "loss"}`` after every step; setting ``cancel`` stops the loop before the next batch and
    raises :class:`Cancelled` (nothing is written).
    """
    torch = torch_module()
    from peft import LoraConfig, get_peft_model

    hp = lora_hyperparameters(hyperparameters)
    if not rows:
        raise ValueError("no training rows")
    device = pick_device(hp["device"])
    codec = PromptCodec(base_dir)
    torch.manual_seed(hp["seed"])
    base = load_model(base_dir, pick_dtype(hp["dtype"], device), device)
    limit = model_limit(base)
    max_len = min(hp["max_seq_length"] or limit, limit)
    config = LoraConfig(r=hp["lora_r"], lora_alpha=hp["lora_alpha"], lora_dropout=hp["lora_dropout"], bias="none",
                        target_modules=hp["target_modules"], task_type="CAUSAL_LM")
    try:
        model = get_peft_model(base, config)
    except ValueError as exc:
        raise ValueError(f"LoRA cannot be applied to this {base.config.model_type} model ({exc}): set "
                         "target_modules to its linear layers' names, or \"all-linear\"") from None
    examples = [codec.example(p, r, max_len) for p, r in rows]
    accumulate = hp["gradient_accumulation_steps"]
    per_epoch = math.ceil(math.ceil(len(examples) / hp["batch_size"]) / accumulate)
    steps = per_epoch * hp["epochs"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=hp["learning_rate"],
                            weight_decay=0.0)
    gen = torch.Generator().manual_seed(hp["seed"])
    model.train()
    step, losses = 0, []
    for _epoch in range(hp["epochs"]):
        pending: list[float] = []
        epoch_batches = list(batches(examples, hp["batch_size"], codec.pad_id, gen))
        for n, (ids, labels, mask) in enumerate(epoch_batches, 1):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled at step {step}/{steps}")
            group = min(accumulate, len(epoch_batches) - (n - 1) // accumulate * accumulate)
            loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
            (loss / group).backward()
            pending.append(loss.item())
            if len(pending) == group:
                opt.step()
                opt.zero_grad()
                step += 1
                losses.append(sum(pending) / len(pending))
                pending = []
                if progress is not None:
                    progress({"step": step, "steps": steps, "loss": losses[-1]})
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    targets = sorted(getattr(model.peft_config["default"], "target_modules", None) or [])
    return {"steps": step, "first_loss": round(losses[0], 4), "final_loss": round(losses[-1], 4),
            "trainable_parameters": trainable, "rows": len(rows), "architecture": base.config.model_type,
            "prompt_format": codec.format, **hp, "target_modules": targets, "max_seq_length": max_len,
            "device": device}


class LocalModel:
    """A model directory, optionally with a LoRA adapter, answering greedily: ``batch_size`` prompts per
    forward pass, left-padded (the same answers as one at a time, tested), at most ``max_new_tokens``
    new tokens, decoded without special tokens."""

    def __init__(self, base_dir: Path, adapter_dir: Path | None = None, *, max_new_tokens: int = MAX_NEW_TOKENS,
                 batch_size: int = 32, device: str = "auto", dtype: str = "auto") -> None:
        torch_module()
        self.device = pick_device(device)
        self.codec = PromptCodec(base_dir)
        model = load_model(base_dir, pick_dtype(dtype, self.device), self.device)
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir), local_files_only=True)
        model.eval()
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.batch_size = max(1, batch_size)
        self.limit = model_limit(model)
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = gen_eos if gen_eos is not None else self.codec.eos_ids
        self.eos_ids: list[int] = [eos] if isinstance(eos, int) else list(eos or [])
        self.truncated = 0

    def _prompt(self, prompt: str) -> list[int]:
        ids = self.codec.prompt_ids(prompt)
        room = self.limit - self.max_new_tokens
        if len(ids) > room > 0:
            self.truncated += 1
            if self.truncated == 1:
                log.warning("a prompt of %d tokens was cut to its last %d (the model takes %d with %d new tokens)",
                            len(ids), room, self.limit, self.max_new_tokens)
            ids = ids[-room:]
        return ids

    def generate(self, prompts: list[str], batch_size: int | None = None) -> list[str]:
        torch = torch_module()
        size = max(1, batch_size or self.batch_size)
        pad = self.codec.pad_id
        out: list[str] = []
        with torch.no_grad():
            for start in range(0, len(prompts), size):
                encoded = [self._prompt(p) for p in prompts[start:start + size]]
                width = max(len(ids) for ids in encoded)
                ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=self.device)
                mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=self.device)
                gen = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                                          do_sample=False, eos_token_id=self.eos_ids or None, pad_token_id=pad)
                out.extend(self.codec.tokenizer.decode(row[width:].tolist(), skip_special_tokens=True)
                           for row in gen)
        return out


def read_dir(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir()) if p.is_file()}


def scratch_dir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="fgov-tune-")
