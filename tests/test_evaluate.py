"""The benchmark harness end to end: two ComfyUI servers, tiny checkpoint, tiny random CLIP and BLIP, resume."""

from __future__ import annotations

import csv
import io
import json
import urllib.error
from pathlib import Path

import evaluate
import pytest
from comfy_server import ComfyServer
from PIL import Image

CKPT = "ae_tiny_sd15.safetensors"
PROMPTS = Path(__file__).resolve().parent.parent / "data" / "ae_benchmark_prompts.json"


def tiny_clip(folder: Path, comfy_root: Path) -> Path:
    """Random CLIP with CLIP-L's tokenizer (ComfyUI's bundled copy) and 32 px images."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.CLIPTokenizer.from_pretrained(str(comfy_root / "comfy" / "sd1_tokenizer"))
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    cfg = transformers.CLIPConfig(text_config=dict(vocab_size=len(tok), max_position_embeddings=77, **layers),
                                  vision_config=dict(image_size=32, patch_size=8, **layers), projection_dim=16)
    transformers.CLIPModel(cfg).save_pretrained(folder)
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformers.CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    return folder


def tiny_blip(folder: Path) -> Path:
    """Random BLIP captioner with an 11-word BERT vocabulary."""
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "dog", "and", "photo", "of"]
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    cfg = transformers.BlipConfig(
        text_config=dict(vocab_size=len(words), encoder_hidden_size=32, max_position_embeddings=64, pad_token_id=0,
                         bos_token_id=2, eos_token_id=3, sep_token_id=3, **layers),
        vision_config=dict(image_size=32, patch_size=8, **layers), projection_dim=16)
    transformers.BlipForConditionalGeneration(cfg).save_pretrained(folder)
    processor = transformers.BlipProcessor(image_processor=transformers.BlipImageProcessor(
        size={"height": 32, "width": 32}), tokenizer=transformers.BertTokenizer(str(folder / "vocab.txt")))
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def second_server(comfy_root, tiny_checkpoint, tmp_path_factory):
    server = ComfyServer(tmp_path_factory.mktemp("comfy_second"), comfy_root=comfy_root)
    server.link_checkpoint(tiny_checkpoint, CKPT)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def history_size(servers) -> int:
    return sum(len(s.get_json("/history")) for s in servers)


def test_jobs_graph_and_settings_guard(tmp_path):
    jobs = evaluate.load_jobs(PROMPTS, ["objects", "animals"], limit=2, seeds=3)
    assert len(jobs) == 2 * 2 * 3 * 2 and jobs[0] == evaluate.Job("objects", jobs[0].prompt, 0, "plain")
    job = evaluate.Job("animals_objects", "a cat and a red car", 7, "ae")
    assert job.image == "images/animals_objects/ae/a_cat_and_a_red_car_7.png"
    graph = evaluate.build_graph(job, evaluate.Settings("m.safetensors", steps=10, size=256))
    assert graph["2"]["inputs"]["subjects"] == "cat, car"
    assert graph["6"]["inputs"]["scale_factor"] == 20.0 and graph["6"]["inputs"]["seed"] == 7
    plain = evaluate.build_graph(evaluate.Job("animals", "a cat and a dog", 0, "plain"), evaluate.Settings("m"))
    assert plain["6"]["inputs"]["scale_factor"] == 0.0 and plain["9"]["class_type"] == "AttendExciteReport"
    evaluate.check_settings(tmp_path, evaluate.Settings("m", steps=10))
    evaluate.check_settings(tmp_path, evaluate.Settings("m", steps=10, timeout=5))  # timeout does not matter
    with pytest.raises(SystemExit, match="other settings"):
        evaluate.check_settings(tmp_path, evaluate.Settings("m", steps=20))


def test_torn_last_row_is_ignored(tmp_path):
    row = {"prompt": "a cat and a dog", "seed": 1, "method": "ae"}
    (tmp_path / "runs.jsonl").write_text(json.dumps(row) + "\n" + '{"prompt": "a ca')
    assert list(evaluate.read_rows(tmp_path / "runs.jsonl")) == [("a cat and a dog", 1, "ae")]


@pytest.mark.host
@pytest.mark.slow
def test_harness_end_to_end_on_two_servers_and_resume(comfy_server, second_server, comfy_root, tmp_path, capsys):
    servers = [comfy_server, second_server]
    out = tmp_path / "eval"
    args = ["--servers", ",".join(s.url for s in servers), "--checkpoint", CKPT, "--prompts", str(PROMPTS),
            "--subsets", "animals,objects", "--limit", "1", "--seeds", "1", "--steps", "2", "--size", "128",
            "--max-refinement-steps", "2", "--timeout", "600", "--out", str(out),
            "--clip", str(tiny_clip(tmp_path / "clip", comfy_root)), "--blip", str(tiny_blip(tmp_path / "blip"))]

    before = history_size(servers)
    assert evaluate.main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result == {**result, "queued": 4, "failed": 0, "images": 4, "jobs": 4}
    assert history_size(servers) - before == 4

    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["method"] for r in rows} == {"plain", "ae"}
    assert {r["server"] for r in rows} == {s.url for s in servers}  # the work was split
    for r in rows:
        assert len(r["labels"]) == 2 and r["step"] == 0  # 2 steps: guided step 0 (plain read at the same step)
        assert all(0.0 <= v <= 1.0 for v in r["max_attention"])
        with Image.open(out / r["image"]) as im:
            assert im.size == (128, 128)

    with (out / "metrics.csv").open() as f:
        records = list(csv.DictReader(f))
    assert len(records) == 4
    for rec in records:
        assert 0.0 <= float(rec["min_attention"]) <= 1.0 and rec["neglected"] in ("0", "1")
        for key in ("full_prompt_sim", "min_object_sim", "text_text_sim"):
            assert -1.0 <= float(rec[key]) <= 1.0, key
        assert float(rec["min_object_sim"]) <= float(rec["full_prompt_sim"]) + 2.0  # both present and finite
    summary = (out / "summary.md").read_text()
    for text in ("Neglect rate", "CLIP full-prompt", "CLIP minimum-object", "text-text", "| plain |", "| ae |",
                 "Animal-Animal (n=1)", "Object-Object (n=1)"):
        assert text in summary, text
    with Image.open(out / "summary.png") as chart:
        assert chart.width >= 5 * 400 and chart.height > 200

    # resume: drop one image and its row; only that one is rendered again
    victim = rows[1]
    (out / victim["image"]).unlink()
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r is not victim))
    before = history_size(servers)
    assert len((out / "scores.jsonl").read_text().splitlines()) == 4  # model scores, cached per image file
    assert evaluate.main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["queued"] == 1 and result["images"] == 4
    assert history_size(servers) - before == 1
    assert (out / victim["image"]).is_file()
    assert len((out / "runs.jsonl").read_text().splitlines()) == 4
    assert len((out / "scores.jsonl").read_text().splitlines()) == 5  # only the new image was scored again
    with (out / "metrics.csv").open() as f:
        assert all(rec["text_text_sim"] for rec in csv.DictReader(f))


def tiny_flux_loader(s: evaluate.Settings) -> evaluate.Loaded:
    return {"1": {"class_type": "AETinyTransformerLoader", "inputs": {"family": "flux", "seed": 0}}}, ["1", 0], \
        ["1", 1], ["1", 2]


@pytest.mark.host
@pytest.mark.slow
def test_harness_on_flux_with_the_tiny_loader(tiny_dit_server, tmp_path, capsys):
    job = evaluate.Job("animals", "a elephant and a rabbit", 0, "ae")
    graph = evaluate.build_graph(job, evaluate.Settings("flux1-dev.safetensors", family="flux"))  # the usual loaders
    assert {n["class_type"] for n in graph.values()} >= {"UNETLoader", "DualCLIPLoader", "VAELoader", "FluxGuidance",
                                                         "EmptySD3LatentImage"}
    assert graph["10"]["inputs"]["type"] == "flux" and graph["6"]["inputs"]["positive"] == ["5", 0]

    out = tmp_path / "eval"
    args = ["--servers", tiny_dit_server.url, "--family", "flux", "--checkpoint", "tiny", "--prompts", str(PROMPTS),
            "--subsets", "animals", "--limit", "1", "--seeds", "1", "--steps", "4", "--size", "64",
            "--max-refinement-steps", "2", "--timeout", "300", "--out", str(out)]
    earlier = set(tiny_dit_server.get_json("/history"))  # the shared test server also ran other tests' prompts
    assert evaluate.main(args, loader=tiny_flux_loader) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result == {**result, "queued": 2, "failed": 0, "images": 2, "jobs": 2}
    queued = [entry["prompt"][2] for pid, entry in tiny_dit_server.get_json("/history").items() if pid not in earlier]
    samplers = [n["inputs"] for p in queued for n in p.values() if n["class_type"] == "AttendExciteKSampler"]
    assert sorted(k["scale_factor"] for k in samplers) == [0.0, 20.0] and {k["cfg"] for k in samplers} == {1.0}

    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in rows) == ["ae", "plain"]
    for r in rows:
        assert r["labels"] == ["elephant", "rabbit"] and r["step"] == 1  # 4 steps: guided 0-1 (plain read at step 1)
        assert all(0.0 <= v <= 1.0 for v in r["max_attention"]) and r["neglected"] == (min(r["max_attention"]) < 0.2)
        with Image.open(out / r["image"]) as im:
            assert im.size == (64, 64)
    with (out / "metrics.csv").open() as f:
        records = {rec["method"]: rec for rec in csv.DictReader(f)}
    for r in rows:
        rec = records[r["method"]]
        assert float(rec["min_attention"]) == pytest.approx(min(r["max_attention"]), abs=1e-6)
        assert rec["neglected"] == str(int(r["neglected"]))
    summary = (out / "summary.md").read_text()
    assert "Neglect rate" in summary and "Smaller subject max attention" in summary and "| ae |" in summary
    assert json.loads((out / "settings.json").read_text())["family"] == "flux"


class FakeClient:
    """Answers like a ComfyUI server that renders instantly, or like one that is down."""

    def __init__(self, url: str, down: bool = False) -> None:
        self.url, self.down, self.prompts = url, down, 0

    def run(self, prompt, timeout):
        if self.down:
            raise urllib.error.URLError("connection refused")
        self.prompts += 1
        report = {"labels": ["cat", "dog"], "step": 0, "max_attention": [[0.5, 0.1]], "neglected": [True],
                  "threshold": 0.2}
        return {"outputs": {evaluate.SAVE_NODE: {"images": [{"filename": "x.png"}]},
                            evaluate.REPORT_NODE: {"attend_excite": [report]}}}

    def image_bytes(self, ref) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format="PNG")
        return buf.getvalue()


def test_a_dead_server_leaves_its_work_to_the_others(tmp_path):
    jobs = evaluate.load_jobs(PROMPTS, ["animals"], limit=3, seeds=1)
    down, up = FakeClient("http://down", down=True), FakeClient("http://up")
    queued, errors = evaluate.generate([down, up], jobs, tmp_path, evaluate.Settings("m"))
    assert (queued, errors, up.prompts) == (6, [], 6)
    assert all((tmp_path / j.image).is_file() for j in jobs)
    queued, errors = evaluate.generate([down], jobs, tmp_path, evaluate.Settings("m"))  # all done: nothing to do
    assert (queued, errors) == (0, [])
    (tmp_path / jobs[0].image).unlink()
    queued, errors = evaluate.generate([down], jobs, tmp_path, evaluate.Settings("m"))
    assert queued == 1 and errors == ["1 images not rendered: no server left"]
