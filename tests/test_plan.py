import json

import numpy as np
import pytest
from PIL import Image

from dalda_aug.plan.ags import AGSConfig, Scaling
from dalda_aug.cli import main
from dalda_aug.data import ImageSource, image_sha256
from dalda_aug.errors import InputError, MissingFileError
from dalda_aug.plan import AugmentationPlan, build_plan, derive_seed

FIELDS = {"source", "label", "class_name", "score", "variant", "prompt", "lambda", "seed", "source_sha256"}


@pytest.fixture()
def folder(tmp_path):
    from skimage import data

    photos = {"tabby_cat": ["chelsea", "cat"], "coffee_cup": ["coffee"], "rocket": ["rocket", "astronaut"]}
    root = tmp_path / "data"
    for cls, names in photos.items():
        (root / cls).mkdir(parents=True)
        for n in names:
            Image.fromarray(getattr(data, n)()).resize((64, 48)).save(root / cls / f"{n}.png")
    return root


def _plan_cli(folder, out, models, *extra):
    argv = ["plan", "--data", str(folder), "--out", str(out), "--variants", "3", "--models", str(models), *extra]
    assert main(argv) == 0
    return AugmentationPlan.load(out)


def test_plan_files_fields_and_determinism(folder, tmp_path, tiny_models):
    models_json = tmp_path / "models.json"
    tiny_models.save(models_json)
    a = _plan_cli(folder, tmp_path / "a", models_json, "--seed", "1")
    b = _plan_cli(folder, tmp_path / "b", models_json, "--seed", "1")
    c = _plan_cli(folder, tmp_path / "c", models_json, "--seed", "2")
    for name in ("plan.jsonl", "plan.json", "summary.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    rows = [json.loads(line) for line in (tmp_path / "a" / "plan.jsonl").read_text().splitlines()]
    assert len(rows) == 5 * 3 and all(set(r) == FIELDS for r in rows)
    assert {r["source"] for r in rows} == {"tabby_cat/chelsea.png", "tabby_cat/cat.png", "coffee_cup/coffee.png",
                                           "rocket/rocket.png", "rocket/astronaut.png"}
    assert {r["class_name"] for r in rows} == {"tabby cat", "coffee cup", "rocket"}
    assert all(r["prompt"] == f"a photo of a {r['class_name']}" for r in rows)
    # a different seed changes λ and seeds but not the scores
    assert [v.lam for v in a] != [v.lam for v in c]
    assert not {v.seed for v in a} & {v.seed for v in c}
    assert [v.score for v in a] == [v.score for v in c]
    # seeds derive from (seed, content hash, variant)
    v = a.variants[4]
    assert v.seed == derive_seed(1, v.source_sha256, v.variant)
    assert v.source_sha256 == image_sha256(Image.open(folder / v.source))
    # summary
    s = a.summary
    assert s["sources"] == 5 and s["variants"] == 15 and s["classes"] == 3
    assert sum(s["score_histogram"]["counts"]) == 5
    assert s["low_sources"] + s["high_sources"] == 5
    assert s["low_share"] == pytest.approx(sum(1 for src, vs in a.by_source().items() if vs[0].score <= 0.3) / 5)


def test_plan_ags_ranges_follow_scores(folder, tiny_models):
    src = ImageSource.from_folder(folder)
    scores = [0.1, 0.9, 0.3, 0.31, 1.0]
    plan = build_plan(src, variants=20, seed=0, scores=scores, models=tiny_models)
    for item, score in zip(src.items, scores):
        lams = [v.lam for v in plan.variants_for(item.source)]
        lo, hi = (0.7, 0.9) if score <= 0.3 else (0.1, 0.4)
        assert all(lo <= lam <= hi for lam in lams), (score, lams)
    # n = images per class when no few-shot split: tabby cat has 2 -> sigma 0.1; coffee cup has 1
    assert plan.config["n_shot"] is None


def test_plan_scaling_strategies(folder, tiny_models):
    src = ImageSource.from_folder(folder)
    fixed = build_plan(src, variants=2, scores=[0.5] * 5, scaling=Scaling.parse("fixed:0.6"), models=tiny_models)
    assert {v.lam for v in fixed} == {0.6}
    rs = build_plan(src, variants=50, scores=[0.5] * 5, scaling=Scaling("rs"), models=tiny_models)
    lams = np.array([v.lam for v in rs])
    assert lams.min() < 0.1 and lams.max() > 0.9
    clip = build_plan(src, variants=50, scores=[0.5] * 5, scaling=Scaling("ags", AGSConfig(mode="clip")),
                      models=tiny_models)
    assert max(v.lam for v in clip) > 0.4  # the reference's widened High bound
    assert clip.config["scaling"] == {"strategy": "ags", "ags": AGSConfig(mode="clip").to_dict()}


def test_plan_prompts_bank_order_is_per_image_and_seeded(folder, tiny_models):
    bank = {
        "tabby cat": [f"a {{name}} doing thing {i}" for i in range(4)],
        "coffee cup": ["a coffee cup on a table", "a coffee cup in the sun"],
        "rocket": [f"rocket prompt {i}" for i in range(4)],
    }
    src = ImageSource.from_folder(folder)
    plan = build_plan(src, variants=4, seed=3, scores=[0.5] * 5, prompts=bank, models=tiny_models)
    cat = plan.variants_for("tabby_cat/cat.png")
    assert sorted(v.prompt for v in cat) == sorted(p.replace("{name}", "tabby cat") for p in bank["tabby cat"])
    coffee = [v.prompt for v in plan.variants_for("coffee_cup/coffee.png")]
    assert sorted(coffee) == sorted(bank["coffee cup"] * 2)  # cycles when M > prompts
    again = build_plan(src, variants=4, seed=3, scores=[0.5] * 5, prompts=bank, models=tiny_models)
    assert [v.prompt for v in again] == [v.prompt for v in plan]
    other = [build_plan(src, variants=4, seed=s, scores=[0.5] * 5, prompts=bank, models=tiny_models) for s in range(4, 8)]
    assert any([v.prompt for v in o] != [v.prompt for v in plan] for o in other)
    with pytest.raises(InputError, match="'rocket'"):
        build_plan(src, variants=2, scores=[0.5] * 5, prompts={"tabby cat": ["x"], "coffee cup": ["y"]},
                   models=tiny_models)


def test_plan_few_shot_and_seed_reuse(folder, tiny_models):
    src = ImageSource.from_folder(folder)
    one = build_plan(src, variants=2, seed=0, n_shot=1, scores=None, models=tiny_models)
    assert one.summary["sources"] == 3 and one.config["n_shot"] == 1
    # a source that is in both the 1-shot and full plan keeps its generation seeds
    full = build_plan(src, variants=2, seed=0, models=tiny_models)
    for v in one:
        match = [w for w in full.variants_for(v.source) if w.variant == v.variant][0]
        assert (match.seed, match.score, match.prompt) == (v.seed, v.score, v.prompt)
    with pytest.raises(InputError, match=r"fewer than the 3 shots asked for \(--shots 3\)"):
        build_plan(src, variants=2, n_shot=3, models=tiny_models)


def test_plan_from_dataset(tiny_models):
    imgs = [Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)) for i in range(4)]
    data = [(imgs[i], i % 2) for i in range(4)]
    src = ImageSource.from_dataset(data, class_names=["sea_lion", "dog"])
    plan = build_plan(src, variants=2, models=tiny_models)
    assert plan.sources() == [0, 1, 2, 3]
    assert plan.variants_for(1)[0].class_name == "dog"
    assert plan.variants_for(0)[0].class_name == "sea lion"


