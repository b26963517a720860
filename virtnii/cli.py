"""Command line: a thin shell over the Python API (``virtnii.scan``, ``virtnii.open``, the manifest index).

Exit status (see :data:`EXIT_STATUS`): 0 when everything was indexed, 1 when some sources failed (the manifest
still holds the good ones; one line per failure on stderr), 2 when nothing could be done (bad arguments, no
source indexed), 3 for an internal error (a bug: never mistaken for failed sources), 130/143 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import traceback
from typing import Any, Sequence


from . import __version__, gzindex, versions
from .bids import index
from .manifest.combine import combine
from .errors import ManifestError, VirtniiError, redact
from .export import export
from .manifest import manifest_options_for, manifest_url, read_index
from .pyramid import CODECS, DEFAULT_CODEC, METHODS, build_pyramids
from .retry import OPTION as RETRY_OPTION, RetryPolicy, policy_of
from .scan import scan
from .server import DEFAULT_HOST, DEFAULT_PORT
from .verified import verify

#: Exit codes: distinct for each outcome a script or scheduler may act on.
EXIT_OK, EXIT_SOURCES_FAILED, EXIT_NOTHING_DONE, EXIT_INTERNAL_ERROR = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_TERMINATED = 128 + signal.SIGINT, 128 + signal.SIGTERM
#: Environment variable that makes an internal error print its traceback (as --debug does).
DEBUG_VARIABLE = "VIRTNII_DEBUG"



def exit_status(ok: str, some_failed: str) -> str:
    """The exit-status table of a command's ``--help``: what 0 and 1 mean for it, the rest shared."""
    return f"""\
exit status:
  {EXIT_OK}    {ok}
  {EXIT_SOURCES_FAILED}    {some_failed}
  {EXIT_NOTHING_DONE}    nothing done: bad arguments, no source indexed, or the manifest could not be written
  {EXIT_INTERNAL_ERROR}    internal error, a bug in virtnii: please report it (--debug or {DEBUG_VARIABLE}=1 prints the traceback)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); {EXIT_TERMINATED} terminated (SIGTERM: timeout, schedulers): nothing written
"""


EXIT_STATUS = exit_status("every source was indexed (verify: is unchanged)",
                          "some sources failed, one line each on stderr (scan: the manifest holds the others;\n"
                          "       verify: changed or missing sources)")

SCAN_EPILOG = EXIT_STATUS + """
A manifest appears at OUT only once complete (an existing OUT is replaced only on success).

examples:
  virtnii scan /data/ds000001 -o manifests/ds000001            # a whole BIDS folder (recursive)
  virtnii scan 's3://openneuro.org/ds000001/sub-*/anat/*.nii.gz' --anon -o manifests/ds1-anat
  virtnii scan a.nii b.nii.gz c.hdr -o out --zarr-format 2 --format parquet
  virtnii scan 's3://lab/raw/' -s endpoint_url=http://minio:9000 -s profile=lab -o s3://lab/manifests/raw
  virtnii scan https://dandiarchive.s3.amazonaws.com/blobs/d86/055/d86055f6-… --name sub-01_T1w -o out   # no suffix
  virtnii scan t1=https://host/blobs/1a2b… bold=s3://bucket/blobs/3c4d… -o out                  # NAME=URL
  virtnii scan 'dandi://dandi/000026@draft/rawdata/' -o manifests/000026    # DANDI (docs/dandi.md)

A file given without a NIfTI suffix (a DANDI blob, a presigned URL) is told by its first bytes: .nii, .nii.gz,
or refused as not NIfTI.  SRC is NAME=URL (image group NAME) when the text before its first '=' has no '://'
and the text after it has one; anything else is a path or URL as given (name a local file by file://…).
"""


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that the same clean-up runs (no ``OUT.partial-*``)."""


def _terminate(signum: int, frame: Any) -> None:
    raise _Terminated()


def _option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE parsed as JSON when it is JSON (``anon=true``, ``max_concurrency=16``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _entity(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` of a BIDS entity: the value is text, as in file names (``run=01`` is not ``run=1``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _storage_arguments(parser: argparse.ArgumentParser, sources: str = "sources", network: bool = True) -> None:
    parser.add_argument("-s", "--storage-option", dest="storage_options", metavar="KEY=VALUE", type=_option,
                        action="append", default=[],
                        help=f"fsspec option for reading {sources}, e.g. -s anon=true or -s endpoint_url=http://… "
                             "(never written into the manifest)")
    parser.add_argument("--anon", action="store_true", help="anonymous access to public buckets (= -s anon=true)")
    parser.add_argument("-m", "--manifest-option", dest="manifest_options", metavar="KEY=VALUE", type=_option,
                        action="append", default=[], help="fsspec option for the manifest folder when it is remote")
    if network:
        _retry_arguments(parser)


def _retry_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for :class:`~virtnii.retry.RetryPolicy` (the storage option ``retry``, see docs/network.md)."""
    default = RetryPolicy()
    group = parser.add_argument_group("flaky networks", "failed requests to remote sources that may pass (resets, "
                                      "timeouts, HTTP 429/5xx, S3 SlowDown) are retried with exponential backoff")
    group.add_argument("--retries", dest="attempts", type=int, metavar="N",
                       help=f"attempts per request in all (default {default.attempts}; 1: never retry)")
    group.add_argument("--retry-delay", dest="base_delay", type=float, metavar="SECONDS",
                       help=f"base of the backoff: retry k waits up to DELAY*2^(k-1) (default {default.base_delay:g})")
    group.add_argument("--retry-max-delay", dest="max_delay", type=float, metavar="SECONDS",
                       help=f"longest wait between attempts (default {default.max_delay:g})")
    group.add_argument("--retry-deadline", dest="deadline", type=float, metavar="SECONDS",
                       help=f"longest one request may take over all its attempts (default {default.deadline:g})")
    group.add_argument("--timeout", type=float, metavar="SECONDS",
                       help="seconds without a connection or new bytes before a request counts as failed "
                            f"(default {default.timeout:g})")


