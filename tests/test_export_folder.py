"""`charlm export --format safetensors`: the folder's files and tensor names, a folder as `--checkpoint` for sample,
eval, viz and serve with exactly the checkpoint's logits and nothing unpickled, the model card's figures equal to
`charlm eval`'s, and bad folders, bad output paths and a failed export each one sentence with nothing left behind."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from conftest import invoke, shakespeare_text, write_model_checkpoint
from safetensors import safe_open
from typer.testing import CliRunner

from charlm.cells.registry import cell_names
from charlm.cli import app
from charlm.data.corpus import sha256_of
from charlm.model.checkpoint import load_model
from charlm.tools.export import model_card
from charlm.tools.export.hub import export_folder
from charlm.util.atomic import FOLDER_MODE

runner = CliRunner()
FILES = ["README.md", "config.json", "model.safetensors"]




@pytest.fixture(scope="module")
def folder(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "smoke-model"
    code, output = invoke("export", str(trained_run / "best.ckpt"), "--format", "safetensors", "--out", str(out))
    assert code == 0, output
    return out


def test_the_folder_holds_the_weights_under_their_documented_names(folder: Path, trained_run: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == FILES
    assert folder.stat().st_mode & 0o777 == FOLDER_MODE
    model, vocab, cfg, _ = load_model(trained_run / "best.ckpt")
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        names = list(f.keys())
        stored = {name: f.get_tensor(name) for name in names}
        assert f.metadata()["format"] == "pt"
    expected = model.state_dict()
    assert cfg.model.tie_weights
    assert sorted(names) == sorted(set(expected) - {"decoder.weight"})  # the tied matrix once, as encoder.weight
    for name in names:
        assert stored[name].dtype == torch.float32 and torch.equal(stored[name], expected[name]), name
    meta = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert meta["format"] == "charlm-safetensors" and meta["format_version"] == 1
    assert "".join(meta["vocab"]) == vocab.chars and meta["config"] == cfg.to_dict()
    assert meta["sampling"] == {"temperature": cfg.sample.temperature, "top_k": None, "top_p": None,
                                "prime": cfg.sample.prime, "length": cfg.sample.length}
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\nlibrary_name: charlm\n") and "\n---\n\n# smoke\n" in card
    for name in names:  # every tensor in the card's table, with its shape
        assert f"| `{name}` | {' x '.join(map(str, stored[name].shape))} |" in card


def test_every_cell_round_trips_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each cell (lstm-bn's running statistics included), tied and untied, with and without LayerNorm: the
    folder's model gives the checkpoint's logits bit for bit."""
    monkeypatch.chdir(tmp_path)  # no corpus here: the card's figures are skipped, quickly
    text = shakespeare_text(3_000)
    for i, cell in enumerate(cell_names()):
        ckpt = write_model_checkpoint(tmp_path / f"{cell}.ckpt", text, seed=i, cell=cell, layer_norm=i % 2 == 0,
                                      tie_weights=i % 3 != 0)
        model, vocab, cfg, record = load_model(ckpt)
        if cell == "lstm-bn":  # running statistics of 5 steps, so that the buffers hold something
            model.train()
            with torch.no_grad():
                model(vocab.encode(text[:40]).view(8, 5))
            model.eval()
        export_folder(model, vocab, cfg, record, tmp_path / cell, name=cell)
        again, _, again_cfg, _ = load_model(tmp_path / cell)
        assert again_cfg == cfg
        ids = vocab.encode(text[:300])[None]
        with torch.no_grad():
            assert torch.equal(again(ids).logits, model(ids).logits), cell


def served(offered: Path) -> tuple[list[str], dict[str, object]]:
    """The characters ``charlm serve`` streams for one request, and what it says of the checkpoint."""
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from charlm.tools.serve.app import create_app
    from charlm.tools.serve.registry import Registry
    from charlm.tools.serve.server import serve_in_thread

    body = {"checkpoint": "0", "prime": "ROMEO:", "length": 80, "temperature": 0.9, "seed": 5}
    with serve_in_thread(create_app(Registry([offered]))) as url, httpx.Client(base_url=url, timeout=30) as http:
        r = http.post("/api/generate", json=body)
        assert r.status_code == 200, r.text
        return [line for line in r.text.splitlines() if line.startswith('data: {"c"')], \
            http.get("/api/checkpoints/0").json()


