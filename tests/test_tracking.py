"""--report_to tensorboard | wandb (tracking.py): the tracker shows exactly the rows of metrics.jsonl, the
config and the sample videos; a resumed run continues the same tracker run with every iteration once;
--overwrite starts a new one; a bad or missing tracker is refused before any model is loaded.

Each tracker is read back with a reader of its own files, never through tracking.py: TensorBoard's
EventAccumulator; for W&B (offline, no network) the run's .wandb file (read_wandb_file below). train.py
runs on the tiny random models of test_train.py (1 rank, 2 denoising steps).
"""
import io
import json
import math
import os
import shutil
import struct
import sys
import time

import numpy as np
import pytest

import run_directory
import config
import distributed
import tracking
import train
from test_train import metrics, run, tiny_models  # noqa: F401 (tiny_models: the module's fixture)


def test_a_metrics_row_becomes_its_numbers_lists_by_index_booleans_as_0_1_and_no_text():
    row = {"iteration": 3, "unix_time": 1.7e9, "update_step": 3, "reward_mean": 0.25, "beta": float("nan"),
           "anchor_refreshed": True, "skipped_update": 0, "reward_components": ["vq", "mq"], "note": "text",
           "ratio_max_dev_per_step": [0.0, 0.5], "empty": []}
    flat = tracking.scalars(row)
    assert math.isnan(flat.pop("beta"))
    assert flat == {"update_step": 3.0, "reward_mean": 0.25, "anchor_refreshed": 1.0, "skipped_update": 0.0,
                    "ratio_max_dev_per_step/0": 0.0, "ratio_max_dev_per_step/1": 0.5}


# ------------------------------------------------------------------------------------------------
# TensorBoard

def shown_by_tensorboard(output_dir):
    """What TensorBoard shows of output_dir/tensorboard, read by its own EventAccumulator (which applies
    purge_step): ({scalar tag: [(step, value)]}, {text tag: [(step, text)]}, {image tag: [(step, (H, W, 3))]})."""
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(output_dir / tracking.TENSORBOARD_DIR),
                              size_guidance={"scalars": 0, "images": 0, "tensors": 0})  # 0: keep every event
    events.Reload()
    tags = events.Tags()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags["scalars"]}
    texts = {tag.split("/")[0]: [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(tag)]
             for tag in tags["tensors"]}
    images = {tag: [(e.step, np.asarray(Image.open(io.BytesIO(e.encoded_image_string)))) for e in events.Images(tag)]
              for tag in tags["images"]}
    return scalars, texts, images


def expected_scalars(rows):
    """{tag: [(iteration, value as TensorBoard stores it, float32)]} of metrics.jsonl rows; NaN as a string,
    so that two NaNs compare equal."""
    expected = {}
    for row in rows:
        for name, value in tracking.scalars(row).items():  # the flattening, pinned by the first test
            expected.setdefault(name, []).append((row["iteration"], float(np.float32(value))))
    return nan_as_text(expected)


def nan_as_text(series):
    return {tag: [(step, "nan" if math.isnan(value) else value) for step, value in points]
            for tag, points in series.items()}


def sample_pixels(path):
    """The sample train.py wrote, read here: an mp4's frames decoded (reward.decode_mp4), min(8, F) evenly spaced
    ones side by side, the strip TensorBoard must show."""
    import reward
    frames = reward.decode_mp4(open(path, "rb").read()).permute(0, 2, 3, 1).numpy()   # (F, H, W, 3) uint8
    shown = np.linspace(0, len(frames) - 1, min(8, len(frames))).round().astype(int)
    return np.concatenate([frames[i] for i in shown], axis=1)


