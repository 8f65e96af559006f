"""Overrides that run configs/dpo/tiny.yaml without the earlier steps of the tiny chain.

The recipe starts from runs/sft/export and reads runs/rm/export's dense rewards; tests start from
the base model and use a frozen implicit signal of that same model (a zero signal: every row falls
back to its full mask), so no reward model has to be trained first.
"""

DPO_TINY_FROM_BASE: tuple[str, ...] = (
    "--model.init_args.model.name_or_path", "builtin:tiny",
    "--model.init_args.reward_model", "null",
    "--model.init_args.ama.token_signal", "implicit",
    "--model.init_args.implicit_model", "builtin:tiny",
)
