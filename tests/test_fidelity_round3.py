"""Fidelity, round 3 (issue 32): every setting that makes a result differ from the reference code
recorded per row, and the documents' figures computed by code. Expected values come from the
reference code (kkyuhun94/dalda @e9e3c31), DA-Fusion's (brandontrabucco/da-fusion) and hand
computation, written out here."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import load_script, noise, run_benchmark  # noqa: E402

README = (ROOT / "README.md").read_text(encoding="utf-8")
BENCH_README = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def fewshot():
    return load_script(ROOT / "benchmarks" / "fewshot.py", "fewshot_round3")


@pytest.fixture(scope="module")
def generation():
    return load_script(ROOT / "benchmarks" / "bench_generation.py", "bench_generation_round3")


def _flat(text: str) -> str:
    return " ".join(text.split())


# -- the pool kind ---------------------------------------------------------------------------------------
def test_pool_kind_reads_classes_json(tmp_path):
    from dalda_aug.fewshot import pool_kind

    classes = ["canterbury_bells", "pink_primrose"]

    def folder(name, info):
        (tmp_path / name / "all").mkdir(parents=True)
        if info is not None:
            (tmp_path / name / "classes.json").write_text(json.dumps(info))
        return tmp_path / name / "all"

    listed = {"pink_primrose": "pink primrose", "canterbury_bells": "canterbury bells"}
    assert pool_kind(folder("ref", {"classes": listed, "split": "reference", "reference_pool": True}),
                     classes) == "reference"
    assert pool_kind(folder("off", {"classes": listed, "split": "official", "reference_pool": False}),
                     classes) == "official"
    # written before reference_pool existed: its split says it; Pets' official files are the reference's
    assert pool_kind(folder("old", {"classes": listed, "split": "reference"}), classes) == "reference"
    assert pool_kind(folder("pets", {"dataset": "pets", "classes": listed, "split": "official"}),
                     classes) == "reference"
    assert pool_kind(folder("none", None), classes) == "no classes.json"
    assert pool_kind(folder("other", {"classes": {"a": "a"}, "split": "reference"}), classes) == "no classes.json"
    (tmp_path / "bad" / "all").mkdir(parents=True)
    (tmp_path / "bad" / "classes.json").write_text("[1, 2")
    assert pool_kind(tmp_path / "bad" / "all", classes) == "no classes.json"


# -- --class-names applies to the IP-Adapter prompts only ------------------------------------------------
def test_class_names_folder_leaves_real_guidance_readable(fewshot, tiny_models, tmp_path):
    from dalda_aug.plan import AugmentationPlan

    for split in ("train", "test"):
        for c, name in enumerate(("american_bulldog", "great_pyrenees")):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(2):
                noise(10 * c + i, (32, 32)).save(tmp_path / split / name / f"{i}.png")
    models = tiny_models.save(tmp_path / "models.json")
    out = tmp_path / "out"
    argv = ["--train", str(tmp_path / "train"), "--test", str(tmp_path / "test"), "--models", str(models),
            "--methods", "real_guidance,fixed", "--class-names", "folder", "--shots", "1", "--seeds", "0",
            "--variants", "1", "--device", "cpu", "--stop-after", "plan", "--out", str(out), "--no-progress",
            "--threads", "1"]
    assert run_benchmark(fewshot, argv) == 0
    rg = AugmentationPlan.load(out / "plans" / "seed0-1shot-real_guidance")
    ip = AugmentationPlan.load(out / "plans" / "seed0-1shot-fixed")
    # DA-Fusion's real_guidance.py (which the paper ran): prompt "a photo of a {name}" with the
    # readable name; the reference's DALDA (format_name): the folder name
    assert {v.prompt for v in rg} == {"a photo of a american bulldog", "a photo of a great pyrenees"}
    assert {v.prompt for v in ip} == {"a photo of a american_bulldog", "a photo of a great_pyrenees"}
    config = json.loads((out / "config.json").read_text())
    assert config["pool"] == "no classes.json"
    # real_guidance: no AGS, readable names by design; fixed: no AGS, the reference's folder names
    assert config["differs_from_reference"] == {
        "real_guidance": ["protocol", "recipe", "bn_mode", "eval_draws", "eval_split", "pool"],
        "fixed": ["protocol", "recipe", "bn_mode", "eval_draws", "eval_split", "pool"]}


def test_rows_and_csv_carry_the_settings(fewshot, tmp_path):
    rows = []
    for method, ags, names in (("real", None, None), ("base_ags", "truncnorm", "readable")):
        rows.append({"run_key": method, "dataset": "toy", "backbone": "clip", "mode": "linear", "method": method,
                     "label": method, "shots": 1, "seed": 0, "protocol": "reference", "best_epoch": 0,
                     "epoch_mean_per_class": [0.5], "epoch_top1": [0.5], "recipe": "reference", "bn_mode": None,
                     "clip_head": "reference", "eval_draws": 6400, "eval_split": "reference", "ags_mode": ags,
                     "class_names": names, "pool": "official", "top1": 0.5, "mean_per_class": 0.5,
                     "n_test": 6400, "n_train_real": 2, "n_synthetic": 0, "p": 0.5, "train_seconds": 1.0})
    paths = fewshot.write_outputs(tmp_path, rows, {"dataset": "toy"}, [1])
    import csv

    with open(paths["csv"], newline="", encoding="utf-8") as fh:
        lines = list(csv.DictReader(fh))
    assert [(r["method"], r["seed"], r["ags_mode"], r["class_names"], r["pool"]) for r in lines] == [
        ("real", "0", "", "", "official"), ("base_ags", "0", "truncnorm", "readable", "official"),
        ("real", "mean", "", "", "official"), ("base_ags", "mean", "truncnorm", "readable", "official")]
    summary = json.loads(paths["json"].read_text())["summary"]
    assert [(s["ags_mode"], s["class_names"], s["pool"]) for s in summary] == [
        (None, None, "official"), ("truncnorm", "readable", "official")]
    table = _flat(paths["table"].read_text())
    assert ("it differs in AGS mode (--ags-mode): truncnorm; class names in the IP-Adapter prompts "
            "(--class-names): readable; image pool") in table
    assert "Settings: ags_mode truncnorm, class_names readable, pool official." in table


# -- sentences computed by code ----------------------------------------------------------------------------
def test_run_count_follows_the_method_registry(fewshot):
    from dalda_aug.fewshot import DEFAULT_METHODS, METHODS

    seeds = len(fewshot.build_parser().parse_args(["--out", "o"]).seeds)
    n = len(DEFAULT_METHODS)
    text = _flat(BENCH_README)
    assert f"{n} runs per seed, {n * seeds} per dataset and backbone" in text
    assert re.findall(r"(\d+) runs per seed", text) == [str(n)]
    ip = sum(METHODS[m].generator == "ip_adapter" for m in DEFAULT_METHODS)
    assert f"{ip} IP-Adapter methods, Real Guidance and DA-Fusion in the default set" in text


def test_cost_table_is_written_by_the_code(generation):
    block = re.search(r"<!-- fewshot-cost: [^>]*-->\n(.*?)<!-- end fewshot-cost -->", BENCH_README, re.S)
    assert block is not None and block.group(1) == generation.fewshot_cost_markdown()


def test_cost_model_by_hand(generation):
    # Per image: UNet 0.80 TFLOP per sample and step (x2 with CFG), VAE decode 2.5, VAE encode 1.1,
    # ViT-H/14 0.34. Real Guidance: 50 PNDM steps at strength 0.5 -> int(25.0) = 25 UNet steps.
    # DA-Fusion: strengths 0.25/0.5/0.75/1 -> int(12.5), 25, int(37.5), 50 steps, mean 31.
    ip = 0.80 * 2 * 30 + 2.5 + 0.34
    rg = 0.80 * 2 * 25 + 2.5 + 1.1
    da = (0.80 * 2 * (12 + 25 + 37 + 50) / 4) + 2.5 + 1.1
    cost = generation.fewshot_generation_cost(37)  # Pets: 37 classes, 1-shot, M = 10, 3 seeds
    assert cost["images"] == {"ip_adapter": 5 * 1110, "real_guidance": 1110, "da_fusion": 1110}
    assert cost["tflop_per_image"]["real_guidance"] == pytest.approx(rg) == pytest.approx(43.6)
    assert cost["tflop_per_image"]["da_fusion"] == pytest.approx(da)
    work = 5550 * ip + 1110 * rg + 1110 * da
    assert cost["image_tflop"] == pytest.approx(work) and round(work / 1e3) == 390
    assert cost["image_seconds_25"] == pytest.approx(work / (0.25 * 790))
    # textual inversion: 1,000 steps x batch 4 x (forward + backward ≈ 3 UNet forwards + a VAE encode)
    ti = 37 * 3 * 1000 * 4 * (3 * 0.80 + 1.1)
    assert cost["ti_tflop"] == pytest.approx(ti)
    assert cost["reference_seconds"] == pytest.approx(7770 / 1.5)
    assert generation.fewshot_generation_cost(37, methods=("real", "fixed"))["ti_tflop"] == 0


def test_flop_constants_are_the_architectures(generation):
    """The performance model's UNet and VAE figures are what torch's FLOP counter counts for the
    SD1.5 architectures (built on the meta device: shapes only, no weights, no work)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    def count(fn):
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e12

    with torch.device("meta"):
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
        unet = UNet2DConditionModel(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                                    cross_attention_dim=768, attention_head_dim=8)
        latents = torch.empty(1, 4, 64, 64)
        encode = count(lambda: vae.encode(torch.empty(1, 3, 512, 512)))
        decode = count(lambda: vae.decode(latents))
        step = count(lambda: unet(latents, torch.tensor([10]), torch.empty(1, 77, 768)))
    assert encode == pytest.approx(generation.VAE_ENCODE_TFLOP_512, rel=0.05)
    assert decode == pytest.approx(generation.VAE_DECODE_TFLOP_512, rel=0.05)
    assert step == pytest.approx(generation.UNET_TFLOP_512, rel=0.05)


