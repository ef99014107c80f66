"""DA-Fusion on tiny models: textual inversion, the token files, the generator, plans and the CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from PIL import Image  # noqa: E402

from dalda_aug.generators.da_fusion import DAFusionConfig, DAFusionGenerator  # noqa: E402
from dalda_aug.generators.textual_inversion import train_textual_inversion  # noqa: E402
from dalda_aug.errors import InputError  # noqa: E402
from dalda_aug.generators import GenerationRequest  # noqa: E402
from dalda_aug.generators.da_fusion import DA_FUSION_STRENGTHS, build_da_fusion_plan, draw_strengths  # noqa: E402
from dalda_aug.generators.textual_inversion import (  # noqa: E402
    TextualInversionConfig,
    TextualInversionTrainer,
    class_token,
)

CANVAS = 64
TI = TextualInversionConfig(steps=3, resolution=32, batch_size=2)


def _image(seed, size=(40, 40)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dafusion-data")
    for k, name in enumerate(("golden retriever", "tabby")):
        (root / name).mkdir()
        for i in range(3):
            _image(10 * k + i, (40 + 4 * i, 36)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ti-cache")


@pytest.fixture(scope="module")
def tokens(tiny_models, data, cache_dir, tmp_path_factory):
    return train_textual_inversion(data, tmp_path_factory.mktemp("tok") / "tokens", models=tiny_models, shots=2,
                                   seed=0, config=TI, cache_dir=cache_dir)


def test_da_fusion_settings_are_the_papers_code():
    # DA-Fusion scripts/fine_tuning/fine_tune_*.sh: --resolution=512 --train_batch_size=4 --max_train_steps=1000
    # --learning_rate=5.0e-04 --scale_lr --lr_scheduler="constant" --lr_warmup_steps=0; fine_tune.py: initializer "the",
    # placeholder "<name_with_underscores>"; AdamW 0.9/0.999/1e-2/1e-8 (diffusers' script defaults).
    c = TextualInversionConfig()
    assert (c.steps, c.batch_size, c.learning_rate, c.resolution, c.initializer_token) == (1000, 4, 5e-4, 512, "the")
    assert c.effective_learning_rate == pytest.approx(2e-3)
    assert (c.adam_beta1, c.adam_beta2, c.weight_decay, c.adam_epsilon, c.flip_p) == (0.9, 0.999, 1e-2, 1e-8, 0.5)
    assert class_token("golden retriever") == "<golden_retriever>"
    # launch_textual_inversion=1.0-0.75-0.5-0.25_*.sh: four strengths, ComposeParallel with probs 0.25 each.
    assert sorted(DA_FUSION_STRENGTHS) == [0.25, 0.5, 0.75, 1.0]


def test_training_lowers_the_loss_on_a_fixed_batch_and_moves_the_token(tiny_models):
    trainer = TextualInversionTrainer(tiny_models, TextualInversionConfig(resolution=32, learning_rate=0.05,
                                                                          scale_lr=False, weight_decay=0.0))
    token_id = trainer.add_token("<thing>")
    the_id = trainer.tokenizer.encode("the", add_special_tokens=False)[0]
    initial = trainer.text_encoder.get_input_embeddings().weight.detach().clone()
    assert torch.equal(initial[token_id], initial[the_id])  # initialised from "the"
    pixels = torch.stack([trainer.pixels(_image(i)) for i in range(2)])
    prompts = ["a photo of a <thing>", "a rendering of a <thing>"]

    def fixed_loss():
        with torch.no_grad():
            return float(trainer.loss(pixels, prompts, torch.Generator("cpu").manual_seed(3)))

    before = fixed_loss()
    for _ in range(15):
        trainer.step(pixels, prompts, torch.Generator("cpu").manual_seed(3))
    after = fixed_loss()
    assert after < before
    weights = trainer.text_encoder.get_input_embeddings().weight.detach()
    assert float((weights[token_id] - initial[the_id]).norm()) > 1e-3
    others = torch.arange(weights.shape[0]) != token_id
    assert torch.equal(weights[others], initial[others])  # only the new token's row is trained


def test_token_files_load_into_stock_img2img_and_match_our_generator(tiny_models, tokens, data):
    from diffusers import StableDiffusionImg2ImgPipeline
    from safetensors.torch import load_file

    assert json.loads((tokens.folder / "tokens.json").read_text())["classes"]["tabby"]["token"] == "<tabby>"
    stock = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_models.base, safety_checker=None)
    stock.set_progress_bar_config(disable=True)
    for name in tokens.class_names:
        stock.load_textual_inversion(str(tokens.file_of(name)), token=tokens.token_of(name))
    token = tokens.token_of("golden retriever")
    saved = next(iter(load_file(str(tokens.file_of("golden retriever"))).values()))
    token_id = stock.tokenizer.convert_tokens_to_ids(token)
    assert torch.equal(stock.text_encoder.get_input_embeddings().weight[token_id].detach(), saved)

    source = _image(77, (52, 44))
    prompt = f"a photo of a {token}"
    generator = DAFusionGenerator(tiny_models, DAFusionConfig(num_inference_steps=4, height=CANVAS, width=CANVAS,
                                                              tokens=str(tokens.folder)))
    for strength, seed in ((0.75, 5), (0.25, 6)):
        canvas = source.resize((CANVAS, CANVAS), Image.BILINEAR)
        expected = stock(prompt=[prompt], image=canvas, strength=strength, guidance_scale=7.5, num_inference_steps=4,
                         generator=torch.Generator("cpu").manual_seed(seed)).images[0].resize(source.size,
                                                                                              Image.BILINEAR)
        ours = generator.generate([GenerationRequest(source, prompt, strength, seed)])[0]
        assert ours.size == source.size
        assert int(np.abs(np.asarray(ours, dtype=int) - np.asarray(expected, dtype=int)).max()) <= 2


def test_learned_tokens_are_cached_by_content(tiny_models, data, tokens, cache_dir, tmp_path):
    cached = sorted(cache_dir.glob("*.safetensors"))
    assert len(cached) == 2
    stamps = {p: p.stat().st_mtime_ns for p in cached}
    again = train_textual_inversion(data, tmp_path / "again", models=tiny_models, shots=2, seed=0, config=TI,
                                    cache_dir=cache_dir)
    assert {p: p.stat().st_mtime_ns for p in cache_dir.glob("*.safetensors")} == stamps  # nothing retrained
    assert again.digest == tokens.digest
    more = train_textual_inversion(data, tmp_path / "more", models=tiny_models, shots=2, seed=0,
                                   config=TextualInversionConfig(steps=4, resolution=32, batch_size=2),
                                   cache_dir=cache_dir)
    assert len(list(cache_dir.glob("*.safetensors"))) == 4 and more.digest != tokens.digest


def test_strengths_are_drawn_uniformly_from_da_fusions_four():
    draws = draw_strengths(8000, np.random.default_rng(0))
    values, counts = np.unique(draws, return_counts=True)
    assert values.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert np.all(np.abs(counts / 8000 - 0.25) < 0.02)
    with pytest.raises(InputError, match="strengths"):
        draw_strengths(3, np.random.default_rng(0), (0.0, 0.5))


def test_plan_rows_carry_the_strength_and_the_token_prompt(tiny_models, data, tokens, tmp_path):
    plan = build_da_fusion_plan(data, tokens.folder, variants=6, seed=1, n_shot=2, models=tiny_models,
                                scores=[0.5] * 4)
    assert len(plan) == 4 * 6
    for v in plan:
        assert v.strength == v.lam and v.strength in DA_FUSION_STRENGTHS
        assert v.prompt == f"a photo of a {class_token(v.class_name)}"
    again = build_da_fusion_plan(data, tokens.folder, variants=6, seed=1, n_shot=2, models=tiny_models,
                                 scores=[0.5] * 4)
    assert [v.strength for v in again] == [v.strength for v in plan]
    plan.save(tmp_path / "plan")
    rows = [json.loads(line) for line in (tmp_path / "plan" / "plan.jsonl").read_text().splitlines()]
    assert all(row["strength"] == row["lambda"] for row in rows)
    assert plan.config["generator"]["method"] == "da_fusion"


def _sha256_seed(text):
    """The seed rule written out here (SHA-256 of "plan seed:source hash:variant:purpose", first 8 bytes >> 1)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


