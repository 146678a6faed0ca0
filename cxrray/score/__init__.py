"""Bulk scoring: an archive of images -> predictions Parquet, resumable and exactly once.

    cxrray score --artifact s3://bucket/runs/x/artifacts/best --input s3://bucket/archive/ --out s3://bucket/scores/

* inputs.py   what to score: folder, glob, CSV/Parquet list or URI prefix -> unique image_ids
* store.py    the output: part files + commit records, resume
* lock.py     the one-writer lock (flock locally, a lease on object stores)
* pipeline.py the Ray Data actor pool that fills the store
* cli.py      options, exit codes

Refusals: an output folder written by another model (unless `--force-model`, which deletes
that model's parts and rescores everything: one folder always holds one model's
predictions), an output holding rows for images no longer in the input (score into a new
folder), or a non-empty folder that is not a predictions folder.
"""
from cxrray.score.cli import add_arguments, build_parser, config_from_args, main, run
from cxrray.score.errors import InputError, OutputConflict, ScoreError
from cxrray.score.inputs import IMAGE_EXTENSIONS, fingerprint, is_image_name, list_inputs
from cxrray.score.pipeline import (DEFAULT_CHUNK, ContractPredictor, Resources, ScoreConfig, build_dataset,
                                   plan_resources, score)
from cxrray.score.store import (COMMITS, FORMAT, MANIFEST, OutputLock, PartWriter, check_output, committed_parts,
                                output_schema, read_index, read_predictions, scan_output)

__all__ = [
    "COMMITS", "DEFAULT_CHUNK", "FORMAT", "IMAGE_EXTENSIONS", "MANIFEST", "ContractPredictor", "InputError",
    "OutputConflict", "OutputLock", "PartWriter", "Resources", "ScoreConfig", "ScoreError", "add_arguments",
    "build_dataset", "build_parser", "check_output", "committed_parts", "config_from_args", "fingerprint",
    "is_image_name", "list_inputs", "main", "output_schema", "plan_resources", "read_index", "read_predictions",
    "run", "scan_output", "score",
]
