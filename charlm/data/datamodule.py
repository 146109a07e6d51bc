"""The ``LightningDataModule``: corpus -> vocabulary -> split (90/5/5, or nanoGPT's 90/10) -> stream windows per
rank."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from charlm.config import DataConfig
from charlm.data.corpus import Corpus, load_corpus
from charlm.data.streams import ResumableLoader, StreamDataset, StreamLayout, WindowSampler, collate_batch
from charlm.data.vocab import Vocab
from charlm.util.errors import CharlmError


@dataclass(frozen=True)
class Splits:
    """Contiguous train / val / test ids of one corpus."""

    train: Tensor
    val: Tensor
    test: Tensor


def eval_streams(n_ids: int, batch_size: int, world_size: int = 1) -> int:
    """Streams per process for scoring a split of ``n_ids`` ids: ``batch_size``, fewer if it is short.

    The split is cut into ``world_size`` times this many rows, so ``evaluate_ids`` with
    ``eval_streams(...) * world_size`` streams scores the same rows as a validation under DDP.
    """
    return max(1, min(batch_size, (n_ids - 1) // world_size))


def split_ids(ids: Tensor, val_fraction: float, test_fraction: float) -> Splits:
    """Contiguous split: the first (1 - val - test) for training, then val, then test."""
    n = ids.numel()
    n_val, n_test = int(n * val_fraction), int(n * test_fraction)
    n_train = n - n_val - n_test
    return Splits(ids[:n_train], ids[n_train:n_train + n_val], ids[n_train + n_val:])


NANOGPT_TRAIN = 0.9  # nanoGPT's data/shakespeare_char/prepare.py: train = data[:int(n * 0.9)], val = the rest


def nanogpt_split(ids: Tensor) -> Splits:
    """nanoGPT's split: the first int(0.9 n) ids to train, the rest to score. nanoGPT has no test split and reports
    the loss on this one, so val and test are the same ids (model selection and the reported figure alike)."""
    n_train = int(ids.numel() * NANOGPT_TRAIN)
    held_out = ids[n_train:]
    return Splits(ids[:n_train], held_out, held_out)


def splits_for(ids: Tensor, config: DataConfig) -> Splits:
    """The split ``config`` asks for (``data.split``): its fractions, or nanoGPT's."""
    if config.split == "nanogpt":
        return nanogpt_split(ids)
    return split_ids(ids, config.val_fraction, config.test_fraction)


def check_split_sizes(splits: Splits, config: DataConfig, path: Path) -> None:
    """Refuse, in one sentence, a corpus whose training split cannot fill one batch or whose validation or test
    split has fewer than the 2 characters one prediction needs."""
    need = config.batch_size * (config.bptt + 1)
    if splits.train.numel() < need:
        raise CharlmError(f"corpus {path} is too short: its training split has {splits.train.numel()} characters, "
                          f"one batch needs batch_size * (bptt + 1) = {need}; use a longer text or lower "
                          "data.batch_size / data.bptt")
    for name in ("val", "test"):
        if getattr(splits, name).numel() < 2:
            raise CharlmError(f"corpus {path} is too short for a {name} split")


class CharDataModule(L.LightningDataModule):
    """Serves stream windows; the vocabulary comes from the corpus unless a checkpoint's is given (then the
    text's characters outside it are an error, or with ``data.drop_unknown`` removed: see ``dropped``)."""

    def __init__(self, config: DataConfig, *, seed: int = 0, vocab: Vocab | None = None,
                 corpus: Corpus | None = None) -> None:
        super().__init__()
        self.config, self.seed = config, seed
        self.corpus = corpus if corpus is not None else load_corpus(config.path)
        self.vocab = vocab if vocab is not None else Vocab.from_text(self.corpus.text)
        what = f"corpus {self.corpus.path}"
        problem = None if config.drop_unknown else self.vocab.describe_unknown(self.corpus.text, what)
        if problem:  # a given vocabulary (fine-tuning) the text does not fit
            whose = f" ({self.vocab.origin})" if self.vocab.origin else ""
            raise CharlmError(f"{problem}{whose}; pass --drop-unknown (data.drop_unknown=true) to remove them "
                              "from the text")
        ids, self.dropped = corpus_ids(self.vocab, self.corpus.text, what, drop_unknown=config.drop_unknown)
        self.splits = splits_for(ids, config)
        check_split_sizes(self.splits, config, self.corpus.path)

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def layout(self, split: str, *, rank: int = 0, world_size: int = 1) -> StreamLayout:
        ids: Tensor = getattr(self.splits, split)
        if split == "train":
            return StreamLayout(ids, self.config.batch_size, rank=rank, world_size=world_size)
        # evaluation: fewer streams if the split is short, and the tail so every char counts once
        per_rank = eval_streams(ids.numel(), self.config.eval_batch_size, world_size)
        return StreamLayout(ids, per_rank, rank=rank, world_size=world_size, keep_tail=True)

    def _loader(self, split: str) -> DataLoader:
        rank, world = self._rank_world()
        layout = self.layout(split, rank=rank, world_size=world)
        train = split == "train"
        sampler = WindowSampler(layout, self.config.bptt, variable=train and self.config.variable_bptt,
                                seed=self.seed)
        pin = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        if train:  # remembers its place in the epoch, so a resumed run goes on from the next window
            return ResumableLoader(StreamDataset(layout), sampler, pin_memory=pin)
        # own generator: creating an iterator must not draw from the global RNG (dropout's stream)
        return DataLoader(StreamDataset(layout), sampler=sampler, batch_size=None, collate_fn=collate_batch,
                          pin_memory=pin, generator=torch.Generator())

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


def corpus_ids(vocab: Vocab, text: str, what: str, *, drop_unknown: bool = False) -> tuple[Tensor, Counter[str]]:
    """``text`` as ids, and the characters left out: with ``drop_unknown`` those outside ``vocab`` are removed
    first (and counted), else they are an error naming them (``Vocab.encode``)."""
    dropped = vocab.unknown(text) if drop_unknown else Counter()
    if dropped:
        text = "".join(c for c in text if c not in dropped)
    return vocab.encode(text, what=what), dropped


def run_splits(vocab: Vocab, data: DataConfig, corpus: Corpus) -> Splits:
    """``corpus`` cut as a run with this ``data`` section cut it: its characters dropped or refused as the run
    did (a fine-tuned run with ``data.drop_unknown`` trained without those it dropped), then its split
    (:func:`splits_for`). ``charlm eval`` and the model card of ``charlm export --format safetensors`` score these."""
    ids, _ = corpus_ids(vocab, corpus.text, f"corpus {corpus.path}", drop_unknown=data.drop_unknown)
    return splits_for(ids, data)


def text_ids(vocab: Vocab, text: str, what: str) -> Tensor:
    """Encode an evaluation text with a checkpoint's vocabulary (a clear error for unknown chars)."""
    if len(text) < 2:
        raise CharlmError(f"{what} needs at least 2 characters to score")
    return vocab.encode(text, what=what)



