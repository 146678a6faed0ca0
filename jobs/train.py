"""Launcher for `ray job submit --working-dir . -- python jobs/train.py --config C key=value ...`.

The same entry point as `cxrray train`; the working dir is put on sys.path so the job runs
from an unpacked checkout without `pip install`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
