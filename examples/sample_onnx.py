"""Sample text from a model exported by ``charlm export CKPT --format onnx``, with onnxruntime and numpy only.

    python examples/sample_onnx.py runs/x/onnx --prime "ROMEO:" --length 300 --temperature 0.7 --top-k 20 --seed 1

The folder holds ``model.onnx`` (one step: ids (N,) and each layer's state in, logits (N, V) and the new
state out) and ``model.json`` (the vocabulary in id order, the state layout, the sampling defaults). The
prime is read one character at a time from a zero state, as ``charlm sample`` does; then each character
is drawn from softmax(logits / temperature), within the top k if given (greedy at temperature 0).
PyTorch is never imported.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


def load(folder: Path) -> tuple[ort.InferenceSession, dict]:
    meta = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    session = ort.InferenceSession(str(folder / meta["onnx_file"]), providers=["CPUExecutionProvider"])
    return session, meta


def pick(logits: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator) -> int:
    """The next id from one row of logits (V,)."""
    if temperature == 0:
        return int(np.argmax(logits))
    scores = (logits.astype(np.float64) - logits.max()) / temperature
    if top_k is not None and top_k < scores.size:
        kth = np.sort(scores)[-top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores)
    probs /= probs.sum()
    return int(rng.choice(scores.size, p=probs))


def sample(session: ort.InferenceSession, meta: dict, prime: str, length: int, temperature: float,
           top_k: int | None, seed: int | None) -> str:
    vocab = meta["vocab"]
    index = {c: i for i, c in enumerate(vocab)}
    unknown = sorted(set(prime) - set(index))
    if not prime or unknown:
        raise SystemExit(f"error: --prime must be non-empty text of the model's characters; unknown: {unknown!r}")
    names = [(name, nxt, shape[1]) for layer in meta["state"]["layers"]
             for name, nxt, shape in zip(layer["inputs"], layer["outputs"], layer["shapes"], strict=True)]
    state = {name: np.zeros((1, size), np.float32) for name, _, size in names}
    outputs = ["logits"] + [nxt for _, nxt, _ in names]
    rng = np.random.default_rng(seed)
    text = list(prime)

    def step(char_id: int) -> np.ndarray:
        got = session.run(outputs, {"ids": np.array([char_id], np.int64), **state})
        for (name, _, _), value in zip(names, got[1:], strict=True):
            state[name] = value
        return got[0][0]

    for ch in prime:
        logits = step(index[ch])
    for _ in range(length):
        nxt = pick(logits, temperature, top_k, rng)
        text.append(vocab[nxt])
        logits = step(nxt)
    return "".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the folder charlm export wrote (model.onnx, model.json)")
    parser.add_argument("--prime", default="\n", help="text the sample starts with")
    parser.add_argument("--length", type=int, default=500, help="characters to generate after the prime")
    parser.add_argument("--temperature", type=float, default=None, help="default: the model's (model.json)")
    parser.add_argument("--top-k", type=int, default=None, help="sample only from the k likeliest characters")
    parser.add_argument("--seed", type=int, default=None, help="same seed, same text")
    args = parser.parse_args()
    session, meta = load(args.folder)
    temperature = meta["sampling"]["temperature"] if args.temperature is None else args.temperature
    top_k = meta["sampling"].get("top_k") if args.top_k is None else args.top_k
    if args.length < 0 or temperature < 0 or (top_k is not None and top_k < 1):
        raise SystemExit("error: --length and --temperature must be >= 0 and --top-k >= 1")
    sys.stdout.write(sample(session, meta, args.prime, args.length, temperature, top_k, args.seed) + "\n")


if __name__ == "__main__":
    main()
