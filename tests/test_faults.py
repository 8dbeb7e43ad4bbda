"""A run never loses work, never silently trains nothing, never loads a corrupt checkpoint.

The output directory is a small database: only the run's own numbered checkpoints are discovered,
resumed from or deleted; a checkpoint is complete only with its manifest and is verified before it
is resumed from; a failed write leaves nothing behind and names the checkpoint still intact; bad
input is refused before any model is loaded; a run that stops learning stops. Each test below is one
fault a user met (kill, disk full, a corrupt file, a hung rank, a NaN flag, a second run into the same
directory) and states what must happen. Tiny random models, CPU, gloo.
"""
import errno
import math
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import config
import distributed
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join("transformer", "diffusion_pytorch_model.safetensors")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    import tiny
    root = tmp_path_factory.mktemp("tiny_models")
    return tiny.build_tiny_hunyuan(str(root / "hunyuan")), tiny.build_tiny_videoalign(str(root / "videoalign"))


def tiny_args(tiny_models, output_dir, *flags, **overrides):
    """The flags of a tiny run. The byT5 glyph projector is frozen (--no-train_glyph_projector): it is 87 % of the
    tiny model's parameters, gets no gradient from these prompts, and would triple every checkpoint's size."""
    options = {"model_path": tiny_models[0], "reward_path": tiny_models[1], "output_dir": str(output_dir),
               "num_steps": 2, "group_size": 2, "videos_per_rank": 2, "lr": 1e-3, "sample_every": 0,
               "max_iterations": 1, "checkpoint_every": 1, **overrides}
    return (["--tiny", "--no-train_glyph_projector"] + [item for key, value in options.items()
                                                         for item in (f"--{key}", str(value))] + list(flags))


def run(tiny_models, output_dir, *flags, **overrides):
    return train.main(config.parse_config(tiny_args(tiny_models, output_dir, *flags, **overrides)))


def numbered(output_dir):
    return sorted(d for d in os.listdir(output_dir) if distributed.CHECKPOINT_NAME.fullmatch(d))


def iterations_logged(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["iteration"] for line in f]


# ------------------------------------------------------------------------------------------------
# 1, 2. Discovery and retention see only the run's own numbered checkpoints; a used directory is refused.

@pytest.mark.slow
def test_user_copies_of_checkpoints_are_never_resumed_from_or_deleted(tiny_models, tmp_path):
    run(tiny_models, tmp_path, max_iterations=2)
    import shutil
    for copy in ("checkpoint-best", "checkpoint-000004-best", "checkpoint-zzz"):  # all sort after checkpoint-000002
        shutil.copytree(tmp_path / "checkpoint-000002", tmp_path / copy)
    assert distributed.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-000002")
    run(tiny_models, tmp_path, "--resume", max_iterations=5, keep_checkpoints=1)
    assert numbered(tmp_path) == ["checkpoint-000005"]                  # resumed from 2, trained 3..5
    assert iterations_logged(tmp_path) == [1, 2, 3, 4, 5]
    for copy in ("checkpoint-best", "checkpoint-000004-best", "checkpoint-zzz"):
        assert os.path.isfile(tmp_path / copy / WEIGHTS)                # the user's copies are untouched


@pytest.mark.slow
def test_a_second_fresh_run_into_a_used_directory_is_refused_before_any_work(tiny_models, tmp_path):
    run(tiny_models, tmp_path, max_iterations=2)
    before = load_file(str(tmp_path / "checkpoint-000002" / WEIGHTS))
    with pytest.raises(ValueError, match=r"already holds a run \(checkpoint-000001, checkpoint-000002, "
                                                r"metrics.jsonl\): add --resume to continue it, --overwrite"):
        run(tiny_models, tmp_path, max_iterations=2)
    after = load_file(str(tmp_path / "checkpoint-000002" / WEIGHTS))
    assert all(torch.equal(before[k], after[k]) for k in before) and iterations_logged(tmp_path) == [1, 2]
    # --overwrite starts afresh: the old rows and checkpoints are gone, not mixed in
    (tmp_path / "checkpoint-000002.tmp").mkdir()                        # and a stale .tmp is cleaned
    run(tiny_models, tmp_path, "--overwrite", max_iterations=1)
    assert numbered(tmp_path) == ["checkpoint-000001"] and iterations_logged(tmp_path) == [1]
    assert not (tmp_path / "checkpoint-000002.tmp").exists()


