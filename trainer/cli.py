"""How every script starts and ends for the person at the keyboard: user mistakes as one line, not a traceback.

A user mistake (a bad flag or value, a missing file, a malformed data line, a flag that conflicts with a
checkpoint) is raised as a UserError (or a DataError / ChatFormatError / ConfigError / TokenizerError, which
are the same kind of thing) and ends the script with ONE line on stderr naming the problem and the fix, and
exit status 2. Under torchrun every rank raises it, and only rank 0 prints it. Anything else is a bug in this
code and keeps its traceback; `--debug` shows the traceback of user mistakes too.

    if __name__ == "__main__":
        run_main(main)
"""
import argparse
import math
import os
import sys


class UserError(Exception):
    """A mistake the user can fix. The message names the problem and the fix, in one line."""


class ReportedOnMainRank(UserError):
    """A user error found on rank 0 and announced to the other ranks: they exit 2 without printing it again."""


def user_error_types():
    """Every exception class that means 'the user's input is wrong' (imported lazily: no import cycles)."""
    from dataset.chat import ChatFormatError
    from dataset.jsonl import DataError
    from model.config import ConfigError
    from model.tokenizer import TokenizerError
    return (UserError, DataError, ChatFormatError, ConfigError, TokenizerError)


def is_main_rank():
    """Rank 0, known from torchrun's environment even before (or without) a process group."""
    return os.environ.get("RANK", "0") == "0"


def one_line(message):
    return " ".join(str(message).split("\n")).strip()


def print_error(message, prog=None):
    """The one line a user mistake gets, from rank 0 only."""
    if is_main_rank():
        prog = prog or os.path.basename(sys.argv[0])
        print(f"{prog}: error: {one_line(message)}", file=sys.stderr, flush=True)


def _leave_process_group():
    """After an error, leave the process group WITHOUT a barrier (the other ranks may be anywhere)."""
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort on the way out; the error that matters is already printed
        pass


def run_main(main):
    """Call main(); turn a user mistake into one line + exit 2, Ctrl-C into exit 130, both without a traceback."""
    debug = "--debug" in sys.argv[1:]
    try:
        main()
    except user_error_types() as e:
        if debug:
            raise
        if not isinstance(e, ReportedOnMainRank):
            print_error(e)
        sys.exit(2)
    except KeyboardInterrupt:
        if debug:
            raise
        if is_main_rank():
            print("\ninterrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        _leave_process_group()  # a no-op after a clean finish (the script already left the group)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep the usage examples' line breaks, and show each flag's default once: '(default: X)' is added
    only when the help text does not already speak of its default, and never for None/False/''."""

    def _get_help_string(self, action):
        text = action.help or ""
        no_default = action.default is None or action.default is False or action.default in ("", argparse.SUPPRESS)
        if "default" in text or no_default:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (from rank 0 only) and our help formatter."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show the traceback of a user mistake too")

    def error(self, message):
        print_error(f"{message} (see --help)", self.prog)
        sys.exit(2)


def checked_number(text, kind, ok, what):
    """An argparse type's work: `text` as int or float, or one line saying what the flag takes (argparse's own
    message for a word would name the type function: "invalid positive_int value: 'abc'")."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or not ok(value):    # inf or nan: no flag means them
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def positive_int(text):
    """argparse type: an integer >= 1."""
    return checked_number(text, int, lambda v: v >= 1, "a positive integer")


def non_negative_int(text):
    return checked_number(text, int, lambda v: v >= 0, "0 or a positive integer")


def positive_float(text):
    return checked_number(text, float, lambda v: v > 0, "a number > 0")


def non_negative_float(text):
    return checked_number(text, float, lambda v: v >= 0, "a number >= 0")


def fraction(text):
    """argparse type: a number in [0, 1]."""
    return checked_number(text, float, lambda v: 0 <= v <= 1, "between 0 and 1")


def probability_mass(text):
    """argparse type for --top_p: a number in (0, 1]."""
    return checked_number(text, float, lambda v: 0 < v <= 1, "in (0, 1]")
