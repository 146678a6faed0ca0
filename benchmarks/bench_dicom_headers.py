"""Header-only manifest benchmark (not a test): headers/s of `load_dicom` over N DICOM files.

Writes a template set with the synthetic DICOM fixture (every installed transfer syntax, CR and
DX, both photometric interpretations, windows and VOI LUTs), then clones it to N files, each
with its own SOP/Study/Series UIDs and PatientID (two images per patient), under a
patientNNNNN/studyK/ tree. Times, on the same files (the page cache is warm for all of them):

  header-only, threads  load_dicom(root): stop_before_pixels, the default thread pool
  header-only, 1 thread load_dicom(root, max_workers=1)
  full read, 1 thread   pydicom.dcmread(path) of every file (pixels read, not decoded): the naive way
  check_pixels          load_dicom(root, check_pixels=True) on the first --pixels-files files (decodes)
  radiograph-sized      header-only vs full read on --big clones of one --big-size image (uncompressed),
                        where reading only the header is what saves the time

    python benchmarks/bench_dicom_headers.py --n 10000 --size 64 --rounds 3 --append benchmarks/results/dicom.md
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pydicom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cxrray.sources.dicom import load_dicom  # noqa: E402
from cxrray.sources.synthetic import SynthConfig  # noqa: E402
from cxrray.sources.synthetic_dicom import write_synthetic_dicom  # noqa: E402


def build_tree(root: Path, n: int, size: int, templates: int) -> dict:
    """N files cloned from a synthetic template set, each with fresh UIDs and a patient of its own."""
    t0 = time.perf_counter()
    s = write_synthetic_dicom(root / "_templates", SynthConfig(n_patients=templates, size=size, seed=0))
    sources = [pydicom.dcmread(p) for p in sorted(s.root.rglob("*.dcm"))]
    tree = root / "tree"
    for i in range(n):
        ds = sources[i % len(sources)]
        patient, study = i // 2, 1 + (i // 2) % 3
        ds.PatientID, ds.PatientName = f"BENCH-{patient:06d}", f"BENCH^{patient:06d}"
        ds.StudyInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["bench", str(patient), str(study)])
        ds.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["bench-series", str(i)])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid(
            entropy_srcs=["bench-sop", str(i)])
        out = tree / f"patient{patient:06d}" / f"study{study}" / f"image{i:06d}.dcm"
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out, enforce_file_format=True)
    shutil.rmtree(root / "_templates")
    sizes = [p.stat().st_size for p in tree.rglob("*.dcm")]
    return {"tree": tree, "seconds": time.perf_counter() - t0, "syntaxes": s.syntaxes, "unavailable": s.unavailable,
            "bytes_median": int(statistics.median(sizes)), "bytes_total": sum(sizes), "templates": len(sources)}


def build_big(root: Path, n: int, size: int) -> tuple[Path, int]:
    s = write_synthetic_dicom(root / "_big_template", SynthConfig(n_patients=1, size=size, seed=0),
                              syntaxes=["explicit"])
    ds = pydicom.dcmread(next(s.root.rglob("*.dcm")))
    tree = root / "big"
    for i in range(n):
        ds.PatientID = f"BIG-{i:06d}"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid(
            entropy_srcs=["big", str(i)])
        out = tree / f"image{i:05d}.dcm"
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out, enforce_file_format=True)
    shutil.rmtree(root / "_big_template")
    return tree, (tree / "image00000.dcm").stat().st_size


def timed(fn, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def full_read(tree: Path) -> None:
    for p in sorted(tree.rglob("*.dcm")):
        pydicom.dcmread(p)


def pixels_subset(tree: Path, k: int) -> Path:
    sub = tree.parent / "subset"
    for p in sorted(tree.rglob("*.dcm"))[:k]:
        dest = sub / p.relative_to(tree)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dest)
    return sub


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--templates", type=int, default=120, help="synthetic patients behind the template set")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pixels-files", type=int, default=1000)
    ap.add_argument("--big", type=int, default=100, help="radiograph-sized files (0: skip that case)")
    ap.add_argument("--big-size", type=int, default=2048)
    ap.add_argument("--workdir", default=None, help="where to write the files (default: a temp dir, removed)")
    ap.add_argument("--append", default=None, help="append the markdown section to this file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("CXRRAY_PATIENT_SALT", "bench")  # no default-salt warning in the timings
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cxrray-bench-dicom-"))
    try:
        built = build_tree(work, args.n, args.size, args.templates)
        tree = built["tree"]
        print(f"wrote {args.n:,} files ({built['bytes_median']:,} bytes median) in {built['seconds']:.1f}s", flush=True)
        res = load_dicom(tree)
        assert len(res.manifest) == args.n and not len(res.skipped), res.info["summary"]
        cases = {
            "header-only, default thread pool": timed(lambda: load_dicom(tree), args.rounds),
            "header-only, 1 thread": timed(lambda: load_dicom(tree, max_workers=1), args.rounds),
            "full `pydicom.dcmread` (pixels read, not decoded), 1 thread": timed(lambda: full_read(tree), args.rounds),
        }
        sub = pixels_subset(tree, min(args.pixels_files, args.n))
        pixel_secs = timed(lambda: load_dicom(sub, check_pixels=True), args.rounds)
        rows = [(name, args.n, statistics.median(secs)) for name, secs in cases.items()]
        rows.append(("`check_pixels=True` (decodes every image), default thread pool", min(args.pixels_files, args.n),
                     statistics.median(pixel_secs)))
        if args.big:
            big, big_bytes = build_big(work, args.big, args.big_size)
            what = f"{args.big_size}x{args.big_size} ({big_bytes / 2**20:.0f} MiB each)"
            rows.append((f"{what}: header-only, default thread pool", args.big,
                         statistics.median(timed(lambda: load_dicom(big), args.rounds))))
            rows.append((f"{what}: full `pydicom.dcmread`, 1 thread", args.big,
                         statistics.median(timed(lambda: full_read(big), args.rounds))))
        text = report(args, built, rows)
        print(text)
        if args.append:
            with open(args.append, "a") as f:
                f.write("\n" + text)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def report(args, built: dict, rows: list[tuple[str, int, float]]) -> str:
    load = os.getloadavg()
    lines = [
        "## Header-only DICOM manifest (`--source dicom`)",
        "",
        f"- **Command**: `python benchmarks/bench_dicom_headers.py --n {args.n} --size {args.size} "
        f"--rounds {args.rounds}` (script: `benchmarks/bench_dicom_headers.py`).",
        f"- **Machine**: {os.cpu_count()}-core {platform.machine()}, no GPU. **Date**: {datetime.date.today()}. "
        f"Python {platform.python_version()}, pydicom {pydicom.__version__}. Load average {load[0]:.1f} at the end "
        "(the cores were shared with other jobs).",
        f"- **Files**: {args.n:,} DICOMs, {args.size}x{args.size}, 12 bits in 16, {built['bytes_median']:,} bytes "
        f"median ({built['bytes_total'] / 2**20:.0f} MiB in all), cloned from {built['templates']} synthetic "
        f"fixture images with new UIDs and PatientIDs; transfer syntaxes "
        f"{', '.join(built['syntaxes'])}. Local disk, page cache warm. Median of {args.rounds} rounds.",
        "",
        "| case | files | seconds | **files/s** |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {n:,} | {secs:.2f} | **{n / secs:,.0f}** |" for name, n, secs in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
