"""`charlm export --format onnx`: every cell exports and matches or is refused, onnxruntime over 1,000 characters
matches `charlm eval`, the example samples without torch, and bad input leaves nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import invoke, shakespeare_text

from charlm.cells.registry import cell_names
from charlm.config import Config, ModelConfig
from charlm.data.vocab import Vocab
from charlm.evaluation.scoring import evaluate_ids
from charlm.generation.continuation import generate
from charlm.model.char_lm import CharLM
from charlm.model.checkpoint import load_model
from charlm.native.build import cpp_off
from charlm.tools.export.onnx import INSTALL_HINT, NOT_EXPORTABLE, export_model, state_slots
from charlm.util.atomic import FOLDER_MODE
from charlm.util.errors import CharlmError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample_onnx.py"




def run_onnx(folder: Path, ids: np.ndarray) -> np.ndarray:
    """Logits (T, N, V) of the exported step driven over ids (T, N), the state carried from zeros."""
    meta = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    session = ort.InferenceSession(str(folder / meta["onnx_file"]), providers=["CPUExecutionProvider"])
    layout = [(i, o, s[1]) for layer in meta["state"]["layers"]
              for i, o, s in zip(layer["inputs"], layer["outputs"], layer["shapes"], strict=True)]
    state = {name: np.zeros((ids.shape[1], size), np.float32) for name, _, size in layout}
    outputs = ["logits"] + [o for _, o, _ in layout]
    logits = []
    for t in range(ids.shape[0]):
        got = session.run(outputs, {"ids": ids[t].astype(np.int64), **state})
        state = {name: value for (name, _, _), value in zip(layout, got[1:], strict=True)}
        logits.append(got[0])
    return np.stack(logits)


def test_every_cell_exports_and_matches_or_is_refused(tmp_path: Path) -> None:
    vocab = Vocab("abcdefg")
    x = torch.randint(0, len(vocab), (3, 6), generator=torch.Generator().manual_seed(0))
    for name in cell_names():
        torch.manual_seed(0)
        model = CharLM(len(vocab), ModelConfig(cell=name, embedding_size=8, hidden_size=12, num_layers=2))
        with torch.no_grad():  # peepholes and fgr's gate recurrence start at zero: make every weight count
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.2)
        model.eval()
        config = Config(model=model.config)
        out = tmp_path / name
        if name in NOT_EXPORTABLE:
            with pytest.raises(CharlmError) as caught:
                export_model(model, vocab, config, out)
            assert str(caught.value) == f"cell {name} cannot be exported to ONNX: {NOT_EXPORTABLE[name]}"
            assert not out.exists()
            continue
        export_model(model, vocab, config, out)
        with torch.no_grad(), cpp_off():  # lstm-ln: its Python kernel, not a C++ build (compared with it elsewhere)
            expected = model(x).logits.transpose(0, 1).numpy()  # the sequence path: kernels, torch RNN ops
        got = run_onnx(out, x.t().numpy())
        assert np.abs(got - expected).max() < 1e-5, name
    assert set(NOT_EXPORTABLE) == {"lstm-bn"}


def test_onnx_matches_charlm_eval_on_1000_chars(trained_run: Path, tmp_path: Path) -> None:
    ckpt = trained_run / "best.ckpt"
    code, output = invoke("export", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "onnx"))
    assert code == 0, output
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["model.json", "model.onnx"]
    assert (tmp_path / "onnx").stat().st_mode & 0o777 == FOLDER_MODE  # as a plain mkdir, not mkdtemp's 0700
    model, vocab, cfg, _ = load_model(ckpt)
    meta = json.loads((tmp_path / "onnx" / "model.json").read_text(encoding="utf-8"))
    assert meta["vocab"] == vocab.chars and meta["cell"] == cfg.model.cell
    assert meta["sampling"] == {"temperature": cfg.sample.temperature, "top_k": None, "prime": cfg.sample.prime}
    assert [layer["shapes"] for layer in meta["state"]["layers"]] == [
        [["N", s.size] for s in state_slots(model) if s.layer == i] for i in range(cfg.model.num_layers)]
    ids = vocab.encode(shakespeare_text(21_000)[20_000:])  # 1,000 characters the model did not train on first
    assert ids.numel() == 1000
    expected = evaluate_ids(model, ids, batch_size=1, bptt=cfg.data.bptt)  # what `charlm eval` computes
    logits = run_onnx(tmp_path / "onnx", ids[:-1, None].numpy())[:, 0].astype(np.float64)  # (999, V)
    log_probs = logits - logits.max(1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
    nll = -log_probs[np.arange(999), ids[1:].numpy()].mean()
    assert abs(nll - expected["loss"]) < 1e-4
    with torch.no_grad():
        reference = model(ids[None, :-1]).logits[0].numpy()
    assert np.abs(logits - reference).max() < 1e-4


def test_example_samples_without_torch(trained_run: Path, tmp_path: Path) -> None:
    ckpt = trained_run / "best.ckpt"
    assert invoke("export", str(ckpt), "--out", str(tmp_path / "onnx"))[0] == 0
    base = [sys.executable, "-X", "importtime", str(EXAMPLE), str(tmp_path / "onnx"), "--prime", "ROMEO:",
            "--length", "60"]
    random = subprocess.run([*base, "--temperature", "0.8", "--top-k", "5", "--seed", "3"], capture_output=True,
                            text=True, timeout=120, check=True)
    imported = {line.rsplit("|", 1)[-1].strip() for line in random.stderr.splitlines()
                if line.startswith("import time")}
    assert "onnxruntime" in imported and "numpy" in imported
    assert not [m for m in imported if m == "torch" or m.startswith("torch.")]
    text = random.stdout.removesuffix("\n")
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 60
    greedy = subprocess.run([*base, "--temperature", "0"], capture_output=True, text=True, timeout=120, check=True)
    model, vocab, _, _ = load_model(ckpt)
    assert greedy.stdout.removesuffix("\n") == generate(model, vocab, "ROMEO:", 60, temperature=0.0)[0]


def test_export_bad_input_writes_nothing(trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = str(trained_run / "best.ckpt")
    missing = tmp_path / "none.ckpt"
    assert invoke("export", str(missing)) == (2, f"error: checkpoint {missing} does not exist")
    assert invoke("export", ckpt, "--format", "tflite") == (
        2, "error: --format must be one of onnx, web, safetensors, got 'tflite'")
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    assert invoke("export", ckpt, "--out", str(full)) == (
        2, f"error: --out {full} already holds files; choose a new or empty folder, or add --force to replace its "
           "model.onnx and model.json")
    assert sorted(p.name for p in full.iterdir()) == ["notes.txt"]
    assert invoke("export", ckpt, "--out", str(full), "--force")[0] == 0
    assert sorted(p.name for p in full.iterdir()) == ["model.json", "model.onnx", "notes.txt"]
    assert (full / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left

    bn = tmp_path / "bn.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    saved["hyper_parameters"]["config"]["model"]["cell"] = "lstm-bn"
    model_cfg = ModelConfig(**saved["hyper_parameters"]["config"]["model"])
    bn_model = CharLM(len(saved["hyper_parameters"]["vocab"]), model_cfg)
    saved["state_dict"] = {f"model.{k}": v for k, v in bn_model.state_dict().items()}
    torch.save(saved, bn)
    out = tmp_path / "bn-out"
    assert invoke("export", str(bn), "--out", str(out)) == (
        2, f"error: cell lstm-bn cannot be exported to ONNX: {NOT_EXPORTABLE['lstm-bn']}")
    assert not out.exists()

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # the extra not installed: importing it fails
    assert invoke("export", ckpt, "--out", str(tmp_path / "x")) == (2, f"error: {INSTALL_HINT}")
    assert not (tmp_path / "x").exists()