@pytest.mark.slow
def test_a_resumed_run_does_not_repeat_metrics_rows(tiny_models, tmp_path):
    run(tiny_models, tmp_path, max_iterations=2, checkpoint_every=2)
    with open(tmp_path / "metrics.jsonl", "a") as f:                    # a row logged after the last checkpoint,
        f.write(json.dumps({"iteration": 3, "reward_mean": 0.0}) + "\n")  # then the run was killed
    run(tiny_models, tmp_path, "--resume", max_iterations=4, checkpoint_every=2)
    assert iterations_logged(tmp_path) == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------------
# 3. A run that cannot learn stops, and says why.

@pytest.mark.slow
def test_a_run_whose_every_reward_fails_stops_and_names_the_cause(tiny_models, tmp_path, monkeypatch):
    import reward
    forward = reward.VideoAlignReward.forward

    def broken(self, frames, prompts, **kwargs):  # a reward model that fails on every video
        return {k: v * float("nan") for k, v in forward(self, frames, prompts, **kwargs).items()}
    monkeypatch.setattr(reward.VideoAlignReward, "forward", broken)
    with pytest.raises(RuntimeError, match=r"no optimizer update in the last 3 iterations \(--max_failed_iterations "
                                             r"3\): every reward failed \(NaN\)"):
        run(tiny_models, tmp_path, max_iterations=50, max_failed_iterations=3, checkpoint_every=100)
    assert iterations_logged(tmp_path) == [1, 2, 3] and numbered(tmp_path) == []  # nothing saved as if trained


@pytest.mark.slow
def test_a_run_whose_loss_is_never_finite_stops_and_names_the_cause(tiny_models, tmp_path, monkeypatch):
    import grpo
    clipped_policy_loss = grpo.clipped_policy_loss
    monkeypatch.setattr(grpo, "clipped_policy_loss",
                        lambda *a, **k: (lambda loss, stats: (loss * float("nan"), stats))(*clipped_policy_loss(*a, **k)))
    with pytest.raises(RuntimeError, match=r"last 2 iterations .*: the loss or the gradient was not finite"):
        run(tiny_models, tmp_path, max_iterations=50, max_failed_iterations=2, checkpoint_every=100)


# ------------------------------------------------------------------------------------------------
# 4. A corrupt newest checkpoint: named, skipped, and the previous one resumed.

