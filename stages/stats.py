"""Stage stats: per-channel mean/std of the TRAIN subset at the training image size (val and test never leak in)."""

import inatpipe.startup  # noqa: F401  (first of the library: see its docstring)
from inatpipe.cores import loader_workers
from inatpipe.data.stats import compute_stats, write_stats
from inatpipe.errors import exit_on_user_error
from inatpipe.params import Params, load_params
from inatpipe.paths import PREPARED_DIR, STATS_FILE


def run(p: Params) -> None:
    stats = compute_stats(PREPARED_DIR, p.data.image_size, loader_workers())  # same stats for any worker count
    write_stats(stats, STATS_FILE)
    print(f"mean {[round(m, 4) for m in stats['mean']]}  std {[round(s, 4) for s in stats['std']]} -> {STATS_FILE}")


if __name__ == "__main__":
    exit_on_user_error(lambda: run(load_params()))
