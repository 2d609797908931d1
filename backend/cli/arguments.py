"""Argument types of the command line: each checks one kind of value and says what was wrong."""
import argparse


def collection_name(text: str) -> str:
    from backend.errors import InvalidQuery
    from backend.storage.collections import check_name

    try:
        return check_name(text)
    except InvalidQuery as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def category_mode(text: str) -> str:
    if text == "labels" or text == "auto" or (text.startswith("auto:") and text[5:].isdigit() and int(text[5:]) >= 2):
        return text
    raise argparse.ArgumentTypeError(f"expected labels, auto or auto:K with K at least 2, got {text!r}")


def at_least_two(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2, got {value}")
    return value


def similarity_threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0.5 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0.5 and 1, got {value}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
