"""Build the embedded CIFAR-10 sample (data/sample/) from a real CIFAR-10 archive.

Takes the first N images of every official batch file, keeps the official "python version" layout and
writes a byte-reproducible .tar.gz (fixed mtimes and owners, gzip without a timestamp), then prints its md5
for ``vitlab/data/sources.py``. Run once by a maintainer; the pipeline never calls it:

    python tools/make_sample.py ../shared/data/cifar-10-subset-python.tar.gz data/sample \
        --train-per-batch 450 --test 500
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import pickle
import tarfile
from pathlib import Path

FOLDER = "cifar-10-batches-py"
TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


def _load(tar: tarfile.TarFile, name: str) -> dict:
    member = tar.extractfile(f"{FOLDER}/{name}")
    assert member is not None, name
    return pickle.load(
        member, encoding="latin1"
    )  # a trusted maintainer's archive; the pipeline never does this


class _Python2Pickler(pickle._Pickler):
    """Writes str and bytes as protocol-2 BINSTRING, as the official Python 2 pickles do.

    Python 3's pickler would encode bytes through ``_codecs.encode``, a global the official files never
    name and the pipeline's restricted unpickler therefore refuses.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def save_binstring(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + len(data).to_bytes(4, "little") + data)
        self.memoize(obj)

    dispatch[str] = save_binstring
    dispatch[bytes] = save_binstring


def _dumps(obj: dict) -> bytes:
    out = io.BytesIO()
    _Python2Pickler(out, protocol=2).dump(obj)
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(f"{FOLDER}/{name}")
    info.size, info.mtime, info.mode = len(payload), 1262304000, 0o644
    tar.addfile(info, io.BytesIO(payload))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train-per-batch", type=int, default=450)
    parser.add_argument("--test", type=int, default=500)
    args = parser.parse_args()

    raw = io.BytesIO()
    with (
        tarfile.open(args.source, "r:gz") as src,
        tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as dst,
    ):
        meta = src.extractfile(f"{FOLDER}/batches.meta")
        assert meta is not None
        _add(dst, "batches.meta", meta.read())
        for name, count in [*((n, args.train_per_batch) for n in TRAIN), ("test_batch", args.test)]:
            batch = _load(src, name)
            small = {
                "batch_label": batch["batch_label"],
                "labels": batch["labels"][:count],
                "data": batch["data"][:count],
            }
            _add(dst, name, _dumps(small))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / "cifar-10-sample-python.tar.gz"
    with open(out, "wb") as handle, gzip.GzipFile(fileobj=handle, mode="wb", mtime=0, filename="") as gz:
        gz.write(raw.getvalue())
    print(out, out.stat().st_size, "bytes, md5", hashlib.md5(out.read_bytes()).hexdigest())


if __name__ == "__main__":
    main()
