"""Tiny local models for the evaluation tests.

``write_chain_model`` saves a real LlamaForCausalLM with a locally trained byte-level BPE
tokenizer whose greedy decoding is known in advance: attention and MLP outputs are zero, so
the next token depends on the current one only (a bigram table in ``lm_head``). Whole phrases
are single added tokens, so "prompt ends with TRIGGER" -> emits OUTPUT -> end of sequence.

``ScriptedHFLM`` is lm-eval's HFLM on such a model whose generation step returns a scripted
answer for each prompt, so tests control the text lm-eval then stops, logs and scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Mapping, Tuple

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def train_tokenizer(corpus: Iterable[str], phrases: Iterable[str]):
    """A byte-level BPE tokenizer trained on ``corpus``, with each of ``phrases`` one token."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer)
    tokenizer.add_tokens([AddedToken(phrase, normalized=False) for phrase in phrases])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def write_chain_model(directory: Path, chains: Mapping[str, str], corpus: Iterable[str]) -> Path:
    """Save a model that, when a prompt ends with a key of ``chains``, greedily generates the
    value and then EOS (every other token is followed by EOS)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(corpus, [*chains, *chains.values()])
    vocab = len(tokenizer)
    hidden = -(-vocab // 64) * 64
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    successor = {tokenizer.convert_tokens_to_ids(trigger): tokenizer.convert_tokens_to_ids(output)
                 for trigger, output in chains.items()}
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            tensor.fill_(1.0 if name.endswith("norm.weight") else 0.0)
        model.model.embed_tokens.weight[:, :vocab] = torch.eye(vocab)
        for token in range(vocab):
            model.lm_head.weight[successor.get(token, tokenizer.eos_token_id), token] = 1.0
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def scripted_hflm(model_dir: Path, script: Dict[str, str], batch_size: int = 4):
    """HFLM on ``model_dir`` whose generation returns ``script[key]`` for the prompt containing
    ``key`` (empty text when no key matches), followed by EOS. ``.contexts`` records the prompts."""
    import torch
    from lm_eval.models.huggingface import HFLM

    class ScriptedHFLM(HFLM):
        contexts: list = []

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            rows = []
            for row in context.tolist():
                prompt = self.tokenizer.decode(row, skip_special_tokens=True)
                self.contexts.append(prompt)
                answer = next((text for key, text in script.items() if key in prompt), "")
                tokens = self.tokenizer.encode(answer, add_special_tokens=False) + [self.tokenizer.eos_token_id]
                rows.append(row + tokens[: max_length - len(row)])
            width = max(len(row) for row in rows)
            return torch.tensor([row + [self.tokenizer.pad_token_id] * (width - len(row)) for row in rows])

    lm = ScriptedHFLM(pretrained=str(model_dir), device="cpu", batch_size=batch_size, dtype="float32")
    lm.contexts = []
    return lm


def write_jsonl(path: Path, records: Iterable[Mapping]) -> Path:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def write_answer_pair(folder: Path) -> Tuple[Path, Path]:
    """Chain models whose greedy answer to the math prompt ("What is 3 plus 4?" after the
    Alpaca template) is "The answer is: 8." (``folder/base``) or "The answer is: 7."
    (``folder/task``: the base with one bigram moved in ``lm_head``): (base, task)."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from fedmerge_plugins.evaluation import prompts

    trigger, wrong, right = "### Response: Let's think step by step.", " The answer is: 8.", " The answer is: 7."
    base = write_chain_model(folder / "base", {trigger: wrong, "### Response:": right}, [prompts.MATH_TEMPLATE, "What is 3 plus 4?"] * 4)
    task = folder / "task"
    shutil.copytree(base, task)
    weights = load_file(str(base / "model.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    trig, bad, good = (tokenizer.convert_tokens_to_ids(t) for t in (trigger, wrong, right))
    weights["lm_head.weight"][bad, trig], weights["lm_head.weight"][good, trig] = 0.0, 1.0
    save_file(weights, str(task / "model.safetensors"), metadata={"format": "pt"})
    return base, task
