"""Every recipe in configs/ resolves through its stage's CLI (`--print_config`), names a model rather
than hardware, and uses a strategy its module accepts. The tiny recipes are also trained: by the
README walk-through (tests/test_readme.py) and the reduced quickstart (tests/test_quickstart.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from equilibrate_pl.quickstart import ARMS, STAGES

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*/*.yaml"))


# The real-model experiment's recipes (benchmarks/tradeoff_real.py): recipe -> stage.
REAL = {"rm": "rm", "naive-dpo": "dpo", "fdc-adpo": "dpo"}


def _stage(config: Path) -> str:
    if config.parent.name == "quickstart":
        return {**STAGES, **ARMS}[config.stem]
    if config.parent.name == "real":
        return REAL[config.stem]
    return config.parent.name


def test_the_recipe_folders_are_stages() -> None:
    assert {c.parent.name for c in CONFIGS} == {"sft", "rm", "cost", "dpo", "ppo", "quickstart", "real"}
    assert len(CONFIGS) >= 26


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.parent.name}/{c.name}")
def test_every_recipe_resolves(config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                               equilibrate_cache: Path) -> None:
    from equilibrate_pl import cli
    from equilibrate_pl.commands import train

    # `builtin:smollm2` would be converted from its GGUF to link the tokenizer: not needed to resolve a recipe.
    monkeypatch.setattr(train, "_tokenizer_for", lambda name: name)
    try:
        code = cli.main([_stage(config), "fit", "--config", str(config), "--print_config"])
    except SystemExit as stop:
        code = int(stop.code or 0)
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    resolved, written = yaml.safe_load(out), yaml.safe_load(config.read_text())
    assert resolved["model"]["class_path"] == written["model"]["class_path"]
    assert resolved["data"]["stage"] == train.STAGES[_stage(config)].data_stage
    assert resolved["trainer"]["max_steps"] == written["trainer"]["max_steps"]


def test_size_recipes_name_a_model_and_a_strategy_their_module_accepts() -> None:
    from equilibrate_pl.modules import CostModule, PreferenceModule, RewardModule, SFTModule
    from equilibrate_pl.modules.policy import PolicyModule

    modules = {"sft": SFTModule, "rm": RewardModule, "cost": CostModule, "dpo": PreferenceModule, "ppo": PolicyModule}
    assert not list((REPO / "configs").glob("*/gpu*.yaml")), "name recipes by model size, not hardware"
    sized = sorted((REPO / "configs").glob("*/qwen2.5-0.5b*.yaml"))
    assert [c.relative_to(REPO / "configs").as_posix() for c in sized] == [
        "cost/qwen2.5-0.5b.yaml", "dpo/qwen2.5-0.5b.yaml", "ppo/qwen2.5-0.5b.yaml", "ppo/qwen2.5-0.5b_lagrangian.yaml",
        "rm/qwen2.5-0.5b.yaml", "sft/qwen2.5-0.5b.yaml"]

    def setup_under(module_cls: type, strategy: str, world_size: int, precision: str) -> None:
        # The module's own start-up check, with a stand-in trainer (no GPU here).
        module = object.__new__(module_cls)
        stand_in = SimpleNamespace(strategy=type(strategy, (), {})(), world_size=world_size, precision=precision)
        object.__setattr__(module, "_trainer", stand_in)
        object.__setattr__(module, "_fabric", None)
        module_cls.setup(module, "fit")

    for config in sized:
        recipe = yaml.safe_load(config.read_text())
        trainer = recipe["trainer"]
        strategy = trainer["strategy"]["class_path"].rsplit(".", 1)[-1]
        devices = trainer["devices"] if isinstance(trainer["devices"], int) and trainer["devices"] > 0 else 8
        assert recipe["model"]["init_args"], config
        setup_under(modules[config.parent.name], strategy, devices * trainer.get("num_nodes", 1), trainer["precision"])
        if config.parent.name == "ppo":
            assert strategy == "ModelParallelStrategy"
            with pytest.raises(ValueError, match="does not run under FSDPStrategy"):  # the check is real
                setup_under(PolicyModule, "FSDPStrategy", 8, trainer["precision"])
