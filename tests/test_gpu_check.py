"""benchmarks/gpu_check.py: the first GPU's command works the first time, because every code path ran here.

`--tiny` runs the whole script on the CPU (tiny models, gloo, fp32 train.py runs; the tiny transformers in
place of the 8.3B and Wan2.1-1.3B ones, wan_train's train.py run on the tiny Wan): every section must come back "ok" with finite, positive figures. A section that
raises must be recorded and must not stop the next one; past the budget the rest is skipped. The
Newton-Schulz FLOPs the Muon section reports are re-counted with torch's FLOP counter.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import optimizer

pytestmark = pytest.mark.slow  # the whole module: train.py / torchrun runs (README: Test)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.py")


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finite_positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_tiny_run_measures_every_section_with_finite_positive_figures(tmp_path):
    out = tmp_path / "report" / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, SCRIPT, "--tiny", "--output_dir", str(out.parent)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert list(sections) == ["train", "self_check", "forward", "block", "muon", "wan_forward", "wan_train"]
    assert all(s["status"] == "ok" and finite_positive(s["seconds"]) for s in sections.values()), sections

    # train.py on the CPU: gloo and fp32, as it decided itself; 2 iterations, every logged number finite
    train = sections["train"]
    assert (train["exit_status"], train["device"], train["backend"], train["compute_dtype"]) == (0, "cpu", "gloo", "float32")
    assert [row["iteration"] for row in train["rows"]] == [1, 2]
    assert all(math.isfinite(v) for row in train["rows"] for v in row.values())
    assert {"reward_mean", "grad_norm", "peak_memory_gb", "time_rollout", "time_update"} <= set(train["rows"][0])
    # the self-check: its 7 lines read back, none FAILs on the healthy tiny setup
    lines = sections["self_check"]["lines"]
    assert len(lines) == 7 and "FAIL" not in lines.values() and set(lines.values()) <= {"PASS", "WARN", "SKIP"}

    # every figure: measured, predicted and their ratio finite and positive where present; memory is None on a CPU
    for name in ("forward", "block", "muon", "wan_forward", "wan_train"):
        figures = sections[name]["figures"]
        assert name == "wan_train" or finite_positive(figures["time_s"]["measured"])
        for key, entry in figures.items():
            for field in ("measured", "prediction", "ratio"):
                assert entry[field] is None or finite_positive(entry[field]), (name, key, field, entry)
            assert entry["prediction"] is not None or entry["reason"], (name, key)
    # the same counting of saved activations as plan.py's calibration, on the tiny block: its fit predicts it
    saved = sections["block"]["figures"]["saved_activations_gib_per_sequence"]
    assert saved["ratio"] == pytest.approx(1.0, rel=0.02)
    assert sections["forward"]["video_tokens"] == 3 * 8 * 8
    assert sections["wan_forward"]["output_finite"] and sections["wan_forward"]["video_tokens"] == 3 * 8 * 8
    # Wan2.1 end to end through train.py (the tiny Wan here, at its own size): 2 iterations, every phase timed, and
    # each figure the last row's own number beside plan.py's prediction for the 1-GPU Wan2.1-1.3B setup
    wan_train = sections["wan_train"]
    assert wan_train["exit_status"] == 0 and wan_train["video"] == [9, 32, 32]
    assert [row["iteration"] for row in wan_train["rows"]] == [1, 2]
    last = wan_train["rows"][-1]
    figures = wan_train["figures"]
    assert [figures[k]["measured"] for k in ("rollout_s", "reward_s", "update_s")] == \
        [last["time_rollout"], last["time_reward"], last["time_update"]]
    assert all(finite_positive(figures[k]["prediction"]) for k in ("rollout_s", "update_s", "peak_memory_gib"))
    assert figures["peak_memory_gib"]["measured"] is None and figures["reward_s"]["prediction"] is None
    # the planner was asked about the setup the GPU run uses (its flags beside train.py's defaults, typed here)
    assert wan_train["plan"]["flags"] == "--group_size 2 --num_frames 33 --height 240 --width 416 --num_steps 4"
    assert "| section | figure | measured | plan.py | measured / plan.py | unit |" in done.stdout


def test_a_section_that_raises_is_recorded_and_the_next_one_still_runs(tmp_path, monkeypatch):
    gpu_check = load_gpu_check()

    def broken(ctx):
        raise RuntimeError("CUDA out of memory.\nTried to allocate 20.00 GiB")

    monkeypatch.setitem(gpu_check.CHECKS, "forward", broken)
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--tiny", "--sections", "forward", "muon", "--output_dir", str(tmp_path)]) == 1
    sections = json.loads(out.read_text())["sections"]
    assert sections["forward"]["status"] == "error"
    assert sections["forward"]["error"] == "RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB"  # one line
    assert sections["muon"]["status"] == "ok"


def test_past_the_budget_the_remaining_sections_are_skipped(tmp_path):
    gpu_check = load_gpu_check()
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--tiny", "--budget_s", "0", "--sections", "forward", "muon", "--output_dir", str(tmp_path)]) == 1
    sections = json.loads(out.read_text())["sections"]
    assert [s["status"] for s in sections.values()] == ["skipped", "skipped"]


def test_without_a_gpu_the_full_check_refuses_and_names_tiny(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    gpu_check = load_gpu_check()
    assert gpu_check.main(["--output_dir", str(tmp_path)]) == 2
    assert "--tiny" in capsys.readouterr().err


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (32, 32)])
def test_newton_schulz_flops_are_what_torch_counts(shape):
    from torch.utils.flop_counter import FlopCounterMode
    gpu_check = load_gpu_check()
    defaults = torch.optim.Muon([torch.nn.Parameter(torch.zeros(2, 2))]).defaults
    counter = FlopCounterMode(display=False)
    with counter:
        optimizer.newton_schulz(torch.randn(shape), defaults["ns_coefficients"], defaults["ns_steps"], defaults["eps"])
    assert counter.get_total_flops() == gpu_check.newton_schulz_flops(shape, defaults["ns_steps"])


def test_the_report_goes_under_runs_which_git_ignores_not_into_the_repository_root(tmp_path, monkeypatch):
    gpu_check = load_gpu_check()
    monkeypatch.chdir(tmp_path)                                       # run from a checkout's root, no flags
    assert gpu_check.main(["--tiny", "--budget_s", "0", "--sections", "muon"]) == 1   # skipped: no section runs
    assert os.listdir(tmp_path) == ["runs"]
    assert json.loads((tmp_path / "runs" / "gpu_check" / "gpu_check.json").read_text())["sections"]["muon"]["status"] == "skipped"
    ignored = subprocess.run(["git", "check-ignore", "-q", os.path.join("runs", "gpu_check", "gpu_check.json")], cwd=REPO)
    assert ignored.returncode == 0, "the default report path is not ignored by the repository's .gitignore"
