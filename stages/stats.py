"""Stage stats: per-channel mean/std of the TRAIN subset at the training image size (val and test never leak in)."""

from inatpipe.data.stats import compute_stats, write_stats
from inatpipe.errors import exit_on_user_error
from inatpipe.params import load_params
from inatpipe.paths import PREPARED_DIR, STATS_FILE
from inatpipe.runtime import resolve_num_workers


def main() -> None:
    p = load_params()
    stats = compute_stats(PREPARED_DIR, p.data.image_size, resolve_num_workers(p.data.num_workers))
    write_stats(stats, STATS_FILE)
    print(f"mean {[round(m, 4) for m in stats['mean']]}  std {[round(s, 4) for s in stats['std']]} -> {STATS_FILE}")


if __name__ == "__main__":
    exit_on_user_error(main)
