"""The whole Equilibrate pipeline on the built-in tiny default, run from the recipes in
``configs/quickstart/`` (one YAML per stage and arm; the values live there, nowhere else).

`run_quickstart` runs each recipe through :func:`equilibrate_pl.commands.train.fit_recipe` (the
function behind ``equilibrate sft|rm|dpo|ppo fit``) and exports each trained model:

1. ``sft.yaml``: SFT on general data plus a sliver of safety data: a start that refuses most
   intent-driven requests but few explicit ones, so the safety stages have something to fix;
2. reward models: ``rm-naive.yaml`` on the world's pairs as they come (the unsorted safety pool,
   mislabelled look-alikes included), ``rm-fdc.yaml`` on the pool sorted by the built-in FDC
   classifier, and ``rm-judge.yaml``, trained on another draw of the world, which only judges; each
   also learns the world's contrastive pairs (``data.contrastive``: a fluent off-topic answer never
   wins);
3. ``cost.yaml``: Safe RLHF's cost model on the world's safety labels, for the Lagrangian arms;
4. one recipe per arm (:data:`ARMS`), each from the same SFT policy: naive DPO and naive PPO on
   unsorted safety data scaled up (with ``rm-naive``), FDC+ADPO and FDC+APPO on a third as many
   safety pairs, sorted and mixed per group (with ``rm-fdc``), and naive PPO and FDC+APPO under the
   cost constraint (PPO-Lagrangian);
5. evaluation of every model on the world's held-out eval split: safety per FDC group,
   over-refusal on benign prompts (look-alikes included), helpfulness judged by ``rm-judge`` (a
   reward model no arm optimises) and task success (the answer holds the reference answer's
   content), and a Markdown report with the safety-versus-over-refusal plot.

The run's own settings reach the recipes as command-line style overrides, so the YAML files stay the
single source: ``seed`` is added to every seed of every recipe (``seed_everything``, ``data.seed``,
the policy's ``seed``), ``output_dir`` replaces the ``runs/quickstart`` prefix of every path in them,
``reduced`` shrinks steps, batches and generation lengths for smoke tests, and ``overrides`` passes
anything else (``{"naive-dpo": ["--data.naive_scale", "5"], "*": [...]}``).

Adding an arm: write ``configs/quickstart/<name>.yaml`` and add one line to :data:`ARMS`.
`equilibrate quickstart` is the command-line form; `notebooks/quickstart.ipynb` walks through it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

log = logging.getLogger(__name__)

# Training stages before the arms, then the arms: recipe name (configs/quickstart/<name>.yaml) ->
# the `equilibrate` stage command that runs it. The SFT and reward-model exports feed the arms, the
# cost model the Lagrangian ones; rm-judge only scores helpfulness in the evaluation.
STAGES: dict[str, str] = {"sft": "sft", "rm-naive": "rm", "rm-fdc": "rm", "rm-judge": "rm", "cost": "cost"}
JUDGE = "rm-judge"
ARMS: dict[str, str] = {
    "naive-dpo": "dpo",
    "naive-ppo": "ppo",
    "fdc-adpo": "dpo",
    "fdc-appo": "ppo",
    "naive-ppo-lagrangian": "ppo",
    "fdc-appo-lagrangian": "ppo",
}
RECIPE_ROOT = "runs/quickstart"  # the output prefix written in the recipes; `output_dir` replaces it

# `reduced`: recipe key -> the smaller value of a smoke-test run (applied where a recipe has the key).
_REDUCED: dict[str, Callable[[Any], Any]] = {
    "trainer.max_steps": lambda steps: max(1, int(steps) // 50),
    "trainer.log_every_n_steps": lambda _: 1,  # a few steps still leave curves in the logs
    "data.batch_size": lambda _: 4,
    "model.init_args.ppo.minibatch_size": lambda _: 4,
    "model.init_args.generation.max_new_tokens": lambda _: 8,
}


def recipe_dir() -> Path:
    """``configs/quickstart`` of the repository (or of the working directory)."""
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        path = root / "configs" / "quickstart"
        if path.is_dir():
            return path
    raise FileNotFoundError("configs/quickstart not found: run from a clone of the repository (pip install -e .) "
                            "or pass recipes=/path/to/configs/quickstart")


@dataclass
class QuickstartSettings:
    """What to run and where; the training values themselves are in the recipes.

    Args:
        output_dir: where models, logs, generations and the report go.
        seed: added to every seed of every recipe (0 = the recipes as written).
        arms: which of :data:`ARMS` to run, in order.
        recipes: the recipe folder (default: ``configs/quickstart`` of the repository).
        overrides: extra command-line style options per recipe name, ``"*"`` for every recipe.
        eval_limit: evaluate on at most this many eval prompts (``None``: the whole split).
        eval_max_new_tokens / eval_batch_size: greedy generation length and batch of the evaluation.
        reduced: a much smaller run for tests (fewer steps, small batches, short generations).
        progress: print a line every ~10% of each stage's steps.
    """

    output_dir: str = RECIPE_ROOT
    seed: int = 0
    arms: tuple[str, ...] = tuple(ARMS)
    recipes: str | None = None
    overrides: dict[str, list[str]] = field(default_factory=dict)
    eval_limit: int | None = None
    eval_max_new_tokens: int = 40
    eval_batch_size: int = 32
    reduced: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.arms = tuple(self.arms)
        unknown = set(self.arms) - set(ARMS)
        if unknown:
            raise ValueError(f"unknown arm(s) {sorted(unknown)}; choose from {list(ARMS)}")
        unknown = set(self.overrides) - {"*", *STAGES, *ARMS}
        if unknown:
            raise ValueError(f"overrides for unknown recipe(s) {sorted(unknown)}; choose from {['*', *STAGES, *ARMS]}")
        if self.reduced:
            self.eval_max_new_tokens = 8
            self.eval_limit = self.eval_limit or 24


@dataclass
class QuickstartResult:
    """What the pipeline produced: model directories, metrics per model, timings, the report."""

    output_dir: Path
    models: dict[str, Path]
    metrics: dict[str, dict[str, Any]]
    seconds: dict[str, float] = field(default_factory=dict)
    report: Path | None = None

    def table(self) -> str:
        """The before/after table printed at the end of the run."""
        return format_table(self.metrics)


# --------------------------------------------------------------------------------------------
# recipes -> command-line overrides


def _leaves(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` for every non-dict value of a parsed YAML (lists are leaves)."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, tree


def _value(value: Any) -> str:
    import yaml

    return value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")


def recipe_overrides(recipe: Mapping[str, Any], settings: QuickstartSettings, name: str) -> list[str]:
    """The command-line options that turn the recipe as written into this run's (see module docstring)."""
    out: list[str] = []
    root = Path(settings.output_dir)
    for key, value in _leaves(recipe):
        last = key.rsplit(".", 1)[-1]
        if last in ("seed", "seed_everything") and isinstance(value, int) and not isinstance(value, bool) and settings.seed:
            out += [f"--{key}", str(value + settings.seed)]
        elif isinstance(value, str) and (value == RECIPE_ROOT or value.startswith(RECIPE_ROOT + "/")) and root != Path(RECIPE_ROOT):
            out += [f"--{key}", str(root / Path(value).relative_to(RECIPE_ROOT))]
        elif settings.reduced and key in _REDUCED:
            out += [f"--{key}", _value(_REDUCED[key](value))]
    out += ["--trainer.enable_progress_bar", "false"]  # the quickstart prints its own progress lines
    return out + list(settings.overrides.get("*", [])) + list(settings.overrides.get(name, []))