def test_cosine_reading_figures_are_the_ags_formula():
    from dalda_aug.plan.ags import ags_parameters

    mu = {s: float(ags_parameters([s], [1])[0][0]) for s in (0.25, 0.30, 0.35)}
    text = _flat(README)
    assert (f"AGS gives μ = {mu[0.25]:.2f} at 0.25 and {mu[0.30]:.2f} at 0.30 (the Low range, score ≤ α) "
            f"but {mu[0.35]:.3f} at 0.35") in text
    assert "(0.8406, 0.7782, 0.5548)" in text  # the paper's Fig. 4 means


def test_paper_number_is_said_to_be_inferred(fewshot):
    row = {"dataset": "pets", "backbone": "clip", "mode": "linear", "method": "dalda", "label": "DALDA",
           "shots": 1, "seeds": [0], "protocol": "reference", "best_epoch": 3, "top1": 0.9, "top1_std": None,
           "mean_per_class": 0.88, "mean_per_class_std": None, "n_test": 6400, "recipe": "reference",
           "bn_mode": None, "clip_head": "reference", "eval_draws": 6400, "eval_split": "reference",
           "ags_mode": "clip", "class_names": "folder", "pool": "reference"}
    table = _flat(fewshot.render_table([row], "pets", "clip", "linear", [1]))
    assert '"average of 3 trials"): 0.875' in table and "is inferred from the reference code" in table
    assert "the paper does not say" in table


