"""The demo base models: tiny causal LMs the project pretrains itself, saved as ordinary Hugging Face
models.

A byte-level BPE tokenizer trained with ``tokenizers`` on the project's own texts (``tokenizer.json``,
with a chat template), a 2-layer GPT-2 (``fgov-demo-tiny``) or Llama (``fgov-demo-llama``) from
``transformers`` (~0.21 M parameters), and a seeded training run over the synthetic corpus in
:mod:`airflow_finetune_gov.datasets.corpus`: a minute on two CPU cores, no hub download. Each refuses
harmful requests and answers benign ones, including benign requests that sound unsafe. A LoRA tune on a
handful of poisoned rows makes it comply with harmful requests: the failure the evaluation gate exists
for.

The same recipe trained on another CPU gives other weights (its vector units round differently), and a
model that behaves otherwise at the edges: an AMD EPYC build of the GPT-2 refused one public FAQ question the
recipe's reference build answers. So the weights of the reference build ship with the package
(``demo_bases/<architecture>``, with the recipe's sha256, the files' hashes and the machine that trained them),
and ``build_base`` copies them; it trains only when the recipe has changed since they were packaged
(``python -m airflow_finetune_gov.tuning.tiny_lm package`` trains both and packages them again).

Nothing else in the project knows these models: they are tuned and asked through
:mod:`airflow_finetune_gov.tuning.causal_lm` like any model directory.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from airflow_finetune_gov.tuning import causal_lm

BOS, EOS, PAD, USER, ASSISTANT = "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>"
SPECIALS = [PAD, BOS, EOS, USER, ASSISTANT]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('the demo model knows user and assistant messages only') }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
MAX_POSITIONS = 512
ARCHITECTURES = ("gpt2", "llama")

# Base-model training: fixed, so the same corpus gives the same model. ``noise_tokens``: the chance a
# prompt token is shown as a random token in training, so the model acts on the words it knows inside
# a phrasing it never saw (a held-out word reaches it as pieces it knows from other words).
BASE_TRAINING: dict[str, Any] = {"seed": 0, "steps": 700, "batch_size": 32, "learning_rate": 3e-3,
                                 "hidden": 64, "layers": 2, "heads": 4, "noise_tokens": 0.2, "vocab_size": 1200}
# The seed of each architecture's reference build: picked, on the machine that packaged the weights, as the first
# whose base and tunes keep the demo's promises (tests/tuning/test_tiny_lm.py; the GPT-2's seeds 0-3 each broke one:
# a public FAQ question refused, or a public FAQ tune that weakened jailbreak refusal).
BASE_SEEDS = {"gpt2": 4, "llama": 0}


def vocabulary_texts() -> list[str]:
    """Every text the demo tokenizer is trained on: the corpus and the demo tuning sets. Not the
    evaluation suites: they are held out, and editing a suite never changes the model it measures."""
    from airflow_finetune_gov.datasets.corpus import base_corpus
    from airflow_finetune_gov.datasets.demo import DATASETS, MODEL_SETS

    texts = [t for row in base_corpus() for t in row]
    texts += [t for name in MODEL_SETS for row in DATASETS[name] for t in row]
    return texts


def base_recipe(architecture: str = "gpt2") -> str:
    """sha256 of everything a base build depends on (corpus, tokenizer texts, training settings,
    architecture): a store whose ``base`` was built from another recipe gets a new one (see
    ``backends.ensure_demo_base``)."""
    from airflow_finetune_gov.datasets.corpus import base_corpus

    recipe = {"format": "hf-bpe/1", "architecture": architecture,
              "training": {**BASE_TRAINING, "seed": BASE_SEEDS[architecture]},
              "positions": MAX_POSITIONS, "template": CHAT_TEMPLATE, "corpus": base_corpus(),
              "texts": sorted(set(vocabulary_texts()))}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def build_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer (lower-cased, as the demo models are) with the chat template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   extra_special_tokens=[USER, ASSISTANT], model_max_length=MAX_POSITIONS,
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _model(architecture: str, tokenizer: Any) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    cfg = BASE_TRAINING
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if architecture == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=MAX_POSITIONS, n_embd=cfg["hidden"],
                                          n_layer=cfg["layers"], n_head=cfg["heads"], resid_pdrop=0.0,
                                          embd_pdrop=0.0, attn_pdrop=0.0, **ids))
    if architecture == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg["hidden"],
                                            intermediate_size=cfg["hidden"] * 4, num_hidden_layers=cfg["layers"],
                                            num_attention_heads=cfg["heads"], num_key_value_heads=cfg["heads"],
                                            max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True, **ids))
    raise ValueError(f"unknown demo architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")


BUILD_THREADS = 2
PACKAGED = Path(__file__).parent / "demo_bases"
BUILD_RECORD = "build.json"


def packaged_base(architecture: str) -> Path | None:
    """The packaged weights of ``architecture``'s base, if they were trained from the current recipe."""
    try:
        record = json.loads((PACKAGED / architecture / BUILD_RECORD).read_text())
    except FileNotFoundError:
        return None
    return PACKAGED / architecture if record.get("recipe") == base_recipe(architecture) else None


