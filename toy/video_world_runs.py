"""Moved: the synthetic video world is not part of the 2-D toy. Its seed grids are `python world/runs.py`."""
import sys

if __name__ == "__main__":
    sys.exit("toy/video_world_runs.py moved to world/runs.py: run `python world/runs.py"
             + "".join(" " + arg for arg in sys.argv[1:]) + "`")