@pytest.mark.parametrize("seed,shots,variants,strengths", [(1, 2, 6, DA_FUSION_STRENGTHS), (4, None, 3, (0.9, 0.123456789))])
def test_strengths_are_drawn_while_planning_as_da_fusion_plans_have_drawn_them(tiny_models, data, tokens, tmp_path, seed,
                                                                              shots, variants, strengths):
    from dalda_aug.plan import AugmentationPlan
    from dalda_aug.plan.ags import Scaling
    from dalda_aug.plan.build import build_plan

    n = 6 if shots is None else 2 * shots
    scores = list(np.linspace(0.1, 0.9, n))
    plan = build_da_fusion_plan(data, tokens.folder, variants=variants, seed=seed, n_shot=shots, models=tiny_models,
                                scores=scores, strengths=strengths)
    assert len(plan) == n * variants
    # Each source's strengths: numpy's default_rng seeded by (plan seed, source hash, 0, "strength"), then
    # integers(0, len(strengths), size=variants) picks one strength per variant (draw_strengths' rule since
    # the first DA-Fusion plans); the row's λ is the same value, unrounded.
    for v in plan:
        rng = np.random.default_rng(_sha256_seed(f"{seed}:{v.source_sha256}:0:strength"))
        expected = float(np.asarray(strengths)[rng.integers(0, len(strengths), size=variants)][v.variant])
        assert (v.strength, v.lam) == (expected, expected)
        assert v.seed == _sha256_seed(f"{seed}:{v.source_sha256}:{v.variant}:generation")
    assert plan.config["scaling"] == {"strategy": "da-fusion-strength", "strengths": [float(x) for x in strengths]}
    assert plan.config["method"] == "da-fusion" and plan.config["prompts"]["backend"] == "da-fusion"
    lams = [v.lam for v in plan]
    assert plan.summary["lambda"] == {"mean": round(float(np.mean(lams)), 6), "min": round(min(lams), 6),
                                      "max": round(max(lams), 6)}
    # the scaling is a plain build_plan strategy: the same rows come out of build_plan with it
    direct = build_plan(data, variants=variants, seed=seed, n_shot=shots, models=tiny_models, scores=scores,
                        scaling=Scaling("da-fusion-strength", strengths=strengths),
                        prompts={name: [f"a photo of a {class_token(name)}"] for name in plan.class_names})
    assert list(direct) == list(plan)
    # saved and loaded, the record reads back as the Scaling that drew it
    loaded = AugmentationPlan.load(plan.save(tmp_path / "plan"))
    assert list(loaded) == list(plan) and loaded.config["scaling"] == plan.config["scaling"]
    assert Scaling.from_dict(loaded.config["scaling"]) == Scaling("da-fusion-strength", strengths=strengths)


