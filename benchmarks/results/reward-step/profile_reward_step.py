"""cProfile of our reward-model step in the benchmark setting (tiny model, 16 pairs, 1 thread).

    PYTHONPATH=. python benchmarks/results/reward-step/profile_reward_step.py   # STEPS=40 by default

Prints the median step CPU time of an unprofiled run, then the cumulative profile of a second run
(steps after the 3rd). Used for the numbers in README.md next to this file.
"""

import cProfile
import os
import pstats
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from lightning.pytorch import seed_everything  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from benchmarks import preference as P  # noqa: E402
from benchmarks.common import StepLog, lightning_step_timer  # noqa: E402
from benchmarks.run import _quiet  # noqa: E402
from equilibrate_pl.modules import RewardModule  # noqa: E402
from equilibrate_pl.modules.common import ModelSettings, OptimSettings  # noqa: E402


def run(setup: P.PreferenceSetup, steps: int, prof: cProfile.Profile | None = None) -> dict:
    seed_everything(0)
    log = StepLog(3)
    module = RewardModule(model=ModelSettings(str(setup.model_dir)), optim=OptimSettings(lr=P.LR, scheduler="constant"))
    callbacks = [lightning_step_timer(log, P._pair_count)]
    if prof is not None:
        class _Profile(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
                if batch_idx == 3:
                    prof.enable()

            def on_train_end(self, trainer, pl_module):  # noqa: ANN001
                prof.disable()

        callbacks.append(_Profile())
    trainer = P._lightning_trainer(steps, callbacks, setup.workdir)
    trainer.fit(module, train_dataloaders=setup.our_loader())
    return log.summary()


def main() -> None:
    _quiet()
    torch.set_num_threads(1)
    steps = int(os.environ.get("STEPS", 40))
    setup = P.prepare("builtin:tiny", Path(tempfile.mkdtemp()), 16, steps)
    run(setup, steps)  # warm-up
    summary = run(setup, steps)
    print(f"median step CPU {summary['median_step_cpu_s'] * 1000:.1f} ms, {summary['samples_per_cpu_s']:.0f} samples/CPU-s")
    prof = cProfile.Profile()
    run(setup, steps, prof)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
