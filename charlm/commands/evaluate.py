"""``charlm eval``: loss, bits per character and perplexity of a checkpoint."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from charlm.commands.common import checkpoint_path, err, friendly, out, stdout_may_close
from charlm.util.errors import CharlmError

# --windowed / --blocks: nanoGPT's shakespeare_char evaluation, block_size 256, eval_iters 200 x batch_size 64
NANOGPT_BLOCK, NANOGPT_BLOCKS = 256, 12_800

# --dynamic's step size and decay: the best of a small search on a piece of the default model's validation split
# (benchmarks/results/dynamic-eval.md)
DYNAMIC_LR, DYNAMIC_DECAY = 2e-4, 0.02
# (benchmarks/results/dynamic-eval.md)


@friendly
def evaluate(
    checkpoint: Annotated[str | None, typer.Option(
        help="Checkpoint: a .ckpt file or an exported safetensors folder (default: newest run's best).")] = None,
    split: Annotated[str, typer.Option(help="val or test.")] = "val",
    text: Annotated[str | None, typer.Option(help="Evaluate this text file instead of a split.")] = None,
    data: Annotated[str | None, typer.Option(help="Corpus the split is cut from (default: the run's).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    batch_size: Annotated[int | None, typer.Option(
        help="Streams evaluated side by side (default: as the run's validation, so the loss matches its "
             "val_loss: data.eval_batch_size x the processes it trained on).", show_default=False)] = None,
    dynamic: Annotated[bool, typer.Option(
        help="Dynamic evaluation: adapt the weights to the text as it is read (one stream, each segment "
             "scored before its gradient step).")] = False,
    dynamic_lr: Annotated[float | None, typer.Option(
        help=f"Step size of --dynamic (default {DYNAMIC_LR:g}).", show_default=False)] = None,
    dynamic_decay: Annotated[float | None, typer.Option(
        help=f"Decay toward the trained weights per segment (default {DYNAMIC_DECAY:g}).",
        show_default=False)] = None,
    dynamic_bptt: Annotated[int | None, typer.Option(
        help="Segment length of --dynamic (default: the run's data.bptt).", show_default=False)] = None,
    per_char: Annotated[str | None, typer.Option(
        help="Write each character's NLL to this CSV (position, char, nll in nats).", show_default=False)] = None,
    windowed: Annotated[int | None, typer.Option(
        help=f"Score as nanoGPT does: random blocks of this many characters (nanoGPT: {NANOGPT_BLOCK}), each "
             "from a zero state, averaged; comparable with its published losses.", show_default=False)] = None,
    blocks: Annotated[int | None, typer.Option(
        help=f"With --windowed: how many random blocks (default {NANOGPT_BLOCKS:,}, nanoGPT's 200 batches of 64).",
        show_default=False)] = None,
    seed: Annotated[int | None, typer.Option(
        help="With --windowed: seed of the block starts (default 0; the same seed, the same blocks).",
        show_default=False)] = None,
) -> None:
    """Loss (nats/char), bits per char and perplexity of a checkpoint on a split or a file."""
    from charlm.config import check_seed
    from charlm.data.corpus import load_corpus, read_corpus, resolve_corpus_path
    from charlm.data.datamodule import run_splits, text_ids
    from charlm.evaluation.dynamic import evaluate_dynamic, evaluate_static, write_char_nlls
    from charlm.evaluation.scoring import (
        evaluate_blocks,
        evaluate_ids,
        finite_or_null,
        nonfinite_parameters,
        validation_streams,
    )
    from charlm.model.checkpoint import load_model
    from charlm.util.atomic import check_output_file
    from charlm.util.threads import fast_cpu_math

    if per_char is not None:
        check_output_file(per_char, "--per-char")  # before the work that fills it
    if split not in ("val", "test"):
        raise CharlmError(f"--split must be val or test, got '{split}'")
    if batch_size is not None and batch_size < 1:
        raise CharlmError(f"--batch-size must be at least 1, got {batch_size}")
    given = [flag for flag, v in (("--dynamic-lr", dynamic_lr), ("--dynamic-decay", dynamic_decay),
                                  ("--dynamic-bptt", dynamic_bptt)) if v is not None]
    if given and not dynamic:
        raise CharlmError(f"{given[0]} sets up dynamic evaluation; add --dynamic")
    windowed_given = [flag for flag, v in (("--blocks", blocks), ("--seed", seed)) if v is not None]
    if windowed_given and windowed is None:
        raise CharlmError(f"{windowed_given[0]} sets up the windowed evaluation; add --windowed {NANOGPT_BLOCK}")
    if windowed is not None:
        conflict = next((flag for flag, on in (("--dynamic", dynamic), ("--per-char", per_char is not None)) if on),
                        None)
        if conflict:
            raise CharlmError(f"--windowed scores random blocks, not the text in order; leave out {conflict}")
        for flag, value in (("--windowed", windowed), ("--blocks", blocks)):
            if value is not None and value < 1:
                raise CharlmError(f"{flag} must be at least 1, got {value}")
        if seed is not None:
            check_seed(seed, "--seed")
    if dynamic and batch_size not in (None, 1):
        raise CharlmError("--dynamic reads the text as one stream, in order, so that every score stays a "
                          f"prediction; leave out --batch-size (got {batch_size}) or give 1")
    from charlm.evaluation.dynamic import DynamicSettings

    settings = DynamicSettings(lr=DYNAMIC_LR if dynamic_lr is None else dynamic_lr,
                               decay=DYNAMIC_DECAY if dynamic_decay is None else dynamic_decay,
                               bptt=1 if dynamic_bptt is None else dynamic_bptt)  # 1: the run's, once loaded
    settings.check()  # before the slow load
    path = checkpoint_path(checkpoint)
    model, vocab, cfg, ckpt = load_model(path)
    fast_cpu_math()
    splits = None
    if text is None or dynamic:  # dynamic evaluation's gradient statistics come from the training split
        corpus = load_corpus(data if data is not None else cfg.data.path)
        splits = run_splits(vocab, cfg.data, corpus)  # as the run cut it
        ids, source = getattr(splits, split), f"{corpus.path} ({split} split)"
    if text is not None:
        corpus = read_corpus(resolve_corpus_path(text, option="--text"), "--text file")
        ids = text_ids(vocab, corpus.text, what=f"--text file {corpus.path}")
        source = str(corpus.path)
    streams = 1 if dynamic else batch_size or validation_streams(ckpt, ids.numel(), cfg.data.eval_batch_size)
    # the training run's window, as its validation used: lstm-bn's per-step statistics restart with every
    # window, so its loss depends on the window length (the other cells' does not, up to float rounding)
    nll = None
    if windowed is not None:
        if ids.numel() < windowed + 1:
            raise CharlmError(f"{source} has {ids.numel():,} characters, too few for one block of {windowed} and its "
                              "last target; give a smaller --windowed")
        options = {"block": windowed, "blocks": NANOGPT_BLOCKS if blocks is None else blocks,
                   "seed": 0 if seed is None else seed}
        streams = batch_size or 64
        result = {**evaluate_blocks(model, ids, batch_size=streams, **options), "windowed": options}
    elif dynamic:
        assert splits is not None
        settings = replace(settings, bptt=cfg.data.bptt if dynamic_bptt is None else dynamic_bptt)
        result, nll = evaluate_dynamic(model, ids, splits.train, settings, train_batch_size=cfg.data.batch_size,
                                       train_bptt=cfg.data.bptt)
        result["dynamic"] = settings.to_dict()
    elif per_char is not None:
        result, nll = evaluate_static(model, ids, batch_size=streams, bptt=cfg.data.bptt)
    else:
        result = evaluate_ids(model, ids, batch_size=streams, bptt=cfg.data.bptt)
    if per_char is not None and nll is not None:
        with stdout_may_close():  # --per-char /dev/stdout | head: the reader may stop early
            write_char_nlls(per_char, ids, vocab, nll)
    bad = nonfinite_parameters(model)
    why = (f"checkpoint {path} has weights that are NaN or inf ({len(bad)} tensor(s), e.g. {bad[0]})" if bad
           else "the model's scores overflowed on this text")
    result = finite_or_null({"checkpoint": str(path), "source": source, "streams": streams, **result}, why)
    with stdout_may_close():
        if as_json:
            print(json.dumps(result, allow_nan=False))
            return
        mode = (f"\ndynamic evaluation: lr {settings.lr:g}, decay {settings.decay:g}, segments of {settings.bptt}"
                if dynamic else "")
        if windowed is not None:
            w = result["windowed"]
            mode = (f"\nwindowed (nanoGPT's way): {w['blocks']:,} random blocks of {w['block']} characters, each "
                    f"from a zero state, seed {w['seed']}")
        table = Table(title=f"{path}\n{source}{mode}", show_header=False)
        for key, fmt in (("loss", "{:.4f} nats/char"), ("bpc", "{:.4f} bits/char"), ("perplexity", "{:.3f}"),
                         ("chars", "{:,}"), ("chars_per_s", "{:,.0f}")):
            table.add_row(key, "not a finite number" if result[key] is None else fmt.format(result[key]))
        out.print(table)
    if "reason" in result:
        err.print(f"[bold yellow]warning:[/] {escape(result['reason'])}", highlight=False, soft_wrap=True)