def train_recipe(recipe: str, settings: QuickstartSettings, say: Callable[[str], None] = print, *,
                 name: str | None = None, extra: Sequence[str] = ()) -> Path:
    """Fit ``configs/quickstart/<recipe>.yaml`` with this run's overrides (then ``extra``), and export
    the trained model to ``<output_dir>/<name>`` (``name`` defaults to the recipe's; a different name
    also names the run's log folder, so one recipe can train several arms), with the account of its
    training mix in ``training_mix.json`` beside it."""
    import yaml

    from equilibrate_pl.commands.train import fit_recipe

    name = name or recipe
    stage = STAGES.get(recipe) or ARMS[recipe]
    config = Path(settings.recipes) / f"{recipe}.yaml" if settings.recipes else recipe_dir() / f"{recipe}.yaml"
    parsed = yaml.safe_load(config.read_text())
    options = recipe_overrides(parsed, settings, recipe)
    if name != recipe and "trainer.logger.init_args.name" in dict(_leaves(parsed)):
        options += ["--trainer.logger.init_args.name", name]
    from equilibrate_pl.commands.progress import ProgressLines

    callbacks = [ProgressLines(name, say)] if settings.progress else []
    # The quickstart exports the model itself: no "checkpoint: ... export it" lines per stage.
    cli = fit_recipe(stage, config, [*options, *extra], callbacks=callbacks, announce=False)
    out = Path(settings.output_dir) / name
    cli.model.export(str(out))
    mix = getattr(cli.datamodule, "mix_result", None)
    if mix is not None:  # what the model was trained on, beside it: rows per group, asked for, available
        from equilibrate_pl.files import atomic_write_json

        atomic_write_json(out / "training_mix.json", {"mode": mix.mode, "counts": mix.counts, "requested": mix.requested,
                                                      "available": mix.available, "notes": mix.notes})
    return out


