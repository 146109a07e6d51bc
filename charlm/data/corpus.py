"""Finding, fetching and reading the corpus.

Resolution order (docs/training.md, Data): an explicit path (``--data FILE``);
``$CHARLM_DATA_DIR/tinyshakespeare.txt``; ``data/tinyshakespeare.txt`` of the working directory; the
user's cache folder (:func:`cache_dir`); else a download from the char-rnn repository into that cache
folder, checked against its sha256 and written atomically. Offline with no copy: one
:class:`CharlmError` that says where to put the file.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from charlm.util.atomic import atomic_file, path_kind
from charlm.util.errors import CharlmError

CORPUS_NAME = "tinyshakespeare.txt"
CORPUS_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
CORPUS_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


@dataclass(frozen=True)
class Corpus:
    """A text read from disk, with where it came from."""

    path: Path
    text: str
    sha256: str

    def record(self) -> dict[str, str | int]:
        """What a result file says of its corpus: the file's name (never its folder, which is the user's),
        its sha256 and its length in characters."""
        return {"file": self.path.name, "sha256": self.sha256, "chars": len(self.text)}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_dir() -> Path:
    """Where a downloaded corpus is kept: ``$CHARLM_CACHE_DIR``, else ``$XDG_CACHE_HOME/charlm``, else
    ``~/.cache/charlm`` (never the installed package, never the working directory)."""
    override = os.environ.get("CHARLM_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"  # XDG: relative is ignored
    return base / "charlm"


def download(url: str, dest: Path, sha256: str, timeout: float = 30.0) -> Path:
    """Fetch ``url`` to ``dest`` through :func:`charlm.util.atomic.atomic_file`: the hash is checked before the
    rename, so a wrong or broken download leaves nothing at ``dest``."""
    digest = hashlib.sha256()
    dest.parent.mkdir(parents=True, exist_ok=True)  # the cache folder
    with atomic_file(dest, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
        while chunk := response.read(1 << 16):
            digest.update(chunk)
            out.write(chunk)
        if digest.hexdigest() != sha256:
            raise CharlmError(f"downloaded {url} but its sha256 is {digest.hexdigest()}, expected {sha256}; "
                              f"not saved. Download it by hand to {dest}.")
    return dest


def resolve_corpus_path(explicit: str | Path | None = None, *, allow_download: bool = True,
                        option: str = "--data") -> Path:
    """The corpus file to use, downloading tiny Shakespeare into :func:`cache_dir` only when no copy is found.

    ``option`` is the command-line flag an explicit path came from, named in the error."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        kind = path_kind(path)
        if kind == "a folder":
            raise CharlmError(f"{option} {path} is a folder; give a text file")
        if kind not in (None, "a regular file"):  # /dev/null, a pipe, a socket
            raise CharlmError(f"{option} {path} is not a regular file; give a text file")
        if kind is None:
            what = "corpus file" if option == "--data" else f"{option} file"
            raise CharlmError(f"{what} {path} does not exist; give {option} an existing text file")
        return path
    env_dir = os.environ.get("CHARLM_DATA_DIR")
    if env_dir:
        path = Path(env_dir).expanduser() / CORPUS_NAME
        if path.is_file():
            return path
    local = Path("data") / CORPUS_NAME
    if local.is_file():
        return local
    cached = cache_dir() / CORPUS_NAME
    if cached.is_file():
        return cached
    if not allow_download:
        raise CharlmError(f"no corpus found; put {CORPUS_NAME} in {cached.parent}/ or set CHARLM_DATA_DIR")
    try:
        return download(CORPUS_URL, cached, CORPUS_SHA256)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        where = f"$CHARLM_DATA_DIR ({env_dir}) or {cached.parent}/" if env_dir else f"{cached.parent}/"
        raise CharlmError(
            f"tiny Shakespeare is not on this machine and could not be downloaded ({exc}).\n"
            f"Download {CORPUS_URL}\nand save it as {CORPUS_NAME} in {where}, "
            f"set CHARLM_DATA_DIR to its folder, or pass --data FILE.") from None


BOM = "\ufeff"  # a byte order mark some editors put at the start of a UTF-8 file: not part of the text


def read_utf8(path: Path, what: str, empty: str = "", *, max_chars: int | None = None) -> tuple[str, bytes]:
    """The text of a UTF-8 file (a byte order mark at its start removed) and its bytes, or one sentence naming
    ``what`` it was (``corpus``, ``--prime-file``) and why it cannot be read: a folder, a device or a pipe
    (which may never end, as ``/dev/zero``), not UTF-8, empty (``empty`` is added to that sentence), or
    longer than ``max_chars`` characters (then no more than that is read)."""
    kind = path_kind(path)
    if kind not in (None, "a folder", "a regular file"):
        raise CharlmError(f"{what} {path} is {kind}, not a text file; give the path of a UTF-8 text file")
    try:
        with path.open("rb") as fh:
            raw = fh.read() if max_chars is None else fh.read(4 * max_chars + 1)  # UTF-8: at most 4 bytes a char
    except FileNotFoundError:
        raise CharlmError(f"{what} {path} does not exist; give the path of a UTF-8 text file") from None
    except IsADirectoryError:
        raise CharlmError(f"{what} {path} is a folder; give the path of a UTF-8 text file") from None
    except OSError as exc:
        raise CharlmError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    too_long = f"{what} {path} is longer than {max_chars or 0:,} characters; give a shorter text"
    if max_chars is not None and len(raw) > 4 * max_chars:  # more bytes than max_chars characters can take
        raise CharlmError(too_long)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CharlmError(f"{what} {path} is not UTF-8 text (invalid byte 0x{raw[exc.start]:02x} at offset "
                          f"{exc.start}); save it as UTF-8") from None
    text = text.removeprefix(BOM)
    if not text:
        raise CharlmError(f"{what} {path} is empty{empty}")
    if max_chars is not None and len(text) > max_chars:
        raise CharlmError(too_long)
    return text, raw


def read_corpus(path: Path, what: str = "corpus") -> Corpus:
    """Read a UTF-8 text file, refusing empty and non-UTF-8 files with a clear message naming ``what`` it is
    (``corpus``, ``--text file``)."""
    text, raw = read_utf8(path, what)
    return Corpus(path=path, text=text, sha256=hashlib.sha256(raw).hexdigest())


def load_corpus(explicit: str | Path | None = None) -> Corpus:
    return read_corpus(resolve_corpus_path(explicit))
