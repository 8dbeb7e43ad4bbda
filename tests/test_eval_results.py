"""eval.py's results are records: a later evaluation adds rows to them or is refused, a crash never corrupts them,
and its --help reads whole. No model is run here (the end-to-end runs: tests/test_eval.py)."""
import json

import pytest

import eval as evaluate
import config

SETTINGS = {"prompts": ["a red car drives through rain", "a cat jumps onto a sofa"], "model_path": "hv", "reward_path": "va",
            "clip_path": "clip", "pickscore_path": "pick", "pickscore_processor_path": "", "tiny": False, "world": False,
            "seed": 0, "videos_per_prompt": 1, "num_steps": 50, "shift": 5.0, "cfg_scale": 6.0, "num_frames": 81,
            "height": 352, "width": 624, "vae_tiling": True}


def row(name, vq, folder=None):
    return {"name": name, "evaluated": "2026-12-08 10:00:00", "path": f"/ckpt/{name}", "vq": vq, "mq": 0.0, "ta": 0.0,
            "overall": vq, "clip_score": 20.0, "pick_score": 21.0, "num_failed": 0,
            "samples": [{"prompt": SETTINGS["prompts"][0], "seed": 0, "video": f"videos/{folder or name}/000_a_seed0.mp4"}]}


def write_by_hand(directory, settings, models):
    (directory / "results.json").write_text(json.dumps({"config": {}, "settings": settings, "models": models}))


def test_the_settings_compared_are_the_eval_configs_own_fields():
    assert set(evaluate.SETTINGS) <= {f.name for f in evaluate.dataclasses.fields(evaluate.EvalConfig)}


def test_earlier_rows_are_returned_when_the_settings_match(tmp_path):
    models = [row("base", 0.1), row("checkpoint-000500", 0.3)]
    write_by_hand(tmp_path, SETTINGS, models)
    assert evaluate.earlier_results(str(tmp_path), dict(SETTINGS)) == models
    assert evaluate.earlier_results(str(tmp_path / "empty"), SETTINGS) == []


@pytest.mark.parametrize("change, found", [
    ({"num_steps": 8}, "num_steps is 50 there, 8 here"),
    ({"cfg_scale": 4.0}, "cfg_scale is 6.0 there, 4.0 here"),
    ({"seed": 1}, "seed is 0 there, 1 here"),
    ({"prompts": ["a red car drives through rain", "a dog"]},
     "2 prompts there, 2 here, first difference at prompt 1: 'a cat jumps onto a sofa' there, 'a dog' here"),
    ({"prompts": ["a red car drives through rain"]}, "2 prompts there, 1 here, first difference at prompt 1"),
])
def test_other_settings_are_refused_in_one_line_naming_the_results_file_and_the_setting(tmp_path, change, found):
    write_by_hand(tmp_path, SETTINGS, [row("base", 0.1)])
    before = (tmp_path / "results.json").read_bytes()
    with pytest.raises(ValueError) as error:
        evaluate.earlier_results(str(tmp_path), {**SETTINGS, **change})
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'results.json'} holds the results of other settings (") and found in message
    assert "\n" not in message and (tmp_path / "results.json").read_bytes() == before


def test_a_results_file_of_an_earlier_eval_without_stored_settings_is_read_from_its_config(tmp_path):
    config = {k: v for k, v in SETTINGS.items() if k != "prompts"}
    models = [row("base", 0.1)]
    models[0]["samples"].append({**models[0]["samples"][0], "prompt": SETTINGS["prompts"][1]})
    (tmp_path / "results.json").write_text(json.dumps({"config": config, "models": models}))
    assert evaluate.earlier_results(str(tmp_path), SETTINGS) == models
    with pytest.raises(ValueError, match="height is 352 there, 480 here"):
        evaluate.earlier_results(str(tmp_path), {**SETTINGS, "height": 480})


def test_a_model_evaluated_again_gets_its_own_video_folder():
    earlier = [row("base", 0.1), row("base", 0.1, folder="base_2"), row("checkpoint-000500", 0.3)]
    assert evaluate.video_folder("base", earlier) == "base_3"
    assert evaluate.video_folder("checkpoint-000500", earlier) == "checkpoint-000500_2"
    assert evaluate.video_folder("checkpoint-000600", earlier) == "checkpoint-000600"


def test_a_crash_while_writing_keeps_the_results_already_written(tmp_path, monkeypatch):
    cfg = evaluate.EvalConfig(output_dir=str(tmp_path), num_frames=81, height=352, width=624, cfg_scale=6.0)
    evaluate.write_results(cfg, SETTINGS, [row("base", 0.1)], 2)
    json_before, md_before = (tmp_path / "results.json").read_text(), (tmp_path / "results.md").read_text()
    assert json.loads(json_before)["models"] == [row("base", 0.1)]

    class Interrupted(Exception):
        pass

    def crashing_open(path, mode="r", *args, **kwargs):  # a kill halfway through writing a file
        f = open(path, mode, *args, **kwargs)
        if "w" in mode:
            write = f.write
            def half_then_crash(text):
                write(text[:len(text) // 2])
                f.flush()
                raise Interrupted(path)
            f.write = half_then_crash
        return f
    monkeypatch.setattr(evaluate, "open", crashing_open, raising=False)
    with pytest.raises(Interrupted):
        evaluate.write_results(cfg, SETTINGS, [row("base", 0.1), row("checkpoint-000500", 0.3)], 2)
    assert (tmp_path / "results.json").read_text() == json_before and (tmp_path / "results.md").read_text() == md_before


def test_help_reads_whole_and_says_what_a_second_evaluation_does(capsys):
    with pytest.raises(SystemExit):
        config.parse_config(["--help"], cls=evaluate.EvalConfig, description=evaluate.__doc__)
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]
    assert " ".join(description.split()) == ("Evaluate HunyuanVideo-1.5 checkpoints side by side: deterministic ODE "
                                             "samples scored by VideoAlign and CLIP/PickScore.")
    assert text.count("options:") == 1, text
    assert "--verbose" in text
    assert "a model evaluated again: a new row with its date" in " ".join(text.split())


def test_a_setting_added_later_reads_as_what_every_earlier_eval_used(tmp_path):
    # results.json files written before --vae_precision existed decoded in the VAE's own dtype ("model")
    write_by_hand(tmp_path, SETTINGS, [row("base", 0.1)])
    assert evaluate.earlier_results(str(tmp_path), {**SETTINGS, "vae_precision": "model"}) == [row("base", 0.1)]
    with pytest.raises(ValueError, match="vae_precision is 'model' there, 'fp16' here"):
        evaluate.earlier_results(str(tmp_path), {**SETTINGS, "vae_precision": "fp16"})
    assert evaluate.settings_of({}, [])["vae_precision"] == "model"
