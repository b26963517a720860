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

from . import __version__
from .errors import VirtniiError
from .combine import combine
from .export import export
from .manifest import read_index
from .pyramid import CODECS, DEFAULT_CODEC, METHODS, build_pyramids
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
    parser.add_argument("--version", action="version", version=f"virtnii {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    p_scan = commands.add_parser("scan", help="index NIfTI files/folders/globs into one manifest folder")
    p_scan.add_argument("sources", nargs="+", metavar="SRC", help="file, folder or glob; local path or fsspec URL")
    p_scan.add_argument("-o", "--out", required=True, help="manifest folder to write (replaced if it exists)")
    p_scan.add_argument("--zarr-format", type=int, choices=(2, 3), default=3,
                        help="3: Zarr v3 + OME 0.5 (default); 2: Zarr v2 + OME 0.4")
    p_scan.add_argument("--format", dest="ref_format", choices=("json", "parquet"), default="json",
                        help="reference file format (parquet needs --zarr-format 2)")
    p_scan.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _storage_arguments(p_scan)

    p_info = commands.add_parser("info", help="summarise a manifest: images, shapes, dtypes, bytes referenced")
    p_info.add_argument("manifest")
    _storage_arguments(p_info)

    p_verify = commands.add_parser("verify", help="check that no source changed since it was indexed")
    p_verify.add_argument("manifest")
    _storage_arguments(p_verify)

    p_pyramid = commands.add_parser(
        "pyramid", help="write downsampled OME levels of a manifest's images and add them to it",
        description="Stream each image's level 0 once and write levels 1..N (2x in x, y, z; t and c untouched) "
                    "as compressed zarr arrays, then update the manifest so each image is one multiscale "
                    "NIfTI-Zarr.  Complete levels made from the same inputs are reused.",
        epilog="examples:\n  virtnii pyramid manifests/ds000001\n"
               "  virtnii pyramid OUT sub-01/anat/sub-01_T1w --method gaussian --chunks 128 --shards 4\n"
               "  virtnii pyramid OUT --out s3://bucket/levels -s anon=true\n\n"
               "exit status: 0 all built, 1 some images failed (the others are in the manifest), 2 nothing done",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p_pyramid.add_argument("manifest")
    p_pyramid.add_argument("images", nargs="*", metavar="IMAGE", help="image names (default: all)")
    p_pyramid.add_argument("--levels", type=int, help="levels to write (default: until the coarsest fits a chunk)")
    p_pyramid.add_argument("--method", choices=METHODS,
                           help="downsampling (default: mode for label images, by NIfTI intent; mean otherwise)")
    p_pyramid.add_argument("--chunks", type=int, default=64, help="chunk edge in voxels (default: %(default)s)")
    p_pyramid.add_argument("--shards", type=int, help="Zarr v3 shards of K chunks per edge (default: none)")
    p_pyramid.add_argument("--codec", choices=sorted(CODECS), default=DEFAULT_CODEC,
                           help="compressor (default: %(default)s)")
    p_pyramid.add_argument("--out", help="where to write level stores (default: MANIFEST/levels)")
    p_pyramid.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _storage_arguments(p_pyramid)

    p_combine = commands.add_parser(
        "combine", help="merge manifests into one (images, whole datasets), nothing copied but gzip indexes",
        epilog="examples:\n  virtnii combine manifests/sub-01 manifests/sub-02 -o manifests/all\n"
               "  virtnii combine ds1 ds2 --prefix ds000001 --prefix ds000002 -o archive",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p_combine.add_argument("manifests", nargs="+", metavar="MANIFEST")
    p_combine.add_argument("-o", "--out", required=True, help="manifest folder to write (replaced if it exists)")
    p_combine.add_argument("--prefix", action="append", dest="prefixes",
                           help="group for each manifest's images, once per MANIFEST, in order")
    p_combine.add_argument("--format", dest="ref_format", choices=("json", "parquet"),
                           help="reference file format (default: the first manifest's)")
    p_combine.add_argument("-m", "--manifest-option", dest="manifest_options", metavar="KEY=VALUE", type=_option,
                           action="append", default=[], help="fsspec option for remote manifest folders")

    p_export = commands.add_parser(
        "export", help="stream one level of an image out as .nii or .nii.gz",
        epilog="examples:\n  virtnii export OUT sub-01/anat/sub-01_T1w -o t1.nii.gz\n"
               "  virtnii export OUT sub-01/anat/sub-01_T1w --level 2 -o t1_level2.nii",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p_export.add_argument("manifest")
    p_export.add_argument("image", nargs="?", help="image name (needed when the manifest holds several)")
    p_export.add_argument("--level", type=int, default=0, help="pyramid level (default: 0, the source's voxels)")
    p_export.add_argument("-o", "--out", required=True, help="file to write (.nii, or .nii.gz to compress)")
    p_export.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _storage_arguments(p_export)

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
                  storage_options=storage, manifest_options=manifest_options, progress=not args.quiet)
    for failure in result.failures:
        print(f"virtnii: error: {failure}", file=sys.stderr)
    if result.manifest is None:
        print("virtnii: nothing indexed, no manifest written", file=sys.stderr)
        return 2
    total = sum(image.nbytes for image in result.images)
    print(f"indexed {len(result.images)} image(s), {_human(total)} of voxels referenced in place -> {result.manifest}"
          + (f"; {len(result.failures)} source(s) failed" if result.failures else ""))
    return 1 if result.failures else 0


def print_info(manifest: str, manifest_options: dict[str, Any]) -> None:
    index = read_index(manifest, manifest_options)
    images = index.images
    print(f"manifest {manifest}: {len(images)} image(s), Zarr v{index.zarr_format}, references {index.references}")
    width = max((len(image.name) for image in images), default=4)
    print(f"  {'name':<{width}}  {'axes':<5} {'shape':<22} {'dtype':<10} {'chunks':<22} {'bytes':>10}  source")
    for image in images:
        dtype = image.dtype if isinstance(image.dtype, str) else "rgb" + str(8 * len(image.dtype))
        gz = " (gzip index)" if image.gzip_index else ""
        print(f"  {image.name:<{width}}  {image.axes:<5} {_dims(image.shape):<22} {dtype:<10} "
              f"{_dims(image.chunks):<22} {_human(image.nbytes):>10}  {image.source}{gz}")
        if image.pyramid:
            pyramid = image.pyramid
            for level in pyramid.levels:
                shards = f" shards {_dims(level.shards)}" if level.shards else ""
                print(f"  {'':<{width}}  level {level.path}: {_dims(level.shape)}, chunks {_dims(level.chunks)}"
                      f"{shards}, {_human(level.stored_bytes)} written")
            print(f"  {'':<{width}}  pyramid: {pyramid.method}, {len(pyramid.levels)} level(s), "
                  f"{_human(pyramid.stored_bytes)} in {pyramid.store}")
    written = sum(image.pyramid.stored_bytes for image in images if image.pyramid)
    print(f"  total: {_human(sum(image.nbytes for image in images))} referenced"
          + (f", {_human(written)} of pyramid levels written" if written else ""))


def _dims(values: tuple[int, ...]) -> str:
    return "x".join(map(str, values))


def cmd_info(args: argparse.Namespace) -> int:
    _, manifest_options = _options(args)
    print_info(args.manifest, manifest_options)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    storage, manifest_options = _options(args)
    checked, problems = verify(args.manifest, manifest_options or None, **storage)
    for problem in problems:
        print(f"virtnii: error: {problem}", file=sys.stderr)
    print(f"{checked - len(problems)} of {checked} source file(s) unchanged since indexing")
    return 1 if problems else 0


def cmd_pyramid(args: argparse.Namespace) -> int:
    storage, manifest_options = _options(args)
    result = build_pyramids(args.manifest, args.images, method=args.method, levels=args.levels, chunks=args.chunks,
                            shards=args.shards, codec=args.codec, out=args.out,
                            manifest_options=manifest_options or None, progress=not args.quiet, **storage)
    for failure in result.failures:
        print(f"virtnii: error: {failure}", file=sys.stderr)
    written = sum(e.pyramid.stored_bytes for e in result.images if e.pyramid and e.name in result.built)
    print(f"pyramid: {len(result.built)} image(s) built ({_human(written)} written), {len(result.reused)} already "
          f"complete, {len(result.failures)} failed -> {args.manifest}")
    if result.failures:
        return 2 if not (result.built or result.reused) else 1
    return 0


def cmd_combine(args: argparse.Namespace) -> int:
    options = dict(args.manifest_options)
    index = combine(args.manifests, args.out, prefixes=args.prefixes, ref_format=args.ref_format,
                    manifest_options=options or None, out_options=options or None)
    print(f"combined {len(args.manifests)} manifest(s): {len(index.images)} image(s) -> {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    storage, manifest_options = _options(args)
    with tqdm(unit="B", unit_scale=True, desc="export", disable=args.quiet) as bar:
        export(args.manifest, args.out, args.image, level=args.level, manifest_options=manifest_options or None,
               progress=bar.update, **storage)
    print(f"exported {args.image or 'the image'} level {args.level} -> {args.out}")
    return 0


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
        ours = to_nibabel(group[image.name])
        theirs = nib.load(str(data / Path(image.source).name))
        same = np.array_equal(np.asarray(ours.dataobj.get_unscaled()), np.asanyarray(theirs.dataobj.get_unscaled()))
        print(f"read back {image.name}: {ours.shape} {ours.get_data_dtype()} voxels equal nibabel's: {same}; "
              f"affine equal: {np.allclose(ours.affine, theirs.affine)}")
        if not same:
            return 1
    return 1 if result.failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"scan": cmd_scan, "info": cmd_info, "verify": cmd_verify, "pyramid": cmd_pyramid,
               "combine": cmd_combine, "export": cmd_export, "example": cmd_example}[args.command]
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
