"""`sdstudio generate RECIPE.toml --out DIR`: the Playground headless, through the same session and job code."""
from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images from a recipe TOML (LoRAs, embeddings, ControlNets, ...)",
                       description="Generate images from a Playground recipe. The recipe, --out and the paths in "
                                   "the recipe are looked up in the workspace, then in the current folder; "
                                   "base_model follows the model-reference rule (see sdstudio --help).")
    p.add_argument("recipe", help="the recipe .toml (or a PNG this app made: its recipe is reused)")
    p.add_argument("--out", required=True, help="folder for the images (a new one goes into the workspace)")
    p.add_argument("--no-fuse", dest="fuse", action="store_false",
                   help="keep LoRAs unfused (by default a stack without step ranges is fused into the base: faster)")
    p.add_argument("--x", default=None, help="X/Y grid axis, e.g. cfg=5,7,9 or lora_weight[0]=0,0.5,1")
    p.add_argument("--y", default=None, help="second grid axis")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a top-level recipe key, e.g. --set seed=7 (repeatable)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow .pt/.ckpt files (loaded with weights_only=True); only for files you trust")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu")
    p.set_defaults(func=run_generate)


def _apply_sets(recipe, sets):
    from ..errors import UserError
    from .recipe import Recipe

    data = recipe.to_dict()
    for s in sets:
        key, sep, value = s.partition("=")
        if not sep or key.strip() not in data or isinstance(data[key.strip()], list):
            raise UserError(f"--set {s!r}: use KEY=VALUE with a top-level recipe key such as seed, steps or cfg.")
        import tomllib

        try:
            data[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            data[key.strip()] = value
    return Recipe.from_dict(data, "the recipe after --set")


def run_generate(args) -> int:
    from ..devices import pick_device
    from ..jobs import foreground_exit, run_foreground
    from ..models.refs import Places
    from ..workspace import Workspace
    from .grid import parse_axis
    from .outputs import read_recipe
    from .recipe import Recipe
    from .session import Playground, generation_work

    ws = Workspace.open()  # --home or $SDSTUDIO_HOME
    places = Places.cli(ws)  # the one rule: the workspace, then the current folder
    recipe_path = places.path(args.recipe, what="recipe")
    recipe = read_recipe(recipe_path) if recipe_path.suffix.lower() == ".png" else Recipe.load(recipe_path)
    recipe = _apply_sets(recipe, args.set)
    out = places.output(args.out)
    x = parse_axis(args.x) if args.x else None
    y = parse_axis(args.y) if args.y else None
    if y and not x:
        from ..errors import UserError

        raise UserError("--y needs --x: give the first grid axis too.")
    session = Playground(places=places, lora_dir=ws.models("lora"), annotators_dir=ws.root / "models" / "annotators",
                         device=pick_device(args.device), allow_pickle=args.allow_pickle)
    work = generation_work(session, recipe, out, fuse=args.fuse, x=x, y=y, preview_every=0)

    def show(ev):
        from ..events import Progress, Status

        if isinstance(ev, Progress) and sys.stderr.isatty():
            print(f"\r\033[K{ev.message}", end="", file=sys.stderr, flush=True)
        elif isinstance(ev, Status) and ev.stage in ("note", "download"):
            print(ev.message, file=sys.stderr, flush=True)

    job = run_foreground("generate", "generate", work, listeners=[show])
    code = foreground_exit(job, args.verbose)
    if code is not None:
        return code
    for path in job.result or []:
        print(path)
    return 0