def corrupt(path, how):
    if how == "truncated weights":
        data = (path / WEIGHTS).read_bytes()
        (path / WEIGHTS).write_bytes(data[:len(data) // 2])
    elif how == "bytes changed, same size":
        data = bytearray((path / WEIGHTS).read_bytes())
        data[len(data) // 2:len(data) // 2 + 64] = os.urandom(64)
        (path / WEIGHTS).write_bytes(bytes(data))
    elif how == "truncated rng":
        (path / "rng.pt").write_bytes((path / "rng.pt").read_bytes()[:10])
    elif how == "truncated optimizer":
        shard = next(p for p in (path / "optimizer").iterdir() if p.suffix == ".distcp")
        shard.write_bytes(shard.read_bytes()[:20])
    elif how == "NaN weights, manifest rewritten":  # written by something else, yet complete: NaN is corruption too
        weights = load_file(str(path / WEIGHTS))
        next(iter(weights.values())).view(-1)[0] = float("nan")
        save_file(weights, str(path / WEIGHTS))
        distributed.write_manifest(str(path))


@pytest.fixture(scope="module")
def two_iterations(tiny_models, tmp_path_factory):
    """A finished 2-iteration run (checkpoints 1 and 2), copied by each test that corrupts one."""
    output_dir = tmp_path_factory.mktemp("two_iterations")
    run(tiny_models, output_dir, max_iterations=2)
    return output_dir


@pytest.mark.slow
@pytest.mark.parametrize("how, reason", [
    ("truncated weights", r"diffusion_pytorch_model.safetensors has \d+ bytes, the manifest says \d+"),
    ("bytes changed, same size", r"diffusion_pytorch_model.safetensors: SHA-256 differs from the manifest"),
    ("truncated rng", r"rng.pt has 10 bytes"),
    ("truncated optimizer", r"optimizer/.*\.distcp has 20 bytes"),
    ("NaN weights, manifest rewritten", r"tensor .* holds NaN or inf"),
])
def test_resume_skips_a_corrupt_newest_checkpoint_names_it_and_continues_from_the_previous(
        how, reason, tiny_models, two_iterations, tmp_path, capsys):
    shutil.copytree(two_iterations, tmp_path, dirs_exist_ok=True)
    corrupt(tmp_path / "checkpoint-000002", how)
    capsys.readouterr()
    run(tiny_models, tmp_path, "--resume", max_iterations=3)
    out = capsys.readouterr().out
    assert "resume: skipping checkpoint-000002: " in out and __import__("re").search(reason, out), out
    assert f"resuming {tmp_path / 'checkpoint-000001'}" in out
    assert numbered(tmp_path) == ["checkpoint-000002", "checkpoint-000003"]  # 2 rewritten from 1, then 3
    distributed.verify_checkpoint(str(tmp_path / "checkpoint-000002"))        # the rewritten one is sound
    assert iterations_logged(tmp_path) == [1, 2, 3]


@pytest.mark.slow
def test_resume_with_no_sound_checkpoint_is_an_error_that_lists_each(tiny_models, two_iterations, tmp_path):
    shutil.copytree(two_iterations, tmp_path, dirs_exist_ok=True)
    corrupt(tmp_path / "checkpoint-000001", "truncated weights")
    corrupt(tmp_path / "checkpoint-000002", "truncated rng")
    with pytest.raises(RuntimeError, match=r"no checkpoint in .* verifies: .*checkpoint-000002/rng.pt has 10 bytes.*"
                                             r"checkpoint-000001/transformer/diffusion_pytorch_model.safetensors has"):
        run(tiny_models, tmp_path, "--resume", max_iterations=3)


# ------------------------------------------------------------------------------------------------
# 7. A write that fails (disk full) says so, names the intact checkpoint, and leaves no partial files.

@pytest.mark.slow
@pytest.mark.parametrize("where", ["safetensors", "torch.save"])
def test_a_checkpoint_write_that_fails_removes_its_partial_files_and_names_the_intact_one(
        where, tiny_models, tmp_path, monkeypatch):
    run(tiny_models, tmp_path, max_iterations=1)
    if where == "safetensors":
        import safetensors.torch

        def disk_full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    else:  # what torch.save says when the disk fills in the middle of a zip write (here: of rng.pt)
        save = torch.save

        def torn(obj, file, *args, **kwargs):
            if str(file).endswith("rng.pt"):
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
            return save(obj, file, *args, **kwargs)
        monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(RuntimeError, match=r"checkpoint-000002 could not be written \((OSError: \[Errno 28\] No space "
                                             r"left on device|RuntimeError: \[enforce fail).*the newest intact checkpoint "
                                             r"is .*checkpoint-000001"):
        run(tiny_models, tmp_path, "--resume", max_iterations=2)
    assert sorted(os.listdir(tmp_path)) == [".lock", "checkpoint-000001", "curves.png", "metrics.jsonl"]
    assert not (tmp_path / "checkpoint-000002.tmp").exists()
    distributed.verify_checkpoint(str(tmp_path / "checkpoint-000001"))


# ------------------------------------------------------------------------------------------------
# 6, 3, 8. Bad input: one clear error before any model is loaded.

@pytest.mark.parametrize("flags, message", [
    (["--lr", "nan"], r"--lr must be a finite number, got nan"),
    (["--cfg_scale", "nan"], r"--cfg_scale must be a finite number"),
    (["--beta_start", "nan"], r"--beta_start must be a finite number"),
    (["--clip_range", "-1"], r"--clip_range must be > 0, got -1.0"),
    (["--shift", "-1"], r"--shift must be > 0, got -1.0"),
    (["--beta_end=-1e-5"], r"--beta_end must be >= 0"),
])
def test_a_bad_number_is_refused_before_any_model_is_loaded(flags, message, tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "setup", lambda *a, **k: pytest.fail("reached the process group"))
    with pytest.raises(ValueError, match=message):
        train.main(config.parse_config(["--tiny", "--output_dir", str(tmp_path), "--group_size", "2"] + flags))


@pytest.mark.slow
def test_a_wrong_reward_path_and_an_unwritable_output_dir_are_refused_before_any_model(tiny_models, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.setattr(distributed, "setup", lambda *a, **k: pytest.fail("reached the process group"))
    args = ["--model_path", tiny_models[0], "--group_size", "2"]
    with pytest.raises(ValueError, match=r"--reward_path .* is not a VideoAlign \(VideoReward\) directory: "
                                                r"expected model_config.json"):
        train.main(config.parse_config(args + ["--reward_path", tiny_models[0], "--output_dir", str(tmp_path)]))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match=r"--output_dir .*a_file/run' is not writable"):
        train.main(config.parse_config(args + ["--reward_path", tiny_models[1], "--output_dir", str(tmp_path / "a_file" / "run")]))


@pytest.mark.parametrize("name, content, message", [
    ("p.txt", b"a cat\n\xff\xfe dog\n", r"p.txt' line 2: not UTF-8 text"),
    ("p.jsonl", b'{"prompt": "a cat"}\n{"text": "a dog"}\n', r"p.jsonl' line 2: expected an object with a string 'prompt'"),
    ("p.jsonl", b'{"prompt": "a cat"}\n{"prompt": \n', r"p.jsonl' line 2: not JSON"),
    ("folder.txt", None, r"folder.txt' is a directory: expected a .txt, .csv or .jsonl file"),
])
def test_prompt_file_errors_name_the_file_and_the_line(name, content, message, tmp_path):
    if content is None:
        (tmp_path / name).mkdir()
    else:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        config.load_prompts(str(tmp_path / name))


@pytest.mark.slow
def test_an_error_on_two_ranks_is_printed_once_without_a_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", "--tiny", "--lr", "nan", "--output_dir", str(tmp_path)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    # at most once from rank 0 (torchrun may stop it first, when rank 1 fails first), and always in torchrun's
    # failure summary (after its ==== rule), which reads the failing rank's error file
    ours, _, summary = done.stderr.partition("=" * 60)
    message = "train.py: error: --lr must be a finite number, got nan"
    assert ours.count(message) <= 1 and message in summary, done.stderr[-3000:]
    assert 'train.py", line' not in done.stderr  # no traceback from our code (torchrun adds its own summary)


# ------------------------------------------------------------------------------------------------
# 8. Preemption and long intervals: SIGTERM writes a checkpoint; time-based checkpoints.

@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_the_run_resumes_from_it(tiny_models, tmp_path):
    process = subprocess.Popen([sys.executable, "train.py"] + tiny_args(tiny_models, tmp_path, max_iterations=1000,
                                                                        checkpoint_every=1000),
                               cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (tmp_path / "metrics.jsonl").exists() or not iterations_logged(tmp_path):
        assert process.poll() is None and time.time() < deadline, process.stdout.read()[-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out[-3000:]
    (checkpoint,) = numbered(tmp_path)
    assert "SIGTERM: " in out and checkpoint in out
    stopped = int(checkpoint.split("-")[1])
    assert 1 <= stopped < 1000 and iterations_logged(tmp_path)[-1] == stopped
    run(tiny_models, tmp_path, "--resume", max_iterations=stopped + 1, checkpoint_every=1000)
    assert iterations_logged(tmp_path) == list(range(1, stopped + 2))


@pytest.mark.slow
def test_time_based_checkpoints_are_written_between_the_iteration_based_ones(tiny_models, tmp_path):
    run(tiny_models, tmp_path, max_iterations=3, checkpoint_every=100, checkpoint_every_minutes=1e-6,
        keep_checkpoints=5)
    assert numbered(tmp_path) == ["checkpoint-000001", "checkpoint-000002", "checkpoint-000003"]


@pytest.mark.slow
def test_a_finished_run_prints_where_everything_went_and_no_fsdp_view_warning(tiny_models, tmp_path, capsys, recwarn):
    run(tiny_models, tmp_path, max_iterations=2)
    out, err = capsys.readouterr()
    assert "done: 2 iterations, 2 updates (0 skipped); reward_mean" in out
    # one line per setup phase; the libraries' progress bars only with --verbose
    assert out.index("setup: text encoders and VAE") < out.index("setup: the policy") < out.index("setup: reward")
    assert "Loading pipeline components" not in err and "Loading weights" not in err
    assert f"checkpoint  {tmp_path / 'checkpoint-000002'}" in out and "curves.png" in out
    assert not [w for w in recwarn if "returned a view tensor" in str(w.message)]


# ------------------------------------------------------------------------------------------------
# 5. A hung rank: the others fail after --collective_timeout_minutes, with a message that says so.

@pytest.mark.slow
def test_a_hung_rank_fails_the_run_after_the_collective_timeout_with_a_clear_message(tiny_models, tmp_path):
    import psutil
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                "train.py"] + tiny_args(tiny_models, tmp_path, max_iterations=1000, checkpoint_every=1000,
                                                        group_size=4, collective_timeout_minutes=0.15),
                               cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stopped = None
    try:
        deadline = time.time() + 300
        while not (tmp_path / "metrics.jsonl").exists() or not iterations_logged(tmp_path):
            assert process.poll() is None and time.time() < deadline, process.stdout.read()[-3000:]
            time.sleep(0.05)
        workers = [p for p in psutil.Process(process.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
        stopped = workers[0]
        stopped.send_signal(signal.SIGSTOP)                             # rank 1 hangs
        started, lines, waited = time.time(), [], None
        for line in process.stdout:                                     # until torchrun exits
            lines.append(line)
            if waited is None and "a collective failed" in line:
                waited = time.time() - started
                stopped.kill()                                          # spare torchrun its 30 s SIGTERM grace
        process.wait(timeout=60)
        out = "".join(lines)
    finally:
        if stopped is not None and stopped.is_running():
            stopped.kill()
        process.kill()
    assert process.returncode != 0
    assert "a collective failed on rank 0" in out and "another rank is hung or dead" in out, out[-3000:]
    assert "--collective_timeout_minutes 0.15" in out
    assert waited is not None and waited < 90  # the 9 s timeout (plus the iteration in flight), not 30 minutes


# ------------------------------------------------------------------------------------------------
# 9. The run directory has one writer; appended files may end torn; inputs that changed are named.

@pytest.mark.slow
def test_a_second_run_into_a_directory_in_use_is_refused_naming_the_first(tiny_models, tmp_path):
    holder = distributed.lock_run_directory(str(tmp_path))             # a first run, alive, holds the directory
    try:
        in_use = rf"'{tmp_path}' is in use by another run \(pid {os.getpid()} on .*\): one writer at a time"
        with pytest.raises(config.ConfigError, match=in_use):        # before any model is loaded
            run(tiny_models, tmp_path)
        # --resume names the lock too (before: "no complete checkpoint", which was true but not the cause)
        with pytest.raises(config.ConfigError, match=in_use):
            run(tiny_models, tmp_path, "--resume")
        assert numbered(tmp_path) == [] and not (tmp_path / "metrics.jsonl").exists()  # nothing written
    finally:
        holder.close()                                                 # the first run ends
    run(tiny_models, tmp_path)                                          # now the directory is free
    assert numbered(tmp_path) == ["checkpoint-000001"]


@pytest.mark.slow
def test_the_directory_lock_does_not_outlive_a_process_killed_with_sigkill(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, distributed; held = distributed.lock_run_directory("
                               "sys.argv[1]); print('locked', flush=True); time.sleep(600)", str(tmp_path)],
                              cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(distributed.DirectoryLocked, match=rf"pid {holder.pid} on"):
            distributed.lock_run_directory(str(tmp_path))
        holder.kill()                                                   # kill -9: no handler, no cleanup runs
        holder.wait(timeout=60)
        distributed.lock_run_directory(str(tmp_path)).close()         # the kernel released it
    finally:
        holder.kill()


@pytest.mark.slow
def test_a_torn_last_metrics_line_never_stops_a_resume(tiny_models, tmp_path, capsys):
    run(tiny_models, tmp_path, max_iterations=2, checkpoint_every=2)
    with open(tmp_path / "metrics.jsonl", "a") as f:                    # killed in the middle of writing row 3
        f.write(json.dumps({"iteration": 3, "reward_mean": 0.0})[:17])
    run(tiny_models, tmp_path, "--resume", max_iterations=3, checkpoint_every=2)
    assert iterations_logged(tmp_path) == [1, 2, 3]
    assert "metrics.jsonl: dropped 1 unreadable line(s)" in capsys.readouterr().out


@pytest.mark.slow
def test_a_row_torn_before_its_checkpoint_is_named_at_resume(tiny_models, tmp_path, capsys):
    """Iteration 2's row is torn although checkpoint-000002 exists (the crash hit the row, then the disk kept the
    checkpoint): the resume says which iteration's numbers are gone, instead of 'dropped 1 line'."""
    run(tiny_models, tmp_path, max_iterations=2, checkpoint_every=2)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][:17] + "\n")
    capsys.readouterr()
    run(tiny_models, tmp_path, "--resume", max_iterations=3, checkpoint_every=2)
    assert iterations_logged(tmp_path) == [1, 3]
    assert "metrics.jsonl: the row of iteration 2 is lost" in capsys.readouterr().out


@pytest.mark.slow
def test_accepted_config_changes_are_each_said_at_resume(tiny_models, tmp_path, capsys):
    run(tiny_models, tmp_path, max_iterations=1, ema_decay=0.5)
    capsys.readouterr()
    run(tiny_models, tmp_path, "--resume", "--allow_config_change", max_iterations=2, lr=2e-3)  # --ema_decay dropped
    out = capsys.readouterr().out
    assert "resume: --allow_config_change accepts --lr 0.002 (checkpoint: 0.001)" in out
    assert "resume: --allow_config_change accepts --ema_decay 0.0 (checkpoint: 0.5)" in out
    assert "resume: --ema_decay dropped: the checkpoints written from now on hold no ema/" in out


@pytest.mark.slow
def test_ctrl_c_checkpoints_the_iteration_and_exits_with_one_line(tiny_models, tmp_path):
    """SIGINT (Ctrl-C) is handled as SIGTERM: the iteration in progress ends, a checkpoint is written, one line
    says so, the exit status is 0; no KeyboardInterrupt traceback."""
    command = [sys.executable, os.path.join(REPO, "train.py"),
               *tiny_args(tiny_models, tmp_path, max_iterations=10000, checkpoint_every=10000)]
    process = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.2)                                             # the first iteration has been logged
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 0, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    (checkpoint,) = numbered(tmp_path)
    assert f"SIGINT: {tmp_path / checkpoint} written after iteration {int(checkpoint[-6:])}" in out
    assert iterations_logged(tmp_path)[-1] == int(checkpoint[-6:])


def test_a_second_ctrl_c_stops_at_once():
    import run_directory
    before = signal.getsignal(signal.SIGINT)
    with run_directory.StopRequest() as stop_request:
        os.kill(os.getpid(), signal.SIGINT)                            # the first: a request, no exception
        assert stop_request.signal == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)                        # the second: at once
    assert signal.getsignal(signal.SIGINT) is before                    # the previous handler is back


@pytest.mark.slow
def test_resume_after_the_prompt_file_shrank_and_changed_continues_and_says_so(tiny_models, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\na fox\na owl\n")                   # 1 prompt (group) per iteration
    output = tmp_path / "run"
    run(tiny_models, output, prompts=prompts, max_iterations=3)        # the sampler stands at position 3 of 4
    prompts.write_text("a cat\na dog\n")                                 # the user cut the file to 2 prompts
    capsys.readouterr()
    run(tiny_models, output, "--resume", prompts=prompts, max_iterations=4)
    out = capsys.readouterr().out
    assert iterations_logged(output) == [1, 2, 3, 4]
    assert "resume: the prompts changed since the checkpoint (4 prompts then, 2 now" in out
    assert "the prompt sampler stood at position 3 of epoch 0, past the end of the 2 prompts now" in out


def test_a_shrunken_prompt_file_starts_the_sampler_on_its_next_epoch():
    sampler = train.PromptSampler(2, 1, seed=0)
    sampler.load_state_dict({"epoch": 0, "position": 3})                # saved with a file of 4 prompts
    first = torch.randperm(2, generator=torch.Generator().manual_seed(0 + 1)).tolist()  # epoch 1's order, by hand
    assert [sampler.next_indices() for _ in range(2)] == [[first[0]], [first[1]]]


@pytest.mark.slow
def test_resume_names_a_changed_thread_count(tiny_models, tmp_path, capsys):
    run(tiny_models, tmp_path, max_iterations=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        capsys.readouterr()
        run(tiny_models, tmp_path, "--resume", max_iterations=2)
    finally:
        torch.set_num_threads(threads)
    assert (f"resume: {threads + 1} CPU threads per rank now, {threads} when the checkpoint was written"
            in capsys.readouterr().out)


def fake_checkpoint(output_dir, iteration=5, world_size=1, lora=False, config=None):
    """A numbered checkpoint whose trainer_state.json is all the checks before any model read."""
    path = output_dir / f"checkpoint-{iteration:06d}"
    (path / "policy" if lora else path).mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"iteration": iteration, "world_size": world_size,
                                                         "config": config or {}}))
    distributed.write_manifest(str(path))
    return path


@pytest.mark.parametrize("setup, flags, message", [
    ({}, ["--max_iterations", "3"], r"which is at iteration 5, with --max_iterations 3: nothing to do; expected "
                                    r"--max_iterations >= 5"),
    ({"world_size": 2}, ["--max_iterations", "9"], r"on 1 rank\(s\): it was written by 2, .* the batch would change "
                                                   r"from 4 to 2 videos per iteration; use 2 ranks, or add "
                                                   r"--allow_config_change"),
    ({}, ["--max_iterations", "9", "--lora_rank", "4", "--allow_config_change"],
     r"--lora_rank 4: the checkpoint was written by a full fine-tune \(no policy/ adapters\); resume it without "
     r"--lora_rank, or start a new run"),
    ({"lora": True, "config": {"lora_rank": 8}}, ["--max_iterations", "9", "--allow_config_change"],
     r"--lora_rank 0: the checkpoint was written by a LoRA run .* resume it with its --lora_rank 8"),
])
def test_a_resume_that_cannot_continue_the_run_is_refused_before_any_model(setup, flags, message, tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "setup", lambda *a, **k: pytest.fail("reached the process group"))
    fake_checkpoint(tmp_path, **setup)
    with pytest.raises(ValueError, match=message):
        train.main(config.parse_config(["--tiny", "--output_dir", str(tmp_path), "--group_size", "2", "--resume"] + flags))


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--eta", "1e-6"], r"--eta 1e-06 gives step 1 \(σ 0.833 -> 0\) a std of 9.8e-07, below 0.0001: .* expected "
                        r"--eta >= 0.000102 for --kernel sage, 2 steps, shift 5"),
    (["--eta", "1e-30"], r"--eta 1e-30 gives step 1 .* a std of 9.8e-31"),
    (["--num_steps", "100"], r"^--num_steps 100 with --kernel sage at shift 5: sage's variance is negative for the step "
                             r"sigma = 1 -> sigma_next = 0.997984"),
])
def test_a_schedule_flag_the_kernel_cannot_sample_is_one_error_before_any_model(flags, message, tiny_models, tmp_path,
                                                                                monkeypatch):
    import model
    monkeypatch.setattr(model, "load_hunyuan", lambda *a, **k: pytest.fail("reached the models"))
    with pytest.raises(ValueError, match=message):
        run(tiny_models, tmp_path, *flags)


