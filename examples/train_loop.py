"""Train a few-shot classifier on real + DALDA images in a plain PyTorch loop.

    dalda-aug plan --data data/pets/train --shots 1 --seed 0 --out runs/pets-1shot/plan
    dalda-aug warm --plan runs/pets-1shot/plan --cache runs/cache --dtype float16     # optional
    python examples/train_loop.py --plan runs/pets-1shot/plan --cache runs/cache \
        --test data/pets/test --backbone clip --out runs/pets-1shot/clip-seed0.json

``--models`` names the models (default: the ones the plan records): the CLIP backbone is its
``clip_model``/``clip_pretrained``, so a plan made with ``--models tiny`` trains offline. Offline
without local models, the script stops with one line naming the model and ``--models``.

The cache's generation settings are the ones ``warm`` recorded in the cache folder; the
``--gen-*`` options override them (or set them for a cache that warm never filled).

The training set is the plan's few-shot subset of its image folder; with probability ``--p``
an image is replaced by one of its cached synthetic variants (generated on a cache miss).
Defaults are the reference code's (50 epochs of 200 batches of 32, AdamW 2e-4 for CLIP, Adam 1e-4 for
ResNet50). ``dalda_aug.classify.train_classifier`` runs the same loop; it is spelled out here
so that you can see where the dataset fits into your own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a classifier on a DALDA-augmented few-shot set.",
                                     allow_abbrev=False)
    parser.add_argument("--plan", required=True, type=Path, help="plan folder (dalda-aug plan --out)")
    parser.add_argument("--cache", required=True, type=Path, help="synthetic image cache folder")
    parser.add_argument("--test", required=True, type=Path, help="test image folder (root/<class>/*.jpg)")
    parser.add_argument("--backbone", default="clip", choices=["clip", "resnet50", "efficientnet_lite0"])
    parser.add_argument("--mode", default="linear", choices=["linear", "finetune"])
    parser.add_argument("--pretrained", default=None,
                        help="weight file (resnet50 / efficientnet_lite0) or open_clip tag/checkpoint (clip)")
    parser.add_argument("--models", default=None,
                        help="models JSON (ModelConfig) or a folder holding models.json (`dalda-aug make-tiny-models "
                             "DIR` writes tiny offline ones): --backbone clip takes its clip_model/clip_pretrained, "
                             "and an unwarmed cache its generation models; default: the models the plan records")
    parser.add_argument("--clip-model", default=None,
                        help="open_clip model name or config JSON (default: the --models' clip_model, ViT-B-16 "
                             "for the paper's)")
    parser.add_argument("--p", type=float, default=0.5, help="probability of replacing an image by a synthetic one")
    parser.add_argument("--on-miss", default="generate", help="what a cache miss does (see SyntheticAugmentedDataset)")
    parser.add_argument("--gen-dtype", default=None,
                        help="dtype the synthetic images were (or will be) generated in; part of their cache keys "
                             "(default: the one warm recorded in the cache, else float32)")
    parser.add_argument("--gen-steps", type=int, default=None,
                        help="denoising steps of the synthetic images (default: warm's record, else 30)")
    parser.add_argument("--gen-size", type=int, default=None,
                        help="size of the synthetic images (default: warm's record, else 512)")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--iterations-per-epoch", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None, help="default: the backbone's (2e-4 CLIP, 1e-4 CNNs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    args = parser.parse_args(argv)
    from dalda_aug.errors import DaldaError

    try:
        return _train(args)
    except DaldaError as exc:  # a missing model offline, a moved folder...: one line, no traceback
        print(f"train_loop.py: error: {exc}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import DataLoader, RandomSampler
    from torchvision.datasets import ImageFolder
    from tqdm.auto import tqdm

    from dalda_aug import (AugmentationPlan, IPAdapterConfig, GenerationSpec, ModelConfig, SyntheticAugmentedDataset,
                           SyntheticCache)
    from dalda_aug.classify import build_classifier, eval_transform, evaluate, train_transform
    from dalda_aug.cli import load_models_arg

    plan = AugmentationPlan.load(args.plan)
    # The models: --models, else the ones the plan was made with (the paper's hub models by default).
    models = load_models_arg(args.models) if args.models is not None else plan.models or ModelConfig()
    # The real training images: the plan's folder, of which the dataset serves the plan's own
    # few-shot subset (items="plan", found by file path). No transform on the base: the wrapper
    # applies it to real and synthetic images alike.
    base = ImageFolder(plan.config["data_root"])
    class_names = plan.config["class_names"]
    # The generation settings the cached images are keyed by: the ones warm recorded in the cache
    # folder, unless given here (or the cache was never warmed: the paper's, with the plan's models).
    cache = SyntheticCache(args.cache)
    overrides = (args.gen_steps, args.gen_size, args.gen_dtype)
    if any(v is not None for v in overrides) or not cache.recorded_specs():
        gen_config = IPAdapterConfig(num_inference_steps=args.gen_steps or 30, height=args.gen_size or 512,
                                      width=args.gen_size or 512)
        cache = SyntheticCache(args.cache, GenerationSpec(models, gen_config, dtype=args.gen_dtype or "float32"))

    pretrained = args.pretrained if args.pretrained is not None else True
    clip_model = args.clip_model
    if args.backbone == "clip":
        clip_model = clip_model or models.clip_model
        if args.pretrained is None:
            pretrained = models.clip_pretrained
        from dalda_aug.generators.loading import require_hub_models

        # offline, one line naming the model and --models, in a second (not a traceback after the hub's retries)
        require_hub_models(ModelConfig(clip_model=clip_model, clip_pretrained=str(pretrained)),
                           ("clip_model", "clip_pretrained"))
    model = build_classifier(args.backbone, len(class_names), class_names=class_names, mode=args.mode,
                             pretrained=pretrained, clip_model=clip_model or "ViT-B-16", seed=args.seed,
                             device=args.device)
    train_set = SyntheticAugmentedDataset(base, plan, cache, p=args.p,
                                          transform=train_transform(model), on_miss=args.on_miss,
                                          seed=args.seed, items="plan")
    test_set = ImageFolder(str(args.test), transform=eval_transform(model))
    if [c for c in test_set.classes] != list(plan.config["classes"]):
        print(f"error: the test folder's classes differ from the plan's ({args.test})", file=sys.stderr)
        return 2

    # -- the loop ----------------------------------------------------------------------------
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(args.seed)  # batch order; no global RNG
    sampler = RandomSampler(train_set, replacement=True, generator=generator,
                            num_samples=args.iterations_per_epoch * args.batch_size)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler,
                        num_workers=args.num_workers, generator=generator)
    spec = model.spec
    params = [p for p in model.parameters() if p.requires_grad]  # only the head in linear mode
    lr = args.lr if args.lr is not None else spec.lr
    if spec.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=spec.weight_decay)
    else:
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=spec.weight_decay)

    torch.manual_seed(args.seed)  # the train transform's random crops/flips in this process
    history = []
    for epoch in tqdm(range(args.epochs), desc="epochs"):
        # No set_epoch needed: every access is a fresh seeded draw (real, or which variant).
        model.train()  # a linear-probe model keeps its frozen backbone in eval mode
        total, count = 0.0, 0
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * labels.numel()
            count += labels.numel()
        history.append({"epoch": epoch, "loss": total / count})

    # The model after the last epoch, on the whole test split (no epoch picked on test data).
    metrics = evaluate(model, test_set, batch_size=64, num_workers=args.num_workers)
    print(f"top-1 {metrics['top1']:.4f}  mean per-class {metrics['mean_per_class']:.4f}  (n={metrics['n']})")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "classifier": spec.to_dict(), "history": history, "test": metrics}
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