def test_plan_load_errors(tmp_path):
    with pytest.raises(MissingFileError, match="plan folder not found"):
        AugmentationPlan.load(tmp_path / "nope")
    (tmp_path / "p").mkdir()
    with pytest.raises(MissingFileError, match="plan.json"):
        AugmentationPlan.load(tmp_path / "p")
    (tmp_path / "p" / "plan.json").write_text('{"format": "dalda_aug.plan/1"}')
    (tmp_path / "p" / "plan.jsonl").write_text('{"source": "a"}\n')
    with pytest.raises(InputError, match=r"plan.jsonl:1.*'label'"):
        AugmentationPlan.load(tmp_path / "p")


def test_plan_rejects_bad_scores(folder, tiny_models):
    src = ImageSource.from_folder(folder)
    with pytest.raises(InputError, match=r"score 1\.5 of 'rocket/astronaut.png'"):
        build_plan(src, variants=2, scores=[0.5, 1.5, 0.5, 0.5, 0.5], models=tiny_models)
    with pytest.raises(InputError, match="variants"):
        build_plan(src, variants=0, scores=[0.5] * 5, models=tiny_models)


def test_cli_errors_are_one_line(folder, tmp_path, capsys):
    assert main(["plan", "--data", str(folder), "--out", str(tmp_path / "o"), "--models", str(tmp_path / "none.json")]) == 2
    assert "models file not found" in capsys.readouterr().err
    assert main(["plan", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--scaling", "fixed:x"]) == 2
    assert "invalid --scaling value 'fixed:x'" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    models_json = tmp_path / "m.json"
    from dalda_aug.config import ModelConfig

    ModelConfig().save(models_json)
    assert main(["plan", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--models", str(models_json)]) == 2
    assert "Couldn't find any class folder" in capsys.readouterr().err


def test_plan_cli_consumes_prompt_banks(folder, tmp_path, tiny_models):
    from dalda_aug.prompts import PromptBank

    models_json = tiny_models.save(tmp_path / "models.json")
    assert main(["prompts", "--data", str(folder), "--out", str(tmp_path / "t.json"), "--llm", "template"]) == 0
    plan = _plan_cli(folder, tmp_path / "p1", models_json, "--prompts", str(tmp_path / "t.json"))
    assert {v.prompt for v in plan.variants_for("coffee_cup/coffee.png")} == {"a photo of a coffee cup"}

    bank = PromptBank({"tabby cat": ["a {name} asleep on a red sofa", "a {name} in the snow", "a {name} on a roof"],
                       "coffee cup": ["a coffee cup on a café table in Paris"],
                       "rocket": ["a rocket lifting off at dawn", "a rocket on the launch pad"]},
                      provenance={"backend": "openai", "model": "test"})
    bank.save(tmp_path / "bank.json")
    plan = _plan_cli(folder, tmp_path / "p2", models_json, "--prompts", str(tmp_path / "bank.json"))
    cat = plan.variants_for("tabby_cat/chelsea.png")
    assert sorted(v.prompt for v in cat) == ["a tabby cat asleep on a red sofa", "a tabby cat in the snow",
                                             "a tabby cat on a roof"]
    assert {v.prompt for v in plan.variants_for("coffee_cup/coffee.png")} == {"a coffee cup on a café table in Paris"}
    assert plan.config["prompts"]["model"] == "test"
    assert "café" in (tmp_path / "p2" / "plan.jsonl").read_text(encoding="utf-8")


def test_real_guidance_is_planned_from_the_command_line(folder, tmp_path, tiny_models):
    """`plan --method` offers every registered generator: a Real Guidance plan holds the base
    prompts, a constant λ (Real Guidance ignores it) and names its config, which `warm` reads."""
    from dalda_aug.cli import build_parser
    from dalda_aug.cli.cache import spec_from_args
    from dalda_aug.generators.real_guidance import RealGuidanceConfig

    choices = next(a for a in build_parser()._subparsers._group_actions[0].choices["plan"]._actions
                   if a.dest == "method").choices
    assert {"dalda", "ip-adapter", "real-guidance", "da-fusion"} <= set(choices)
    models_json = tiny_models.save(tmp_path / "models.json")
    plan = _plan_cli(folder, tmp_path / "rg", models_json, "--method", "real-guidance")
    assert len(plan) == 3 * len(plan.sources())
    assert {v.lam for v in plan} == {0.0}
    assert {v.prompt for v in plan.variants_for("coffee_cup/coffee.png")} == {"a photo of a coffee cup"}
    assert plan.config["generator"] == {"method": "real_guidance", "config": RealGuidanceConfig().to_dict()}
    args = build_parser().parse_args(["warm", "--plan", str(tmp_path / "rg"), "--cache", str(tmp_path / "c")])
    assert type(spec_from_args(args, plan).config) is RealGuidanceConfig
    # the paper's method stays the default, and its plan names no other generator
    plan = _plan_cli(folder, tmp_path / "d", models_json)
    assert "generator" not in plan.config


def test_plan_reads_sources_in_chunks_with_the_same_result(folder, tiny_models, monkeypatch):
    import dalda_aug.plan.build as plan_module

    src = ImageSource.from_folder(folder)
    whole = build_plan(src, variants=2, seed=4, models=tiny_models)
    monkeypatch.setattr(plan_module, "_CHUNK", 2)  # 5 sources -> chunks of 2, 2, 1
    chunked = build_plan(src, variants=2, seed=4, models=tiny_models)
    assert [v.to_row() for v in chunked] == [v.to_row() for v in whole]


def _forward_passes(monkeypatch, scorer, pixels_of_source):
    """Record every CLIP forward pass of ``scorer`` as its shape and, per row, the indices of the
    sources whose preprocessed pixels it holds (skimage's cat is chelsea: two sources alike), or
    "pad" for an all-zero padding row."""
    import torch

    passes: list[tuple[tuple[int, ...], tuple[object, ...]]] = []
    forward = scorer._forward

    def recording(pixels):
        rows = []
        for row in pixels:
            found = tuple(i for i, px in enumerate(pixels_of_source) if torch.equal(row, px))
            rows.append(found if found else ("pad" if not row.any() else "unknown"))
        passes.append((tuple(pixels.shape), tuple(rows)))
        return forward(pixels)

    monkeypatch.setattr(scorer, "_forward", recording)
    return passes


@pytest.mark.parametrize("block", [2, None])  # None: the real clipscore.SCORE_BLOCK
def test_every_forward_pass_has_the_one_block_shape(folder, tiny_models, monkeypatch, block):
    """Issue 14 / 23.4: float32 kernels round differently per batch shape on some CPUs, so every
    forward pass holds exactly SCORE_BLOCK images (the last padded with zeros), for any reading
    chunk and batch size; each source is scored exactly once, and the plan is the same."""
    import dalda_aug.plan.clipscore as clipscore_module
    import dalda_aug.plan.build as plan_module
    from dalda_aug.plan.clipscore import CLIPScorer

    if block is not None:
        monkeypatch.setattr(clipscore_module, "SCORE_BLOCK", block)
    size = clipscore_module.SCORE_BLOCK
    src = ImageSource.from_folder(folder)
    reference = CLIPScorer.from_models(tiny_models)
    pixels = [reference.preprocess(item.load()) for item in src.items]
    results = []
    for chunk, batch_size in [(256, 64), (3, 1), (1, 3), (2, 5)]:
        monkeypatch.setattr(plan_module, "_CHUNK", chunk)
        scorer = CLIPScorer.from_models(tiny_models, batch_size=batch_size)
        passes = _forward_passes(monkeypatch, scorer, pixels)
        plan = build_plan(src, variants=2, seed=4, models=tiny_models, scorer=scorer)
        assert passes and all(shape == (size, 3, 32, 32) for shape, _ in passes), (chunk, passes)
        real = [r for _, rows in passes for r in rows if r != "pad"]
        # each source once, in order, nothing unknown
        assert len(real) == 5 and all(i in found for i, found in enumerate(real)), (chunk, passes)
        for _, rows in passes:  # padding only fills the end of a pass
            assert "pad" not in rows or set(rows[rows.index("pad"):]) == {"pad"}
        pads = sum(rows.count("pad") for _, rows in passes)
        chunks = [min(chunk, 5 - s) for s in range(0, 5, chunk)]
        assert pads == sum(-(-c // size) * size - c for c in chunks), (chunk, passes)
        results.append([v.to_row() for v in plan])
    assert all(r == results[0] for r in results[1:])
    # Each source's score is the one it gets scored alone (an independent call per image), exactly.
    alone = [float(reference.score([item.load()], [item.label], src.class_names)[0]) for item in src.items]
    planned = {v.source: v.score for v in plan}
    assert [planned[item.source] for item in src.items] == [round(x, 8) for x in alone]
