"""`charlm sample --interactive`: the state carried from line to line (the library session, a pipe, a real
terminal in tmux), the commands, Ctrl-C and Ctrl-D."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import shakespeare_text, write_model_checkpoint

from charlm.data.vocab import Vocab
from charlm.generation.continuation import generate
from charlm.generation.session import Session, Settings
from charlm.model.char_lm import CharLM
from charlm.model.checkpoint import load_model


@pytest.fixture(scope="module")
def sharp(sharp_checkpoint: Path) -> tuple[CharLM, Vocab]:
    model, vocab, _, _ = load_model(sharp_checkpoint)
    return model, vocab


def greedy(model: CharLM, vocab: Vocab, text: str, length: int) -> str:
    """What the library's greedy generation continues ``text`` with, read in one go."""
    return generate(model, vocab, text, length, temperature=0.0)[0][len(text):]


def piped(ckpt: Path, lines: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "charlm", "sample", "--interactive", "--checkpoint", str(ckpt), *args],
                          input="".join(f"{line}\n" for line in lines), capture_output=True, text=True, timeout=300)


def test_session_carries_the_state_and_stops_cleanly(sharp: tuple[CharLM, Vocab]) -> None:
    model, vocab = sharp
    session = Session(model, vocab, Settings(temperature=0.0, length=30))
    pieces: list[str] = []
    session.read("ROMEO:\n")
    assert session.continue_text(pieces.append, lambda: len(pieces) >= 7) == "interrupted"  # as Ctrl-C does
    first = "".join(pieces)
    assert first == greedy(model, vocab, "ROMEO:\n", 7)
    session.read("JULIET:\n")
    pieces.clear()
    assert session.continue_text(pieces.append) == "length"
    whole = "ROMEO:\n" + first + "JULIET:\n"
    assert "".join(pieces) == greedy(model, vocab, whole, 30)  # the 7 interrupted characters are in the state
    assert "".join(pieces) != greedy(model, vocab, "JULIET:\n", 30)
    stop = "".join(pieces)[10:12]
    session.reset()
    session.settings.stop = (stop,)
    session.read(whole)
    pieces.clear()
    assert session.continue_text(pieces.append) == "stop" and "".join(pieces).endswith(stop)


def test_piped_lines_are_answered_and_the_state_kept(sharp_checkpoint: Path, sharp: tuple[CharLM, Vocab]) -> None:
    """Two lines answered, the second from the state the first left; then the commands, a bad value, an unknown
    command, a character outside the vocabulary, /reset, a line sent with //, and /quit (one process: each
    start of the command costs seconds)."""
    model, vocab = sharp
    lines = ["ROMEO:", "JULIET:", "/topk nope", "/frob", "/length 25", "ROMEO: ~", "/reset", "ROMEO: ", "//KING",
             "/quit", "never read"]
    done = piped(sharp_checkpoint, lines, "--temperature", "0", "--length", "40")
    assert done.returncode == 0, done.stderr
    first, second = done.stdout[:40], done.stdout[41:81]
    assert first == greedy(model, vocab, "ROMEO:\n", 40)
    assert second == greedy(model, vocab, f"ROMEO:\n{first}JULIET:\n", 40)
    assert second != greedy(model, vocab, "JULIET:\n", 40)  # so the state did matter
    carried = greedy(model, vocab, f"ROMEO:\n{first}JULIET:\n{second}ROMEO: \n", 25)  # the ~ skipped
    fresh = greedy(model, vocab, "ROMEO: \n", 25)  # after the reset
    then = greedy(model, vocab, f"ROMEO: \n{fresh}KING\n", 25)  # "/KING": "/" is outside this vocabulary
    assert carried != fresh
    assert done.stdout == f"{first}\n{second}\n{carried}\n{fresh}\n{then}\n"  # no prompt; nothing after /quit
    unknown = "the line has 1 character(s) outside the model's {}-character vocabulary: {!r} (1x); they were skipped"
    assert done.stderr.splitlines() == [
        "error: /topk needs a whole number or off, got 'nope'",
        "error: unknown command /frob; /help lists the commands (start a line with // to send a line that begins "
        "with /)",
        "temperature 0, top-k off, top-p off, length 25, stop strings: none",
        unknown.format(len(vocab), "~"),
        "the state is reset: the next line starts a new text",
        unknown.format(len(vocab), "/")]