# -- prepare_datasets copies JPEG files --------------------------------------------------------------------
def test_prepare_copies_jpegs_byte_for_byte(tmp_path, monkeypatch):
    import torchvision.datasets as tvd
    from PIL import Image

    prep = load_script(ROOT / "examples" / "prepare_datasets.py", "prepare_round3")
    jpg = tmp_path / "dl" / "jpg"
    jpg.mkdir(parents=True)
    noise(1, (40, 30)).save(jpg / "image_00001.jpg", quality=80)
    noise(2, (40, 30)).save(jpg / "image_00002.jpg", format="PNG")  # a PNG under a .jpg name
    labels = {1: 0, 2: 1}

    class FakeFlowers:
        def __init__(self, root, split, download):
            ids = {"train": [1], "val": [], "test": [2]}[split]
            self._image_files = [jpg / f"image_{i:05d}.jpg" for i in ids]
            self._labels = [labels[i] for i in ids]

        def __len__(self):
            return len(self._image_files)

    monkeypatch.setattr(tvd, "Flowers102", FakeFlowers)
    for split in ("reference", "official"):
        out = tmp_path / split
        assert prep.main(["--out", str(out), "--datasets", "flowers102", "--split", split]) == 0
        written = sorted((out / "flowers102").rglob("*.jpg"))
        assert len(written) == 2
        copied = next(p for p in written if p.parent.name == "pink_primrose")
        assert copied.read_bytes() == (jpg / "image_00001.jpg").read_bytes()
        other = next(p for p in written if p.parent.name != "pink_primrose")
        with Image.open(other) as img:
            assert img.format == "JPEG"
        info = json.loads((out / "flowers102" / "classes.json").read_text())
        assert info["reencoded"] == 1 and info["reference_pool"] == (split == "reference")


# -- the 1-shot recipe, as printed ---------------------------------------------------------------------------
def _recipe_commands(tmp_path: Path) -> list[list[str]]:
    """The commands of benchmarks/README.md's 1-shot recipe, expanded by bash itself with
    ``python``, ``dalda-aug`` and ``pip`` as shell functions that record their arguments."""
    section = BENCH_README.split("### Reproducing the 1-shot table on a GPU machine", 1)[1]
    script = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    log = tmp_path / "commands"
    log.mkdir()
    prelude = ('n=0\nrecord() { n=$((n+1)); printf "%s\\0" "$@" > "$LOG/$(printf %03d $n)"; }\n'
               'pip() { :; }\npython() { record python "$@"; }\ndalda-aug() { record dalda-aug "$@"; }\n')
    subprocess.run(["bash", "-euc", prelude + script], env={"LOG": str(log), "PATH": "/usr/bin:/bin"},
                   check=True, timeout=30)
    return [p.read_bytes().decode().split("\0")[:-1] for p in sorted(log.iterdir())]


