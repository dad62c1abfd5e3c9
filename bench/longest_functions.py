"""The longest functions of the package, by lines (docstring included): the orchestrators should read as a list of
named steps, each about 60 lines at most.

    python bench/longest_functions.py [--root DIR] [--top 10]

Reads the source with `ast` (nothing is imported), so it runs on any commit without TensorFlow.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1]), help="checkout to read")
    parser.add_argument("--top", type=int, default=10, help="how many to list")
    args = parser.parse_args()
    root = Path(args.root)
    found = []
    for path in sorted((root / "classifier").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                found.append((node.end_lineno - node.lineno + 1, f"{path.stem}.{node.name}"))
    for lines, name in sorted(found, reverse=True)[: args.top]:
        print(f"{lines:5d}  {name}")


if __name__ == "__main__":
    main()