@pytest.fixture(scope="module")
def tensorboard_run(tiny_models, tmp_path_factory):
    """--report_to tensorboard for 3 iterations (checkpoints at 2 and 3, samples at 1 and 3), what
    TensorBoard showed then; then a crash after iteration 3 was logged but before its checkpoint was
    complete (checkpoint-000003 deleted), and --resume to iteration 4, which does iteration 3 again."""
    pytest.importorskip("tensorboard")
    output_dir = tmp_path_factory.mktemp("tensorboard_run")
    options = {"report_to": "tensorboard", "max_iterations": 3, "checkpoint_every": 2, "sample_every": 2}
    run(tiny_models, output_dir, **options)
    before = shown_by_tensorboard(output_dir), metrics(output_dir), sample_pixels(output_dir / "samples" / "iter000001.mp4")
    shutil.rmtree(output_dir / "checkpoint-000003")
    run(tiny_models, output_dir, "--resume", **{**options, "max_iterations": 4})
    return output_dir, before


@pytest.mark.slow
def test_tensorboard_shows_every_number_of_every_metrics_row_the_config_and_the_samples(tensorboard_run):
    _, ((scalars, texts, images), rows, sample_1) = tensorboard_run
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert nan_as_text(scalars) == expected_scalars(rows)  # every tag, every step, every value
    assert {"reward_mean", "vq", "beta", "grad_norm", "anchor_refreshed", "ratio_max_dev_per_step/1"} <= set(scalars)
    (step, config), = texts["config"]
    assert step == 0 and "| lr | `0.001` |" in config and "| report_to | `'tensorboard'` |" in config
    assert [step for step, _ in images["sample"]] == [1, 3]  # --sample_every 2: iterations 1 and 3
    assert np.array_equal(images["sample"][0][1], sample_1)  # the video train.py wrote, pixel for pixel
    assert [step for step, _ in texts["sample_prompt"]] == [1, 3]


@pytest.mark.slow
def test_a_resumed_run_shows_each_iteration_once_with_the_values_of_metrics_jsonl(tensorboard_run):
    output_dir, _ = tensorboard_run
    scalars, texts, images = shown_by_tensorboard(output_dir)
    rows = metrics(output_dir)  # iteration 3 as done again after the resume
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    steps = {tag: [step for step, _ in points] for tag, points in scalars.items()}
    assert steps == {tag: [1, 2, 3, 4] for tag in scalars}  # once each: the 3 logged before the crash was purged
    assert nan_as_text(scalars) == expected_scalars(rows)
    assert [step for step, _ in texts["config"]] == [0, 2]  # the config of each start, at its first iteration
    assert [step for step, _ in images["sample"]] == [1, 3]
    assert np.array_equal(images["sample"][1][1], sample_pixels(output_dir / "samples" / "iter000003.mp4"))


def write_grey_mp4(path, num_frames=17):
    """An mp4 sample (H.264, yuv420p, as run_directory.save_video writes), 16x16; frame i all grey 15·i."""
    import av
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), 15 * i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def test_an_mp4_sample_is_shown_as_a_strip_of_evenly_spaced_frames(tmp_path):
    strip = tracking.sample_picture(write_grey_mp4(str(tmp_path / "sample.mp4")))
    assert strip.shape == (16, 8 * 16, 3) and strip.dtype == np.uint8
    shown = [round(float(strip[:, 16 * k:16 * (k + 1)].mean()) / 15) for k in range(8)]  # H.264 is lossy
    assert shown == [0, 2, 5, 7, 9, 11, 14, 16]  # linspace(0, 16, 8) rounded: first and last frames included


# ------------------------------------------------------------------------------------------------
# Weights & Biases, offline

