"""Writes the quickstart's data: small instruction tasks a tiny model can learn on a CPU in minutes.

    python examples/data/make_quickstart_data.py      # rewrites examples/data/*.jsonl

Deterministic (seeded); the files it writes are committed, so nobody needs to run it.
"""

import json
import random
from pathlib import Path

COLORS = {"banana": "yellow", "grass": "green", "sky": "blue", "snow": "white", "coal": "black",
          "tomato": "red", "orange": "orange", "plum": "purple", "lemon": "yellow",
          "cherry": "red", "leaf": "green", "ocean": "blue", "milk": "white", "ink": "black",
          "carrot": "orange", "violet": "purple", "pumpkin": "orange", "cloud": "white"}
OPPOSITES = {"hot": "cold", "up": "down", "big": "small", "fast": "slow", "open": "closed",
             "light": "dark", "early": "late", "happy": "sad", "hard": "soft", "full": "empty",
             "old": "new", "wet": "dry", "loud": "quiet", "rich": "poor", "near": "far"}
WORDS = sorted(set(COLORS) | set(OPPOSITES) | set(OPPOSITES.values()))


def alpaca_rows(rng: random.Random, count: int) -> list[dict]:
    rows = []
    for _ in range(count):
        task = rng.randrange(4)
        if task == 0:
            thing = rng.choice(sorted(COLORS))
            rows.append({"instruction": "Name the color of the thing.", "input": thing,
                         "output": COLORS[thing]})
        elif task == 1:
            word = rng.choice(sorted(OPPOSITES))
            rows.append({"instruction": "Give the opposite word.", "input": word,
                         "output": OPPOSITES[word]})
        elif task == 2:
            n = rng.randrange(0, 50)
            rows.append({"instruction": "What number comes after this one?", "input": str(n),
                         "output": str(n + 1)})
        else:
            word = rng.choice(WORDS)
            rows.append({"instruction": "Repeat the word.", "input": word, "output": word})
    return rows


def chat_rows(rng: random.Random, count: int) -> list[dict]:
    rows = []
    for row in alpaca_rows(rng, count):
        messages = [{"role": "system", "content": "You answer in one word."},
                    {"role": "user", "content": f"{row['instruction']} {row['input']}"},
                    {"role": "assistant", "content": row["output"]}]
        if rng.random() < 0.5:
            follow = alpaca_rows(rng, 1)[0]
            messages += [{"role": "user", "content": f"{follow['instruction']} {follow['input']}"},
                         {"role": "assistant", "content": follow["output"]}]
        rows.append({"messages": messages})
    return rows


def completion_rows(rng: random.Random, count: int) -> list[dict]:
    return [{"text": f"The {thing} is {COLORS[thing]}. The opposite of {word} is {OPPOSITES[word]}."}
            for thing, word in ((rng.choice(sorted(COLORS)), rng.choice(sorted(OPPOSITES)))
                                for _ in range(count))]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    here = Path(__file__).parent
    write_jsonl(here / "quickstart.jsonl", alpaca_rows(random.Random(0), 640))
    write_jsonl(here / "chat.jsonl", chat_rows(random.Random(1), 320))
    write_jsonl(here / "completion.jsonl", completion_rows(random.Random(2), 320))
