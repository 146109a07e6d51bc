"""``charlm data``: where the corpus is, its hash, vocabulary and splits."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from charlm.commands.common import friendly, out


@friendly
def data_(
    data: Annotated[str | None, typer.Option(help="Corpus text file (default: tiny Shakespeare).")] = None,
    config: Annotated[str, typer.Option(help="Config whose split to use.")] = "default",
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override: section.key=value (e.g. data.split=nanogpt).")] = None,
) -> None:
    """Where the corpus is, its sha256, size, vocabulary and split sizes."""
    from charlm.config import load_config
    from charlm.data.corpus import load_corpus
    from charlm.data.datamodule import check_split_sizes, splits_for
    from charlm.data.vocab import Vocab

    cfg = load_config(config, set_)
    corpus = load_corpus(data if data is not None else cfg.data.path)
    vocab = Vocab.from_text(corpus.text)
    splits = splits_for(vocab.encode(corpus.text), cfg.data)
    check_split_sizes(splits, cfg.data, corpus.path)  # as charlm train would
    table = Table(show_header=False)
    table.add_column("what", no_wrap=True)
    table.add_column("value", overflow="fold")  # a narrow terminal folds the hash, never cuts it
    table.add_row("path", str(corpus.path))
    table.add_row("sha256", corpus.sha256)
    table.add_row("characters", f"{len(corpus.text):,}")
    table.add_row("vocabulary", f"{len(vocab)}: {vocab.chars!r}")
    for name in ("train", "val", "test"):
        same = " (the val split: nanoGPT's split has no test split)" if name == "test" and splits.test is splits.val \
            else ""
        table.add_row(f"{name} split", f"{getattr(splits, name).numel():,}{same}")
    out.print(table)