def read_wandb_file(path):
    """The protobuf records of a .wandb file: W&B's 7-byte header (":W&B", 0xBEE1, version), then LevelDB's
    log format: 32 KiB blocks of chunks, each a 7-byte header (CRC32C, length, type: 1 full, 2 first,
    3 middle, 4 last) and its bytes; a block's tail shorter than a header is padding."""
    from wandb.proto import wandb_internal_pb2
    data, block = open(path, "rb").read(), 32768
    assert data[:4] == b":W&B", data[:7]
    records, position, pending = [], 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if position + 7 + length > len(data):  # still being written
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def finished_records(path, timeout=60):
    """The records of a finished session's .wandb file. W&B's service process writes the file after run.finish()
    returns (at the latest when the process exits): wait for the run's last record, `exit`."""
    deadline = time.time() + timeout
    while True:
        records = read_wandb_file(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.time() > deadline:
            return records
        time.sleep(0.1)


def wandb_runs(output_dir):
    """Every offline W&B session under output_dir/wandb, oldest first: [{"id", "project", "config": {key: value},
    "history": [{key: value}]}]; a media item's fields as sample/_type, sample/caption, ..."""
    sessions = []
    for name in sorted(os.listdir(output_dir / "wandb")):
        if not name.startswith("offline-run-"):
            continue
        (file,) = [f for f in os.listdir(output_dir / "wandb" / name) if f.endswith(".wandb")]
        session = {"history": []}
        for record in finished_records(output_dir / "wandb" / name / file):
            if record.WhichOneof("record_type") == "run":
                session.update(id=record.run.run_id, project=record.run.project,
                               config={u.key: json.loads(u.value_json) for u in record.run.config.update})
            elif record.WhichOneof("record_type") == "history":
                session["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                           for item in record.history.item})
        sessions.append(session)
    return sessions


def logged_rows(session):
    """{step: {key: value}} of a session's history, without W&B's own keys (_step, _runtime, _timestamp)."""
    rows = {}
    for entry in session["history"]:
        rows.setdefault(entry["_step"], {}).update({k: v for k, v in entry.items() if not k.startswith("_")})
    return rows


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    """W&B as a user without an account runs it: WANDB_MODE=offline; every W&B directory under tmp_path; the
    server address a closed local port, so that anything that tried the network would fail here."""
    pytest.importorskip("wandb")
    for name in ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # W&B would wrap stdout, which pytest has captured
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))


@pytest.mark.slow
def test_a_wandb_tracker_logs_its_rows_and_a_resumed_one_continues_the_same_run(wandb_offline, tmp_path):
    png = tmp_path / "iter000002.png"
    from PIL import Image
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(png)
    rows = [{"iteration": 1, "reward_mean": 0.5, "anchor_refreshed": False, "ratio_max_dev_per_step": [0.0, 0.25],
             "reward_components": ["vq"]},
            {"iteration": 2, "reward_mean": 0.75, "anchor_refreshed": True, "ratio_max_dev_per_step": [0.0, 0.5],
             "reward_components": ["vq"]}]
    with tracking.open_tracker("wandb", str(tmp_path), {"lr": 0.001, "kernel": "sage"}, resume=False,
                               start_iteration=0) as tracker:
        for row in rows:
            tracker.log(row, step=row["iteration"])
        tracker.log_video(str(png), step=2, caption="a cat")
    run_id = (tmp_path / tracking.WANDB_RUN_ID).read_text()
    time.sleep(1 - time.time() % 1)  # a session's directory is named by the second it started in
    with tracking.open_tracker("wandb", str(tmp_path), {"lr": 0.002, "kernel": "sage"}, resume=True,
                               start_iteration=2) as tracker:
        tracker.log({"iteration": 3, "reward_mean": 1.0}, step=3)
        tracker.log_video(write_grey_mp4(str(tmp_path / "iter000003.mp4")), step=3, caption="a dog")
    first, resumed = wandb_runs(tmp_path)
    assert first["id"] == resumed["id"] == run_id and first["project"] == resumed["project"] == "sage-grpo"
    assert first["config"]["lr"] == 0.001 and resumed["config"]["lr"] == 0.002
    logged = logged_rows(first)
    sample = {k.split("/")[1]: v for k, v in logged[2].items() if k.startswith("sample/")}
    assert (sample["_type"], sample["caption"], sample["width"], sample["height"]) == ("image-file", "a cat", 6, 4)
    assert {step: {k: v for k, v in row.items() if not k.startswith("sample/")} for step, row in logged.items()} == {
        1: {"reward_mean": 0.5, "anchor_refreshed": 0, "ratio_max_dev_per_step/0": 0, "ratio_max_dev_per_step/1": 0.25},
        2: {"reward_mean": 0.75, "anchor_refreshed": 1, "ratio_max_dev_per_step/0": 0, "ratio_max_dev_per_step/1": 0.5}}
    assert {k: v for k, v in logged_rows(resumed)[3].items() if k in ("reward_mean", "sample/_type", "sample/caption")
            } == {"reward_mean": 1.0, "sample/_type": "video-file", "sample/caption": "a dog"}
    assert sorted(logged_rows(resumed)) == [3]
    time.sleep(1 - time.time() % 1)
    with tracking.open_tracker("wandb", str(tmp_path), {}, resume=False, start_iteration=0):
        pass  # a fresh run (not --resume) is a new W&B run, and the id kept is the new one
    assert wandb_runs(tmp_path)[-1]["id"] == (tmp_path / tracking.WANDB_RUN_ID).read_text() != run_id


