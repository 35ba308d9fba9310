"""Measure how many of Axolotl's own example recipes tunegraph accepts, and what stops the rest.

    python scripts/axolotl_compat.py                                          # print the report
    python scripts/axolotl_compat.py --write docs/axolotl-compatibility.md    # refresh the doc

Runs what `tunegraph validate` runs (load_recipe, then plan_of) on every YAML file in
../shared/axolotl-configs (Axolotl's examples, unchanged; `--configs DIR` to point elsewhere), and
writes a Markdown report: the share that validates, the unsupported keys and values by how many
files they block, and each file's outcome with its messages. tests/config/test_axolotl_compat.py
fails when the committed doc differs from what this prints (the date line aside).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tunegraph.config import RecipeError, load_recipe
from tunegraph.config.axolotl_keys import AXOLOTL_DATASET_KEYS, AXOLOTL_KEYS

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = REPO.parent / "shared" / "axolotl-configs"
COMMAND = "python scripts/axolotl_compat.py --write docs/axolotl-compatibility.md"
DATE_LINE_PREFIX = "Produced by "


@dataclass
class Outcome:
    """One file's result: `problems` is empty when it validates and plans."""

    name: str
    problems: list[str] = field(default_factory=list)
    num_assets: int = 0
    off_keys: tuple[str, ...] = ()

    @property
    def validates(self) -> bool:
        return not self.problems


def check_file(path: Path) -> Outcome:
    """`tunegraph validate PATH`, returning its problems instead of printing them."""
    from tunegraph.cli import plan_of

    try:
        recipe = load_recipe(path)
        plan = plan_of(recipe)
    except RecipeError as exc:
        return Outcome(path.name, list(exc.problems))
    except ValueError as exc:  # planning can refuse a recipe too; a crash is a bug and propagates
        return Outcome(path.name, [str(exc)])
    return Outcome(path.name, [], len(plan["assets"]), recipe.off_keys)


def config_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".yml", ".yaml"))


def problem_label(problem: str) -> tuple[str, str]:
    """A problem line → (what is unsupported, which kind of problem), e.g.
    ("optimizer: adamw_8bit", "value not supported yet"). datasets[3] becomes datasets[]."""
    key, _, rest = problem.partition(": ")
    key = re.sub(r"\[\d+\]", "[]", key)
    if rest.startswith("known to Axolotl but not supported by tunegraph yet"):
        return key, "key not supported yet"
    if match := re.search(r"'([^']*)' is an Axolotl value that tunegraph does not support", rest):
        return f"{key}: {match.group(1)}", "value not supported yet"
    if match := re.search(r"unknown value '([^']*)'", rest):
        return f"{key}: {match.group(1)}", "value unknown to tunegraph"
    if rest.startswith("unknown key"):
        return key, "key unknown to tunegraph"
    return key, rest


def axolotl_area(label: str) -> str:
    """The part of Axolotl a key belongs to, from tunegraph.config.axolotl_keys."""
    key = label.split(": ", 1)[0]
    if key.startswith("datasets[]."):
        return AXOLOTL_DATASET_KEYS.get(key.removeprefix("datasets[]."), "")
    return AXOLOTL_KEYS.get(key, "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render(outcomes: list[Outcome], configs: Path, date: str) -> str:
    num_ok = sum(o.validates for o in outcomes)
    share = 100 * num_ok / len(outcomes) if outcomes else 0.0
    files_per_label: collections.Counter[str] = collections.Counter()
    kind_of: dict[str, str] = {}
    for outcome in outcomes:
        labels = dict(problem_label(p) for p in outcome.problems)
        files_per_label.update(labels.keys())
        kind_of.update(labels)
    lines = [
        "# Axolotl compatibility",
        "",
        f"How many of Axolotl's own example recipes `tunegraph validate` accepts, measured on the "
        f"{len(outcomes)} files in `shared/{configs.name}/` (Axolotl's examples, unchanged; see its "
        f"NOTICE). A file validates when it loads and plans; it fails when it sets a key or value "
        f"that tunegraph does not run yet, and then the error names every such key and value. "
        f"tunegraph never accepts a key it would ignore: an Axolotl key passes only when its value "
        f"asks for nothing (`false`, empty), and is then listed as off.",
        "",
        f"{DATE_LINE_PREFIX}`{COMMAND}` on {date}.",
        "",
        f"**{num_ok} of {len(outcomes)} files validate ({share:.0f}%).**",
        "",
        "## What stops the rest",
        "",
        "Each unsupported key or value, with the number of files it appears in (a file can have "
        "several).",
        "",
        "| key or value | problem | Axolotl area | files |",
        "|---|---|---|---:|",
    ]
    ranked = sorted(files_per_label.items(), key=lambda item: (-item[1], item[0]))
    for label, count in ranked:
        lines.append(f"| `{_cell(label)}` | {_cell(kind_of[label])} | "
                     f"{_cell(axolotl_area(label))} | {count} |")
    lines += ["", "## Files", "", "| file | outcome | problems | unsupported |", "|---|---|---:|---|"]
    for outcome in outcomes:
        if outcome.validates:
            lines.append(f"| {outcome.name} | validates ({outcome.num_assets} assets, "
                         f"{len(outcome.off_keys)} off keys) | 0 | |")
            continue
        labels = ", ".join(f"`{_cell(problem_label(p)[0])}`" for p in outcome.problems)
        lines.append(f"| {outcome.name} | fails | {len(outcome.problems)} | {labels} |")
    lines += ["", "## Messages", "", "What `tunegraph validate` prints for each file that fails.", ""]
    for outcome in outcomes:
        if outcome.validates:
            continue
        lines += [f"### {outcome.name}", "", "```"]
        lines += [f"- {p}" for p in outcome.problems]
        lines += ["```", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def report(configs: Path = DEFAULT_CONFIGS, date: str | None = None) -> str:
    date = date or datetime.date.today().isoformat()
    return render([check_file(p) for p in config_files(configs)], configs, date)


def without_date(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith(DATE_LINE_PREFIX))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=Path, default=DEFAULT_CONFIGS,
                        help=f"folder of Axolotl YAML recipes (default {DEFAULT_CONFIGS})")
    parser.add_argument("--write", type=Path, help="write the report here instead of printing")
    args = parser.parse_args(argv)
    if not args.configs.is_dir():
        parser.error(f"--configs: no folder {args.configs}")
    text = report(args.configs)
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text)
        print(f"wrote {args.write}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