def test_the_smallest_eta_allowed_is_the_stated_bound_on_the_step_std(tiny_models, tmp_path):
    import sde
    sigmas = sde.shifted_sigmas(2, 5.0).double()
    # sage's last step, 0.833 -> 0: std = η·sqrt(−ln(1 − 0.833) − 0.833), by hand
    per_eta = math.sqrt(-math.log(1 - 5 * 0.5 / (1 + 4 * 0.5)) - 5 * 0.5 / (1 + 4 * 0.5))
    assert sde.step_std("sage", sigmas[1], sigmas[2], 1.0).item() == pytest.approx(per_eta, rel=1e-12)
    bound = config.MIN_STEP_STD / per_eta
    config.check_step_stds(config.Config(kernel="sage", num_steps=2, shift=5.0, eta=bound * 1.001))
    with pytest.raises(ValueError, match=r"below 0.0001"):
        config.check_step_stds(config.Config(kernel="sage", num_steps=2, shift=5.0, eta=bound * 0.999))


def test_world_prompts_are_the_worlds_own_and_any_other_file_is_an_error_not_replaced(tmp_path, monkeypatch):
    from world import video_world
    monkeypatch.setattr(distributed, "setup", lambda *a, **k: pytest.fail("reached the process group"))
    cfg, prompts = config.check_config(config.Config(world=True, group_size=2, output_dir=str(tmp_path / "a")), 1)
    assert cfg.prompts == video_world.PROMPTS_FILE and prompts == list(video_world.WORLD_PROMPTS)
    for given, first in (("prompts/example.txt", None), (str(tmp_path / "mine.txt"), "A red square moving right.")):
        if first:
            (tmp_path / "mine.txt").write_text(first + "\n")
        with pytest.raises(ValueError, match=r"--world: prompt file .* holds \d+ prompt\(s\) the world's reward does not "
                                             r"know, the first .*; expected only prompts of prompts/video_world.txt"):
            config.check_config(config.Config(world=True, group_size=2, prompts=given, output_dir=str(tmp_path / "b")), 1)
    (tmp_path / "two.txt").write_text(f"{video_world.WORLD_PROMPTS[3]}\n{video_world.WORLD_PROMPTS[1]}\n")
    _, prompts = config.check_config(config.Config(world=True, group_size=2, prompts=str(tmp_path / "two.txt"),
                                                 output_dir=str(tmp_path / "c")), 1)
    assert prompts == [video_world.WORLD_PROMPTS[3], video_world.WORLD_PROMPTS[1]]


@pytest.mark.parametrize("name, content", [("p.txt", "\ufeffa cat\na dog\n"), ("p.csv", "\ufeffprompt,seed\na cat,1\na dog,2\n")])
def test_a_byte_order_mark_is_not_part_of_the_first_prompt_or_column(name, content, tmp_path):
    (tmp_path / name).write_text(content, encoding="utf-8")
    assert config.load_prompts(str(tmp_path / name)) == ["a cat", "a dog"]