@pytest.mark.slow
def test_a_wandb_training_run_logs_the_metrics_rows_and_overwrite_forgets_the_tracker_runs(wandb_offline,
                                                                                          tiny_models, tmp_path):
    run(tiny_models, tmp_path, report_to="wandb", max_iterations=2, sample_every=1)
    (session,) = wandb_runs(tmp_path)
    assert session["id"] == (tmp_path / tracking.WANDB_RUN_ID).read_text()
    assert session["config"]["report_to"] == "wandb" and session["config"]["num_steps"] == 2
    logged = logged_rows(session)
    for row in metrics(tmp_path):
        shown = {k: v for k, v in logged[row["iteration"]].items() if not k.startswith("sample/")}
        assert shown == pytest.approx(tracking.scalars(row), nan_ok=True)  # JSON round trip: the same floats
        assert logged[row["iteration"]]["sample/_type"] == "video-file"  # --sample_every 1: an mp4
    # --overwrite deletes the tracker runs with the rest: else a later --resume --report_to wandb of the new run
    # would continue the old W&B run, and TensorBoard would mix the old events in
    (tmp_path / tracking.TENSORBOARD_DIR).mkdir()  # as an earlier --report_to tensorboard would have left it
    run(tiny_models, tmp_path, "--overwrite", max_iterations=1)
    assert not (tmp_path / tracking.TENSORBOARD_DIR).exists() and not (tmp_path / tracking.WANDB_RUN_ID).exists()


# ------------------------------------------------------------------------------------------------
# Errors before any model is loaded

@pytest.mark.parametrize("report_to, hidden, message", [
    ("bogus", None, r"unknown --report_to 'bogus': expected one of \['none', 'tensorboard', 'wandb'\]"),
    ("tensorboard", "tensorboard", r"--report_to tensorboard needs the optional package tensorboard, which is not "
                                   r"installed: pip install tensorboard"),
    ("wandb", "wandb", r"--report_to wandb needs the optional package wandb, which is not installed: pip install wandb"),
])
def test_an_unknown_or_missing_tracker_is_refused_before_any_model_is_loaded(report_to, hidden, message, tmp_path,
                                                                             monkeypatch):
    if hidden:  # hide the package whether or not it is installed: `import wandb` then raises ImportError
        monkeypatch.setitem(sys.modules, hidden, None)
    monkeypatch.setattr(distributed, "setup", lambda *a, **k: pytest.fail("reached the process group"))
    with pytest.raises(config.ConfigError, match=message):
        train.main(config.parse_config(["--tiny", "--group_size", "2", "--output_dir", str(tmp_path),
                                       "--report_to", report_to]))
