"""`jaxrl-entropy prepare-data`: a data file of another layout → verl's, which `train` and `eval` read.

    jaxrl-entropy prepare-data --in=/data/math500/test.jsonl --out=/data/math500.parquet \
        --prompt_key=problem --answer_key=answer --prompt_template=dapo --data_source=math500

Reads the prompt from `--prompt_key` and the answer from `--answer_key` (dotted for a nested field),
puts a bare problem into `--prompt_template` ("dapo": the paper's prompt, as DAPO-Math-17k holds it;
or a text holding {problem}), checks every row as `train` would, and writes parquet or JSONL (by the
suffix of `--out`). Nothing is downloaded. The sources the paper used and their columns: docs/data.md.
"""
from __future__ import annotations

import argparse
import sys

from jaxrl_entropy.data.layout import TEMPLATES, VERL_ANSWER_KEY, VERL_PROMPT_KEY, RowLayout, resolve_template


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxrl-entropy prepare-data", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="The sources the paper used, and the command for each: docs/data.md")
    p.add_argument("--in", dest="inputs", nargs="+", required=True, metavar="PATH",
                   help="parquet / JSONL files, globs or directories (comma-separated or several)")
    p.add_argument("--out", required=True, help="the file to write: .parquet or .jsonl")
    p.add_argument("--prompt_key", default=VERL_PROMPT_KEY,
                   help=f"the column holding the prompt (default {VERL_PROMPT_KEY!r}; MATH-500: problem)")
    p.add_argument("--answer_key", default=VERL_ANSWER_KEY,
                   help=f"the column holding the answer, dotted when nested (default {VERL_ANSWER_KEY!r}; "
                        "MATH-500: answer)")
    p.add_argument("--prompt_template", default="",
                   help=f"for a bare problem text: '' (none, the default), {' or '.join(sorted(TEMPLATES))} "
                        "(the paper's prompt), or a text holding {problem}")
    p.add_argument("--data_source", default=None,
                   help="the benchmark's label on every row (default: the rows' own, else the file name)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from jaxrl_entropy.data import prepare
    from jaxrl_entropy.data.sources import DataError
    inputs = [p.strip() for item in args.inputs for p in item.split(",") if p.strip()]
    try:
        template = resolve_template(args.prompt_template)
    except ValueError as e:
        print(f"jaxrl-entropy prepare-data: --prompt_template: {e}", file=sys.stderr)
        return 2
    try:
        layout = RowLayout(prompt_key=args.prompt_key, answer_key=args.answer_key, template=template, settings="--")
    except ValueError as e:
        print(f"jaxrl-entropy prepare-data: --{e}", file=sys.stderr)
        return 2
    try:
        summary = prepare.prepare(inputs, args.out, layout, data_source=args.data_source, overwrite=args.overwrite)
    except (DataError, OSError) as e:
        print(f"jaxrl-entropy prepare-data: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {summary.rows} rows ({summary.distinct} distinct prompts; data_source "
          f"{', '.join(summary.data_sources)}) in verl's layout to {summary.out}")
    print(f"first prompt:\n{summary.first_prompt}")
    return 0
