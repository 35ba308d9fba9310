"""Benchmark D1: tokenize 20k multi-turn chat rows (4-12 turns) with assistant-only labels.

    .venv/bin/python benchmarks/d1_tokenize.py        # table + benchmarks/results/D1.json + docs
    .venv/bin/python benchmarks/d1_tokenize.py --rows 2000 --repeats 2 --no-write   # a quick look

Side by side in one process, interleaved, several repeats, on the same rows and tokenizer (a
byte-level BPE built by tunegraph.ops.base_model.build_tokenizer on the generated text, with the
ChatML template, whose assistant turns carry {% generation %}):
- tunegraph: `make_strategy(..., type chat_template).encode_batch` over the rows of a
  `datasets.Dataset`, 256 rows per call (what the tokenized-dataset stage does).
- TRL: `SFTTrainer._prepare_dataset` with `SFTConfig(assistant_only_loss=True)` on the same
  `datasets.Dataset`: the preparation SFTTrainer runs on its train_dataset (apply_chat_template
  with assistant masks per row, then labels), single process as by default.
Both must give identical labels, row by row (so identical trainable-token counts).

Pass (BENCHMARKS.md, D1): >= 2x TRL's rows/s, identical trainable-token counts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import datasets  # noqa: E402

from tunegraph.config import DatasetConfig  # noqa: E402
from tunegraph.ops.base_model import build_tokenizer  # noqa: E402
from tunegraph.ops.prompts import IGNORE_INDEX, make_strategy  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from _results import percentile  # noqa: E402

DEVICE = "2-core CPU, this workplace's dev machine"
BATCH_ROWS = 256  # tunegraph.ops.tokenize.BATCH_ROWS
WORDS = ("the of and to in is that it for on with as was at by an be this from or have not are "
         "but what all were when we there can more if no out so said up one about time into "
         "them some could him see other than then now look only come its over think also back "
         "after use two how our work first well way even new want because any these give day "
         "most us model data train token loss learning rate batch gradient layer attention "
         "sequence paris france capital number answer question explain why code python").split()


def make_rows(num_rows: int, seed: int = 0) -> list[dict]:
    """Conversations of 4-12 messages (user/assistant alternating, a system message in a third
    of them), 3-60 words per message, punctuation and newlines now and then."""
    rng = random.Random(seed)

    def text() -> str:
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 60))]
        for i in range(0, len(words), rng.randint(6, 15)):
            words[i] = words[i].capitalize()
        out = " ".join(words) + rng.choice((".", "?", "!", ".\n\n- done."))
        return out

    rows = []
    for _ in range(num_rows):
        num_turns = rng.randint(4, 12)
        messages = [{"role": "system", "content": text()}] if rng.random() < 1 / 3 else []
        messages += [{"role": ("user", "assistant")[t % 2], "content": text()}
                     for t in range(num_turns - len(messages))]
        rows.append({"messages": messages})
    return rows


def run_tunegraph(strategy, dataset: datasets.Dataset) -> list[list[int]]:
    labels = []
    for batch in dataset.iter(batch_size=BATCH_ROWS):
        rows = [{"messages": messages} for messages in batch["messages"]]
        labels += [encoded["labels"] for encoded in strategy.encode_batch(rows)]
    return labels


def make_trl(tokenizer, dataset: datasets.Dataset, scratch: Path):
    """An SFTTrainer on a tiny model (built once, untimed) whose `_prepare_dataset` is timed."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32))
    args = SFTConfig(output_dir=str(scratch), assistant_only_loss=True, max_length=None,
                     report_to=[], bf16=False, use_cpu=True)
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=dataset.select(range(8)))

    def prepare() -> list[list[int]]:
        prepared = trainer._prepare_dataset(dataset, tokenizer, args, packing=False,
                                            formatting_func=None, dataset_name="train")
        return prepared["labels"]
    return prepare


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def timed(fn, *args):
    """(wall s, CPU s of this process (all threads), peak RSS growth in MB, result). RSS is
    sampled every 20 ms by a thread: it sees Rust and Arrow memory, which tracemalloc does not."""
    import threading

    base, peak, done = rss_mb(), [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], rss_mb())
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    done.set()
    sampler.join()
    return wall, cpu, max(peak[0], rss_mb()) - base, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only")
    options = parser.parse_args()
    datasets.disable_caching()
    datasets.disable_progress_bars()

    rows = make_rows(options.rows)
    texts = (m["content"] for row in rows[:5000] for m in row["messages"])
    tokenizer = build_tokenizer(texts, vocab_size=4096)
    dataset = datasets.Dataset.from_list(rows)
    strategy = make_strategy(tokenizer, DatasetConfig(path="d1", type="chat_template"),
                             train_on_inputs=False)
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        trl_prepare = make_trl(tokenizer, dataset, Path(scratch))
        providers = {"tunegraph": lambda: run_tunegraph(strategy, dataset), "trl": trl_prepare}
        times: dict[str, list[float]] = {name: [] for name in providers}
        cpu_times: dict[str, list[float]] = {name: [] for name in providers}
        memory: dict[str, float] = {name: 0.0 for name in providers}
        results: dict[str, list[list[int]]] = {}
        load_before = os.getloadavg()[0]
        for repeat in range(options.repeats):
            order = list(providers) if repeat % 2 == 0 else list(reversed(providers))
            for name in order:
                results.pop(name, None)  # the previous result's memory is not this run's
                seconds, cpu, grown, results[name] = timed(providers[name])
                times[name].append(seconds)
                cpu_times[name].append(cpu)
                memory[name] = max(memory[name], grown)
                print(f"repeat {repeat}: {name} {seconds:.2f} s (cpu {cpu:.2f} s)",
                      file=sys.stderr)
        load_after = os.getloadavg()[0]

    trainable = {name: sum(sum(label != IGNORE_INDEX for label in labels) for labels in rows_)
                 for name, rows_ in results.items()}
    identical = results["tunegraph"] == results["trl"]
    num_tokens = sum(len(labels) for labels in results["tunegraph"])
    table_rows = []
    workload = f"{options.rows} chats, 4-12 turns, assistant-only labels"
    for name in providers:
        median = statistics.median(times[name])
        table_rows.append({
            "workload": workload, "provider": name, "median_ms": round(median * 1000, 1),
            "p10_ms": round(percentile(times[name], 0.1) * 1000, 1),
            "p90_ms": round(percentile(times[name], 0.9) * 1000, 1),
            "peak_mem_mb": round(memory[name], 1), "throughput": round(options.rows / median, 1),
            "unit": "rows/s", "tokens_per_s": round(num_tokens / median),
            "median_cpu_ms": round(statistics.median(cpu_times[name]) * 1000, 1),
            "num_trainable_tokens": trainable[name]})
    best_peer = table_rows[1]
    speedup = best_peer["median_ms"] / table_rows[0]["median_ms"]
    cpu_speedup = best_peer["median_cpu_ms"] / table_rows[0]["median_cpu_ms"]
    mem_ratio = best_peer["peak_mem_mb"] / table_rows[0]["peak_mem_mb"]
    command = ".venv/bin/python benchmarks/d1_tokenize.py" + (
        "" if (options.rows, options.repeats) == (20_000, 5)
        else f" --rows {options.rows} --repeats {options.repeats}")
    date = datetime.date.today().isoformat()

    lines = ["| workload | provider | median time | spread (p10-p90) | CPU time | peak memory | "
             "rows/s | trainable tokens | ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for row in table_rows:
        ratio = best_peer["median_ms"] / row["median_ms"]
        lines.append(f"| {row['workload']} | {row['provider']} | {row['median_ms'] / 1000:.2f} s "
                     f"| {row['p10_ms'] / 1000:.2f}-{row['p90_ms'] / 1000:.2f} s "
                     f"| {row['median_cpu_ms'] / 1000:.2f} s "
                     f"| {row['peak_mem_mb']:.0f} MB | {row['throughput']:,.0f} "
                     f"| {row['num_trainable_tokens']:,} | {ratio:.2f}x |")
    table = "\n".join(lines)
    verdict = (f"Labels identical row by row: {identical}; {num_tokens:,} tokens. Speedup vs TRL: "
               f"{speedup:.2f}x in wall time (pass needs >= 2x), {cpu_speedup:.2f}x in CPU time "
               f"(all threads); 1-minute load average {load_before:.1f} before, "
               f"{load_after:.1f} after, on 2 cores shared with other work.")
    print(table)
    print(verdict)
    if not identical:
        raise SystemExit("D1: tunegraph's labels differ from TRL's")
    if options.no_write:
        return
    result = {"id": "D1", "device": DEVICE, "date": date, "command": command, "rows": table_rows,
              "best_peer": "trl", "speedup_vs_best_peer": round(speedup, 3),
              "mem_ratio_vs_best_peer": round(mem_ratio, 3), "labels_identical": identical,
              "num_tokens": num_tokens, "repeats": options.repeats,
              "cpu_speedup_vs_best_peer": round(cpu_speedup, 3),
              "load_average_before": round(load_before, 2),
              "load_average_after": round(load_after, 2)}
    out = REPO / "benchmarks" / "results" / "D1.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    write_docs(table, verdict, date, command)


def write_docs(table: str, verdict: str, date: str, command: str) -> None:
    """Replace the D1 section of docs/benchmarks.md (other benchmarks keep theirs)."""
    path = REPO / "docs" / "benchmarks.md"
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    begin, end = "<!-- D1 begin -->", "<!-- D1 end -->"
    section = "\n".join([
        begin, "## D1: tokenize multi-turn chats with assistant-only labels", "",
        f"{DEVICE}, {date}. Command: `{command}`", "",
        "tunegraph's chat_template strategy (one render per conversation, batched fast-tokenizer "
        "calls with character offsets) against TRL's SFTTrainer dataset preparation with "
        "`assistant_only_loss=True`, same rows, same ChatML tokenizer, interleaved repeats in "
        "one process. Peak memory is the largest growth of the process's resident set during a "
        "run (sampled every 20 ms). CPU time counts all threads: the fairer comparison when "
        "other work shares the two cores.", "",
        table, "", verdict, end])
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