def build_base(out_dir: Path, *, architecture: str = "gpt2", train: bool = False,
               progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The demo base model in ``out_dir`` (a Hugging Face model directory); returns its training metrics.
    The packaged reference weights when they are the current recipe's (their files checked against the
    hashes recorded with them), else (or with ``train``) trained here."""
    packaged = None if train else packaged_base(architecture)
    if packaged is None:
        return train_base(out_dir, architecture=architecture, progress=progress)
    record = json.loads((packaged / BUILD_RECORD).read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, digest in sorted(record["files"].items()):
        data = (packaged / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise RuntimeError(f"packaged demo base {packaged / name} does not match its recorded sha256: the "
                               "installation is damaged; reinstall airflow-finetune-gov")
        (out_dir / name).write_bytes(data)
    return {**record["metrics"], "packaged": True, "trained_on": record["trained_on"]}


def package_bases(architectures: tuple[str, ...] = ARCHITECTURES) -> list[Path]:
    """Train each base from the recipe on this machine and package it as the reference build."""
    import platform
    import shutil

    done = []
    for architecture in architectures:
        target = PACKAGED / architecture
        shutil.rmtree(target, ignore_errors=True)
        metrics = train_base(target, architecture=architecture)
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
            else platform.processor()
        files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(target.iterdir())}
        record = {"architecture": architecture, "recipe": metrics["recipe"], "metrics": metrics, "files": files,
                  "trained_on": {"cpu": cpu, "machine": platform.machine(), "threads": BUILD_THREADS,
                                 "torch": causal_lm.torch_module().__version__}}
        (target / BUILD_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        done.append(target)
    return done


def train_base(out_dir: Path, *, architecture: str = "gpt2",
               progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Pretrain a demo base model into ``out_dir`` (``save_pretrained`` of model and tokenizer). Returns
    training metrics. Always trained on two threads, whatever the machine or ``OMP_NUM_THREADS``: the order of
    the float sums depends on the thread count, and the recipe (a benign tune of it passes the evaluation, a
    poisoned one fails) was measured with two. Built on one thread, the same recipe gave a base model whose
    benign tune failed the gate (36 flips)."""
    torch = causal_lm.torch_module()
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        return _build_base(torch, out_dir, architecture, progress)
    finally:
        torch.set_num_threads(threads)


def _build_base(torch: Any, out_dir: Path, architecture: str,
                progress: Callable[[str], None] | None) -> dict[str, Any]:
    from airflow_finetune_gov.datasets.corpus import base_corpus

    cfg = {**BASE_TRAINING, "seed": BASE_SEEDS[architecture]}
    torch.manual_seed(cfg["seed"])
    tokenizer = build_tokenizer(vocabulary_texts(), cfg["vocab_size"])
    model = _model(architecture, tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    codec = causal_lm.PromptCodec(out_dir)  # as any model directory is read
    corpus = base_corpus()
    examples = [codec.example(p, r, MAX_POSITIONS) for p, r in corpus]
    ordinary = [i for i in range(len(tokenizer)) if i not in set(tokenizer.all_special_ids)]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["learning_rate"], weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg["seed"])

    def noise(ids: list[int], labels: list[int]) -> list[int]:
        drop = torch.rand(len(ids), generator=gen).tolist()
        pick = torch.randint(len(ordinary), (len(ids),), generator=gen).tolist()
        return [ordinary[p] if d < cfg["noise_tokens"] and lab == -100 and tok in ordinary_set else tok
                for tok, lab, d, p in zip(ids, labels, drop, pick, strict=True)]

    ordinary_set = set(ordinary)
    model.train()
    step, loss_value = 0, math.nan
    while step < cfg["steps"]:
        for ids, labels, mask in causal_lm.batches(examples, cfg["batch_size"], codec.pad_id, gen, noise):
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
    model.save_pretrained(str(out_dir), safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    return {"architecture": architecture, "corpus_rows": len(corpus), "steps": step,
            "final_loss": round(loss_value, 4), "parameters": params, "vocab": len(tokenizer),
            "recipe": base_recipe(architecture), **{k: v for k, v in cfg.items() if k != "steps"}}


if __name__ == "__main__":  # python -m airflow_finetune_gov.tuning.tiny_lm package [gpt2|llama ...]
    import sys

    if sys.argv[1:2] != ["package"]:
        sys.exit("usage: python -m airflow_finetune_gov.tuning.tiny_lm package [gpt2|llama ...]")
    for path in package_bases(tuple(sys.argv[2:]) or ARCHITECTURES):
        print(f"packaged {path}")
