"""``python -m mmedagent.recipes NAME [settings] [-- extra train_mem.py flags]``."""

from __future__ import annotations

import argparse
import sys

import mmedagent  # noqa: F401  - arms the torchvision shim before transformers is imported
from mmedagent.recipes import RECIPES, get_recipe
from mmedagent.recipes.config import add_config_args, config_from_args, unknown_flag_error


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    if not argv or argv[0] in ("-h", "--help", "--list"):
        print(
            "usage: python -m mmedagent.recipes NAME [--tiny] [--out DIR] [--model ID_OR_PATH] [--data SOURCE] "
            "[settings] [-- train_mem.py flags]\n\nrecipes:"
        )
        for name in RECIPES:
            print(f"  {name:20s} {get_recipe(name).summary}")
        print("\n`python -m mmedagent.recipes NAME --help` lists a recipe's settings and defaults.")
        return 0
    try:
        recipe_cls = get_recipe(argv[0])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(
        prog=f"python -m mmedagent.recipes {argv[0]}",
        description=recipe_cls.summary,
        epilog="Flags after `--` go to train/train_mem.py unchanged.",
    )
    add_config_args(parser, recipe_cls.Config)
    given, unknown = parser.parse_known_args(argv[1:])
    if unknown:
        parser.error(unknown_flag_error(unknown))
    given = vars(given)
    try:
        cfg = config_from_args(recipe_cls.Config, given)
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    from mmedagent.recipes.base import run_cli

    return run_cli(recipe_cls(cfg, train_extra=extra))


if __name__ == "__main__":
    sys.exit(main())
