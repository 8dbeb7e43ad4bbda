"""hub.py: a hub id is read from the local hub cache (never downloaded), a local directory is used as it is.

The cache is built here in huggingface_hub's on-disk layout (models--org--name/{blobs, snapshots/<commit>,
refs/<branch>}), with the tiny random models of tiny.py as its snapshots, and every resolution is checked
against huggingface_hub's own cache readers (`try_to_load_from_cache`, `scan_cache_dir`), which share no
code path with `snapshot_download`. No test may open a network connection: every socket connect and DNS
lookup is recorded and refused, and the record must stay empty.
"""
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from huggingface_hub import constants, scan_cache_dir, try_to_load_from_cache
from huggingface_hub.file_download import repo_folder_name

import eval as evaluate
import config
import hub
import model
import reward
import tiny
import train
import videoalign_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUNYUAN_ID = "test-org/tiny-hunyuan"
REWARD_ID = "test-org/tiny-videoreward"
BASE_ID = "test-org/tiny-qwen2-vl"  # the reward's base model, named by hub id as in the VideoReward release
CLIP_ID = "test-org/tiny-clip"
REVISIONS_ID = "test-org/two-revisions"
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40  # main -> A; tag v1 -> B


def add_to_hub_cache(cache, repo_id, source, commit, refs=("main",)):
    """Lay `source` (a directory) out in `cache` as huggingface_hub stores a downloaded snapshot: each file's
    bytes in blobs/<sha256>, snapshots/<commit>/<path> a relative symlink to its blob, refs/<ref> holding the
    commit hash. Returns the snapshot directory."""
    repo = os.path.join(cache, repo_folder_name(repo_id=repo_id, repo_type="model"))  # models--org--name
    snapshot = os.path.join(repo, "snapshots", commit)
    for folder, _, files in os.walk(source):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                data = f.read()
            blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
            os.makedirs(os.path.dirname(blob), exist_ok=True)
            with open(blob, "wb") as f:
                f.write(data)
            link = os.path.join(snapshot, os.path.relpath(os.path.join(folder, name), source))
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    for ref in refs:
        os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(commit)
    return snapshot


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A hub cache holding a tiny HunyuanVideo-1.5, a tiny VideoReward laid out as the hub release (model_config.json
    + checkpoint; its base Qwen2-VL a separate hub repo, named by id), a tiny CLIP and a repo with two revisions."""
    built, cache = tmp_path_factory.mktemp("built"), str(tmp_path_factory.mktemp("hub_cache"))
    add_to_hub_cache(cache, HUNYUAN_ID, tiny.build_tiny_hunyuan(str(built / "hunyuan")), COMMIT_A)
    videoalign = tiny.build_tiny_videoalign(str(built / "videoalign"))
    add_to_hub_cache(cache, BASE_ID, os.path.join(videoalign, tiny.TINY_BASE_DIR), COMMIT_A)
    shutil.rmtree(os.path.join(videoalign, tiny.TINY_BASE_DIR))
    config_file = os.path.join(videoalign, videoalign_checkpoint.MODEL_CONFIG_FILE)
    with open(config_file) as f:
        config = json.load(f)
    config["model_config"]["model_name_or_path"] = BASE_ID
    with open(config_file, "w") as f:
        json.dump(config, f)
    add_to_hub_cache(cache, REWARD_ID, videoalign, COMMIT_A)
    add_to_hub_cache(cache, CLIP_ID, tiny.build_tiny_clip(str(built / "clip")), COMMIT_A)
    for commit, text, refs in ((COMMIT_A, "revision A", ("main",)), (COMMIT_B, "revision B", ("v1",))):
        (built / commit).mkdir()
        (built / commit / "which.txt").write_text(text)
        add_to_hub_cache(cache, REVISIONS_ID, str(built / commit), commit, refs)
    return cache


def snapshot(cache, repo_id, commit):
    return os.path.join(cache, repo_folder_name(repo_id=repo_id, repo_type="model"), "snapshots", commit)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every connect and DNS lookup is recorded and refused; each test ends by checking the record is empty."""
    attempts = []
    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("tests/test_hub.py: no network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts
    assert attempts == [], f"network access attempted: {attempts}"


@pytest.fixture
def offline_cache(cache, monkeypatch):
    """HF_HUB_CACHE = the test cache, HF_HUB_OFFLINE = 1, as a user would export them. huggingface_hub reads both
    once, at import, so its constants are set too (a fresh process reads the variables: see the subprocess test)."""
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


# ---------------------------------------------------------------------------------------------
# Resolution.

def test_a_hub_id_resolves_to_its_cached_snapshot_and_loads_with_load_hunyuan(offline_cache):
    resolved = hub.resolve_path(HUNYUAN_ID, "--model_path")
    assert resolved == snapshot(offline_cache, HUNYUAN_ID, COMMIT_A)
    # huggingface_hub's own cache readers agree: the layout built here is the one it writes
    assert try_to_load_from_cache(HUNYUAN_ID, "model_index.json", cache_dir=offline_cache) == \
        os.path.join(resolved, "model_index.json")
    (repo,) = [r for r in scan_cache_dir(offline_cache).repos if r.repo_id == HUNYUAN_ID]
    (revision,) = repo.revisions
    assert (revision.commit_hash, set(revision.refs), str(revision.snapshot_path)) == (COMMIT_A, {"main"}, resolved)
    # the id loads through the code a user runs, weights read through the cache's symlinks
    policy = model.load_hunyuan(HUNYUAN_ID, dtype=torch.float32)
    assert (policy.shift, policy.guidance_scale) == (5.0, model.DEFAULT_GUIDANCE_SCALE)
    assert policy.transformer.config.num_layers == 1


def test_train_config_check_resolves_hub_ids_and_the_reward_finds_its_base_model_by_id(offline_cache, tmp_path):
    cfg, _ = config.check_config(config.parse_config(["--model_path", HUNYUAN_ID, "--reward_path", REWARD_ID,
                                                    "--output_dir", str(tmp_path), "--group_size", "2"]), world_size=1)
    # what the layout checks, the loaders and the saved config see: the snapshot directories
    assert cfg.model_path == snapshot(offline_cache, HUNYUAN_ID, COMMIT_A)
    assert cfg.reward_path == snapshot(offline_cache, REWARD_ID, COMMIT_A)
    # the reward's model_config.json names its base by hub id: found in the cache, not inside the checkpoint
    scorer = reward.VideoAlignReward.from_pretrained(REWARD_ID)
    assert scorer.model.config.text_config.hidden_size == 32  # the tiny base's


def test_the_clip_and_pickscore_loaders_take_hub_ids(offline_cache):
    frames, prompts = torch.rand(1, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), ["a cat"]
    clip = reward.ClipScore.from_pretrained(CLIP_ID)
    pick = reward.PickScore.from_pretrained(CLIP_ID, processor_path=f"{CLIP_ID}@main")
    assert torch.isfinite(clip(frames, prompts)).all() and torch.isfinite(pick(frames, prompts)).all()


def test_a_revision_selects_its_own_snapshot(offline_cache):
    cases = {REVISIONS_ID: COMMIT_A, f"{REVISIONS_ID}@main": COMMIT_A, f"{REVISIONS_ID}@v1": COMMIT_B,
             f"{REVISIONS_ID}@{COMMIT_B}": COMMIT_B}
    for text, commit in cases.items():
        resolved = hub.resolve_path(text, "--model_path")
        assert resolved == snapshot(offline_cache, REVISIONS_ID, commit), text
        with open(os.path.join(resolved, "which.txt")) as f:
            assert f.read() == f"revision {'A' if commit == COMMIT_A else 'B'}"
    # independently: huggingface_hub's reader maps the tag to the same file
    assert try_to_load_from_cache(REVISIONS_ID, "which.txt", cache_dir=offline_cache, revision="v1") == \
        os.path.join(snapshot(offline_cache, REVISIONS_ID, COMMIT_B), "which.txt")


@pytest.mark.parametrize("text, download", [
    ("test-org/not-downloaded", "`hf download test-org/not-downloaded`"),
    (f"{REVISIONS_ID}@v2", f"`hf download {REVISIONS_ID} --revision v2`"),
])
def test_an_id_missing_from_the_cache_is_an_error_naming_it_and_the_download_command(text, download, offline_cache):
    repo_id = text.partition("@")[0]
    with pytest.raises(FileNotFoundError) as error:
        hub.resolve_path(text, "--model_path")
    message = str(error.value)
    assert f"hub id {repo_id!r}" in message and download in message and "never downloads" in message
    assert offline_cache in message  # where it looked


def test_train_and_eval_report_a_missing_id_before_loading_anything(offline_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(model, "load_hunyuan", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(config.ConfigError, match=r"--reward_path 'test-org/not-downloaded' is not a local directory.*"
                                                r"`hf download test-org/not-downloaded`"):
        config.check_config(config.parse_config(["--model_path", HUNYUAN_ID, "--reward_path", "test-org/not-downloaded",
                                               "--output_dir", str(tmp_path), "--group_size", "2"]), world_size=1)
    (tmp_path / "p.txt").write_text("a cat\n")
    cfg = evaluate.EvalConfig(model_path=HUNYUAN_ID, reward_path=REWARD_ID, clip_path="test-org/not-downloaded",
                              pickscore_path=HUNYUAN_ID, prompts=str(tmp_path / "p.txt"))
    with pytest.raises(ValueError, match=r"--clip_path 'test-org/not-downloaded'.*`hf download test-org/not-downloaded`"):
        evaluate.main(cfg)


def test_eval_resolves_every_model_flag_before_loading(offline_cache, tmp_path, monkeypatch):
    seen = {}
    def stop(cfg, model_path):  # eval's first use of the paths, before any model is loaded
        seen.update(vars(cfg))
        raise RuntimeError("stop here")
    monkeypatch.setattr(evaluate, "resolve_sampling", stop)
    (tmp_path / "p.txt").write_text("a cat\n")
    ids = {"model_path": HUNYUAN_ID, "reward_path": REWARD_ID, "clip_path": f"{REVISIONS_ID}@v1",
           "pickscore_path": REVISIONS_ID, "pickscore_processor_path": BASE_ID}
    with pytest.raises(RuntimeError, match="stop here"):
        evaluate.main(evaluate.EvalConfig(prompts=str(tmp_path / "p.txt"), output_dir=str(tmp_path), **ids))
    commits = {"clip_path": COMMIT_B}
    for name, text in ids.items():
        assert seen[name] == snapshot(offline_cache, text.partition("@")[0], commits.get(name, COMMIT_A)), name


def test_a_local_directory_is_returned_unchanged_even_when_it_reads_as_a_cached_id(offline_cache, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs(HUNYUAN_ID)  # ./test-org/tiny-hunyuan, also the name of a cached repo: the directory wins
    assert hub.resolve_path(HUNYUAN_ID, "--model_path") == HUNYUAN_ID
    assert hub.resolve_path(str(tmp_path), "--model_path") == str(tmp_path)


@pytest.mark.parametrize("text", ["/nonexistent/hunyuan", "ckpts/a/b", "./ckpts/model", "org/", "org/name@", "",
                                  "org/bad--name"])
def test_neither_a_directory_nor_a_hub_id_is_a_not_a_directory_error(text, offline_cache):
    assert hub.parse_repo_id(text) is None
    with pytest.raises(FileNotFoundError, match=rf"--model_path {text!r} is not a directory \(expected a local "
                                                rf"directory, or a Hugging Face hub id"):
        hub.resolve_path(text, "--model_path")


def test_resolution_never_opens_a_connection_even_with_hub_offline_mode_off(cache, monkeypatch, no_network):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # what a user who exported nothing has
    assert hub.resolve_path(REVISIONS_ID, "x") == snapshot(cache, REVISIONS_ID, COMMIT_A)
    with pytest.raises(FileNotFoundError):
        hub.resolve_path("test-org/not-downloaded", "x")
    assert no_network == []


def test_a_fresh_process_reads_the_cache_location_from_the_environment(cache, tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "elsewhere"),
           "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", f"import hub; print(hub.resolve_path('{REVISIONS_ID}@v1', 'x'))"],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == snapshot(cache, REVISIONS_ID, COMMIT_B)