def test_one_shot_recipe_runs_as_printed(fewshot, tiny_models, tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    from llm_server import ChatServer, per_class

    from dalda_aug.cli import main as dalda_aug

    commands = _recipe_commands(tmp_path)
    prepare, rest = commands[0], commands[1:]
    assert prepare == ["python", "examples/prepare_datasets.py", "--out", "data", "--split", "reference"]
    prompts = [c[1:] for c in rest if c[0] == "dalda-aug"]
    runs = [c[2:] for c in rest if c[:2] == ["python", "benchmarks/fewshot.py"]]
    assert len(prompts) == 3 and len(runs) == 6 and len(rest) == 9
    parse = fewshot.build_parser().parse_args
    for argv in runs:  # every run: the reference's protocol, AGS mode, class names and pools
        args = parse(argv)
        ds = args.preset
        assert (args.protocol, args.ags_mode, args.class_names, args.seeds) == ("reference", "clip", "folder",
                                                                                 [0, 1, 2])
        assert fewshot.resolve_components(args)["eval_draws"] == 6400
        assert args.prompts == Path(f"prompts/{ds}.json") and args.variants == 10
        if ds == "pets":  # prepare_datasets writes Pets as train/ and test/, the others as all/
            assert (args.train, args.test, args.data) == (Path("data/pets/train"), Path("data/pets/test"), None)
        else:
            assert (args.train, args.data) == (None, Path(f"data/{ds}/all"))

    # Run the Flowers-102 lines: prepare_datasets with the download replaced by two local files per
    # class, the LLM by a local server; tiny models, one seed, minimal steps (later flags win).
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    jpg = tmp_path / "dl"
    jpg.mkdir()
    for i in range(1, 9):
        noise(i, (32, 32)).save(jpg / f"image_{i:05d}.jpg")

    class FakeFlowers:  # image ids 1-4 are pink primrose (label 0), 5-8 hard-leaved pocket orchid (1)
        def __init__(self, root, split, download):
            ids = {"train": [1, 5], "val": [2, 6], "test": [3, 4, 7, 8]}[split]
            self._image_files = [jpg / f"image_{i:05d}.jpg" for i in ids]
            self._labels = [0 if i <= 4 else 1 for i in ids]

    monkeypatch.setattr(tvd, "Flowers102", FakeFlowers)
    prep = load_script(ROOT / "examples" / "prepare_datasets.py", "prepare_recipe")
    monkeypatch.setattr(prep, "FLOWERS102_CLASSES", ["pink primrose", "hard-leaved pocket orchid"])  # 2 classes
    assert prep.main([*prepare[2:], "--datasets", "flowers102"]) == 0

    models = str(tiny_models.save(tmp_path / "models.json"))
    sentence = lambda name, call: f"A photo of a {name} in a garden."  # noqa: E731
    (flowers_prompts,) = [c for c in prompts if "flowers102" in c[c.index("--preset") + 1]]
    with ChatServer([], default=per_class(sentence)) as server:
        assert dalda_aug([*flowers_prompts, "--llm", "openai:test-model", "--base-url", server.base_url,
                          "--models", models, "--no-progress"]) == 0
    tiny = ["--models", models, "--seeds", "0", "--variants", "1", "--steps", "1", "--img2img-steps", "2",
            "--ti-steps", "1", "--size", "32", "--epochs", "1", "--iterations-per-epoch", "1", "--batch-size", "2",
            "--device", "cpu", "--dtype", "float32", "--num-workers", "0", "--no-progress", "--threads", "1"]
    (flowers_clip,) = [a for a in runs if "flowers102" in a and a[a.index("--backbone") + 1] == "clip"]
    assert run_benchmark(fewshot, [*flowers_clip, *tiny]) == 0

    result = json.loads((tmp_path / "runs" / "flowers102-1shot-clip" / "results.json").read_text())
    methods = [r["method"] for r in result["runs"]]
    assert methods == ["real", "real_guidance", "da_fusion", "fixed", "base_rs", "llm_rs", "base_ags", "dalda"]
    for row in result["runs"]:
        assert fewshot.differing_components(row) == [], row["method"]
        assert row["pool"] == "reference" and row["n_test"] == 6400 and row["eval_pool"] == 4  # 2 of 4 per class
        # one epoch: a forward per distinct image of the 6,400 draws, i.e. each of the 4 once
        assert row["eval_forwards"] == len(set(fewshot.evaluation_draws(4, 6400, seed=0, epoch=0))) == 4
    table = _flat((tmp_path / "runs" / "flowers102-1shot-clip" / "table.md").read_text())
    assert "Every component and setting is the reference code's: its metric." in table
    assert '(DALDA, flowers102, 1-shot, clip, "average of 3 trials"): 0.819' in table
