"""Command line: a thin shell over the Python API (``virtnii.scan``, ``virtnii.open``, the manifest index).

Exit status: 0 when everything was indexed, 1 when some sources failed (the manifest still holds the good
ones; one line per failure on stderr), 2 when nothing could be done (bad arguments, no source indexed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import __version__, gzindex
from .errors import ManifestError, VirtniiError, redact
from .manifest import read_index
from .scan import scan
from .verified import verify


def _option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE parsed as JSON when it is JSON (``anon=true``, ``max_concurrency=16``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _storage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-s", "--storage-option", dest="storage_options", metavar="KEY=VALUE", type=_option,
                        action="append", default=[],
                        help="fsspec option for reading sources, e.g. -s anon=true or -s endpoint_url=http://… "
                             "(never written into the manifest)")
    parser.add_argument("--anon", action="store_true", help="anonymous access to public buckets (= -s anon=true)")
    parser.add_argument("-m", "--manifest-option", dest="manifest_options", metavar="KEY=VALUE", type=_option,
                        action="append", default=[], help="fsspec option for the manifest folder when it is remote")


def _options(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    storage = dict(args.storage_options)
    if args.anon:
        storage["anon"] = True
    return storage, dict(args.manifest_options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="virtnii", description="Index NIfTI files in place as virtual NIfTI-Zarr.")
    parser.add_argument("--version", action="version",
                        version=f"virtnii {__version__} (gzip inflater: {gzindex.inflater()})")
    commands = parser.add_subparsers(dest="command", required=True)

    p_scan = commands.add_parser("scan", help="index NIfTI files/folders/globs into one manifest folder")
    p_scan.add_argument("sources", nargs="+", metavar="SRC", help="file, folder or glob; local path or fsspec URL")
    p_scan.add_argument("-o", "--out", required=True, help="manifest folder to write (replaced if it exists)")
    p_scan.add_argument("--zarr-format", type=int, choices=(2, 3), default=3,
                        help="3: Zarr v3 + OME 0.5 (default); 2: Zarr v2 + OME 0.4")
    p_scan.add_argument("--format", dest="ref_format", choices=("json", "parquet"), default="json",
                        help="reference file format (parquet needs --zarr-format 2)")
    p_scan.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p_scan.add_argument("--content-hash", action="store_true",
                        help="record each source's SHA-256, for `virtnii verify --content` (reads every .nii whole)")
    p_scan.add_argument("--no-extensions", dest="extensions", action="store_false",
                        help="leave header extensions (which may carry identifying text) out of the manifest")
    p_scan.add_argument("--write-url-secrets", action="store_true",
                        help="index URLs whose query holds credentials (presigned URLs), writing them into the "
                             "manifest; refused otherwise")
    _storage_arguments(p_scan)

    p_info = commands.add_parser("info", help="summarise a manifest: images, shapes, dtypes, bytes referenced")
    p_info.add_argument("manifest")
    _storage_arguments(p_info)

    p_verify = commands.add_parser("verify", help="check the manifest's files, and that no source changed since "
                                                  "it was indexed")
    p_verify.add_argument("manifest")
    p_verify.add_argument("--content", action="store_true",
                          help="also compare every source's bytes (reads them whole): SHA-256 where the scan "
                               "recorded one, a full inflate of .nii.gz otherwise")
    _storage_arguments(p_verify)

    p_example = commands.add_parser("example", help="index NIfTI files shipped with nibabel and read one back")
    p_example.add_argument("-o", "--out", default="manifests/example", help="manifest folder (default: %(default)s)")
    return parser


def _human(nbytes: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    step = 0
    while nbytes >= 1024 and step < len(units) - 1:
        nbytes /= 1024
        step += 1
    return f"{nbytes:.0f} B" if step == 0 else f"{nbytes:.1f} {units[step]}"


def cmd_scan(args: argparse.Namespace) -> int:
    storage, manifest_options = _options(args)
    result = scan(args.sources, args.out, zarr_format=args.zarr_format, ref_format=args.ref_format,
                  storage_options=storage, manifest_options=manifest_options, progress=not args.quiet,
                  content_hash=args.content_hash, extensions=args.extensions,
                  write_url_secrets=args.write_url_secrets)
    for failure in result.failures:
        print(f"virtnii: error: {failure}", file=sys.stderr)
    if result.manifest is None:
        print("virtnii: nothing indexed, no manifest written", file=sys.stderr)
        return 2
    total = sum(image["nbytes"] for image in result.images)
    print(f"indexed {len(result.images)} image(s), {_human(total)} of voxels referenced in place -> {result.manifest}"
          + (f"; {len(result.failures)} source(s) failed" if result.failures else ""))
    return 1 if result.failures else 0


def print_info(manifest: str, manifest_options: dict[str, Any]) -> None:
    index = read_index(manifest, manifest_options)
    images = index["images"]
    print(f"manifest {manifest}: {len(images)} image(s), Zarr v{index['zarr_format']}, references {index['references']}")
    width = max((len(image["name"]) for image in images), default=4)
    print(f"  {'name':<{width}}  {'axes':<5} {'shape':<22} {'dtype':<10} {'chunks':<22} {'bytes':>10}  source")
    for image in images:
        dtype = image["dtype"] if isinstance(image["dtype"], str) else "rgb" + str(8 * len(image["dtype"]))
        gz = " (gzip index)" if image.get("gzip_index") else ""
        print(f"  {image['name']:<{width}}  {image['axes']:<5} {'x'.join(map(str, image['shape'])):<22} {dtype:<10} "
              f"{'x'.join(map(str, image['chunks'])):<22} {_human(image['nbytes']):>10}  {redact(image['source'])}{gz}")
    print(f"  total: {_human(sum(image['nbytes'] for image in images))} referenced")


def cmd_info(args: argparse.Namespace) -> int:
    _, manifest_options = _options(args)
    print_info(args.manifest, manifest_options)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    storage, manifest_options = _options(args)
    checked, problems = verify(args.manifest, manifest_options or None, content=args.content, **storage)
    for problem in problems:
        print(f"virtnii: error: {problem}", file=sys.stderr)
    damaged = sum(isinstance(problem, ManifestError) for problem in problems)
    print(f"{checked - len(problems) + damaged} of {checked} source file(s) unchanged since indexing"
          + (" (content compared)" if args.content else "")
          + (f"; {damaged} problem(s) with the manifest itself" if damaged else ""))
    return 1 if problems else 0


def cmd_example(args: argparse.Namespace) -> int:
    import nibabel as nib

    from .reader import open as open_manifest, to_nibabel

    data = Path(nib.__file__).parent / "tests" / "data"
    names = ["anatomical.nii", "functional.nii", "example4d.nii.gz", "example_nifti2.nii.gz"]
    sources = [str(data / name) for name in names]
    print(f"indexing {len(sources)} NIfTI files shipped with nibabel, in place ({data})")
    result = scan(sources, args.out, progress=False)
    for failure in result.failures:
        print(f"virtnii: error: {failure}", file=sys.stderr)
    if result.manifest is None:
        return 2
    print_info(args.out, {})
    group = open_manifest(args.out)
    for image in result.images:
        ours = to_nibabel(group[image["name"]])
        theirs = nib.load(str(data / Path(image["source"]).name))
        same = np.array_equal(np.asarray(ours.dataobj.get_unscaled()), np.asanyarray(theirs.dataobj.get_unscaled()))
        print(f"read back {image['name']}: {ours.shape} {ours.get_data_dtype()} voxels equal nibabel's: {same}; "
              f"affine equal: {np.allclose(ours.affine, theirs.affine)}")
        if not same:
            return 1
    return 1 if result.failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"scan": cmd_scan, "info": cmd_info, "verify": cmd_verify, "example": cmd_example}[args.command]
    try:
        return handler(args)
    except VirtniiError as err:
        print(f"virtnii: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("virtnii: interrupted" + ("; the manifest may be incomplete: run the scan again"
                                        if args.command == "scan" else ""), file=sys.stderr)
        return 130
    except BrokenPipeError:  # `virtnii info OUT | head`: the reader has what it wanted
        # Python flushes stdout again at exit, into the closed pipe: point it at /dev/null first
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
