"""``charlm sample --interactive``: lines in, continuations out, one :class:`Session` for the whole conversation.

In a terminal: a prompt, line editing and history (Python's ``readline`` where the platform has it),
Ctrl-C stops the continuation being written (at the prompt it only says how to quit), Ctrl-D ends the
session. Not in a terminal (a pipe, a file): no prompt, each line read and answered, so it can be scripted.
A line starting with ``/`` is a command (``/help``); ``//`` sends a line that starts with ``/``.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable, Iterator
from typing import TextIO

from charlm.generation.options import check_options
from charlm.generation.session import Session, usable_text
from charlm.util.errors import CharlmError

PROMPT = "> "
HELP = """\
Type a line: the model reads it (with its newline) and continues the text; the state carries on.
  /temp T     temperature (0 is greedy)        /topk K|off   sample from the K likeliest only
  /topp P|off nucleus: smallest set of mass P   /length N     characters per continuation
  /reset      forget the text so far            /settings     show the settings
  /quit       end the session (or Ctrl-D)       /help         this list
A line starting with // sends the rest of it, starting with /; Ctrl-C stops a continuation."""


class _Quit(Exception):
    """/quit was typed."""


def _number(text: str, kind: type[int] | type[float], command: str, off: bool = False) -> float | int | None:
    if off and text == "off":
        return None
    try:
        return kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise CharlmError(f"{command} needs {what}{' or off' if off else ''}, got {text!r}") from None


def command(session: Session, line: str) -> str:
    """Carry out one ``/command`` line; what to tell the user. A bad command or value raises one sentence and
    changes nothing."""
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    s = session.settings
    if name in ("/quit", "/exit"):
        raise _Quit
    if name == "/help":
        return HELP
    if name == "/settings":
        return describe(session)
    if name == "/reset":
        session.reset()
        return "the state is reset: the next line starts a new text"
    setters = {"/temp": ("temperature", float, False), "/topk": ("top_k", int, True),
               "/topp": ("top_p", float, True), "/length": ("length", int, False)}
    if name not in setters:
        raise CharlmError(f"unknown command {name}; /help lists the commands (start a line with // to send a "
                          "line that begins with /)")
    field, kind, off = setters[name]
    if not arg:
        raise CharlmError(f"{name} needs a value, e.g. {name} {'0.7' if kind is float else '20'}")
    value = _number(arg, kind, name, off)
    new = {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "length": s.length, field: value}
    check_options(new["length"], new["temperature"], new["top_k"], top_p=new["top_p"])  # type: ignore[arg-type]
    setattr(s, field, value)
    return describe(session)


def describe(session: Session) -> str:
    s = session.settings
    stops = ", ".join(repr(x) for x in s.stop) or "none"
    return (f"temperature {s.temperature:g}, top-k {s.top_k or 'off'}, top-p {s.top_p or 'off'}, length {s.length}, "
            f"stop strings: {stops}")


def _terminal_lines() -> Iterator[str]:
    """Lines typed at a prompt; Ctrl-C at the prompt drops the line and says how to quit; Ctrl-D ends."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input(); not on every platform)
    while True:
        try:
            yield input(PROMPT)
        except KeyboardInterrupt:
            print("\n(Ctrl-D quits)", file=sys.stderr, flush=True)
        except EOFError:
            print(file=sys.stderr, flush=True)
            return


def _piped_lines(stdin: TextIO) -> Iterator[str]:
    for line in stdin:
        yield line.removesuffix("\n").removesuffix("\r")


@contextlib.contextmanager
def _ctrl_c_sets_flag() -> Iterator[Callable[[], bool]]:
    """During a continuation Ctrl-C only raises a flag the generation loop checks between characters."""
    pressed = [False]

    def handler(signum: int, frame: object) -> None:
        pressed[0] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: pressed[0]
    finally:
        signal.signal(signal.SIGINT, previous)


def run(session: Session, *, terminal: bool, stdin: TextIO | None = None, stdout: TextIO | None = None,
        say: Callable[[str], None] | None = None) -> None:
    """The session's loop, until Ctrl-D, the end of the input, or /quit."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    newline = "\n" if "\n" in session.vocab.chars else ""
    if terminal:
        say("charlm interactive session: type a line and the model continues the text; /help lists the "
            "commands; Ctrl-D quits.")
    if not newline:
        say("the model's vocabulary has no newline, so each line is read without one")

    last = [""]  # the last character written

    def write(ch: str) -> None:
        last[0] = ch
        stdout.write(ch)
        stdout.flush()

    for line in _terminal_lines() if terminal else _piped_lines(stdin):
        try:
            if line.startswith("/") and not line.startswith("//"):
                say(command(session, line))
                continue
            text, problem = usable_text(session.vocab, line.removeprefix("/") + newline, "the line")
            if problem:
                say(problem)
            session.read(text)
            last[0] = ""
            with _ctrl_c_sets_flag() as pressed:
                ended = session.continue_text(write, pressed)
            if not terminal or last[0] != "\n":
                write("\n")  # ends the answer; not part of the text (never read into the state)
            if ended == "interrupted":
                say("(stopped)")
        except _Quit:
            return
        except KeyboardInterrupt:  # Ctrl-C while the line was being read in: the session goes on
            say("(stopped)")
        except CharlmError as exc:
            say(f"error: {exc}")
