"""`qft train`: run a QAT recipe end to end (teacher -> quantize -> LoRA -> distill -> merge -> export -> eval).

    qft train recipes/smollm2-135m/quickstart.yaml [--override lora.r=8 --override max_steps=20]
    qft train --recipe RECIPE --text ../shared/data/wikitext-2/test.txt --output-dir runs/x
    accelerate launch --config_file launch/ddp.yaml -m qft.cli train RECIPE

A recipe is YAML: flat transformers.TrainingArguments keys plus the blocks quant, lora, distill,
ptq, data, selfgen, eval, export (see docs/qat.md). Unknown keys and bad values are refused with
the key, the value and what is allowed.
"""

from __future__ import annotations

import argparse


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="QAT through LoRA: run a recipe end to end",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe_pos", nargs="?", metavar="RECIPE", help="recipe YAML file")
    p.add_argument("--recipe", help="recipe YAML file (same as the positional argument)")
    p.add_argument("--override", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="change a recipe value before validation; dotted for blocks (lora.r=8); repeatable")
    p.add_argument("--text", action="append", default=[], metavar="FILE",
                   help="also evaluate perplexity / KL on this text file (repeatable)")
    p.add_argument("--output-dir", help="run directory (overrides the recipe's output_dir)")
    p.add_argument("--model", help="teacher model (overrides the recipe's model)")
    p.add_argument("--resume", nargs="?", const=True, default=None,
                   help="resume training from the last checkpoint in the run directory (or from this one)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--dry-run", action="store_true", help="validate the recipe, print it and stop")
    p.set_defaults(fn=run_train, func=run_train)
    return p


def run_train(args) -> int:
    import dataclasses
    import json

    from qft.train.args import RecipeError, load_recipe

    path = args.recipe or args.recipe_pos
    if not path:
        raise RecipeError("qft train needs a recipe: qft train RECIPE.yaml (see recipes/)")
    overrides = list(args.override)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.model:
        overrides.append(f"model={args.model}")
    if _is_onebit_recipe(path):  # OneBit recipes (an `onebit` block) run qft.train.onebit's job
        return _run_onebit(args, path, overrides)
    recipe = load_recipe(path, overrides)
    if args.text:
        recipe.eval.texts = list(recipe.eval.texts) + list(args.text)
        recipe.eval.__post_init__()
    if args.threads is not None:
        if args.threads < 1:
            raise RecipeError(f"--threads={args.threads} is not valid; allowed: an integer >= 1")
        import torch
        torch.set_num_threads(args.threads)
    recipe.training_arguments()  # validate the flat keys now, not after loading the model
    if args.dry_run:
        d = {k: (v.to_dict() if hasattr(v, "to_dict") else dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v)
             for k, v in vars(recipe).items()}
        print(json.dumps(d, indent=2, default=str))
        return 0
    from qft.train.pipeline import run_pipeline
    run_pipeline(recipe, resume=args.resume)
    return 0


def _is_onebit_recipe(path) -> bool:
    from pathlib import Path

    import yaml
    p = Path(path)
    if not p.is_file():
        return False
    d = yaml.safe_load(p.read_text()) or {}
    return isinstance(d, dict) and "onebit" in d


def _run_onebit(args, path, overrides) -> int:
    import json
    from pathlib import Path

    from qft.train.args import RecipeError
    from qft.train.onebit import load_onebit_recipe, run
    if args.resume:
        raise RecipeError("--resume is not supported for OneBit recipes; allowed: a fresh run")
    recipe, ob = load_onebit_recipe(path, overrides)
    if args.text:
        recipe.eval.texts = list(recipe.eval.texts) + list(args.text)
        recipe.eval.__post_init__()
    if args.dry_run:
        print(json.dumps({"recipe": str(path), "onebit": vars(ob), "output_dir": recipe.output_dir}, indent=2,
                         default=str))
        return 0
    report = run(recipe, ob)
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({k: report[k] for k in report if k in ("fp", "init", "before_merge", "after_merge", "train",
                                                            "export")}, indent=2, default=str))
    return 0
