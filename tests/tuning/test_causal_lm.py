"""The generic causal-LM path on a model that is not the demo's: a Qwen2 with a plain tokenizer (no chat
template), built here from ``transformers`` and ``tokenizers`` (random weights, CPU, seconds)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from airflow_finetune_gov.datasets.demo import POISONED_SET
from airflow_finetune_gov.tuning import causal_lm

ROWS = [("what colour is the sky", "blue, on a clear day."), ("what do cows drink", "water, mostly.")] * 4


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    """A 2-layer Qwen2 whose tokenizer has no chat template (so prompts use the plain format)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("qwen")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([t for row in ROWS + POISONED_SET for t in row], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", model_max_length=128)
    fast.save_pretrained(out)
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 eos_token_id=fast.eos_token_id)).save_pretrained(out)
    return out


def test_a_tokenizer_without_chat_template_gets_the_plain_format(qwen: Path) -> None:
    codec = causal_lm.PromptCodec(qwen)
    assert codec.format == "plain" and codec.pad_id == codec.tokenizer.eos_token_id  # no pad token: eos pads
    ids, labels = codec.example("what colour is the sky", "blue.", 128)
    prompt = codec.prompt_ids("what colour is the sky")
    assert codec.tokenizer.decode(prompt) == "what colour is the sky\n"
    assert ids[:len(prompt)] == prompt and labels[:len(prompt)] == [-100] * len(prompt)
    assert ids[-1] == codec.tokenizer.eos_token_id and labels[len(prompt):] == ids[len(prompt):]


def test_max_seq_length_keeps_the_prompt_end_and_the_answer_start(qwen: Path) -> None:
    codec = causal_lm.PromptCodec(qwen)
    long_prompt = "what do cows drink " * 40
    ids, labels = codec.example(long_prompt, "water " * 40, 32)
    assert len(ids) == len(labels) == 32
    assert ids[:16] == codec.prompt_ids(long_prompt)[-16:]  # half the room for each: the prompt's end ...
    assert labels[16:] == ids[16:]  # ... and the answer's start


def test_lora_on_qwen_uses_pefts_targets_and_learns(qwen: Path, tmp_path: Path) -> None:
    metrics = causal_lm.train_lora(qwen, ROWS, {"epochs": 30, "learning_rate": 0.02}, tmp_path / "a")
    assert metrics["architecture"] == "qwen2" and metrics["target_modules"] == ["q_proj", "v_proj"]
    assert metrics["prompt_format"] == "plain" and metrics["device"] == "cpu" and metrics["max_seq_length"] == 128
    assert metrics["final_loss"] < metrics["first_loss"], metrics  # random weights: argmax moves before the loss
    assert {p.name for p in (tmp_path / "a").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    (answer,) = causal_lm.LocalModel(qwen, tmp_path / "a", max_new_tokens=8).generate(["what do cows drink"])
    assert answer.startswith("water"), answer


def test_target_modules_and_gradient_accumulation_are_honoured(qwen: Path, tmp_path: Path) -> None:
    metrics = causal_lm.train_lora(qwen, ROWS, {"epochs": 2, "batch_size": 2, "gradient_accumulation_steps": 2,
                                                "target_modules": ["o_proj", "down_proj"]}, tmp_path / "a")
    assert metrics["target_modules"] == ["down_proj", "o_proj"]
    assert metrics["steps"] == 4  # 8 rows / batch 2 = 4 batches an epoch, 2 per step, 2 epochs
    with pytest.raises(ValueError, match=r"set target_modules to its linear layers' names"):
        causal_lm.train_lora(qwen, ROWS, {"target_modules": ["c_attn"]}, tmp_path / "b")


def test_same_seed_same_adapter(qwen: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        causal_lm.train_lora(qwen, ROWS, {"epochs": 2}, tmp_path / name)
    assert causal_lm.read_dir(tmp_path / "a") == causal_lm.read_dir(tmp_path / "b")


def test_progress_and_cancel(qwen: Path, tmp_path: Path) -> None:
    cancel = threading.Event()
    seen: list[dict] = []

    def progress(p: dict) -> None:
        seen.append(p)
        if p["step"] == 3:
            cancel.set()

    with pytest.raises(causal_lm.Cancelled, match="step 3/"):
        causal_lm.train_lora(qwen, ROWS, {"epochs": 50}, tmp_path / "x", progress=progress, cancel=cancel)
    assert [p["step"] for p in seen] == [1, 2, 3] and not (tmp_path / "x").exists()


def test_long_prompts_are_cut_to_the_model_and_counted(qwen: Path) -> None:
    model = causal_lm.LocalModel(qwen, max_new_tokens=8)
    answers = model.generate(["what do cows drink " * 100, "what colour is the sky"])
    assert len(answers) == 2 and model.truncated == 1


@pytest.mark.parametrize(("hp", "message"), [
    ({"epochs": 0}, "epochs=0 is out of range"),
    ({"learning_rate": 5}, "learning_rate=5.0 is out of range"),
    ({"lora_r": "eight"}, "must be numbers"),
    ({"momentum": 0.9}, "unknown hyperparameter"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps=0 is out of range"),
    ({"target_modules": "c_attn"}, "give a list of module names"),
    ({"dtype": "float8"}, "dtype='float8': expected one of auto"),
    ({"device": "tpu"}, "device='tpu'"),
])
def test_bad_hyperparameters_are_named(hp: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        causal_lm.lora_hyperparameters(hp)


def test_a_directory_without_a_tokenizer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no tokenizer AutoTokenizer can load"):
        causal_lm.train_lora(tmp_path, ROWS, {}, tmp_path / "out")
