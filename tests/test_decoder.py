"""Decoder classifiers (Llama-class) read the last real token of every row: with right and left padding,
a text ending in EOS and one with EOS inside, each against a hand-computed position; training, predict,
a merged export (with plain transformers) and the teacher-logits cache give the same logits; a text
that ends in the pad token is refused. The model is `conftest.save_tiny_decoder`: a tiny Llama whose
tokenizer is shaped like SmolLM2-Instruct's (pad = EOS = `<|im_end|>`, `<empty_output>` unused)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import tiny_overrides, write_toy_dataset
from scalelora.config import ModelConfig, load_config
from scalelora.data import PadCollator
from scalelora.errors import DataError
from scalelora.models import encode_batch, load_classifier, load_tokenizer

LABELS = ["neg", "pos"]
LONG = "the movie was really quite lovely"
EOS = "<|im_end|>"

# texts, padding side, the last real token's position in each row (counted by hand: one token a word)
CASES = {
    "right padding": (["great film", LONG], "right", [1, 5]),
    "left padding": (["great film", LONG], "left", [5, 5]),
    "EOS at the end": ([f"great film{EOS}", LONG], "right", [2, 5]),
    "EOS at the end, left padding": ([f"great film{EOS}", LONG], "left", [5, 5]),
    "EOS inside": ([f"great{EOS} film", LONG], "right", [2, 5]),
}


@pytest.fixture(scope="module")
def decoder(tiny_decoder):
    cfg = ModelConfig(name=str(tiny_decoder))
    model, _ = load_classifier(cfg, LABELS)
    return model.eval(), load_tokenizer(cfg)


def logits_read_at(model, batch, positions: list[int]) -> torch.Tensor:
    """The head applied by hand to the base's last hidden state at `positions` (one per row)."""
    hidden = model.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    return model.score(hidden[torch.arange(len(positions)), torch.tensor(positions)])