def test_sample_eval_viz_serve_take_the_folder_and_never_unpickle(folder: Path, trained_run: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = trained_run / "best.ckpt"
    model, vocab, _, _ = load_model(ckpt)
    step = torch_step(trained_run)
    sample = ["sample", "--prime", "ROMEO:", "--length", "200", "--temperature", "0.9", "--seed", "5"]
    from_ckpt = runner.invoke(app, [*sample, "--checkpoint", str(ckpt)])
    evaluated = invoke("eval", "--checkpoint", str(ckpt), "--split", "test", "--json")
    viz_ckpt = runner.invoke(app, ["viz", "--checkpoint", str(ckpt), "--length", "60", "--seed", "1",
                                   "--out", str(tmp_path / "a.html")])
    assert from_ckpt.exit_code == 0 and evaluated[0] == 0 and viz_ckpt.exit_code == 0
    served_ckpt, _ = served(ckpt)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model folder was unpickled")

    for owner, name in ((torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads"),
                        (pickle, "Unpickler")):
        monkeypatch.setattr(owner, name, refuse)
    folder_model, folder_vocab, _, record = load_model(folder)
    assert folder_vocab == vocab and record["global_step"] == step
    ids = vocab.encode(shakespeare_text(2_000)[1_000:])[None]
    with torch.no_grad():
        assert torch.equal(folder_model(ids).logits, model(ids).logits)  # the same float32 weights: exactly
    from_folder = runner.invoke(app, [*sample, "--checkpoint", str(folder)])
    assert from_folder.exit_code == 0 and from_folder.output == from_ckpt.output
    code, output = invoke("eval", "--checkpoint", str(folder), "--split", "test", "--json")
    unlike = {"checkpoint": "", "chars_per_s": 0, "seconds": 0}  # the path, and the clock
    assert code == 0 and json.loads(output) | unlike == json.loads(evaluated[1]) | unlike
    viz_folder = runner.invoke(app, ["viz", "--checkpoint", str(folder), "--length", "60", "--seed", "1",
                                     "--out", str(tmp_path / "b.html")])
    assert viz_folder.exit_code == 0, viz_folder.output
    assert (tmp_path / "b.html").read_text().replace("smoke-model", "best.ckpt") == (tmp_path / "a.html").read_text()
    served_folder, info = served(folder)
    assert len(served_ckpt) == 80 and served_folder == served_ckpt
    assert info["global_step"] == step and info["cell"] == "lstm"


def torch_step(run: Path) -> int:
    return int(torch.load(run / "best.ckpt", map_location="cpu", weights_only=True)["global_step"])


def test_the_model_card_figures_are_charlm_evals(folder: Path, trained_run: Path, corpus_file: Path) -> None:
    meta = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    run = meta["run"]
    assert run["corpus"] == {"file": corpus_file.name, "sha256": sha256_of(corpus_file),
                             "chars": len(shakespeare_text())}
    assert run["global_step"] == torch_step(trained_run) and run["world_size"] == 1
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert f"sha256 `{sha256_of(corpus_file)}`" in card
    for split, label in (("val", "validation"), ("test", "test")):
        code, output = invoke("eval", "--checkpoint", str(trained_run / "best.ckpt"), "--split", split, "--json")
        assert code == 0, output
        result = json.loads(output)
        figures = run["evaluation"][split]
        assert figures["loss"] == pytest.approx(result["loss"], rel=1e-9, abs=0)
        assert figures["bpc"] == pytest.approx(result["bpc"], rel=1e-9, abs=0)
        assert (figures["chars"], figures["streams"]) == (result["chars"], result["streams"])
        row = (f"| {label} | {result['chars']:,} | {result['loss']:.4f} | {result['bpc']:.4f} | "
               f"{result['perplexity']:.3f} |")
        assert row in card
    steps = re.search(r"\| steps at this checkpoint \| ([\d,]+) \|", card)
    assert steps and int(steps[1].replace(",", "")) == torch_step(trained_run)


def test_a_card_without_the_corpus_says_so(sharp_checkpoint: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no data/tinyshakespeare.txt here, none configured (conftest), none downloaded
    code, output = invoke("export", str(sharp_checkpoint), "--format", "safetensors", "--out", "card")
    assert code == 0, output
    card = (tmp_path / "card" / "README.md").read_text(encoding="utf-8")
    assert "## Figures\n\nNot computed: the corpus the run trained on was not found when this folder was exported (" \
        in card
    assert "| validation |" not in card
    assert json.loads((tmp_path / "card" / "config.json").read_text())["run"]["evaluation"] is None
    # with the corpus named, the figures are there (the sharp model's vocabulary is the excerpt's plus "é")
    corpus = tmp_path / "with-e.txt"
    corpus.write_text(shakespeare_text() + "é", encoding="utf-8")
    code, output = invoke("export", str(sharp_checkpoint), "--format", "safetensors", "--out", "card2",
                          "--data", str(corpus))
    assert code == 0, output
    assert "| validation |" in (tmp_path / "card2" / "README.md").read_text(encoding="utf-8")


def copy_folder(source: Path, dest: Path) -> Path:
    dest.mkdir()
    for p in source.iterdir():
        (dest / p.name).write_bytes(p.read_bytes())
    return dest


def test_bad_folders_are_one_sentence(folder: Path, tmp_path: Path) -> None:
    sample = ("sample", "--prime", "A", "--length", "5", "--checkpoint")
    no_weights = copy_folder(folder, tmp_path / "no-weights")
    (no_weights / "model.safetensors").unlink()
    assert invoke(*sample, str(no_weights)) == (
        2, f"error: checkpoint folder {no_weights} has no model.safetensors; give a folder written by `charlm export "
           "--format safetensors`, or a .ckpt file")

    reshaped = copy_folder(folder, tmp_path / "reshaped")
    meta = json.loads((reshaped / "config.json").read_text())
    meta["config"]["model"]["hidden_size"] = 48  # the tensors are of 64
    (reshaped / "config.json").write_text(json.dumps(meta))
    weights = reshaped / "model.safetensors"
    assert invoke(*sample, str(reshaped)) == (
        2, f"error: {weights} (with its config.json) holds weights that do not fit the model its config describes "
           "(cell lstm, 2 layer(s) of 48, embedding 32): 5 of another shape (e.g. layers.0.bias_hh_l0: [256] in the "
           "file, [192] in the model); the file was altered, or written by a charlm whose models differ from "
           "this one (0.1.0)")

    garbled = copy_folder(folder, tmp_path / "garbled")
    (garbled / "config.json").write_text("{not json")
    code, output = invoke(*sample, str(garbled))
    assert (code, output) == (2, f"error: {garbled / 'config.json'} is not valid JSON (Expecting property name "
                                 "enclosed in double quotes at line 1, column 2); it must be the JSON `charlm export` "
                                 "wrote")
    truncated = copy_folder(folder, tmp_path / "truncated")
    (truncated / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:1000])
    code, output = invoke(*sample, str(truncated))
    assert code == 2 and output.startswith(f"error: {truncated / 'model.safetensors'} is not a readable safetensors "
                                           "file (truncated, corrupt, or another format): ")
    assert "Traceback" not in output


def test_export_refuses_a_used_folder_unless_forced_and_never_leaves_half_a_folder(
        trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = str(trained_run / "best.ckpt")
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    assert invoke("export", ckpt, "--format", "safetensors", "--out", str(used)) == (
        2, f"error: --out {used} already holds files; choose a new or empty folder, or add --force to replace its "
           "model.safetensors, config.json and README.md")
    assert sorted(p.name for p in used.iterdir()) == ["notes.txt"]
    assert invoke("export", ckpt, "--format", "safetensors", "--out", str(used), "--force")[0] == 0
    assert sorted(p.name for p in used.iterdir()) == sorted([*FILES, "notes.txt"])
    assert (used / "notes.txt").read_text() == "mine"
    assert invoke("export", ckpt, "--format", "onnx", "--data", "x.txt") == (
        2, "error: --data goes with --format safetensors, not onnx; drop it")

    def full_disk() -> str:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_card, "_template", full_disk)  # the card fails after the weights were written
    out = tmp_path / "failed"
    code, output = invoke("export", ckpt, "--format", "safetensors", "--out", str(out))
    assert (code, output) == (2, "error: could not read or write: No space left on device")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left
