"""The whole Equilibrate pipeline on the built-in tiny default, as one function.

`run_quickstart` builds the tiny model and the built-in safety world, then:
1. SFT on general data plus a sliver of safety data: a mostly helpful-only start that knows what a
   refusal looks like but answers most harmful requests (as SmolLM2-135M-Instruct does), so the
   safety stages have something to fix;
2. a reward model on the world's preference pairs (general + the unsorted safety pool);
3. four arms from the same SFT policy: naive DPO and naive PPO on unsorted safety data scaled up,
   and FDC+ADPO and FDC+APPO on the paper's small, deliberate per-group mix;
4. evaluation of every model on the world's held-out eval split: safety per FDC group,
   over-refusal on benign prompts (look-alikes included), helpfulness (reward-model score), and
   a Markdown report with the safety-versus-over-refusal plot.

`equilibrate quickstart` is the command-line form; `notebooks/quickstart.ipynb` walks through it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

ARMS: tuple[str, ...] = ("naive-dpo", "naive-ppo", "fdc-adpo", "fdc-appo")


@dataclass
class QuickstartSettings:
    """Sizes of each stage. The defaults finish in a few minutes on 2 CPU cores.

    Args:
        output_dir: where models, logs, generations and the report go.
        seed: seeds the world, the mixes, the models and sampling.
        arms: which of ``naive-dpo``, ``naive-ppo``, ``fdc-adpo``, ``fdc-appo`` to run.
        naive_scale: the naive arms draw this many times the FDC mix's safety budget from the
            unsorted pool ("scaling safety data naively").
        sft_steps, rm_steps, dpo_steps, ppo_steps: optimizer steps (PPO: rollout batches).
        sft_safety_quotas: safety rows (refusals) per group in the SFT data, beside all general rows.
        eval_limit: evaluate on at most this many eval prompts (``None``: the whole split).
        reduced: a much smaller run for tests (overrides the step counts and eval size).
    """

    output_dir: str = "runs/quickstart"
    seed: int = 0
    arms: tuple[str, ...] = ARMS
    naive_scale: float = 10.0
    sft_steps: int = 400
    rm_steps: int = 150
    dpo_steps: int = 150
    ppo_steps: int = 25
    batch_size: int = 16
    sft_safety_quotas: dict[str, int] = field(default_factory=lambda: {"EHD": 120, "IHD": 40, "MHD": 20})
    eval_limit: int | None = None
    max_new_tokens: int = 40
    reduced: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.arms) - set(ARMS)
        if unknown:
            raise ValueError(f"unknown arm(s) {sorted(unknown)}; choose from {list(ARMS)}")
        if self.reduced:
            self.sft_steps, self.rm_steps, self.dpo_steps, self.ppo_steps = 6, 4, 3, 1
            self.batch_size, self.max_new_tokens = 4, 8
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


def _trainer(settings: QuickstartSettings, name: str, max_steps: int, **overrides: Any) -> Any:
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import CSVLogger

    from equilibrate_pl.modules.common import AtomicCheckpointIO

    kwargs: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=CSVLogger(Path(settings.output_dir) / "logs", name=name),
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
        num_sanity_val_steps=0, limit_val_batches=2, log_every_n_steps=5, val_check_interval=None, check_val_every_n_epoch=None,
        plugins=[AtomicCheckpointIO()], deterministic=False,
    )
    kwargs.update(overrides)
    return Trainer(**kwargs)


def _data(settings: QuickstartSettings, stage: str, tokenizer: str, **kw: Any) -> Any:
    from equilibrate_pl.data import SafetyDataModule

    return SafetyDataModule(stage=stage, tokenizer=tokenizer, seed=settings.seed, batch_size=settings.batch_size,
                            max_length=160, max_prompt_length=96, val_size=32, **kw)


# The FDC mix is the paper's default ratios; the naive arms draw `naive_scale` x that safety budget
# uniformly from the unsorted pool (which, like real safety data, holds mislabelled look-alikes).
def _mix(arm: str, settings: QuickstartSettings) -> dict[str, Any]:
    if arm.startswith("naive"):
        return {"mix": "naive", "naive_scale": settings.naive_scale}
    return {"mix": "ratio"}


def stage_sft(settings: QuickstartSettings, out: Path) -> Path:
    """Fine-tune the tiny model on general data plus a few safety rows; returns the exported HF directory."""
    from equilibrate_pl.modules import SFTModule
    from equilibrate_pl.modules.common import ModelSettings, OptimSettings

    from lightning.pytorch import seed_everything

    seed_everything(settings.seed, workers=True)
    module = SFTModule(model=ModelSettings("builtin:tiny"), optim=OptimSettings(lr=3e-3, warmup_steps=10))
    # Mostly general data plus a sliver of safety rows: like a real instruct model, the start knows
    # what a refusal looks like but rarely uses one, so the alignment arms have something to push.
    data = _data(settings, "sft", "builtin:tiny", mix="quota", quotas=dict(settings.sft_safety_quotas))
    _trainer(settings, "sft", settings.sft_steps).fit(module, datamodule=data)
    module.export(str(out / "sft"))
    return out / "sft"


def stage_reward_model(settings: QuickstartSettings, out: Path, sft_dir: Path) -> Path:
    """Bradley-Terry reward model on every preference pair of the world, initialised from the SFT model."""
    from equilibrate_pl.modules import RewardModule
    from equilibrate_pl.modules.common import ModelSettings, OptimSettings

    from lightning.pytorch import seed_everything

    seed_everything(settings.seed + 1, workers=True)
    module = RewardModule(model=ModelSettings(str(sft_dir)), optim=OptimSettings(lr=1e-3, warmup_steps=10))
    data = _data(settings, "preference", str(sft_dir), mix="all")
    _trainer(settings, "rm", settings.rm_steps).fit(module, datamodule=data)
    module.export(str(out / "rm"))
    return out / "rm"


def stage_dpo(settings: QuickstartSettings, out: Path, arm: str, sft_dir: Path, rm_dir: Path) -> Path:
    """``naive-dpo`` (plain DPO, naive mix) or ``fdc-adpo`` (dense-reward ADPO mask, FDC mix)."""
    from equilibrate_pl.modules import PreferenceModule
    from equilibrate_pl.modules.common import ModelSettings, OptimSettings

    from lightning.pytorch import seed_everything

    seed_everything(settings.seed + 2, workers=True)
    ama = {"enabled": arm == "fdc-adpo", "token_signal": "dense_reward", "baseline": "batch_mean"}
    module = PreferenceModule(model=ModelSettings(str(sft_dir)), optim=OptimSettings(lr=5e-4, warmup_steps=5),
                              beta=0.1, nll_weight=1.0, ama=ama, reward_model=str(rm_dir))
    data = _data(settings, "preference", str(sft_dir), **_mix(arm, settings))
    _trainer(settings, arm, settings.dpo_steps).fit(module, datamodule=data)
    module.export(str(out / arm))
    return out / arm


def stage_ppo(settings: QuickstartSettings, out: Path, arm: str, sft_dir: Path, rm_dir: Path) -> Path:
    """``naive-ppo`` (plain PPO, naive mix) or ``fdc-appo`` (value-signal APPO mask, FDC mix)."""
    from equilibrate_pl.modules.common import ModelSettings, OptimSettings
    from equilibrate_pl.modules.policy import PolicyModule

    from lightning.pytorch import seed_everything

    seed_everything(settings.seed + 3, workers=True)
    module = PolicyModule(
        actor=ModelSettings(str(sft_dir)), reward_model=ModelSettings(str(rm_dir)), critic=ModelSettings(str(rm_dir)),
        generation={"max_new_tokens": settings.max_new_tokens, "do_sample": True},
        ppo={"ppo_epochs": 2, "minibatch_size": settings.batch_size},
        kl={"coef": 0.2, "estimator": "k3"},
        ama={"enabled": arm == "fdc-appo", "token_signal": "value", "baseline": "batch_mean"},
        actor_optim=OptimSettings(lr=1e-4, scheduler="constant"), critic_optim=OptimSettings(lr=1e-3, scheduler="constant"),
        seed=settings.seed,
    )
    data = _data(settings, "prompt", str(sft_dir), **_mix(arm, settings))
    _trainer(settings, arm, settings.ppo_steps, limit_val_batches=0).fit(module, datamodule=data)
    module.export(str(out / arm))
    return out / arm


def evaluate_arms(settings: QuickstartSettings, models: dict[str, Path], rm_dir: Path) -> Any:
    """Generate with every model on the world's held-out eval split and judge it (greedy decoding).

    Safety: a harmful prompt answered with a refusal (rule-based detector, docs/EVAL.md).
    Over-refusal: benign prompts (look-alikes included) refused. Helpfulness: the reward model's
    mean score on benign prompts. Returns an ``equilibrate_pl.eval.EvalResult``.
    """
    from equilibrate_pl.eval import evaluate_models, load_reward_scorer, load_suite
    from equilibrate_pl.models import load_causal_lm

    suite = load_suite("builtin", seed=settings.seed)
    loaders = {name: (lambda p=path: load_causal_lm(str(p))) for name, path in models.items()}
    return evaluate_models(
        loaders, suite, "refusal", helpfulness_fn=load_reward_scorer(str(rm_dir)), limit=settings.eval_limit,
        max_new_tokens=settings.max_new_tokens, batch_size=32, seed=settings.seed, progress=False,
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

    sft_dir = timed("sft", lambda: stage_sft(settings, out))
    rm_dir = timed("reward model", lambda: stage_reward_model(settings, out, sft_dir))
    models: dict[str, Path] = {"before (SFT)": sft_dir}
    for arm in settings.arms:
        stage = stage_dpo if arm.endswith("dpo") else stage_ppo
        models[arm] = timed(arm, lambda arm=arm, stage=stage: stage(settings, out, arm, sft_dir, rm_dir))

    result = timed("evaluation", lambda: evaluate_arms(settings, models, rm_dir))
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
    ("safety_rate/MHD", "MHD"), ("over_refusal_rate", "over-refusal (benign)"), ("helpfulness", "helpfulness (RM)"),
    ("balance", "balance"),
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