def test_a_decoder_without_a_free_pad_token_gets_an_unused_special_one(decoder, tiny_decoder):
    model, tokenizer = decoder
    # SmolLM2-Instruct pads with its EOS; scalelora gives it the unused special token instead
    assert tokenizer.pad_token == "<empty_output>" != tokenizer.eos_token
    assert model.config.pad_token_id == tokenizer.pad_token_id == 3
    assert json.loads((tiny_decoder / "config.json").read_text())["pad_token_id"] == 2  # the base: EOS


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_the_pooled_position_is_the_last_real_token(decoder, case):
    model, tokenizer = decoder
    texts, side, positions = CASES[case]
    tokenizer.padding_side = side
    try:
        batch = tokenizer(texts, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = "right"
    assert batch["input_ids"].shape[1] == 6
    logits = model(**batch).logits
    torch.testing.assert_close(logits, logits_read_at(model, batch, positions), atol=1e-6, rtol=0)
    # the case discriminates: the token before gives other logits
    earlier = logits_read_at(model, batch, [positions[0] - 1, positions[1]])
    assert not torch.allclose(logits[0], earlier[0], atol=1e-4)
    if side == "right":  # training's collator pads the same rows the same way
        rows = [{**tokenizer(t), "labels": 0, "idx": i} for i, t in enumerate(texts)]
        collated = PadCollator(tokenizer.pad_token_id)(rows)
        assert torch.equal(collated["input_ids"], batch["input_ids"])
        torch.testing.assert_close(
            model(input_ids=collated["input_ids"], attention_mask=collated["attention_mask"]).logits,
            logits,
            atol=1e-6,
            rtol=0,
        )


def test_a_text_ending_in_the_pad_token_is_refused(decoder):
    import datasets

    from scalelora.config import DataConfig
    from scalelora.data import tokenize_split

    _, tokenizer = decoder
    texts = ["great film", "great film <empty_output>", "great <empty_output> film"]
    ds = datasets.Dataset.from_dict({"text": texts, "label": [1, 1, 1], "idx": [0, 1, 2]})
    with pytest.raises(DataError, match=r"^row 1: the text ends in '<empty_output>' \(id 3\)"):
        tokenize_split(ds, tokenizer, DataConfig(max_length=16))
    with pytest.raises(DataError, match=r"^text 1: the text ends in '<empty_output>'"):
        encode_batch(tokenizer, texts, None, 16)
    encode_batch(tokenizer, [texts[0], texts[2]], None, 16)  # inside a text it is read past


def test_a_vocabulary_without_an_unused_special_token_pads_with_eos(tmp_path):
    """GPT-2's only special token is `<|endoftext|>` (BOS, EOS and UNK): it stays the pad token, and a
    text that ends in it is refused."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(
        models.WordLevel({"<|endoftext|>": 0, "great": 1, "film": 2}, unk_token="<|endoftext|>")
    )
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    end = "<|endoftext|>"
    PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=end, eos_token=end, unk_token=end
    ).save_pretrained(tmp_path)
    tokenizer = load_tokenizer(ModelConfig(name=str(tmp_path)))
    assert tokenizer.pad_token == end and tokenizer.padding_side == "right"
    encode_batch(tokenizer, ["great film", f"great{end} film"], None, 8)
    with pytest.raises(DataError, match=r"^text 1: the text ends in '<\|endoftext\|>'"):
        encode_batch(tokenizer, ["great film", f"great film{end}"], None, 8)


def write_eos_dataset(folder):
    """The toy set with EOS ending every third text and inside every third but one."""
    write_toy_dataset(folder)
    for split in ("train", "validation", "test"):
        path = folder / f"{split}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for i, row in enumerate(rows):
            words = row["text"].split()
            if i % 3 == 0:
                row["text"] = " ".join(words) + EOS
            elif i % 3 == 1:
                row["text"] = " ".join(words[:1] + [EOS] + words[1:])
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_predict_export_and_teacher_logits_read_the_token_training_reads(tiny_decoder, tmp_path):
    from scalelora.evaluation import gather_logits
    from scalelora.trainer import Trainer

    data = write_eos_dataset(tmp_path / "data")
    run = tmp_path / "run"
    cfg = load_config(
        "quickstart",
        tiny_overrides(tiny_decoder, data, run, **{"eval.calibrate": "false", "train.max_steps": 3}),
    )
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        trainer.train()
        outputs = gather_logits(trainer.accelerator, trainer.model, trainer.eval_loaders["test"])
    finally:
        trainer.close()
    trained = torch.from_numpy(outputs.logits)[torch.from_numpy(outputs.idx).argsort()]
    texts = [json.loads(line)["text"] for line in (data / "test.jsonl").read_text().splitlines()]
    assert len(trained) == len(texts) == 40
    with torch.no_grad():
        same_logits_as_training(cfg, run, texts, trained, tmp_path)


def same_logits_as_training(cfg, run, texts: list[str], trained: torch.Tensor, tmp_path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from scalelora.export import merge_adapter
    from scalelora.predict import load_for_inference, predict_texts
    from scalelora.teacher_logits import build_cache

    model, tokenizer, labels, max_length = load_for_inference(run / "adapter")
    predicted = torch.cat(
        [
            model(**encode_batch(tokenizer, texts[i : i + 16], None, max_length)).logits
            for i in range(0, 40, 16)
        ]
    )
    torch.testing.assert_close(predicted, trained, atol=1e-5, rtol=0)
    printed = predict_texts(model, tokenizer, labels, texts, max_length, batch_size=16)
    probs = torch.tensor([[r["probs"][name] for name in labels] for r in printed])
    torch.testing.assert_close(probs, trained.softmax(-1), atol=1e-5, rtol=0)

    export = tmp_path / "export"
    merge_adapter(run / "adapter", export)
    plain = AutoModelForSequenceClassification.from_pretrained(export).eval()
    plain_tokenizer = AutoTokenizer.from_pretrained(export)
    assert plain.config.pad_token_id == plain_tokenizer.pad_token_id == 3
    for side in ("right", "left"):  # a plain transformers user pads either way
        plain_tokenizer.padding_side = side
        batch = plain_tokenizer(
            texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        torch.testing.assert_close(plain(**batch).logits, trained, atol=1e-5, rtol=0)

    # an adapter saved when scalelora padded decoders with EOS is still read by EOS, as it was trained
    old = tmp_path / "old-adapter"
    shutil.copytree(run / "adapter", old)
    old_tokenizer = AutoTokenizer.from_pretrained(old)
    old_tokenizer.pad_token = EOS
    old_tokenizer.save_pretrained(old)
    assert load_for_inference(old)[0].config.pad_token_id == 2

    cache = tmp_path / "cache"
    build_cache(cfg, str(export), cache, splits=("test",), batch_size=16)
    shard = load_file(str(cache / "test-00000.safetensors"))
    cached = shard["logits"][shard["idx"].argsort()]
    torch.testing.assert_close(cached, trained, atol=1e-5, rtol=0)
