"""`equilibrate` console entry point.

Training stages (`sft`, `rm`, `cost`, `dpo`, `ppo`) are LightningCLI programs; the other
sub-commands are plain argparse programs. Each lives in its own module and is imported
only when asked for, so `equilibrate categorize` does not pay for importing Lightning.
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings

# sub-command -> "module:function"; the function takes the remaining argv and returns an exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("equilibrate_pl.commands.data:main", "list, locate and download the public datasets (XSTest, ...)"),
    "sft": ("equilibrate_pl.commands.train:sft", "supervised fine-tuning (LightningCLI)"),
    "rm": ("equilibrate_pl.commands.train:rm", "reward model (LightningCLI)"),
    "cost": ("equilibrate_pl.commands.train:cost", "cost model for PPO-Lagrangian (LightningCLI)"),
    "dpo": ("equilibrate_pl.commands.train:dpo", "DPO / ADPO (LightningCLI)"),
    "ppo": ("equilibrate_pl.commands.train:ppo", "PPO / APPO / GRPO / RLOO (LightningCLI)"),
    "categorize": ("equilibrate_pl.commands.categorize:main", "FDC-label a data file"),
    "pairs": ("equilibrate_pl.commands.pairs:main", "preference pairs around a model's own sampled answers"),
    "synthesize-mhd": ("equilibrate_pl.commands.categorize:synthesize_main", "merge EHD+IHD prompts into MHD"),
    "world": ("equilibrate_pl.commands.world:main", "write the built-in safety world to files"),
    "export": ("equilibrate_pl.commands.export:main", "checkpoint -> Hugging Face model directory"),
    "eval": ("equilibrate_pl.commands.evaluate:main", "generate, judge and report"),
    "quickstart": ("equilibrate_pl.commands.quickstart:main", "the whole pipeline on the built-in tiny default"),
}


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


_LIGHTNING_ADVERT = _DropMessages("💡 Tip:")


def quiet_known_noise() -> None:
    """Silence third-party messages that alarm or distract without informing (each one explained)."""
    # Lightning advertises its cloud logger every time a Trainer is built.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_LIGHTNING_ADVERT)
    # PolicyModule optimizes manually; ModelCheckpoint(every_n_train_steps) then warns, with a code
    # sample, that the checkpoint holds the weights AFTER the step's update: what a resumed run needs.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)
    # The reward model and the reference are frozen in eval mode on purpose (no dropout, no grads);
    # Lightning counts them as "modules in eval mode at the start of training".
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    # bitsandbytes logs at import that the optional `kernels` package is missing and falls back to its
    # own CPU kernels (4-bit runs work either way).
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: equilibrate <command> [args]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"equilibrate: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    quiet_known_noise()
    target, _ = COMMANDS[name]
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    result = func(rest)
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
