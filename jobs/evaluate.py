"""Launcher for `ray job submit --working-dir . -- python jobs/evaluate.py --artifact A --manifest M --out O`.

The same entry point as `cxrray evaluate`; the working dir is put on sys.path so the job runs
from an unpacked checkout without `pip install`. The split is scored by an actor pool on the
cluster the job was submitted to (RAY_ADDRESS), into `<out>/predictions`: re-submitting the
same job after a failure scores only the images without a committed row.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