def evaluate_arms(settings: QuickstartSettings, models: Mapping[str, Path], rm_dir: Path) -> Any:
    """Generate with every model on the world's held-out eval split and judge it (greedy decoding).

    Safety: a harmful prompt answered with a refusal (rule-based detector, docs/EVAL.md).
    Over-refusal: benign prompts (look-alikes included) refused. Helpfulness: the mean score of
    ``rm_dir`` (the judge reward model, which no arm optimises) on benign prompts; task success: the
    benign answer holds the reference answer's content. Returns an ``equilibrate_pl.eval.EvalResult``.
    """
    from equilibrate_pl.eval import evaluate_models, load_reward_scorer, load_suite
    from equilibrate_pl.models import load_causal_lm

    # The world the recipes train on (data.world_seed 0); the run's seed varies training, not the world.
    suite = load_suite("builtin", seed=0)
    loaders = {name: (lambda p=path: load_causal_lm(str(p))) for name, path in models.items()}
    return evaluate_models(
        loaders, suite, "refusal", helpfulness_fn=load_reward_scorer(str(rm_dir)), limit=settings.eval_limit,
        max_new_tokens=settings.eval_max_new_tokens, batch_size=settings.eval_batch_size, seed=settings.seed,
        progress=False,
    )


def run_quickstart(settings: QuickstartSettings | None = None, progress: Callable[[str], None] = print) -> QuickstartResult:
    """Run the whole pipeline; see the module docstring. Returns paths, metrics and timings."""
    settings = settings or QuickstartSettings()
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        progress(f"[quickstart] {name} ...")
        start = time.perf_counter()
        value = fn()
        seconds[name] = time.perf_counter() - start
        progress(f"[quickstart] {name} done in {seconds[name]:.1f}s")
        return value

    exported = {name: timed(name, lambda name=name: train_recipe(name, settings, progress)) for name in STAGES}
    models: dict[str, Path] = {"before (SFT)": exported["sft"]}
    for arm in settings.arms:
        models[arm] = timed(arm, lambda arm=arm: train_recipe(arm, settings, progress))

    result = timed("evaluation", lambda: evaluate_arms(settings, models, exported[JUDGE]))
    report = result.write(out / "report")["report"]
    metrics = {name: dict(res.metrics) for name, res in result.models.items()}
    quick = QuickstartResult(out, models, metrics, seconds, report)
    _write_json_atomic(out / "metrics.json", {"settings": asdict(settings), "metrics": metrics, "seconds": seconds})
    progress(quick.table())
    progress(verdict(metrics))
    progress(f"[quickstart] report: {report}")
    return quick


COLUMNS: tuple[tuple[str, str], ...] = (
    ("safety_rate", "safety (harmful)"), ("safety_rate/EHD", "EHD"), ("safety_rate/IHD", "IHD"),
    ("safety_rate/MHD", "MHD"), ("over_refusal_rate", "over-refusal (benign)"), ("helpfulness", "helpfulness (judge RM)"),
    ("task_success", "task success"), ("balance", "balance"),
)


def format_table(metrics: dict[str, dict[str, Any]]) -> str:
    """A Markdown table: one row per model, the columns of :data:`COLUMNS` (missing -> ``-``)."""
    head = "| model | " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(COLUMNS)
    rows = []
    for name, m in metrics.items():
        cells = [f"{m[key]:.3f}" if isinstance(m.get(key), (int, float)) and m[key] == m[key] else "-" for key, _ in COLUMNS]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])


def verdict(metrics: dict[str, dict[str, Any]]) -> str:
    """An honest one-paragraph reading: does each FDC arm beat its naive counterpart on balance?"""
    lines = []
    for fdc, naive in (("fdc-adpo", "naive-dpo"), ("fdc-appo", "naive-ppo")):
        if fdc in metrics and naive in metrics:
            f, n = metrics[fdc].get("balance"), metrics[naive].get("balance")
            if f is None or n is None:
                continue
            word = "beats" if f > n else ("ties" if f == n else "does NOT beat")
            lines.append(f"{fdc} {word} {naive} on balance ({f:.3f} vs {n:.3f}; safety "
                         f"{metrics[fdc].get('safety_rate', float('nan')):.3f} vs {metrics[naive].get('safety_rate', float('nan')):.3f}, "
                         f"over-refusal {metrics[fdc].get('over_refusal_rate', float('nan')):.3f} vs "
                         f"{metrics[naive].get('over_refusal_rate', float('nan')):.3f}).")
    return "\n".join(lines) or "(no FDC/naive pair was run)"


def _write_json_atomic(path: Path, payload: Any) -> None:
    from equilibrate_pl.files import atomic_write_json

    atomic_write_json(path, payload)
