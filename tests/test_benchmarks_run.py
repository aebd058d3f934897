"""The benchmark scripts still run end to end (tiny sizes; their numbers are not checked here, only sanity)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ingest_benchmark_runs_small(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "benchmarks/ingest.py", "--size", "512", "--dates", "3", "--bands", "2", "--reps", "2",
         "--layouts", "cog_zstd,striped_deflate", "--readers", "agrivlm,agrivlm native,raw rasterio,torchgeo",
         "--growth", "",
         "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--torchgeo-python", sys.executable],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "ingest.json").read_text())
    row = report["layouts"]["cog_zstd"]["agrivlm"]
    assert row["chips"] == 4 and row["transforms_ok"] and row["x_raw"] > 0
    # x raw: the ratio of the fastest repetitions (bytes per wall second), the paired median beside it
    raw = report["layouts"]["cog_zstd"]["raw rasterio"]
    assert row["x_raw"] == pytest.approx(row["best_mb_per_s"] / raw["best_mb_per_s"])
    assert row["best_chips_per_s"] == pytest.approx(row["chips"] / min(row["wall_s"]))
    assert row["x_raw_spread"][0] <= row["x_raw_paired"] <= row["x_raw_spread"][1] and len(row["x_raw_runs"]) == 2
    # --compare: two runs' ratios side by side with the largest relative difference
    other = json.loads(json.dumps(report))
    other["layouts"]["cog_zstd"]["agrivlm"]["x_raw"] = row["x_raw"] * 1.25
    (tmp_path / "other.json").write_text(json.dumps(other))
    cmp = subprocess.run([sys.executable, "benchmarks/ingest.py", "--compare", str(tmp_path / "out" / "ingest.json"),
                          str(tmp_path / "other.json")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert cmp.returncode == 0, cmp.stderr[-2000:]
    assert "largest difference between the runs: 20.0%" in cmp.stdout
    native = report["layouts"]["cog_zstd"]["agrivlm native"]
    assert native["chips"] == 4 and native["transforms_ok"] and native["x_raw"] > 0
    assert report["spot_checked_chips"] == {"cog_zstd": 3, "striped_deflate": 3}
    if report["machine"]["torchgeo"] is None:  # this venv has no torchgeo: the column says so
        assert report["layouts"]["cog_zstd"]["torchgeo"] == {"status": "not installed"}
        assert "not installed" in res.stdout
    assert (tmp_path / "out" / "ingest.png").stat().st_size > 0


def test_memory_benchmark_runs_small(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "benchmarks/ingest_memory.py", "--size", "600", "--dates", "3", "--data-dir",
         str(tmp_path / "data"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "ingest_memory.json").read_text())
    assert report["runs"]["600x600"]["chips"] == 9  # 256-px chips, snapped to the edge: 3 x 3
    assert 0 < report["runs"]["imports only"]["peak_rss_mib"] < report["peak_rss_gib"] * 1024 < 2048


def test_infer_benchmark_runs_small(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "benchmarks/infer.py", "--batch-sizes", "1,4", "--reps", "2", "--max-new-tokens", "3",
         "--stride", "32", "--max-frames", "2", "--threads", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "infer.json").read_text())
    rows = report["configurations"]
    assert list(rows) == ["batch 1, cache on", "batch 4, cache on", "batch 1, cache off", "batch 4, cache off"]
    for row in rows.values():  # every configuration ran every round over all 16 chips (stride 32)
        assert [r["chips"] for r in row["runs"]] == [16, 16] and row["chips_per_s"] > 0
        assert 0 < row["model_share"] < 1 and 0 <= row["waiting_share"] < 1 and row["io_share"] > 0
    assert rows["batch 1, cache on"]["speedup"] == 1.0 and "x_cache_off" in rows["batch 4, cache on"]
    assert "x no cache" in res.stdout and (tmp_path / "infer.png").stat().st_size > 0


def test_infer_default_benchmark_runs_small(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "benchmarks/infer_default.py", "--batch-sizes", "36", "--growth-batch", "16", "--reps", "1",
         "--stride", "48", "--threads", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((tmp_path / "infer_default.json").read_text())["configurations"]
    assert list(rows) == ["fields, batch 36, as before", "fields, batch 36, frames shared",
                          "fields, batch 36, frames shared + whole chips", "growth, batch 16, as before",
                          "growth, batch 16, frames shared + whole chips"]
    for key, row in rows.items():  # every configuration asked the same questions of the same 9 chips (stride 48)
        assert row["chips"] == 9 and row["chips_per_s"] > 0, key
        assert 0 < row["model_share"] < row["loop_model_share"] < 1, key  # the run includes opening the stack
        assert row["questions"] == rows[key.rsplit(", ", 1)[0] + ", as before"]["questions"] > 0
    assert rows["fields, batch 36, as before"]["questions"] == 9 * 36
    assert rows["fields, batch 36, as before"]["x_before"] == 1.0
    assert "x before" in res.stdout and (tmp_path / "infer_default.png").stat().st_size > 0


def test_ablation_benchmark_runs_tiny(tmp_path: Path) -> None:
    # the shipped recipe and the curriculum ablation (stage 3 alone, from the model YAML), 2 seeds each, a few
    # steps of the tiny model: every phase through `agrivlm train`, scored by benchmarks/learning.py's code
    res = subprocess.run(
        [sys.executable, "benchmarks/ablations.py", "--tiny", "--variants", "stage3_alone", "--seeds", "2",
         "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "ablations.json").read_text())
    assert list(report["variants"]) == ["shipped", "stage3_alone"] and report["seeds"] == [0, 1]
    shipped, alone = report["variants"]["shipped"], report["variants"]["stage3_alone"]
    for v in (shipped, alone):
        assert len(v["per_seed"]) == 2
        assert v["summary"]["val_position_loss"]["n"] == 2 and v["summary"]["val_position_loss"]["sd"] is not None
        assert v["summary"]["step_time_s"]["mean"] > 0 and v["summary"]["peak_mem_mib"]["mean"] > 0
    # stage 3 alone trained one phase with the steps of the phases it skipped; the shipped recipe three
    runs = sorted(p.name.split("-")[0] for p in (tmp_path / "work" / "tiny" / "train" / "seed0").iterdir()
                  if p.is_dir())
    assert runs == ["stage1", "stage2", "stage3", "stage3"]
    logs = {p.name: p for p in (tmp_path / "work" / "tiny" / "train" / "seed0").iterdir() if p.is_dir()}
    steps = sorted(json.loads(line)["step"] for name, p in logs.items() if name.startswith("stage3")
                   for line in (p / "logs" / "metrics.jsonl").read_text().splitlines()[-1:])
    assert steps == [2, 6]
    assert "| shipped |" in res.stdout and (tmp_path / "out" / "ablations.png").stat().st_size > 0


def test_trainer_vs_bare_loop_benchmark_runs_small(tmp_path: Path) -> None:
    """``train_step.py --vs-bare``: the trainer's log breaks its time down, the bare loop reports samples/s."""
    out = tmp_path / "vs_bare.json"
    res = subprocess.run(
        [sys.executable, "benchmarks/train_step.py", "--vs-bare", "--sizes", "tiny", "--steps", "2", "--warmup", "1",
         "--rounds", "1", "--save-every", "1", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    med = report["median"]
    assert med["bare"]["samples_per_s"] > 0 and med["trainer"]["samples_per_s"] > 0
    for run in ("trainer", "trainer_ckpt"):  # the parts add up to the wall clock the log measured
        r = med[run]
        assert r["data_s"] >= 0 and r["step_s"] > 0
        assert abs(r["data_s"] + r["step_s"] + r["other_s"] - r["seconds"]) < 1e-6
    assert report["saves"] == 2 and "trainer / bare" in res.stdout
    assert out.with_suffix(".png").stat().st_size > 0


def test_encoder_pretrain_benchmark_runs_smoke(tmp_path: Path) -> None:
    """``encoder_pretrain.py --smoke``: the encoder, a random and a pre-trained start, held-out F1 beside the chip."""
    res = subprocess.run(
        [sys.executable, "benchmarks/encoder_pretrain.py", "--smoke", "--threads", "1", "--work", str(tmp_path)],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "encoder_pretrain.json").read_text())
    assert list(report["starts"]) == ["random", "pretrained"] and len(report["held_out"]) == 2
    for start in report["starts"].values():
        run = start["runs"][0]
        assert 0.0 <= run["pooled_f1"]["model"] <= 1.0 and set(run["scenes"]) == set(report["held_out"])
    assert "val_extent_error_px" in report["encoder"]
    assert (tmp_path / "encoder_pretrain.png").stat().st_size > 0


def test_compare_answers_counts_identical_answers_and_names_a_bad_journal(tmp_path: Path) -> None:
    """``compare_answers.py`` (the GPU check's CPU-vs-CUDA comparison) counts word-for-word equal answers per chip."""
    def journal(path: Path, chips: dict[str, list[str]]) -> Path:
        header = {"settings": {"dtype": "float32"}}
        body = {"type": "chips", "chips": [{"chip_id": c, "answers": [{"text": t} for t in texts]}
                                           for c, texts in chips.items()]}
        path.write_text(json.dumps(header) + "\n" + json.dumps(body) + "\n")
        return path

    ref = journal(tmp_path / "cpu.jsonl", {"a": ["no field", "grassland <x>"], "b": ["no field"], "c": ["x"]})
    gpu = journal(tmp_path / "gpu.jsonl", {"a": ["no field", "grassland <y>"], "b": ["no field"]})
    out = tmp_path / "answers.json"
    res = subprocess.run([sys.executable, "benchmarks/compare_answers.py", str(ref), str(gpu), "--out", str(out)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    counts = json.loads(out.read_text())["compared"][str(gpu)]
    assert counts == {"chips_ref": 3, "chips_other": 2, "chips_both": 2, "answers": 3, "identical": 2}
    (tmp_path / "bad.jsonl").write_text("not json\n")
    bad = subprocess.run([sys.executable, "benchmarks/compare_answers.py", str(ref), str(tmp_path / "bad.jsonl")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode != 0 and "bad.jsonl:1: not a JSON line" in bad.stderr