def test_bad_inputs(tiny_models, tokens, data, tmp_path):
    generator = DAFusionGenerator(tiny_models, DAFusionConfig(num_inference_steps=2, height=CANVAS, width=CANVAS,
                                                              tokens=str(tokens.folder)))
    with pytest.raises(InputError, match="strength"):
        generator.generate([GenerationRequest(_image(1), "a photo of a <tabby>", 1.5, 0)])
    with pytest.raises(InputError, match="tokens="):
        DAFusionGenerator(tiny_models, DAFusionConfig())
    with pytest.raises(Exception, match="tokens.json"):
        DAFusionConfig(tokens=str(tmp_path)).fingerprint()
    with pytest.raises(InputError, match=r"strengths must be numbers in \(0, 1\]"):
        build_da_fusion_plan(data, tokens.folder, variants=2, models=tiny_models, scores=[0.5] * 6, strengths=(0.5, 2.0))
    (data / "extra class").mkdir()
    try:
        _image(5).save(data / "extra class" / "0.png")
        with pytest.raises(InputError, match="extra class"):
            build_da_fusion_plan(data, tokens.folder, variants=2, models=tiny_models, scores=[0.5] * 7)
    finally:
        (data / "extra class" / "0.png").unlink()
        (data / "extra class").rmdir()


