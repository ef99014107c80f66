"""``dalda-aug textual-inversion``: learn DA-Fusion's class tokens (see :mod:`dalda_aug.generators.textual_inversion`)."""

from __future__ import annotations

import argparse

from ._common import add_command, add_data_argument, add_threads_argument, default_device, options, set_threads

__all__ = ["register"]


def _run_textual_inversion(args: argparse.Namespace) -> int:
    from ..config import load_models_arg
    from ..generators.textual_inversion import TextualInversionConfig, train_textual_inversion

    config = TextualInversionConfig(**options(args, "steps", "batch_size", "learning_rate", "resolution", given=True))
    models = load_models_arg(args.models)
    from ..hub import require_hub_models

    require_hub_models(models, ("base",))  # one line in seconds without the hub
    set_threads(args.threads)
    tokens = train_textual_inversion(args.data, args.out, models=models, shots=args.shots, seed=args.seed,
                                     config=config, device=default_device(args.device), dtype=args.dtype,
                                     progress=not args.no_progress)
    from ..config import describe_model_defaults

    print(f"learned {len(tokens.class_names)} class tokens ({config.steps} steps each"
          f"{describe_model_defaults(args)}) -> {tokens.folder}")
    return 0


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = add_command(subparsers, "textual-inversion", _run_textual_inversion,
                    help="learn one DA-Fusion token per class on its few-shot images",
                    description="Textual inversion with DA-Fusion's settings (1000 steps, batch 4, lr 5e-4 x 4, init "
                                "'the'): writes TOKENS/tokens.json and one diffusers textual-inversion file per class; "
                                "learned tokens are cached by content, so a rerun reuses them. Then: dalda-aug plan "
                                "--method da-fusion --tokens TOKENS.")
    add_data_argument(p)
    p.add_argument("--out", required=True, help="token folder to write")
    p.add_argument("--shots", type=int, default=None,
                   help="keep N images per class, the same seeded split as `dalda-aug plan --shots N --seed S`")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", default=None, help="models JSON (see ModelConfig) or a folder holding models.json; "
                                                  "default: the paper's hub models. Its \"defaults\" (tiny models: "
                                                  "--resolution 64 --steps 20) apply to options not given")
    p.add_argument("--steps", type=int, default=None, help="training steps per class (default 1000)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default 4)")
    p.add_argument("--learning-rate", type=float, default=None, help="base learning rate (default 5e-4, x batch size)")
    p.add_argument("--resolution", type=int, default=None, help="training image size (default 512)")
    p.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, help="dtype of the frozen UNet and VAE (default float32)")
    add_threads_argument(p)
    p.add_argument("--no-progress", action="store_true")
