"""Stage prepare: decode every image of train, val and test once, into memory-mapped uint8 arrays that every later
stage reads instead of the JPEGs. Its only param is data.image_size, so experiments on the model or the training
recipe reuse it; it decodes with as many processes as the cores allow (the output does not depend on how many)."""

import inatpipe.startup  # noqa: F401  (first of the library: see its docstring)
from inatpipe.cores import loader_workers
from inatpipe.data.index import read_classes, read_index
from inatpipe.data.prepared import SUBSETS, prepare
from inatpipe.errors import exit_on_user_error
from inatpipe.params import Params, load_params
from inatpipe.paths import PREPARED_DIR, SPLIT_DIR


def run(p: Params) -> None:
    classes = read_classes(SPLIT_DIR / "classes.json")
    indexes = {name: read_index(SPLIT_DIR / f"{name}.csv") for name in SUBSETS}
    meta = prepare(indexes, classes, p.data.image_size, PREPARED_DIR, loader_workers())
    counts = ", ".join(f"{n} {name}" for name, n in meta["counts"].items())
    print(f"{counts} images at {meta['side']}x{meta['side']} -> {PREPARED_DIR}/")


if __name__ == "__main__":
    exit_on_user_error(lambda: run(load_params()))