def test_cli_textual_inversion_plan_warm(tiny_models, data, tmp_path, monkeypatch):
    from dalda_aug.cache import SyntheticCache
    from dalda_aug.cli import main
    from dalda_aug.plan import AugmentationPlan

    models = os.path.join(os.path.dirname(tiny_models.base), "models.json")
    env_cache = tmp_path / "dalda-cache"
    with monkeypatch.context() as env:  # the previous value comes back after the commands
        env.setenv("DALDA_AUG_CACHE", str(env_cache))
        assert main(["textual-inversion", "--data", str(data), "--shots", "1", "--out", str(tmp_path / "tok"),
                     "--models", models, "--steps", "2", "--resolution", "32", "--batch-size", "2",
                     "--device", "cpu", "--no-progress"]) == 0
        assert (tmp_path / "tok" / "tokens.json").is_file() and list((env_cache / "textual-inversion").iterdir())
        assert main(["plan", "--method", "da-fusion", "--tokens", str(tmp_path / "tok"), "--data", str(data),
                     "--shots", "1", "--variants", "2", "--out", str(tmp_path / "plan"), "--models", models]) == 0
        assert main(["warm", "--plan", str(tmp_path / "plan"), "--cache", str(tmp_path / "cache"), "--steps", "2",
                     "--size", str(CANVAS), "--device", "cpu", "--no-progress"]) == 0
    plan = AugmentationPlan.load(tmp_path / "plan")
    cache = SyntheticCache(tmp_path / "cache")
    spec = cache.resolve_spec(plan)
    assert isinstance(spec.config, DAFusionConfig)
    cache = cache.with_spec(spec)
    assert all(cache.get(v) is not None for v in plan)
    # metrics (Table 1's CLIP-I / LPIPS) read the DA-Fusion images through the spec warm recorded
    assert main(["metrics", "--plan", str(tmp_path / "plan"), "--cache", str(tmp_path / "cache"), "--lpips-random",
                 "--out", str(tmp_path / "metrics.json")]) == 0
    overall = json.loads((tmp_path / "metrics.json").read_text())["overall"]
    assert overall["n_images"] == len(plan) and overall["n_sources"] == 2
    assert overall["clip_i_within_source"] is not None and overall["lpips_within_source"] is not None
    assert main(["plan", "--method", "da-fusion", "--data", str(data), "--out", str(tmp_path / "p2"),
                 "--models", models]) == 2


def test_fewshot_benchmark_runs_da_fusion_and_a_rerun_reuses_tokens_and_images(tiny_models, data, tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    import torch

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "fewshot.py"
    spec = importlib.util.spec_from_file_location("fewshot_da_fusion", script)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    assert "da_fusion" in bench.DEFAULT_METHODS

    models = tiny_models.save(tmp_path / "models.json")
    out = tmp_path / "out"
    argv = ["--data", str(data), "--test-fraction", "0.34", "--models", str(models), "--methods", "real,da_fusion",
            "--shots", "1", "--seeds", "0", "--variants", "2", "--steps", "2", "--img2img-steps", "4",
            "--ti-steps", "2", "--size", "32", "--device", "cpu", "--dtype", "float32", "--backbone", "clip",
            "--epochs", "1", "--iterations-per-epoch", "1", "--batch-size", "4", "--out", str(out),
            "--no-progress", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        assert bench.main(argv) == 0
        result = json.loads((out / "results.json").read_text())
        runs = {r["method"]: r for r in result["runs"]}
        assert set(runs) == {"real", "da_fusion"} and runs["da_fusion"]["n_synthetic"] == 2 * 2
        assert json.loads((out / "tokens" / "seed0-1shot" / "tokens.json").read_text())["settings"]["steps"] == 2
        rows = [json.loads(line) for line in
                (out / "plans" / "seed0-1shot-da_fusion" / "plan.jsonl").read_text().splitlines()]
        assert all(row["strength"] in DA_FUSION_STRENGTHS for row in rows)
        stamps = {p: p.stat().st_mtime_ns for p in (out / "textual-inversion-cache").iterdir()}
        # The same command again (--overwrite retrains the classifiers): tokens come from the content
        # cache and images from the image cache; nothing is learned or generated again.
        assert bench.main(argv + ["--overwrite"]) == 0
        assert {p: p.stat().st_mtime_ns for p in (out / "textual-inversion-cache").iterdir()} == stamps
        reports = json.loads((out / "results.json").read_text())["warm"]
        assert reports and all(r["method"] == "da_fusion" and r["generated"] == 0 for r in reports)
    finally:
        torch.set_num_threads(threads)