def _pin_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pin-versions", action=argparse.BooleanOptionalAction, default=None,
                        help="record each object's version (S3 VersionId, GCS generation) and always read that "
                             "version, so the manifest keeps its bytes after the objects are overwritten "
                             "(default: where the storage reports versions; --pin-versions: a source without "
                             "one fails)")


def _trust_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-local-sources", action="store_true",
                        help="let a remote manifest read local files or loopback/private addresses (only for "
                             "manifests you trust; see docs/manifest.md)")


def _options(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    storage = dict(args.storage_options)
    if args.anon:
        storage["anon"] = True
    flags = {name: getattr(args, name, None) for name in ("attempts", "base_delay", "max_delay", "deadline", "timeout")}
    flags = {name: value for name, value in flags.items() if value is not None}
    if flags:  # over -s retry={...}; checked now, so that a bad value stops the command before it starts
        storage[RETRY_OPTION] = {**(storage.get(RETRY_OPTION) or {}), **flags}
    if RETRY_OPTION in storage:
        policy_of(storage)
    return storage, dict(args.manifest_options)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help=f"print the traceback of an internal error (or set {DEBUG_VARIABLE}=1)")
    parser = argparse.ArgumentParser(prog="virtnii", description="Index NIfTI files in place as virtual NIfTI-Zarr.",
                                     epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version",
                        version=f"virtnii {__version__} (gzip inflater: {gzindex.inflater()})")
    commands = parser.add_subparsers(dest="command", required=True)

    p_scan = commands.add_parser("scan", help="index NIfTI files/folders/globs into one manifest folder",
                                 description="Index NIfTI files, folders (recursively) and globs, in place, into "
                                             "one manifest folder.", parents=[common], epilog=SCAN_EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    p_scan.add_argument("sources", nargs="+", metavar="SRC",
                        help="file, folder or glob; local path or fsspec URL; NAME=URL names a file's image group")
    p_scan.add_argument("--name", help="image group name for the one file SRC (default: its path's stem, or an "
                                       "extension-less URL's last segment)")
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
    p_scan.add_argument("--relative-sources", action="store_true",
                        help="name sources by paths relative to the manifest folder, which must be on their "
                             "filesystem (e.g. -o DATASET/derivatives/virtnii): the dataset and its manifest can "
                             "then be moved, cloned or uploaded together")
    _pin_argument(p_scan)
    _storage_arguments(p_scan)

    p_index = commands.add_parser(
        "index", help="index a whole BIDS dataset in place: entities, sidecars, resumable, optionally on Dask",
        description="Index every NIfTI image of a BIDS dataset (a folder or any fsspec URL) in place into one "
                    "manifest whose groups mirror the BIDS paths and carry each image's entities and inherited "
                    "sidecar metadata.  A re-run reads only new or changed files, drops removed ones and "
                    "finishes what a killed run left.  Ends with a summary, also written to "
                    "OUT/index-report.json.",
        epilog="examples:\n  virtnii index /data/ds000117 -o /data/ds000117/derivatives/virtnii --pyramid\n"
               "  virtnii index s3://openneuro.org/ds000117 --anon -o manifests/ds000117\n"
               "  virtnii index /data/ds000117 -o out --derivatives --dask tcp://scheduler:8786\n\n"
               + exit_status("every image was indexed", "some files were skipped (placeholders, broken links, "
                                                        "not NIfTI...): listed in the summary and the report"),
        parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter)
    p_index.add_argument("root", metavar="ROOT", help="the dataset folder (holding dataset_description.json)")
    p_index.add_argument("-o", "--out", required=True, help="manifest folder (updated in place on re-runs)")
    p_index.add_argument("--pyramid", action="store_true", help="also build OME pyramid levels (mode for "
                                                                "_dseg/_mask label images)")
    p_index.add_argument("--derivatives", action="store_true", help="index derivatives/ too")
    p_index.add_argument("--workers", type=int, help="batches at once (default: one per core locally, "
                                                     "8 for remote datasets)")
    p_index.add_argument("--dask", metavar="ADDRESS", help="run the batches (and --pyramid's) on this Dask "
                                                           "scheduler (its workers must reach ROOT and OUT)")
    p_index.add_argument("--zarr-format", type=int, choices=(2, 3), default=3,
                         help="3: Zarr v3 + OME 0.5 (default); 2: Zarr v2 + OME 0.4")
    p_index.add_argument("--format", dest="ref_format", choices=("json", "parquet"), default="json",
                         help="reference file format (parquet needs --zarr-format 2)")
    p_index.add_argument("--no-extensions", dest="extensions", action="store_false",
                         help="leave header extensions (which may carry identifying text) out of the manifest")
    p_index.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _pin_argument(p_index)
    _storage_arguments(p_index, sources="the dataset")

    p_find = commands.add_parser(
        "find", help="list the images of an indexed dataset whose BIDS entities match",
        description="Answer from the manifest's index file alone (no source or reference is read).",
        epilog="examples:\n  virtnii find OUT sub=01 suffix=T1w\n  virtnii find OUT datatype=func task=rest --json",
        parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter)
    p_find.add_argument("manifest")
    p_find.add_argument("entities", nargs="*", metavar="KEY=VALUE", type=_entity,
                        help="entity (sub, ses, task, run, ..., datatype, suffix, ext) and value; "
                             "a value a,b matches either")
    p_find.add_argument("--json", action="store_true", help="print one JSON row per image (entities, shape, ...)")
    _storage_arguments(p_find, sources="a remote manifest", network=False)

    p_info = commands.add_parser("info", help="summarise a manifest: images, shapes, dtypes, bytes referenced",
                                 parents=[common])
    p_info.add_argument("manifest")
    _storage_arguments(p_info, sources="a remote manifest (unless -m is given)", network=False)

    p_verify = commands.add_parser("verify", help="check the manifest's files, and that no source changed since "
                                                  "it was indexed", parents=[common], epilog=EXIT_STATUS,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p_verify.add_argument("manifest")
    p_verify.add_argument("--content", action="store_true",
                          help="also compare every source's bytes (reads them whole): SHA-256 where the scan "
                               "recorded one, a full inflate of .nii.gz otherwise")
    _storage_arguments(p_verify)

    p_pyramid = commands.add_parser(
        "pyramid", help="write downsampled OME levels of a manifest's images and add them to it",
        description="Stream each image's level 0 once and write levels 1..N (2x in x, y, z; t and c untouched) "
                    "as compressed zarr arrays, then update the manifest so each image is one multiscale "
                    "NIfTI-Zarr.  Complete levels made from the same inputs are reused.",
        epilog="examples:\n  virtnii pyramid manifests/ds000001\n"
               "  virtnii pyramid OUT sub-01/anat/sub-01_T1w --method gaussian --chunks 128 --shards 4\n"
               "  virtnii pyramid OUT --out s3://bucket/levels -s anon=true\n\n"
               "\n" + exit_status("every image was built (or already complete)",
                                  "some images failed, one line each on stderr (the manifest holds the others)"),
        parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p_pyramid.add_argument("--dask", metavar="ADDRESS", help="build the images on this Dask scheduler (its "
                                                             "workers must reach MANIFEST, the sources and --out)")
    p_pyramid.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _storage_arguments(p_pyramid)
    _trust_argument(p_pyramid)

    p_combine = commands.add_parser(
        "combine", help="merge manifests into one (images, whole datasets), nothing copied but gzip indexes",
        epilog="examples:\n  virtnii combine manifests/sub-01 manifests/sub-02 -o manifests/all\n"
               "  virtnii combine ds1 ds2 --prefix ds000001 --prefix ds000002 -o archive",
        parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter)
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
        parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter)
    p_export.add_argument("manifest")
    p_export.add_argument("image", nargs="?", help="image name (needed when the manifest holds several)")
    p_export.add_argument("--level", type=int, default=0, help="pyramid level (default: 0, the source's voxels)")
    p_export.add_argument("-o", "--out", required=True, help="file to write (.nii, or .nii.gz to compress)")
    p_export.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _storage_arguments(p_export)
    _trust_argument(p_export)

    p_serve = commands.add_parser(
        "serve", help="serve manifests over HTTP as plain Zarr, with an image listing and a viewer page",
        description="Serve every image of the manifests as a read-only Zarr store (/zarr/), exactly the "
                    "manifests' keys, .nii.gz chunks decoded on the fly, with the image listing at /api/images "
                    "and the viewer page at / (docs/serve.md).  Runs until Ctrl-C or SIGTERM (exit status 0).",
        epilog="examples:\n  virtnii serve manifests/ds000001 --open\n"
               "  virtnii serve manifests/ds1 manifests/ds2 --port 0      # one subgroup each; a free port\n"
               "  python -c 'import zarr; print(zarr.open_group(\"http://127.0.0.1:8000/zarr/\", mode=\"r\").attrs)'",
        parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter)
    p_serve.add_argument("manifests", nargs="+", metavar="MANIFEST")
    p_serve.add_argument("--host", default=DEFAULT_HOST,
                         help="address to listen on (default: %(default)s, this machine only; any other lets "
                              "everyone who reaches it read the images: there is no authentication)")
    p_serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s; 0 picks a "
                                                                        "free one)")
    p_serve.add_argument("--open", dest="open_browser", action="store_true", help="open the viewer page in a "
                                                                                  "web browser")
    _storage_arguments(p_serve)
    _trust_argument(p_serve)

    p_example = commands.add_parser("example", help="the whole job (scan, pyramid, export) on files shipped with "
                                                    "nibabel, each step checked",
                                    parents=[common])
    p_example.add_argument("-o", "--out", default="manifests/example", help="manifest folder (default: %(default)s)")
    return parser


def _human(nbytes: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    step = 0
    while nbytes >= 1024 and step < len(units) - 1:
        nbytes /= 1024
        step += 1
    return f"{nbytes:.0f} B" if step == 0 else f"{nbytes:.1f} {units[step]}"


def named_source(text: str) -> str | tuple[str, str]:
    """``(NAME, URL)`` for a ``NAME=URL`` argument, else ``text`` itself.

    A path or URL may hold ``=`` itself (``?X-Amz-Expires=300``, ``/data/a=b``), so the rule must not guess:
    ``NAME=URL`` only when the text before the first ``=`` has no ``://`` and the text after it has one.  A
    local file is named through its ``file://`` URL; the NAME is then checked like any given name.
    """
    name, sep, url = text.partition("=")
    return (name, url) if sep and "://" not in name and "://" in url else text


def cmd_scan(args: argparse.Namespace) -> int:
    storage, manifest_options = _options(args)
    sources = [named_source(text) for text in args.sources]
    if args.name is not None:
        if len(sources) != 1:
            raise ManifestError("--name", f"names the one file given, not {len(sources)}: give NAME=URL for each")
        if not isinstance(sources[0], str):
            raise ManifestError(args.sources[0], "is named twice: as NAME=URL and by --name")
        sources = [(args.name, sources[0])]
    result = scan(sources, args.out, zarr_format=args.zarr_format, ref_format=args.ref_format,
                  storage_options=storage, manifest_options=manifest_options, progress=not args.quiet,
                  content_hash=args.content_hash, extensions=args.extensions,
                  write_url_secrets=args.write_url_secrets, relative_sources=args.relative_sources,
                  pin_versions=args.pin_versions)
    for failure in result.failures:
        print(f"virtnii: error: {failure}", file=sys.stderr)
    if result.manifest is None:
        print("virtnii: nothing indexed, no manifest written", file=sys.stderr)
        return EXIT_NOTHING_DONE
    total = sum(image.nbytes for image in result.images)
    print(f"indexed {len(result.images)} image(s), {_human(total)} of voxels referenced in place -> {result.manifest}"
          + (f"; {len(result.failures)} source(s) failed" if result.failures else ""))
    return EXIT_SOURCES_FAILED if result.failures else EXIT_OK


def cmd_index(args: argparse.Namespace) -> int:
    storage, manifest_options = _options(args)
    result = index(args.root, args.out, pyramid=args.pyramid, derivatives=args.derivatives, workers=args.workers,
                   dask=args.dask, zarr_format=args.zarr_format, ref_format=args.ref_format,
                   extensions=args.extensions, storage_options=storage, manifest_options=manifest_options or None,
                   progress=not args.quiet, pin_versions=args.pin_versions)
    print(result.report.summary())
    if not result.images:
        print("virtnii: nothing indexed, no manifest written", file=sys.stderr)
        return EXIT_NOTHING_DONE
    return EXIT_SOURCES_FAILED if result.skipped else EXIT_OK


def cmd_find(args: argparse.Namespace) -> int:
    from .bids.query import matching

    storage, _ = _options(args)
    for row in matching(args.manifest, storage, **{key: value.split(",") for key, value in args.entities}):
        print(json.dumps(row) if args.json else row["name"])
    return EXIT_OK


def print_info(manifest: str, manifest_options: dict[str, Any]) -> None:
    index = read_index(manifest, manifest_options)
    base = manifest_url(manifest, manifest_options)
    images = index.images
    print(f"manifest {manifest}: {len(images)} image(s), Zarr v{index.zarr_format}, references {index.references}")
    width = max((len(image.name) for image in images), default=4)
    print(f"  {'name':<{width}}  {'axes':<5} {'shape':<22} {'dtype':<10} {'chunks':<22} {'bytes':>10}  source")
    for image in images:
        dtype = image.dtype if isinstance(image.dtype, str) else "rgb" + str(8 * len(image.dtype))
        gz = " (gzip index)" if image.gzip_index else ""
        gz += f" (version {image.fingerprint[versions.VERSION]})" if versions.VERSION in image.fingerprint else ""
        print(f"  {image.name:<{width}}  {image.axes:<5} {_dims(image.shape):<22} {dtype:<10} "
              f"{_dims(image.chunks):<22} {_human(image.nbytes):>10}  {redact(image.resolved(base).source)}{gz}")
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
    storage, manifest_options = _options(args)
    # as virtnii.open reads it: a remote manifest with the storage options unless -m says otherwise
    print_info(args.manifest, manifest_options_for(args.manifest, manifest_options or None, storage))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    storage, manifest_options = _options(args)
    checked, problems = verify(args.manifest, manifest_options or None, content=args.content, **storage)
    for problem in problems:
        print(f"virtnii: error: {problem}", file=sys.stderr)
    damaged = sum(isinstance(problem, ManifestError) for problem in problems)
    print(f"{checked - len(problems) + damaged} of {checked} source file(s) unchanged since indexing"
          + (" (content compared)" if args.content else "")
          + (f"; {damaged} problem(s) with the manifest itself" if damaged else ""))
    return EXIT_SOURCES_FAILED if problems else EXIT_OK


def cmd_pyramid(args: argparse.Namespace) -> int:
    storage, manifest_options = _options(args)
    result = build_pyramids(args.manifest, args.images, method=args.method, levels=args.levels, chunks=args.chunks,
                            shards=args.shards, codec=args.codec, out=args.out,
                            manifest_options=manifest_options or None, progress=not args.quiet,
                            allow_local_sources=args.allow_local_sources, dask=args.dask, **storage)
    for failure in result.failures:
        print(f"virtnii: error: {failure}", file=sys.stderr)
    written = sum(e.pyramid.stored_bytes for e in result.images if e.pyramid and e.name in result.built)
    print(f"pyramid: {len(result.built)} image(s) built ({_human(written)} written), {len(result.reused)} already "
          f"complete, {len(result.failures)} failed -> {args.manifest}")
    if result.failures:
        return EXIT_NOTHING_DONE if not (result.built or result.reused) else EXIT_SOURCES_FAILED
    return EXIT_OK


def cmd_combine(args: argparse.Namespace) -> int:
    options = dict(args.manifest_options)
    index = combine(args.manifests, args.out, prefixes=args.prefixes, ref_format=args.ref_format,
                    manifest_options=options or None, out_options=options or None)
    print(f"combined {len(args.manifests)} manifest(s): {len(index.images)} image(s) -> {args.out}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    storage, manifest_options = _options(args)
    with tqdm(unit="B", unit_scale=True, desc="export", disable=args.quiet) as bar:
        export(args.manifest, args.out, args.image, level=args.level, manifest_options=manifest_options or None,
               progress=bar.update, allow_local_sources=args.allow_local_sources, **storage)
    print(f"exported {args.image or 'the image'} level {args.level} -> {args.out}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from .server import Store, serve

    storage, manifest_options = _options(args)
    store = Store(args.manifests, storage_options=storage, manifest_options=manifest_options or None,
                  allow_local_sources=args.allow_local_sources)
    count = len(store.images)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormatter())
    logger = logging.getLogger("virtnii.server")
    logger.addHandler(handler)
    try:
        serve(store, args.host, args.port, open_browser=args.open_browser,
              ready=lambda url: print(f"serving {count} image(s) of {len(args.manifests)} manifest(s) at {url} "
                                      "(Ctrl-C to stop)", flush=True))
    finally:
        logger.removeHandler(handler)
    print("virtnii: stopped", file=sys.stderr)
    return EXIT_OK


class _LogFormatter:
    """``virtnii: warning: …`` lines, as the other commands print their errors."""

    def format(self, record: Any) -> str:
        return f"virtnii: {record.levelname.lower()}: {record.getMessage()}"


def cmd_example(args: argparse.Namespace) -> int:
    from .example import run

    result, ok = run(args.out)
    for failure in result.failures:
        print(f"virtnii: error: {failure}", file=sys.stderr)
    if result.manifest is None:
        return EXIT_NOTHING_DONE
    print_info(args.out, {})
    return EXIT_OK if ok and not result.failures else EXIT_SOURCES_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every outcome is an exit code and at most a few lines on stderr, never a traceback
    (unless --debug or VIRTNII_DEBUG asks for one of an internal error)."""
    args = build_parser().parse_args(argv)
    handler = {"scan": cmd_scan, "index": cmd_index, "find": cmd_find, "info": cmd_info, "verify": cmd_verify, "pyramid": cmd_pyramid,
               "combine": cmd_combine, "export": cmd_export, "serve": cmd_serve, "example": cmd_example}[args.command]
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    written = f": {args.out} was left as it was (a manifest is put in place only once complete)" \
        if args.command in ("scan", "example") else ""
    try:
        return handler(args)
    except VirtniiError as err:
        print(f"virtnii: error: {err}", file=sys.stderr)
        return EXIT_NOTHING_DONE
    except _Terminated:
        print(f"virtnii: terminated{written}", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"virtnii: interrupted{written}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `virtnii info OUT | head`: the reader has what it wanted
        # Python flushes stdout again at exit, into the closed pipe: point it at /dev/null first
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as err:  # a bug: exit 3, so that it is never taken for "some sources failed" (1)
        if args.debug or os.environ.get(DEBUG_VARIABLE):
            traceback.print_exc()
        print(f"virtnii: internal error: {type(err).__name__}: {err} -- a bug in virtnii, please report it "
              f"(run with --debug or {DEBUG_VARIABLE}=1 for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL_ERROR
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
