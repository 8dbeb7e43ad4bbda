"""Where the weights come from: a local directory, or a Hugging Face hub id looked up in the local hub cache.

Every model this code reads (HunyuanVideo-1.5, VideoAlign and its Qwen2-VL base, CLIP, PickScore) can be
named either way, on the command line of train.py / eval.py or in Python:

    --model_path ckpts/HunyuanVideo-1.5-480p_t2v                      a local directory: used as it is
    --model_path hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v     a hub id: its snapshot in the hub cache
    --reward_path KwaiVGI/VideoReward@<branch, tag or commit>        a hub id at a revision (default: main)

`resolve_path` turns either into a local directory, so that everything after it (the layout checks,
loading, the config stored in checkpoints) sees a plain path. A hub id is resolved by huggingface_hub
itself, `snapshot_download(repo_id, revision=..., local_files_only=True)`, which only READS the cache:

    $HF_HUB_CACHE (default $HF_HOME/hub, default ~/.cache/huggingface/hub)
        models--<org>--<name>/
            refs/main                  the commit hash the branch `main` points to
            snapshots/<commit>/...     the repository's files (links into blobs/)
            blobs/

Nothing is ever downloaded at run time: a multi-node run must not have 64 processes race to fetch
tens of gigabytes, and a run must not silently pick up a new upstream revision. Download once, by
hand, with the CLI that ships with huggingface_hub (`hf`; older releases called it `huggingface-cli`):

    hf download hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v      # into the hub cache
    hf download KwaiVGI/VideoReward --local-dir ckpts/VideoReward      # or into a directory of your choice

A string is read as a hub id only when it is not an existing directory and has the form org/name
(huggingface_hub's own validation of repo ids), optionally followed by @revision; so a mistyped
relative path such as ckpts/VideoReward gets an error that names both readings.
"""
import os

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id


def parse_repo_id(text):
    """'org/name' -> ('org/name', None); 'org/name@v1.0' -> ('org/name', 'v1.0'); not of that form -> None.

    A repo id cannot contain '@', so the first '@' starts the revision (which may hold '/', as refs/pr/1 does).
    A bare 'name' (a valid id of the hub's oldest models) is not accepted: it reads as a relative directory.
    """
    repo_id, at, revision = text.partition("@")
    if repo_id.count("/") != 1 or (at and not revision):
        return None
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return repo_id, revision or None


def resolve_path(path_or_id, what="path"):
    """A local directory for `path_or_id`: an existing directory as it is, a hub id as its cached snapshot.

    what: how the caller names the value in errors, e.g. "--model_path".
    E.g. resolve_path("ckpts/hv15", "--model_path") -> "ckpts/hv15" (it exists);
         resolve_path("org/name@v1", "--model_path") -> "<HF_HUB_CACHE>/models--org--name/snapshots/<commit of v1>".
    Raises FileNotFoundError saying what to do: neither a directory nor an id; an id not in the cache
    (with the `hf download` command); an incomplete cached snapshot. Never touches the network.
    """
    if os.path.isdir(path_or_id):
        return path_or_id
    parsed = parse_repo_id(path_or_id)
    if parsed is None:
        raise FileNotFoundError(f"{what} {path_or_id!r} is not a directory (expected a local directory, or a "
                                f"Hugging Face hub id org/name[@revision] already in the hub cache)")
    repo_id, revision = parsed
    at_revision = f" at revision {revision!r}" if revision else ""
    download = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    try:
        return snapshot_download(repo_id, revision=revision, local_files_only=True)
    except IncompleteSnapshotError as error:  # huggingface_hub knows the file list and some files are missing
        raise FileNotFoundError(f"{what} {path_or_id!r}: the hub cache holds an incomplete snapshot of {repo_id!r}"
                                f"{at_revision} ({error}). Complete it with `{download}`; this code never "
                                f"downloads") from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{what} {path_or_id!r} is not a local directory, and the Hugging Face hub id {repo_id!r}{at_revision} "
            f"is not in the hub cache {constants.HF_HUB_CACHE!r}. This code never downloads weights: download them "
            f"once with `{download}` (into that cache; runs must see the same HF_HUB_CACHE / HF_HOME), or with "
            f"`{download} --local-dir <dir>` and pass <dir>") from None


def quiet_libraries():
    """diffusers', transformers' and huggingface_hub's info and warnings (loading reports, "Guiders are currently an
    experimental feature", the float32-modules note) and progress bars off, so that a script's own lines stay
    readable; the entry scripts skip it under --verbose."""
    import diffusers
    import huggingface_hub
    import transformers
    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
