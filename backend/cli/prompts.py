"""Questions the command line asks a person in a terminal (and what it does where nobody can answer)."""
import select
import sys
from pathlib import Path

from backend.errors import ImsrcError

DEFAULT_POPULATE = 1000  # what the populate dialog offers for CIFAR-10 and Fashion-MNIST (the seed's default)


def ask_populate(args) -> None:
    """Ask for what `populate` was not told: the dataset (saying which can be had here), a path, how many."""
    from backend.pipeline.datasets import DATASET_TITLES, DATASETS, availability, default_dataset

    if args.dataset is None:
        found = {name: availability(name) for name in ("cifar10", "fashion-mnist")}
        default, why = default_dataset(found["cifar10"])
        print("Datasets:")
        for number, name in enumerate(DATASETS, 1):
            ok, where = found.get(name, (True, ""))
            note = f" ({where})" if ok and where else f" (not available here: {where})" if not ok else ""
            print(f"  {number}) {DATASET_TITLES[name]}{note}")
        print(why)
        args.dataset = DATASETS[ask_number("Dataset", DATASETS.index(default) + 1, maximum=len(DATASETS)) - 1]
    if args.dataset in ("folder", "csv") and args.data_dir is None:
        question = "Folder (one subfolder per category)" if args.dataset == "folder" else "CSV file"
        while not (answer := ask(f"{question}: ").strip()):
            pass
        args.data_dir = Path(answer).expanduser()
    if args.num_images is None:
        everything = args.dataset in ("folder", "csv")
        args.num_images = ask_number("How many images", None if everything else DEFAULT_POPULATE)


POLL_SECONDS = 0.2  # how often a wait for an answer looks for a Ctrl-C that arrived meanwhile


class Unanswered(KeyboardInterrupt):
    """Ctrl-C at a question: the command had not started anything yet."""


def read_answer(prompt: str) -> str | None:
    """A line typed after `prompt` (without its newline), or None at end of input.

    Not input(): its readline loop blocks in select() with no timeout, so a Ctrl-C arriving between the prompt
    and that select() (as a person's right after the prompt shows can) waits for the next key instead of stopping
    the command. Here the wait wakes up every POLL_SECONDS, and the interpreter raises KeyboardInterrupt there."""
    sys.stdout.write(prompt)
    sys.stdout.flush()
    try:
        if sys.stdin.isatty():
            while not select.select([sys.stdin], [], [], POLL_SECONDS)[0]:
                pass
        line = sys.stdin.readline()
    except KeyboardInterrupt:
        print()  # off the prompt's line
        raise Unanswered("interrupted at a question: nothing was started") from None
    return line.rstrip("\n") if line else None


def ask(prompt: str) -> str:
    """An answer to `prompt`; an error (nothing is done) at end of input."""
    answer = read_answer(prompt)
    if answer is None:
        raise ImsrcError("no answer (end of input): nothing was populated")
    return answer


def ask_number(question: str, default: int | None, maximum: int | None = None) -> int | None:
    """A whole number from 1 to maximum, asked until one is given; Enter takes the default (None: all)."""
    while True:
        answer = ask(f"{question}? [{default if default is not None else 'all'}] ").strip()
        if not answer:
            return default
        if answer.isdigit() and 1 <= int(answer) <= (maximum or int(answer)):
            return int(answer)
        print(f"  please type a whole number from 1 to {maximum}" if maximum else "  please type a whole number, at least 1")


def confirmed(question: str, answer: str) -> bool:
    """Whether a person typed `answer` to `question`; where nobody can answer, an error saying to add --yes."""
    if not sys.stdin.isatty():
        raise ImsrcError("this cannot be undone: add --yes to confirm")
    if read_answer(question) != answer:
        print("not done")
        return False
    return True
