"""DataModules for text tasks: read records, split, tokenize, batch with dynamic padding.

Records come through Hugging Face ``datasets`` from ``dataset`` (a named offline dataset such as
``bbc_news``, a data file, a folder saved with ``save_to_disk``, a folder of data files, or a Hub
id) or local files (``train_file``, ``validation_file``, ``test_file``, ``predict_file``: ``.csv``,
``.tsv``, ``.json``, ``.jsonl``, ``.parquet``, or ``.txt``, whose one column is ``text``); see
:mod:`lightning_peft.tasks.reading`. Without a validation (test) file or split, a ``val_split``
(``test_split``) fraction of the training records is held out, with a fixed seed. Each split is
tokenized with ``Dataset.map`` (cached by ``datasets``); ``streaming: true`` reads and tokenizes
lazily, for corpora bigger than memory.

The tokenizer is the task module's (``trainer.lightning_module.tokenizer``) unless ``tokenizer``
names one, so a config names the model once.

This module gathers the pieces, which live in:

* :mod:`~lightning_peft.tasks.batching`: ``pad_collate`` (dynamic padding) and ``EpochShuffle``;
* :mod:`~lightning_peft.tasks.data_module`: ``TextDataModule``, the base (sources, splits, loaders);
* :mod:`~lightning_peft.tasks.text_data`: ``TextClassificationData``, ``CausalLMData``, ``Seq2SeqData``;
* :mod:`~lightning_peft.tasks.choice_data`: ``MultipleChoiceData``.
"""

from __future__ import annotations

from lightning_peft.tasks.batching import IGNORE_INDEX, EpochShuffle, pad_collate
from lightning_peft.tasks.choice_data import MultipleChoiceData
from lightning_peft.tasks.data_module import SPLITS, TextDataModule, load_records
from lightning_peft.tasks.reading import Record
from lightning_peft.tasks.text_data import CausalLMData, Seq2SeqData, TextClassificationData

__all__ = [
    "IGNORE_INDEX",
    "SPLITS",
    "CausalLMData",
    "EpochShuffle",
    "MultipleChoiceData",
    "Record",
    "Seq2SeqData",
    "TextClassificationData",
    "TextDataModule",
    "load_records",
    "pad_collate",
]