# ------------------------------------------------------------------------------------------------ tmux
class Terminal:
    """A real terminal: a tmux server of its own (its own socket), one window running a command."""

    def __init__(self, tmux: str, command: str) -> None:
        self.tmux, self.socket = tmux, f"charlm-test-{os.getpid()}"
        self._tmux("new-session", "-d", "-s", "t", "-x", "150", "-y", "40", command)

    def _tmux(self, *args: str) -> str:
        return subprocess.run([self.tmux, "-L", self.socket, *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "t", *keys)

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-J", "-t", "t", "-S", "-2000")  # wrapped lines joined

    def wait_for(self, done: Callable[[str], bool], what: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if done(screen):
                return screen
            time.sleep(0.1)
        raise AssertionError(f"the terminal never showed {what}; it shows:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run([self.tmux, "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


def as_shown(text: str) -> list[str]:
    """The lines of ``text`` as a terminal shows them (tmux drops trailing spaces) up to the last non-empty one."""
    return [line.rstrip() for line in text.rstrip().split("\n")]


def prompts(screen: str) -> int:
    return sum(line.startswith(">") for line in screen.splitlines())  # ">" is not in the model's vocabulary


def test_in_a_real_terminal(tmp_path: Path) -> None:
    """The prompt, a continuation, /temp 0, Ctrl-C at the prompt and during a long continuation, Ctrl-D."""
    tmux = shutil.which("tmux")
    if tmux is None:
        pytest.skip("tmux is not installed")
    ckpt = write_model_checkpoint(tmp_path / "ascii.ckpt", shakespeare_text(), scale=4.0, hidden_size=32,
                                  embedding_size=16)  # ASCII only: what the screen shows is what was written
    model, vocab, _, _ = load_model(ckpt)
    command = shlex.join([sys.executable, "-m", "charlm", "sample", "--interactive", "--checkpoint", str(ckpt),
                          "--length", "40", "--seed", "1"])
    env = f"env PYTHONPATH={shlex.quote(os.pathsep.join(sys.path))} TERM=xterm"
    term = Terminal(tmux, f"{env} {command}; echo EXIT=$?; sleep 60")
    try:
        term.wait_for(lambda s: prompts(s) == 1 and "/help lists the commands" in s, "the prompt")
        term.keys("ROMEO:", "Enter")
        term.wait_for(lambda s: prompts(s) == 2, "an answer and a second prompt")
        term.keys("/temp 0", "Enter")
        term.wait_for(lambda s: "temperature 0, top-k off" in s and prompts(s) == 3, "the new temperature")
        term.keys("JULIET:", "Enter")
        screen = term.wait_for(lambda s: prompts(s) == 4, "a greedy answer")
        session = Session(model, vocab, Settings(temperature=0.8, length=40), seed=1)  # what the terminal ran
        session.read("ROMEO:\n")
        session.continue_text(lambda ch: None)
        session.settings.temperature = 0.0
        session.read("JULIET:\n")
        pieces: list[str] = []
        session.continue_text(pieces.append)
        shown = screen.split("> JULIET:\n", 1)[1].rsplit("\n>", 1)[0]
        assert as_shown(shown) == as_shown("".join(pieces))
        term.keys("half a line", "C-c")
        term.wait_for(lambda s: "(Ctrl-D quits)" in s and prompts(s) == 5, "the hint after Ctrl-C at the prompt")
        term.keys("/length 100000", "Enter")
        term.wait_for(lambda s: prompts(s) == 6, "the new length")
        term.keys("KING:", "Enter")
        term.wait_for(lambda s: len(s.split("> KING:", 1)[-1]) > 200, "a long answer streaming")
        term.keys("C-c")
        term.wait_for(lambda s: "(stopped)" in s and prompts(s) == 7, "the prompt again after Ctrl-C")
        term.keys("C-d")
        term.wait_for(lambda s: "EXIT=0" in s, "the session ending with exit 0 on Ctrl-D")
    finally:
        term.close()
