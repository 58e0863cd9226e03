"""Generate train.jsonl and eval.jsonl for the code recipe (seeded, no download).

Every row asks for one short Python function; its hidden tests (``tests``: assert statements)
are never shown to the model and run in rlft's sandbox. Tasks are one-liners on purpose
(SmolLM2-135M rarely writes correct code for anything harder). Most tasks take a constant
(``add_7``, ``repeat the string 3 times``...), so the eval split holds constants and function
names that training never sees.

    python make_data.py            # writes train.jsonl (236 rows) and eval.jsonl (48 rows)
"""

from __future__ import annotations

import json
import random
from pathlib import Path


def tasks(k: int) -> list[tuple[str, str, list[str]]]:
    """(function name, description, hidden tests) for the constant k."""
    return [
        (f"add_{k}", f"takes a number x and returns x plus {k}",
         [f"assert add_{k}({x}) == {x + k}" for x in (0, 3, -5)]),
        (f"times_{k}", f"takes a number x and returns x multiplied by {k}",
         [f"assert times_{k}({x}) == {x * k}" for x in (0, 2, -4)]),
        (f"minus_{k}", f"takes a number x and returns x minus {k}",
         [f"assert minus_{k}({x}) == {x - k}" for x in (0, 10, -1)]),
        (f"is_multiple_of_{k}", f"takes an integer n and returns True if n is divisible by {k}, else False",
         [f"assert is_multiple_of_{k}({n}) == {n % k == 0}" for n in (0, k, k + 1, 3 * k)]),
        (f"repeat_{k}", f"takes a string s and returns s repeated {k} times",
         [f"assert repeat_{k}({s!r}) == {s * k!r}" for s in ("ab", "", "x")]),
        (f"first_{k}", f"takes a list xs and returns its first {k} elements",
         [f"assert first_{k}({xs!r}) == {xs[:k]!r}" for xs in (list(range(10)), [1, 2], [])]),
        (f"greater_than_{k}", f"takes a list of numbers xs and returns a list of the numbers greater than {k}",
         [f"assert greater_than_{k}({xs!r}) == {[x for x in xs if x > k]!r}"
          for xs in ([1, k, k + 5, 20], [], [k + 1])]),
        (f"power_{k}", f"takes a number x and returns x to the power {k}",
         [f"assert power_{k}({x}) == {x ** k}" for x in (2, 1, 3)]),
    ]


FIXED = [
    ("add", "takes two numbers a and b and returns their sum", ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]),
    ("reverse_string", "takes a string s and returns it reversed",
     ["assert reverse_string('abc') == 'cba'", "assert reverse_string('') == ''"]),
    ("is_even", "takes an integer n and returns True if n is even, else False",
     ["assert is_even(4) is True", "assert is_even(7) is False", "assert is_even(0) is True"]),
    ("max_of_list", "takes a non-empty list of numbers and returns the largest",
     ["assert max_of_list([1, 5, 3]) == 5", "assert max_of_list([-2, -7]) == -2"]),
    ("square", "takes a number x and returns x squared", ["assert square(3) == 9", "assert square(-2) == 4"]),
    ("to_upper", "takes a string s and returns it in upper case", ["assert to_upper('abc') == 'ABC'"]),
    ("count_items", "takes a list and returns how many elements it has", ["assert count_items([1, 2, 3]) == 3",
                                                                          "assert count_items([]) == 0"]),
    ("sum_list", "takes a list of numbers and returns their sum", ["assert sum_list([1, 2, 3]) == 6",
                                                                  "assert sum_list([]) == 0"]),
    ("min_of_list", "takes a non-empty list of numbers and returns the smallest",
     ["assert min_of_list([4, 2, 8]) == 2"]),
    ("last_item", "takes a non-empty list and returns its last element", ["assert last_item([1, 2, 3]) == 3"]),
    ("is_positive", "takes a number x and returns True if x is greater than 0, else False",
     ["assert is_positive(3) is True", "assert is_positive(-1) is False", "assert is_positive(0) is False"]),
    ("string_length", "takes a string s and returns its length", ["assert string_length('hello') == 5"]),
]


def prompt(name: str, desc: str) -> str:
    return (f"Write a Python function `{name}` that {desc}. "
            "Reply with the function only, in a ```python code block.")


def rows(constants: list[int], with_fixed: bool) -> list[dict]:
    out = [{"prompt": prompt(n, d), "entry_point": n, "tests": t} for k in constants for n, d, t in tasks(k)]
    if with_fixed:
        out += [{"prompt": prompt(n, d), "entry_point": n, "tests": t} for n, d, t in FIXED]
    return out


def main() -> None:
    here = Path(__file__).parent
    train = rows([2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 15, 20, 25, 30, 50, 100, 7, 13, 17, 19, 21, 23, 24, 26, 27,
                  28, 29, 31], with_fixed=True)
    held = rows([14, 16, 18, 22, 40, 60], with_fixed=False)
    random.Random(0).shuffle(train)
    for name, data in [("train", train), ("eval", held)]:
        with open(here / f"{name}.jsonl", "w") as f:
            for r in data:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
