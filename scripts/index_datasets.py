"""Index a list of BIDS datasets, one manifest each, plus a catalogue of every image: an archive as a batch job.

The list is a text file of dataset roots, one per line (``s3://openneuro.org/ds000117``, local folders; ``#``
starts a comment).  Each dataset goes to ``OUT/<its last path part>`` through ``virtnii.index``, so each one is
resumable on its own: a re-run of a killed job lists the finished datasets, finds nothing changed and goes on
to the next.  One progress display counts datasets, images and bytes referenced, with an ETA over datasets.
A dataset that cannot be indexed at all (gone, no permission) is reported and the job goes on.  At the end
``OUT/catalogue.parquet`` holds one row per image of every manifest (``virtnii.table`` of them all), which
answers archive-wide queries without opening any manifest.

Run: ``python scripts/index_datasets.py LIST -o OUT [--anon] [--pyramid] [--derivatives] [--dask ADDRESS]``.
"""

from __future__ import annotations

import argparse
import posixpath
import sys
from pathlib import Path

from tqdm.auto import tqdm

import virtnii

CATALOGUE = "catalogue.parquet"


def datasets(listing: Path) -> list[str]:
    """The roots named in a list file (blank lines and ``#`` comments skipped)."""
    roots = [line.split("#", 1)[0].strip() for line in listing.read_text().splitlines()]
    return [root.rstrip("/") for root in roots if root]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("list", type=Path, help="text file: one dataset root (folder or URL) per line")
    parser.add_argument("-o", "--out", required=True, help="folder of the manifests (one per dataset)")
    parser.add_argument("--anon", action="store_true", help="anonymous access (public buckets such as OpenNeuro)")
    parser.add_argument("--pyramid", action="store_true", help="build pyramid levels too")
    parser.add_argument("--derivatives", action="store_true", help="index derivatives/ too")
    parser.add_argument("--dask", metavar="ADDRESS", help="run every dataset's batches on this Dask scheduler")
    args = parser.parse_args(argv)
    roots = datasets(args.list)
    names = [posixpath.basename(root) for root in roots]
    if len(set(names)) != len(names):
        parser.error("two datasets share a last path part; their manifests would collide")
    options = {"anon": True} if args.anon else {}
    client = None
    if args.dask:
        import distributed

        client = distributed.Client(args.dask)
    manifests, failed = [], []
    images = referenced = 0
    with tqdm(total=len(roots), unit="dataset", desc="datasets") as bar:
        for root, name in zip(roots, names):
            out = f"{args.out.rstrip('/')}/{name}"
            try:
                result = virtnii.index(root, out, pyramid=args.pyramid, derivatives=args.derivatives,
                                       dask=client, storage_options=options)
            except virtnii.VirtniiError as err:
                failed.append(f"{root}: {err}")
                tqdm.write(f"virtnii: error: {err}", file=sys.stderr)
            else:
                report = result.report
                if result.images:
                    manifests.append(out)
                images += report.images
                referenced += report.bytes_referenced
                tqdm.write(f"{name}: {report.images} image(s), {report.indexed} read, {report.reused} unchanged, "
                           f"{len(report.skipped)} skipped, {report.seconds:.1f} s")
            bar.update(1)
            bar.set_postfix_str(f"{images} images, {referenced / 1e9:.2f} GB referenced", refresh=False)
    if client is not None:
        client.close()
    if manifests:
        catalogue = f"{args.out.rstrip('/')}/{CATALOGUE}"
        virtnii.table(manifests).to_parquet(catalogue) if "://" not in catalogue else \
            virtnii.table(manifests).to_parquet(catalogue, storage_options=options)
        print(f"{len(manifests)} manifest(s), {images} image(s) -> {catalogue}")
    for line in failed:
        print(f"failed: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
