"""Writes the eval-suites example's task data: every thing, word and a range of numbers the
quickstart's data teaches, as Alpaca rows (eval_tasks) and lm-eval documents (lm_eval_tasks).

    python examples/data/make_eval_data.py      # rewrites examples/data/evals/ and
                                                # examples/lm_eval_tasks/*.jsonl

Deterministic; the files it writes are committed, so nobody needs to run it.
"""

import json
from pathlib import Path

from make_quickstart_data import COLORS, OPPOSITES


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def alpaca(instruction: str, extra: str, output: str) -> dict:
    return {"instruction": instruction, "input": extra, "output": output}


if __name__ == "__main__":
    here = Path(__file__).parent
    evals = here / "evals"
    evals.mkdir(exist_ok=True)
    write_jsonl(evals / "colors.jsonl", [alpaca("Name the color of the thing.", thing, color)
                                         for thing, color in sorted(COLORS.items())])
    write_jsonl(evals / "opposites.jsonl", [alpaca("Give the opposite word.", word, opposite)
                                            for word, opposite in sorted(OPPOSITES.items())])
    write_jsonl(evals / "next_number.jsonl", [alpaca("What number comes after this one?", str(n),
                                                     str(n + 1)) for n in range(0, 50, 3)])
    tasks = here.parent / "lm_eval_tasks"
    colors = sorted(set(COLORS.values()))
    write_jsonl(tasks / "colors_mc.jsonl", [{"thing": thing, "choices": colors,
                                             "label": colors.index(color)}
                                            for thing, color in sorted(COLORS.items())])
    write_jsonl(tasks / "opposites_gen.jsonl", [{"word": word, "answer": opposite}
                                                for word, opposite in sorted(OPPOSITES.items())])
